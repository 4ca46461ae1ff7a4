"""The patch on every supported pipeline: behaviour, phases, restoration and errors."""
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from PIL import Image

import agentsd
from agentsd.processor import AgentSDAttnProcessor

import tiny


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("height", 64)
    kwargs.setdefault("width", 64)
    out = pipe("a red circle", generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    return out.images


def record_phases(unet):
    """Record the phase chosen for every UNet call."""
    phases = []
    unet.register_forward_hook(lambda m, a, o: phases.append(m._agentsd_state.phase))
    return phases


@pytest.fixture(scope="module")
def sd1():
    return tiny.sd_pipeline("sd1")


# ----------------------------------------------------------------------------- restoration
def test_remove_restores_exactly_including_custom_processors(sd1):
    pipe = sd1
    custom = AttnProcessor()  # a user-chosen processor on one self-attention
    pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.set_processor(custom)
    before = dict(pipe.unet.attn_processors)
    dict_keys = {name: set(m.__dict__) for name, m in pipe.unet.named_modules()}
    hooks = len(pipe.unet._forward_pre_hooks)
    reference = run(pipe)

    agentsd.apply_patch(pipe, ratio=0.5)
    patched = run(pipe)
    assert not np.array_equal(patched, reference)
    wrapped = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor
    assert isinstance(wrapped, AgentSDAttnProcessor) and wrapped.base is custom

    agentsd.remove_patch(pipe)
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert {name: set(m.__dict__) for name, m in pipe.unet.named_modules()} == dict_keys
    assert len(pipe.unet._forward_pre_hooks) == hooks
    assert np.array_equal(run(pipe), reference)  # bit for bit
    pipe.unet.set_attn_processor(AttnProcessor2_0())


def test_second_apply_replaces_first_and_remove_on_unpatched_is_noop(sd1):
    pipe = sd1
    originals = dict(pipe.unet.attn_processors)
    agentsd.remove_patch(pipe)  # not patched: nothing happens
    assert all(pipe.unet.attn_processors[k] is v for k, v in originals.items())
    agentsd.apply_patch(pipe, ratio=0.2)
    agentsd.apply_patch(pipe, ratio=0.3, sx=2, sy=2)
    assert agentsd.patch_config(pipe).ratio == 0.3 and len(pipe.unet._forward_pre_hooks) == 1
    for proc in pipe.unet.attn_processors.values():
        if isinstance(proc, AgentSDAttnProcessor):
            assert not isinstance(proc.base, AgentSDAttnProcessor)  # no nesting
    twice = run(pipe)
    agentsd.remove_patch(pipe)
    agentsd.apply_patch(pipe, ratio=0.3, sx=2, sy=2)
    assert np.array_equal(run(pipe), twice)
    agentsd.remove_patch(pipe)
    assert all(pipe.unet.attn_processors[k] is v for k, v in originals.items())
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
    # an odd batch cannot hold both CFG halves: top-left dst, as with use_rand=False
    assert torch.equal(out(1), out(1, use_rand=False))
    assert torch.equal(out(1, seed=1), out(1, seed=2))


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
    assert np.array_equal(run(sd1), reference)


def test_deepcopy_is_an_independent_patched_model():
    import copy

    pipe = tiny.sd_pipeline()
    reference = run(pipe)
    agentsd.apply_patch(pipe, ratio=0.5)
    patched = run(pipe)
    twin = copy.deepcopy(pipe)
    state, twin_state = pipe.unet._agentsd_state, twin.unet._agentsd_state
    assert twin_state is not state and twin_state.pipeline is twin
    assert np.array_equal(run(twin), patched)
    run(twin, height=48, width=80)  # the copy's hook updates the copy's state only
    assert twin_state.latent_size == (12, 20) and state.latent_size == (16, 16)
    agentsd.remove_patch(twin)
    assert np.array_equal(run(twin), reference)
    assert agentsd.is_patched(pipe) and np.array_equal(run(pipe), patched)
    unet_copy = copy.deepcopy(pipe.unet)  # a UNet copied alone follows the timestep
    assert unet_copy._agentsd_state.pipeline is None and agentsd.is_patched(unet_copy)
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
        (None, 10, 7.5, 5),  # PLMS: 11 calls for 10 steps (the first repeats a timestep)
        (EulerDiscreteScheduler, 5, 1.0, 2),  # guidance off: steps 0-1 of 5
        (DPMSolverMultistepScheduler, 10, 3.0, 4),
        (HeunDiscreteScheduler, 5, 7.5, 5),  # 2 calls a step: 9 timesteps, the first 3 steps
    ],
)
def test_phase_follows_step_index_for_any_scheduler(sd1, scheduler, steps, guidance, agent_calls):
    original = sd1.scheduler
    if scheduler is not None:
        sd1.scheduler = scheduler.from_config(original.config)
    with agentsd.patched(sd1, agent_fraction=0.4):
        phases = record_phases(sd1.unet)
        run(sd1, num_inference_steps=steps, guidance_scale=guidance)
    sd1.unet._forward_hooks.clear()
    sd1.scheduler = original
    agent = [p.agent_ratio is not None for p in phases]
    assert agent == [True] * agent_calls + [False] * (len(phases) - agent_calls)


def test_phase_on_bare_unet_follows_timestep():
    unet = tiny.unet("sd1")
    agentsd.apply_patch(unet, agent_fraction=0.4)
    phases = record_phases(unet)
    with torch.no_grad():
        for t in (999, 700, 601, 599, 10):
            unet(torch.randn(1, 4, 16, 16), torch.tensor([t]), torch.randn(1, 77, 32))
    assert [p.agent_ratio is not None for p in phases] == [True, True, True, False, False]


def test_img2img_phase_counts_the_steps_it_runs():
    pipe = tiny.sd_pipeline(cls=tiny.StableDiffusionImg2ImgPipeline)
    agentsd.apply_patch(pipe, agent_fraction=0.4)
    phases = record_phases(pipe.unet)
    run(pipe, image=Image.new("RGB", (64, 64), "red"), strength=0.5, num_inference_steps=10)
    # PLMS: 6 calls for the 5 steps run; the first 40 % of them (progress 0, 1/6, 2/6)
    assert [p.agent_ratio is not None for p in phases] == [True] * 3 + [False] * 3


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
        patched = [n for n, p in pipe.unet.attn_processors.items() if isinstance(p, AgentSDAttnProcessor)]
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


@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, None), (torch.float16, None), (torch.float16, "fp32")])
def test_pipeline_moved_to_dtype_after_patching(dtype, precision):
    pipe = tiny.sd_pipeline()
    agentsd.apply_patch(pipe, agent_fraction=1.0, attn_precision=precision)
    pipe.to(dtype=dtype)
    phases = record_phases(pipe.unet)
    out = pipe("a", num_inference_steps=2, height=64, width=64, output_type="latent").images
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert phases and all(p.agent_ratio is not None for p in phases)  # PLMS: 3 calls for 2 steps


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
    ],
)
def test_bad_arguments_raise_and_leave_model_untouched(sd1, kwargs, error, match):
    originals = dict(sd1.unet.attn_processors)
    with pytest.raises(error, match=match):
        agentsd.apply_patch(sd1, **kwargs)
    assert not agentsd.is_patched(sd1)
    assert all(sd1.unet.attn_processors[k] is v for k, v in originals.items())


@pytest.mark.parametrize("model", [torch.nn.Linear(2, 2), "runwayml/stable-diffusion-v1-5", None])
def test_unsupported_model(model):
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        agentsd.apply_patch(model)
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        agentsd.remove_patch(model)
