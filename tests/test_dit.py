"""AgentSD on diffusion transformers (PixArt-α/Σ, SD3/SD3.5): held to the plain reference of
tests/dit_reference.py end to end, and everything the UNet path promises."""
import copy
import logging
import pickle
import threading

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel, SanaTransformer2DModel
from torch._dynamo.utils import counters

import agentsd
import dit_reference
import tiny

FAMILIES = {"pixart": (tiny.pixart_transformer, dit_reference.patch_pixart),
            "sd3": (tiny.sd3_transformer, dit_reference.patch_sd3)}


def call(transformer, sample, t=999.0, seed=1):
    """One call of the transformer with random conditions."""
    g = torch.Generator().manual_seed(seed)
    b, dtype = sample.shape[0], sample.dtype
    timestep = torch.full((b,), t, dtype=dtype)
    with torch.no_grad():
        if isinstance(transformer, agentsd.models.PixArtTransformer2DModel):
            text = torch.randn(b, 8, 32, generator=g, dtype=dtype)
            return transformer(sample, encoder_hidden_states=text, timestep=timestep,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        text, pooled = torch.randn(b, 8, 32, generator=g, dtype=dtype), torch.randn(b, 64, generator=g, dtype=dtype)
        return transformer(sample, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep).sample


def latents(batch, hw, dtype=torch.float64):
    return torch.randn(batch, 4, *hw, generator=torch.Generator().manual_seed(0), dtype=dtype)


# ----------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("reduction,agents,settings", [
    ("merge", True, dict(ratio=0.4, sx=2, sy=2, agent_ratio=0.8)),  # agents: 1 of 4 tokens, merged 0.4
    ("merge", False, dict(ratio=0.4, sx=2, sy=2)),  # the late phase: ToMe
    ("pool", True, dict(ratio=0.75, sx=2, sy=2)),  # agents per 2x2 cell, keys and values pooled 2x2
    ("pool", False, dict(ratio=0.75, sx=2, sy=2)),  # the late phase: ToDo-like
])
@pytest.mark.parametrize("batch,hw", [(1, (16, 16)), (2, (12, 20))])
def test_patched_transformer_equals_the_reference(family, reduction, agents, settings, batch, hw):
    build, patch_reference = FAMILIES[family]
    transformer, reference = build().double(), build().double()
    sample = latents(batch, hw)
    plain = call(transformer, sample)
    size = (hw[0] // transformer.config.patch_size * transformer.config.patch_size,
            hw[1] // transformer.config.patch_size * transformer.config.patch_size)
    patch_reference(reference, dit_reference.Reference(size, reduction, agents, **settings))
    phase = dict(agent_fraction=1.0) if agents else dict(agent_fraction=0.0, tome_ratio=settings["ratio"],
                                                         tome_sx=settings["sx"], tome_sy=settings["sy"])
    extra = dict(agent_ratio=settings["agent_ratio"]) if "agent_ratio" in settings else {}
    agentsd.apply_patch(transformer, reduction=reduction, ratio=settings["ratio"], sx=settings["sx"],
                        sy=settings["sy"], use_rand=False, **phase, **extra)
    ours, theirs = call(transformer, sample), call(reference, sample)
    assert (theirs - plain).abs().max() > 1e-3  # the reference does change the output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- the pipelines
@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_pipelines_patch_remove_and_follow_the_timestep(family):
    make, prompt = {"pixart": (tiny.pixart_pipeline, tiny.pixart_prompt), "sd3": (tiny.sd3_pipeline, tiny.sd3_prompt)}[family]
    pipe = make()

    def run(**kwargs):
        return pipe(**prompt(), generator=torch.Generator().manual_seed(0), num_inference_steps=6, height=64,
                    width=64, output_type="np", **kwargs).images

    plain = run()
    agentsd.apply_patch(pipe)
    phases = tiny.record_phases(pipe)
    patched = run()
    timesteps = pipe.scheduler.timesteps.tolist()
    assert phases == ["agent" if t >= 600 else "late" for t in timesteps] and "agent" in phases
    assert np.abs(patched - plain).max() > 1e-3
    pipe.transformer._forward_pre_hooks.popitem()
    agentsd.remove_patch(pipe)
    assert np.array_equal(run(), plain)
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in pipe.transformer.modules())


