"""``reduction="pool"`` against its plain reference (tests/pooled.py), end to end on a UNet."""
import copy

import numpy as np
import pytest
import torch

import agentsd
import pooled
import tiny
from agentsd.pool import CellPool


def unet_outputs(unet, sample, timestep):
    text = torch.randn(sample.shape[0], 77, 32, generator=torch.Generator().manual_seed(1), dtype=sample.dtype)
    with torch.no_grad():
        return unet(sample, timestep, text).sample


@pytest.mark.parametrize("phase,agents", [("agent", True), ("late", False)])
@pytest.mark.parametrize("ratio", [0.4, 0.75])  # 0.75 halves each side exactly; 0.4 pools adaptively
@pytest.mark.parametrize("mode", ["mean", "nearest"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("hw", [(16, 16), (12, 20)])
def test_pool_equals_its_reference(phase, agents, ratio, mode, batch, hw):
    unet = tiny.unet("sd1").double()
    reference = copy.deepcopy(unet)
    sx = sy = 4 if agents else 2
    pooled.patch_pooled(reference, hw, ratio=ratio, sx=sx, sy=sy, agents=agents, mode=mode)
    agentsd.apply_patch(unet, ratio=ratio, reduction="pool", pool_mode=mode,
                        agent_fraction=1.0 if agents else 0.0)
    sample = torch.randn(batch, 4, *hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = unet_outputs(tiny.unet("sd1").double(), sample, 999)
    ours, theirs = unet_outputs(unet, sample, 999), unet_outputs(reference, sample, 999)
    assert (theirs - plain).abs().max() > 1e-3  # the reference does change the output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("h,w,gh,gw", [(16, 16, 8, 8), (16, 16, 12, 12), (12, 20, 4, 5), (7, 9, 3, 4)])
@pytest.mark.parametrize("mode", ["mean", "nearest"])
def test_cell_pool_matches_pooling_matrices(h, w, gh, gw, mode):
    x = torch.randn(2, h * w, 5, dtype=torch.float64)
    pool = CellPool(h, w, gh, gw, mode)
    expected = torch.einsum("mn,bnc->bmc", pooled.pool_matrix(h, w, gh, gw, mode), x)
    torch.testing.assert_close(pool.merge(x), expected, rtol=0, atol=1e-12)
    y = torch.randn(2, gh * gw, 5, dtype=torch.float64)
    torch.testing.assert_close(pool.unmerge(y), torch.einsum("nm,bmc->bnc", pooled.upsample_matrix(h, w, gh, gw), y))


def test_pool_phases_on_a_pipeline_and_exact_removal():
    pipe = tiny.sd_pipeline()
    run = lambda: pipe("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                       height=64, width=64, output_type="np").images
    plain = run()
    with agentsd.patched(pipe, reduction="pool"):
        pool = run()
    with agentsd.patched(pipe, reduction="pool", tome_reduction="merge"):
        mixed = run()
    with agentsd.patched(pipe):
        merge = run()
    assert np.array_equal(run(), plain)
    for a, b in ((pool, plain), (pool, merge), (mixed, pool), (mixed, merge)):
        assert np.abs(a - b).max() > 1e-4


def test_pool_keywords_are_checked():
    unet = tiny.unet("sd1")
    with pytest.raises(ValueError, match="reduction must be one of 'merge', 'pool'"):
        agentsd.apply_patch(unet, reduction="downsample")
    with pytest.raises(ValueError, match="pool_mode must be one of 'mean', 'nearest'"):
        agentsd.apply_patch(unet, reduction="pool", pool_mode="max")
    with pytest.raises(ValueError, match="merge_crossattn needs merged tokens"):
        agentsd.apply_patch(unet, reduction="pool", merge_crossattn=True)
    agentsd.apply_patch(unet, reduction="pool", tome_reduction="merge", merge_mlp=True)  # the late phase merges
    assert not agentsd.is_patched(tiny.unet("sd1"))
