"""The patch on every supported pipeline: behaviour, phases, restoration and errors."""
import logging

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from PIL import Image

import agentsd

import tiny


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("height", 64)
    kwargs.setdefault("width", 64)
    out = pipe("a red circle", generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    return out.images


def module_state(unet):
    """What the patch could leave behind: every module's attributes, hooks and processor."""
    return {name: (dict(m.__dict__), dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in unet.named_modules()}


def same_state(before, after):
    assert before.keys() == after.keys()
    for name in before:
        (attrs, pre, post), (attrs2, pre2, post2) = before[name], after[name]
        assert attrs.keys() == attrs2.keys(), (name, set(attrs) ^ set(attrs2))
        assert all(attrs[k] is attrs2[k] for k in attrs), name
        assert pre == pre2 and post == post2, name


@pytest.fixture(scope="module")
def sd1():
    return tiny.sd_pipeline("sd1")


# ----------------------------------------------------------------------------- restoration
@pytest.mark.parametrize("options", [{}, dict(merge_crossattn=True, merge_mlp=True)])
def test_remove_restores_exactly_including_custom_processors(sd1, options):
    pipe = sd1
    custom = AttnProcessor()  # a user-chosen processor on one self-attention
    pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.set_processor(custom)
    before = dict(pipe.unet.attn_processors)
    state = module_state(pipe.unet)
    reference = run(pipe)

    agentsd.apply_patch(pipe, ratio=0.5, **options)
    patched = run(pipe)
    assert not np.array_equal(patched, reference)
    during = pipe.unet.attn_processors  # the processors are the user's, before and during the patch
    assert during.keys() == before.keys() and all(during[k] is before[k] for k in before)

    agentsd.remove_patch(pipe)
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    same_state(state, module_state(pipe.unet))
    assert np.array_equal(run(pipe), reference)  # bit for bit
    pipe.unet.set_attn_processor(AttnProcessor2_0())


def test_second_apply_replaces_first_and_remove_on_unpatched_is_noop(sd1):
    pipe = sd1
    state = module_state(pipe.unet)
    agentsd.remove_patch(pipe)  # not patched: nothing happens
    same_state(state, module_state(pipe.unet))
    agentsd.apply_patch(pipe, ratio=0.2)
    agentsd.apply_patch(pipe, ratio=0.3, sx=2, sy=2)
    assert agentsd.patch_config(pipe).ratio == 0.3 and len(pipe.unet._forward_pre_hooks) == 1
    for hook in tiny.self_attention_hooks(pipe.unet).values():  # one hook per layer, no nesting
        registry = pipe.unet.get_submodule(hook.name)._diffusers_hook
        assert registry._hook_order == ["agentsd.self_attention"]
    twice = run(pipe)
    agentsd.remove_patch(pipe)
    agentsd.apply_patch(pipe, ratio=0.3, sx=2, sy=2)
    assert np.array_equal(run(pipe), twice)
    agentsd.remove_patch(pipe)
    same_state(state, module_state(pipe.unet))
    assert not agentsd.is_patched(pipe)


def test_context_manager_restores_even_on_error(sd1):
    reference = run(sd1)
    with agentsd.patched(sd1, ratio=0.4) as p:
        assert agentsd.is_patched(p)
        assert not np.array_equal(run(p), reference)
    assert not agentsd.is_patched(sd1)
    with pytest.raises(RuntimeError):
        with agentsd.patched(sd1):
            raise RuntimeError("boom")
    assert not agentsd.is_patched(sd1)
    assert np.array_equal(run(sd1), reference)


def test_nested_context_managers_give_the_earlier_patch_back(sd1):
    agentsd.apply_patch(sd1, ratio=0.3, seed=3)
    earlier, images = agentsd.patch_config(sd1), run(sd1)
    with agentsd.patched(sd1, reduction="pool"):
        with agentsd.patched(sd1, ratio=0.5):
            assert agentsd.patch_config(sd1).ratio == 0.5
        assert agentsd.patch_config(sd1).reduction == "pool"
    assert agentsd.patch_config(sd1) == earlier and np.array_equal(run(sd1), images)
    agentsd.remove_patch(sd1)


# ----------------------------------------------------------------------------- behaviour
def test_seeded_determinism(sd1):
    with agentsd.patched(sd1, seed=1):
        a, b = run(sd1), run(sd1)
    with agentsd.patched(sd1, seed=2):
        c = run(sd1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_same_merge_for_every_batch_element_and_cfg_half():
    unet = tiny.unet("sd1")
    agentsd.apply_patch(unet, ratio=0.5, agent_fraction=1.0)
    sample = torch.randn(1, 4, 16, 16).repeat(2, 1, 1, 1)
    text = torch.randn(1, 77, 32).repeat(2, 1, 1)
    with torch.no_grad():
        out = unet(sample, 999, text).sample
    assert torch.equal(out[0], out[1])


def test_zero_ratio_means_no_token_merging():
    unet = tiny.unet("sd1")
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        plain = unet(sample, 100, text).sample
        agentsd.apply_patch(unet, ratio=0.0)
        tome_phase = unet(sample, 100, text).sample  # late step, ratio 0: plain attention
        agent_phase = unet(sample, 999, text).sample  # early step: agents, no token merging
    torch.testing.assert_close(tome_phase, plain, rtol=0, atol=0)
    assert not torch.allclose(agent_phase, plain)


def test_gradients_flow_through_merge_and_agents():
    unet = tiny.unet("sd1").train()
    agentsd.apply_patch(unet, agent_fraction=1.0)
    unet(torch.randn(2, 4, 16, 16), 500, torch.randn(2, 77, 32)).sample.square().mean().backward()
    attn1 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    for proj in (attn1.to_q, attn1.to_k, attn1.to_v, attn1.to_out[0]):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_use_rand_and_odd_batches():
    unet = tiny.unet("sd1")
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)

    def out(batch, **settings):
        agentsd.apply_patch(unet, agent_fraction=1.0, **settings)
        with torch.no_grad():
            return unet(sample[:batch], 999, text[:batch]).sample

    assert not torch.equal(out(2), out(2, use_rand=False))
    assert not torch.equal(out(2, seed=1), out(2, seed=2))
    # by default an image does not depend on its batch: the same random dst alone (up to float
    # reordering of a batched matmul)
    torch.testing.assert_close(out(1), out(2)[:1], atol=1e-5, rtol=0)
    assert (out(1) - out(1, use_rand=False)).abs().max() > 1e-3
    assert not torch.equal(out(1, seed=1), out(1, seed=2))
    # the official rule, kept as an option: an odd batch takes the top-left dst, as with use_rand=False
    official = dict(top_left_for_odd_batches=True)
    assert torch.equal(out(1, **official), out(1, use_rand=False))
    assert torch.equal(out(1, seed=1, **official), out(1, seed=2, **official))
    assert torch.equal(out(2, **official), out(2))


@pytest.mark.parametrize("option", ["merge_crossattn", "merge_mlp"])
def test_merge_crossattn_and_mlp_change_output_and_are_removed_exactly(sd1, option):
    reference = run(sd1)
    processors = dict(sd1.unet.attn_processors)
    with agentsd.patched(sd1, agent_fraction=1.0):
        default = run(sd1)
    with agentsd.patched(sd1, agent_fraction=1.0, **{option: True}):
        assert getattr(agentsd.patch_config(sd1), option)
        merged = run(sd1)
    assert np.isfinite(merged).all() and not np.array_equal(merged, default)
    assert all(sd1.unet.attn_processors[k] is v for k, v in processors.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in sd1.unet.modules())
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in sd1.unet.modules())
    assert np.array_equal(run(sd1), reference)


@pytest.mark.parametrize("dim", [0, 1])
def test_merge_mlp_with_forward_chunking(dim, caplog):
    unet = tiny.unet("sd1")
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)

    def out(chunk, **settings):
        agentsd.apply_patch(unet, agent_fraction=1.0, **settings)
        for block in unet.modules():  # what unet.enable_forward_chunking(chunk, dim) does; None: off
            if hasattr(block, "set_chunk_feed_forward"):
                block.set_chunk_feed_forward(chunk, dim)
        with torch.no_grad():
            return unet(sample, 999, text).sample

    merged, unmerged = out(None, merge_mlp=True), out(None)
    assert (merged - unmerged).abs().max() > 1e-3
    with caplog.at_level(logging.WARNING, logger="agentsd"):
        chunked = out(1 if dim == 0 else 64, merge_mlp=True)
    if dim == 0:  # each chunk of the batch with its own rows' merge: the same result
        torch.testing.assert_close(chunked, merged, atol=1e-6, rtol=0)
        assert "merge_mlp" not in caplog.text
    else:  # chunks of tokens: the feed-forward keeps every token, and says why
        torch.testing.assert_close(chunked, unmerged, atol=1e-6, rtol=0)
        assert "merge_mlp: its feed-forward got 64 of 256 tokens" in caplog.text