def test_skip_ends_and_what_is_patched_is_logged(caplog):
    transformer = tiny.pixart_transformer(num_layers=5)
    with caplog.at_level(logging.INFO, logger="agentsd"):
        agentsd.apply_patch(transformer, skip_ends=1)
    assert "AgentSD on 3 PixArtTransformer2DModel blocks at downsampling [2] (transformer_blocks.1, " \
           "transformer_blocks.2, transformer_blocks.3)" in caplog.text
    hooked = [name for name, m in transformer.named_modules() if hasattr(m, "_diffusers_hook")]
    assert hooked == [f"transformer_blocks.{i}{layer}" for i in (1, 2, 3) for layer in ("", ".attn1")]
    with pytest.raises(ValueError, match="skip_ends=3 leaves none of the 5 blocks patched; use at most 2"):
        agentsd.apply_patch(transformer, skip_ends=3)
    assert agentsd.patch_config(transformer).skip_ends == 1  # the earlier patch is untouched


def test_sd3_patches_joint_attention_and_sd35s_attn2():
    transformer = tiny.sd3_transformer(dual=True)
    agentsd.apply_patch(transformer)
    hooked = {name for name, m in transformer.named_modules() if hasattr(m, "_diffusers_hook")}
    assert {"transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.2.attn"} <= hooked
    assert "transformer_blocks.2.attn2" not in hooked  # only the dual-attention blocks have one


def test_settings_a_family_does_not_have_are_refused():
    sd3, pixart = tiny.sd3_transformer(), tiny.pixart_transformer()
    with pytest.raises(ValueError, match="merge_crossattn: SD3's blocks have no cross-attention"):
        agentsd.apply_patch(sd3, reduction="merge", merge_crossattn=True)
    with pytest.raises(ValueError, match="max_downsample chooses a UNet level"):
        agentsd.apply_patch(pixart, max_downsample=1)
    assert not agentsd.is_patched(sd3) and not agentsd.is_patched(pixart)


@pytest.mark.parametrize("model", [
    lambda: FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
    lambda: SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
                                   attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                   cross_attention_dim=8, caption_channels=8, sample_size=8),
], ids=["flux", "sana"])
def test_unsupported_transformers_name_what_is_supported(model):
    with pytest.raises(TypeError, match="PixArtTransformer2DModel .PixArt-α, PixArt-Σ., SD3Transformer2DModel"):
        agentsd.apply_patch(model())


# ----------------------------------------------------------------------------- what the UNet path promises
@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_crossattn_and_mlp_copies_and_removal(family):
    build = FAMILIES[family][0]
    transformer = build()
    sample = latents(2, (16, 16), torch.float32)
    plain = call(transformer, sample)
    options = dict(reduction="merge", merge_mlp=True)
    if family != "sd3":  # SD3 has no cross-attention
        options["merge_crossattn"] = True
    agentsd.apply_patch(transformer, agent_fraction=1.0, **options)
    patched = call(transformer, sample)
    assert (patched - plain).abs().max() > 1e-3
    for twin in (copy.deepcopy(transformer), pickle.loads(pickle.dumps(transformer))):
        assert torch.equal(call(twin, sample), patched)
        with torch.no_grad():
            for param in twin.parameters():
                param.mul_(0.5)
        assert not torch.equal(call(twin, sample), patched)
    agentsd.remove_patch(transformer)
    assert torch.equal(call(transformer, sample), plain)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_threads_get_what_each_gets_alone(family):
    transformer = FAMILIES[family][0]()
    agentsd.apply_patch(transformer, ratio=0.5)
    calls = {"a": (latents(2, (16, 16), torch.float32), 999.0), "b": (latents(2, (16, 16), torch.float32) * 2, 700.0)}
    alone = {name: call(transformer, *args) for name, args in calls.items()}
    barrier = threading.Barrier(2)
    ff = transformer.transformer_blocks[0].ff

    def meet(module, args):
        barrier.wait(timeout=30)

    handle = ff.register_forward_pre_hook(meet)
    together = {}
    threads = [threading.Thread(target=lambda n=name: together.__setitem__(n, call(transformer, *calls[n])))
               for name in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    handle.remove()
    assert all(torch.equal(together[name], alone[name]) for name in calls)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_regional_compile_without_graph_breaks_one_graph_per_phase(family, fresh_dynamo):
    transformer = FAMILIES[family][0]()
    agentsd.apply_patch(transformer, ratio=0.5)
    sample = latents(2, (16, 16), torch.float32)
    eager = [call(transformer, sample, t) for t in (999.0, 300.0)]
    for block in transformer.transformer_blocks:  # compile_repeated_blocks (PixArt does not list its blocks)
        block.compile(fullgraph=True, backend="aot_eager")
    compiled = [call(transformer, sample, t) for t in (999.0, 300.0)]
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    graphs = counters["stats"]["unique_graphs"]
    assert sum(counters["graph_break"].values()) == 0
    for t in (998.0, 997.0, 200.0):  # other steps of both phases: no new graph
        call(transformer, sample, t)
    assert counters["stats"]["unique_graphs"] == graphs
