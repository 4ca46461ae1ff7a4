"""The whole patch against the official algorithm (tests/official.py), end to end on a UNet."""
import copy

import pytest
import torch

import agentsd
import official
import tiny


def unet_outputs(unet, sample, timestep):
    text = torch.randn(sample.shape[0], 77, 32, generator=torch.Generator().manual_seed(1), dtype=sample.dtype)
    with torch.no_grad():
        return unet(sample, timestep, text).sample


@pytest.mark.parametrize(
    "case,settings,official_settings",
    [
        # agent phase of the default recipe: 4x4 cells, 16 agents of 256 tokens, 154 merged tokens
        ("agent", dict(agent_fraction=1.0), dict(ratio=0.4, agent_ratio=0.95, sx=4, sy=4)),
        # ToMe phase: 2x2 cells; the official recipe passes agent_ratio 0.5, which the rule rejects
        ("tome", dict(agent_fraction=0.0), dict(ratio=0.4, agent_ratio=0.5, sx=2, sy=2)),
        # agents that do not pay (2 * 102 >= 128 merged tokens): plain attention on merged tokens
        ("fallback", dict(agent_fraction=1.0, ratio=0.5, agent_ratio=0.6, sx=2, sy=2),
         dict(ratio=0.5, agent_ratio=0.6, sx=2, sy=2)),
    ],
)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("hw", [(16, 16), (12, 20)])
def test_patch_equals_official_algorithm(case, settings, official_settings, batch, hw):
    unet = tiny.unet("sd1").double()
    reference = copy.deepcopy(unet)
    official.patch_official(reference, hw, **official_settings)
    agentsd.apply_patch(unet, use_rand=False, **settings)
    sample = torch.randn(batch, 4, *hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = unet_outputs(tiny.unet("sd1").double(), sample, 999)
    ours, theirs = unet_outputs(unet, sample, 999), unet_outputs(reference, sample, 999)
    assert (theirs - plain).abs().max() > 1e-3  # the reference does change the output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_matching_on_the_block_input_not_on_norm1():
    """Matching after norm1 (what an attention processor alone sees) gives other merges."""
    unet = tiny.unet("sd1").double()
    sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    agentsd.apply_patch(unet, use_rand=False, agent_fraction=1.0)
    ours = unet_outputs(unet, sample, 999)
    # a reference that matches on norm1(x) instead
    reference = tiny.unet("sd1").double()
    official.patch_official(reference, (16, 16), ratio=0.4, agent_ratio=0.95, sx=4, sy=4)
    original = official.OfficialMerge.__init__

    def match_on_norm1(self, x, *args):
        original(self, torch.nn.functional.layer_norm(x, x.shape[-1:]), *args)

    official.OfficialMerge.__init__ = match_on_norm1
    try:
        shifted = unet_outputs(reference, sample, 999)
    finally:
        official.OfficialMerge.__init__ = original
    assert (ours - shifted).abs().max() > 1e-6