def test_deepcopy_is_an_independent_patched_model():
    import copy

    pipe = tiny.sd_pipeline()
    reference = run(pipe)
    agentsd.apply_patch(pipe, ratio=0.5)
    patched = run(pipe)
    twin = copy.deepcopy(pipe)
    assert agentsd.is_patched(twin) and np.array_equal(run(twin), patched)
    with torch.no_grad():  # the copy computes with its own weights
        for param in twin.unet.parameters():
            param.mul_(0.5)
    assert not np.array_equal(run(twin), patched) and np.array_equal(run(pipe), patched)
    agentsd.remove_patch(twin)
    assert agentsd.is_patched(pipe) and np.array_equal(run(pipe), patched)
    agentsd.remove_patch(pipe)
    assert np.array_equal(run(pipe), reference)


def test_compiled_wrappers_are_accepted():
    pipe = tiny.sd_pipeline()
    reference = run(pipe)
    unet = pipe.unet
    pipe.unet = torch.compile(unet, backend="eager")
    agentsd.apply_patch(pipe, agent_fraction=1.0)
    assert agentsd.is_patched(unet) and agentsd.is_patched(pipe.unet)
    assert not np.array_equal(run(pipe), reference)
    agentsd.remove_patch(pipe.unet)
    assert not agentsd.is_patched(pipe) and np.array_equal(run(pipe), reference)


