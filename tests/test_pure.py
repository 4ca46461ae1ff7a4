"""A patched model is a pure function of its call: shared UNets, hand-written loops, a bare UNet
with timesteps in any order, threads, any strength and scheduler give what the plain pipeline
would, with the patch's effect and nothing else."""
import threading

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline
from PIL import Image

import agentsd
import tiny

PROMPT = "a red circle"


def run(pipe, steps=8, seed=0, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, height=64,
                width=64, **kwargs).images


def phases_of(pipe, **kwargs):
    """The phase of every UNet call of one generation, and the timesteps of the run."""
    hooks = dict(pipe.unet._forward_pre_hooks)
    phases = tiny.record_phases(pipe)
    try:
        run(pipe, **kwargs)
    finally:
        pipe.unet._forward_pre_hooks.clear()
        pipe.unet._forward_pre_hooks.update(hooks)
    return phases


def by_rule(timesteps, fraction=0.4):
    return ["agent" if t >= (1 - fraction) * 1000 else "late" for t in timesteps]


@pytest.fixture
def pipe():
    pipe = tiny.sd_pipeline()
    agentsd.apply_patch(pipe)
    return pipe


# ----------------------------------------------------------------------------- shared UNets
def test_from_pipe_and_components_run_the_phases_of_their_timesteps(pipe):
    run(pipe, steps=20)  # an earlier, longer run of the pipeline the UNet came with
    own = phases_of(pipe)
    timesteps = pipe.scheduler.timesteps.tolist()
    assert own == by_rule(timesteps) and own.count("agent") == 4  # PLMS, 8 steps: 876, 751, 751, 626
    for other in (StableDiffusionPipeline.from_pipe(pipe), StableDiffusionPipeline(**pipe.components)):
        other.set_progress_bar_config(disable=True)
        assert other.unet is pipe.unet and phases_of(other) == own
        assert np.array_equal(run(other), run(pipe))


def test_a_hand_written_loop_gives_the_pipelines_latents(pipe):
    run(pipe, steps=30)
    expected = run(pipe, steps=10, output_type="latent")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
        embeddings = torch.cat([negative, text])
        scheduler = pipe.scheduler
        scheduler.set_timesteps(10)
        latents = pipe.prepare_latents(1, 4, 64, 64, text.dtype, "cpu", generator) * scheduler.init_noise_sigma
        phases = tiny.record_phases(pipe)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            uncond, cond = pipe.unet(model_input, t, encoder_hidden_states=embeddings).sample.chunk(2)
            latents = scheduler.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample
    assert phases == by_rule(scheduler.timesteps.tolist()) and phases.count("agent") == 5  # 901, 901, 801, 701, 601
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- a bare UNet
def test_a_bare_unet_at_timesteps_in_any_order():
    unet = tiny.unet("sd1")
    agentsd.apply_patch(unet, ratio=0.5)
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    timesteps = torch.tensor([100, 200, 300, 400, 999])  # views of one storage, in rising order
    with torch.no_grad():
        alone = {int(t): unet(sample, torch.tensor(int(t)), text).sample for t in timesteps}
        for order in (timesteps, timesteps.flip(0), timesteps[[2, 4, 0, 3, 1]]):
            phases = tiny.record_phases(unet)
            outputs = {int(t): unet(sample, t, text).sample for t in order}
            assert phases == by_rule(order.tolist())  # only 999 is in the agent phase
            assert all(torch.equal(outputs[t], alone[t]) for t in alone)  # the same call, the same output
            unet._forward_pre_hooks.popitem()


def test_flow_matching_timesteps():
    unet = tiny.unet("sd1")
    agentsd.apply_patch(unet)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    phases = tiny.record_phases(unet)
    with torch.no_grad():
        for t in scheduler.timesteps:  # sigma * 1000: 1000, 889, 778, 667, 556, ..., 1
            unet(torch.randn(1, 4, 16, 16), t, torch.randn(1, 77, 32))
    assert phases == by_rule(scheduler.timesteps.tolist()) and phases.count("agent") == 4