# ----------------------------------------------------------------------------- phases
@pytest.mark.parametrize(
    "scheduler,steps,guidance,agent_calls",
    [
        (None, 10, 7.5, 5),  # PLMS: 11 calls for 10 steps (901, 801, 801, 701, 601 >= 600)
        (EulerDiscreteScheduler, 5, 1.0, 2),  # guidance off: 999, 749.25
        (DPMSolverMultistepScheduler, 10, 3.0, 4),  # 999, 899, 799, 699
        (HeunDiscreteScheduler, 5, 7.5, 3),  # both calls of a step alike: 999, 749.25, 749.25
    ],
)
def test_phase_follows_the_timestep_for_any_scheduler(sd1, scheduler, steps, guidance, agent_calls):
    original = sd1.scheduler
    if scheduler is not None:
        sd1.scheduler = scheduler.from_config(original.config)
    with agentsd.patched(sd1, agent_fraction=0.4):
        phases = tiny.record_phases(sd1)
        run(sd1, num_inference_steps=steps, guidance_scale=guidance)
        timesteps = sd1.scheduler.timesteps.tolist()
    sd1.unet._forward_pre_hooks.clear()
    sd1.scheduler = original
    assert phases == ["agent"] * agent_calls + ["late"] * (len(phases) - agent_calls)
    assert sum(t >= 600 for t in timesteps) == agent_calls  # the rule, t >= (1 - 0.4) * 1000


def test_official_recipe_by_timestep():
    """50 PNDM/PLMS steps: the agent phase is steps 0-19, timesteps 981 to 601, as in the official code."""
    config = agentsd.AgentSDConfig()
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    scheduler.set_timesteps(50)
    steps = list(dict.fromkeys(scheduler.timesteps.tolist()))  # PLMS repeats its first timestep
    agent = [t for t in steps if config.phase_at(t).agent_ratio is not None]
    assert agent == steps[:20] and (agent[0], agent[-1], steps[20]) == (981, 601, 581)
    assert config.phase_at(999) is config.agent_phase and config.phase_at(0) is config.tome_phase
    assert agentsd.AgentSDConfig(agent_fraction=0.0).phase_at(1000).agent_ratio is None
    assert agentsd.AgentSDConfig(agent_fraction=1.0).phase_at(0).agent_ratio is not None


@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, None), (torch.float16, None), (torch.float16, "fp32")])
def test_pipeline_moved_to_dtype_after_patching(dtype, precision):
    pipe = tiny.sd_pipeline()
    agentsd.apply_patch(pipe, agent_fraction=1.0, attn_precision=precision)
    pipe.to(dtype=dtype)
    phases = tiny.record_phases(pipe)
    out = pipe("a", num_inference_steps=2, height=64, width=64, output_type="latent").images
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert phases and set(phases) == {"agent"}  # PLMS: 3 calls for 2 steps


# ----------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("style", ["sd1", "sd2"])
@pytest.mark.parametrize("size", [(64, 64), (72, 56), (48, 80)])
def test_text_to_image(style, size):
    pipe = tiny.sd_pipeline(style)
    reference = run(pipe, height=size[0], width=size[1])
    agentsd.apply_patch(pipe, attn_precision="fp32" if style == "sd2" else None)
    out = run(pipe, height=size[0], width=size[1])
    assert out.shape == reference.shape == (1, *size, 3) and np.isfinite(out).all()
    assert not np.array_equal(out, reference)
    agentsd.remove_patch(pipe)
    assert np.array_equal(run(pipe, height=size[0], width=size[1]), reference)


def test_guidance_off_and_several_images_per_prompt(sd1):
    with agentsd.patched(sd1):
        one = run(sd1, guidance_scale=1.0)
        many = run(sd1, num_images_per_prompt=3)
    assert one.shape == (1, 64, 64, 3) and many.shape == (3, 64, 64, 3)
    assert np.isfinite(many).all()


@pytest.mark.parametrize("cls", ["img2img", "inpaint"])
def test_img2img_and_inpaint(cls):
    pipe_cls = {"img2img": tiny.StableDiffusionImg2ImgPipeline, "inpaint": tiny.StableDiffusionInpaintPipeline}[cls]
    pipe = tiny.sd_pipeline(cls=pipe_cls)
    kwargs = dict(image=Image.new("RGB", (64, 64), "blue"), strength=0.8, num_inference_steps=5)
    if cls == "inpaint":
        kwargs["mask_image"] = Image.new("L", (64, 64), 255)
    reference = run(pipe, **kwargs)
    with agentsd.patched(pipe, agent_fraction=1.0):
        out = run(pipe, **kwargs)
    assert out.shape == (1, 64, 64, 3) and not np.array_equal(out, reference)
    assert np.array_equal(run(pipe, **kwargs), reference)


def test_sdxl_with_defaults_patches_its_highest_attention_level():
    pipe = tiny.sdxl_pipeline()
    originals = dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match=r"downsampling \[2, 4\] \(use max_downsample=2"):
        agentsd.apply_patch(pipe, max_downsample=1)
    assert all(pipe.unet.attn_processors[k] is v for k, v in originals.items())
    reference = run(pipe, num_inference_steps=3)
    with agentsd.patched(pipe, agent_fraction=1.0):
        assert agentsd.patch_config(pipe).max_downsample is None  # the default: highest level with attention
        patched = list(tiny.self_attention_hooks(pipe.unet))
        assert patched and all(name.startswith(("down_blocks.1", "up_blocks.1")) for name in patched)
        out = run(pipe, num_inference_steps=3)
    assert out.shape == reference.shape and not np.array_equal(out, reference)
    assert np.array_equal(run(pipe, num_inference_steps=3), reference)
    sd1_unet = tiny.unet("sd1")  # the default level of SD 1.x is 1
    assert agentsd.self_attention_layers(sd1_unet).keys() == agentsd.self_attention_layers(sd1_unet, 1).keys()


def test_controlnet_pipeline():
    pipe = tiny.controlnet_pipeline()
    reference = run(pipe, image=Image.new("RGB", (64, 64)))
    with agentsd.patched(pipe, agent_fraction=1.0):
        out = run(pipe, image=Image.new("RGB", (64, 64)))
    assert out.shape == (1, 64, 64, 3) and not np.array_equal(out, reference)


@pytest.mark.parametrize("hw", [(16, 16), (18, 14), (17, 13), (12, 20)])
def test_bare_unet_any_latent_size(hw):
    unet = tiny.unet("sd1")
    sample, text = torch.randn(2, 4, *hw), torch.randn(2, 77, 32)
    agentsd.apply_patch(unet, agent_fraction=1.0)
    with torch.no_grad():
        out = unet(sample, 999, text).sample
    assert out.shape == sample.shape and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(ratio=1.0), ValueError, r"ratio must be in \[0, 1\)"),
        (dict(ratio=-0.1), ValueError, "ratio"),
        (dict(agent_ratio=0.0), ValueError, r"agent_ratio must be in \(0, 1\)"),
        (dict(agent_ratio=1.0), ValueError, "agent_ratio"),
        (dict(sx=0), ValueError, "sx must be >= 1"),
        (dict(sy=0), ValueError, "sy must be >= 1"),
        (dict(sx=2.5), TypeError, "sx must be an int"),
        (dict(ratio="0.4"), TypeError, "ratio must be a real number"),
        (dict(agent_fraction=1.5), ValueError, "agent_fraction"),
        (dict(max_downsample=3), ValueError, "power of two"),
        (dict(attn_precision="fp8"), ValueError, "attn_precision"),
        (dict(rato=0.4), TypeError, "rato"),
        (dict(ratio=float("nan")), ValueError, "ratio must be a finite number"),
        (dict(agent_fraction=float("nan")), ValueError, "agent_fraction must be a finite number"),
        (dict(k_shortcut=float("nan")), ValueError, "k_shortcut must be a finite number"),
        (dict(k_scale2=float("inf")), ValueError, "k_scale2 must be a finite number"),
        (dict(tome_ratio=float("-inf")), ValueError, "tome_ratio must be a finite number"),
        (dict(top_left_for_odd_batches=1), TypeError, "top_left_for_odd_batches must be a bool"),
    ],
)
def test_bad_arguments_raise_and_leave_model_untouched(sd1, kwargs, error, match):
    state = module_state(sd1.unet)
    with pytest.raises(error, match=match):
        agentsd.apply_patch(sd1, **kwargs)
    assert not agentsd.is_patched(sd1)
    same_state(state, module_state(sd1.unet))


@pytest.mark.parametrize("model", [torch.nn.Linear(2, 2), "runwayml/stable-diffusion-v1-5", None])
def test_unsupported_model(model):
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        agentsd.apply_patch(model)
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        agentsd.remove_patch(model)