# ----------------------------------------------------------------------------- threads
def test_two_threads_on_one_unet_get_what_each_gets_alone():
    unet = tiny.unet("sd1")
    agentsd.apply_patch(unet, ratio=0.5, merge_crossattn=True, merge_mlp=True)
    text = torch.randn(2, 77, 32)
    calls = {"a": (torch.randn(2, 4, 16, 16), 999), "b": (torch.randn(2, 4, 16, 16), 990)}
    with torch.no_grad():
        alone = {name: unet(sample, t, text).sample for name, (sample, t) in calls.items()}
    # both threads stop inside the same patched block, each with its own merges pending
    barrier = threading.Barrier(2)
    ff = unet.down_blocks[0].attentions[0].transformer_blocks[0].ff

    def meet(module, args):
        barrier.wait(timeout=30)

    handle = ff.register_forward_pre_hook(meet)
    together, errors = {}, []

    def work(name):
        try:
            with torch.no_grad():
                together[name] = unet(calls[name][0], calls[name][1], text).sample
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(name,)) for name in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    handle.remove()
    assert not errors and all(torch.equal(together[name], alone[name]) for name in calls)
    assert not torch.equal(alone["a"], alone["b"])


def test_a_call_made_inside_another_leaves_it_as_it_was():
    """Re-entrant: a UNet call from inside a patched block of another call (a callback, a nested
    pipeline) stacks on top of it."""
    unet = tiny.unet("sd1")
    agentsd.apply_patch(unet, ratio=0.5, merge_mlp=True)
    outer_sample, inner_sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        alone = unet(outer_sample, 999, text).sample, unet(inner_sample, 300, text).sample
        inner = []

        def call_inside(module, args):
            if not inner:
                inner.append(None)  # the inner call passes here too
                inner[0] = unet(inner_sample, 300, text).sample

        handle = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.register_forward_pre_hook(call_inside)
        outer = unet(outer_sample, 999, text).sample
        handle.remove()
    assert torch.equal(outer, alone[0]) and torch.equal(inner[0], alone[1])


# ----------------------------------------------------------------------------- strength and refiners
@pytest.mark.parametrize("cls", ["img2img", "inpaint"])
def test_low_strength_runs_no_agent_step(cls):
    pipe_cls = {"img2img": tiny.StableDiffusionImg2ImgPipeline, "inpaint": tiny.StableDiffusionInpaintPipeline}[cls]
    pipe = tiny.sd_pipeline(cls=pipe_cls)
    agentsd.apply_patch(pipe)
    kwargs = dict(image=Image.new("RGB", (64, 64), "blue"), steps=10)
    if cls == "inpaint":
        kwargs["mask_image"] = Image.new("L", (64, 64), 255)
    low = phases_of(pipe, strength=0.3, **kwargs)  # noise up to t = 301: the late phase only
    assert low and set(low) == {"late"}
    high = phases_of(pipe, strength=1.0, **kwargs)
    assert high == by_rule(pipe.scheduler.timesteps.tolist()) and "agent" in high


def test_sdxl_refiner_steps_run_the_late_phase():
    base = tiny.sdxl_pipeline()
    agentsd.apply_patch(base)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pipe(base, requires_aesthetics_score=False)
    refiner.set_progress_bar_config(disable=True)
    latents = run(base, steps=10, output_type="latent", denoising_end=0.8)
    phases = phases_of(refiner, steps=10, image=latents, denoising_start=0.8)
    assert phases and set(phases) == {"late"}  # the last 20 % of the noise levels, t < 200
    assert phases_of(base, steps=10).count("agent") == 4  # the base: 999, 899.1, 799.2, 699.3


# ----------------------------------------------------------------------------- the batch
def test_an_image_does_not_depend_on_its_batch_without_guidance(pipe):
    one = pipe(PROMPT, generator=[torch.Generator().manual_seed(0)], num_inference_steps=4, height=64, width=64,
               guidance_scale=1.0, output_type="np").images
    two = pipe([PROMPT] * 2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], num_inference_steps=4,
               height=64, width=64, guidance_scale=1.0, output_type="np").images
    agentsd.remove_patch(pipe)
    plain = pipe(PROMPT, generator=[torch.Generator().manual_seed(0)], num_inference_steps=4, height=64, width=64,
                 guidance_scale=1.0, output_type="np").images
    assert np.abs(two[0] - one[0]).max() < 1e-5 and np.abs(one - plain).max() > 1e-3
