"""AgentSD together with diffusers features: LoRA loaders, IP-Adapter, offloading, FreeU, step
callbacks, several images per prompt, save_pretrained. All on CPU, every model built offline.

Each test asserts on the images: with the patch on they differ from the unpatched pipeline with
the same feature (by more than ``FAR``), and after ``remove_patch`` they equal, bit for bit, a
reference that did the same steps without AgentSD.

The IP-Adapter is a real tiny one, loaded with ``pipe.load_ip_adapter``: a
``CLIPVisionModelWithProjection`` from a tiny config saved in ``<folder>/ip/image_encoder``, and a
safetensors file in diffusers' original layout (``image_proj.proj`` / ``image_proj.norm`` for
``ImageProjection``, ``ip_adapter.<1, 3, 5, ...>.to_k_ip`` / ``to_v_ip`` for the cross-attentions in
``unet.attn_processors`` order). No image processor needs saving: the tiny pipeline has none, so
``load_ip_adapter`` makes a ``CLIPImageProcessor`` of the encoder's image size, which transformers
turns into ``CLIPImageProcessorPil`` here (torchvision is not installed).

With ``merge_crossattn``, the IP-Adapter cross-attentions keep every token (their masks and scale
apply to each one), with a warning.
"""
import functools
import json
import logging
import warnings

import accelerate
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import agentsd
import tiny
from agentsd.training import DreamBoothSettings, load_pipeline, train_dreambooth
from agentsd.patch import CONFIG_KEY

TOP = "down_blocks.0.attentions.0.transformer_blocks.0"  # a patched block of the tiny SD UNet
FAR = 1e-3  # the patch, or a feature, changes the images by more than this
CLOSE = 1e-5  # the same images up to float reordering


def run(pipe, seed=0, **kwargs):
    return pipe("a red circle", generator=torch.Generator().manual_seed(seed), num_inference_steps=3,
                height=64, width=64, output_type="np", **kwargs).images


def gap(a, b):
    return float(np.abs(a - b).max())


def processor(pipe, name):
    return pipe.unet.get_submodule(f"{TOP}.{name}").processor


def hooked(pipe):
    """Whether the top block's self-attention carries AgentSD's hook."""
    return f"{TOP}.attn1" in tiny.self_attention_hooks(pipe.unet)


@pytest.fixture(scope="module")
def plain_images():
    """The tiny pipeline's images without AgentSD and patched with the defaults."""
    pipe = tiny.sd_pipeline()
    plain = run(pipe)
    with agentsd.patched(pipe):
        return plain, run(pipe)


# ----------------------------------------------------------------------------- LoRA
@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA folder written by diffusers' ``save_lora_weights`` from random peft adapters."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny.unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


def test_lora_loaders_in_either_order(lora_dir):
    pipes = {"plain": tiny.sd_pipeline(), "load_first": tiny.sd_pipeline(), "patch_first": tiny.sd_pipeline()}
    agentsd.apply_patch(pipes["patch_first"])
    stages = {
        "loaded": lambda p: p.load_lora_weights(lora_dir, adapter_name="shapes"),
        "half": lambda p: p.set_adapters(["shapes"], adapter_weights=[0.5]),
        "fused": lambda p: p.fuse_lora(adapter_names=["shapes"]),
        "unloaded": lambda p: (p.unfuse_lora(), p.unload_lora_weights()),
    }
    images = {}
    for stage, step in stages.items():
        for name, pipe in pipes.items():
            step(pipe)
            if stage == "loaded" and name == "load_first":
                agentsd.apply_patch(pipe)
            images[stage, name] = run(pipe)
    assert gap(images["loaded", "plain"], images["unloaded", "plain"]) > FAR  # the LoRA does something
    for stage in stages:
        assert gap(images[stage, "patch_first"], images[stage, "load_first"]) < CLOSE, stage
        assert gap(images[stage, "load_first"], images[stage, "plain"]) > FAR, stage  # the patch is on
    assert gap(images["half", "load_first"], images["loaded", "load_first"]) > FAR  # set_adapters reached it
    assert gap(images["fused", "load_first"], images["half", "load_first"]) < 1e-4  # fused = unfused
    for name in ("load_first", "patch_first"):
        assert hooked(pipes[name]) and type(processor(pipes[name], "attn1")) is AttnProcessor2_0
        agentsd.remove_patch(pipes[name])
        assert np.array_equal(run(pipes[name]), images["unloaded", "plain"])


def test_dreambooth_lora_on_a_patched_pipeline(model_dir, instance_dir, tmp_path):
    settings = DreamBoothSettings(
        pretrained=str(model_dir), instance_dir=str(instance_dir), instance_prompt="a white sks",
        output_dir=str(tmp_path / "lora"), resolution=64, max_train_steps=2, learning_rate=1e-2,
        checkpointing_steps=2, inference_steps=2, progress=False, lora_rank=4,
    )
    out = train_dreambooth(settings)
    reference = load_pipeline(str(model_dir))
    base = run(reference)
    reference.load_lora_weights(out)
    with_lora = run(reference)

    pipe = load_pipeline(str(model_dir))
    agentsd.apply_patch(pipe)
    pipe.load_lora_weights(out)
    agentsd.apply_patch(pipe, config=agentsd.load_config(out))
    assert agentsd.patch_config(pipe) == settings.agentsd_config()
    patched = run(pipe)
    assert gap(with_lora, base) > FAR and gap(patched, with_lora) > FAR
    agentsd.remove_patch(pipe)
    assert np.array_equal(run(pipe), with_lora)


# ----------------------------------------------------------------------------- IP-Adapter
IMAGE = Image.new("RGB", (40, 40), "green")


@pytest.fixture(scope="module")
def ip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip_adapter")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16,
    )).save_pretrained(folder / "ip" / "image_encoder")
    generator = torch.Generator().manual_seed(1)
    cross = 32  # cross_attention_dim of the tiny UNet
    weights = {"image_proj.proj.weight": 0.3 * torch.randn(4 * cross, 16, generator=generator),
               "image_proj.proj.bias": torch.zeros(4 * cross),
               "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    unet = tiny.unet()
    attn2 = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for key, name in zip(range(1, 2 * len(attn2), 2), attn2):
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
        for proj in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{key}.{proj}.weight"] = 0.3 * torch.randn(hidden, cross, generator=generator)
    save_file(weights, folder / "ip" / "ip_adapter.safetensors")
    return folder


def load_ip(pipe, folder):
    pipe.load_ip_adapter(folder, subfolder="ip", weight_name="ip_adapter.safetensors")
    return pipe


def half_mask():
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    return {"ip_adapter_masks": [IPAdapterMaskProcessor().preprocess([Image.fromarray(mask)], height=64, width=64)]}


@pytest.fixture(scope="module")
def ip_images(ip_dir):
    """IP-Adapter images without AgentSD (with and without a mask) and patched after loading."""
    pipe = load_ip(tiny.sd_pipeline(), ip_dir)
    images = {"plain": run(pipe, ip_adapter_image=IMAGE),
              "masked": run(pipe, ip_adapter_image=IMAGE, cross_attention_kwargs=half_mask())}
    with agentsd.patched(pipe):
        images["patched"] = run(pipe, ip_adapter_image=IMAGE)
    return images


def check_ip_processors(pipe):
    processors = pipe.unet.attn_processors
    assert all(isinstance(p, IPAdapterAttnProcessor2_0) for name, p in processors.items() if name.endswith("attn2.processor"))
    patched = tiny.self_attention_hooks(pipe.unet)
    assert patched and all(name.endswith("attn1") for name in patched)
    assert all(type(processors[f"{name}.processor"]) is AttnProcessor2_0 for name in patched)


def test_ip_adapter_loaded_then_patched(ip_dir, ip_images):
    pipe = load_ip(tiny.sd_pipeline(), ip_dir)
    assert type(pipe.feature_extractor).__name__.startswith("CLIPImageProcessor")
    agentsd.apply_patch(pipe)
    check_ip_processors(pipe)
    patched = run(pipe, ip_adapter_image=IMAGE)
    assert np.array_equal(patched, ip_images["patched"]) and gap(patched, ip_images["plain"]) > FAR
    pipe.set_ip_adapter_scale(0.0)
    assert gap(run(pipe, ip_adapter_image=IMAGE), patched) > FAR  # the IP-Adapter acts under the patch
    pipe.set_ip_adapter_scale(1.0)
    agentsd.remove_patch(pipe)
    assert np.array_equal(run(pipe, ip_adapter_image=IMAGE), ip_images["plain"])


def test_ip_adapter_loaded_onto_a_patched_pipeline(ip_dir, ip_images):
    pipe = tiny.sd_pipeline()
    agentsd.apply_patch(pipe)
    load_ip(pipe, ip_dir)
    check_ip_processors(pipe)
    assert gap(run(pipe, ip_adapter_image=IMAGE), ip_images["patched"]) < CLOSE
    agentsd.remove_patch(pipe)
    assert np.array_equal(run(pipe, ip_adapter_image=IMAGE), ip_images["plain"])


def test_unload_ip_adapter_from_a_patched_pipeline(ip_dir, plain_images):
    pipe = load_ip(tiny.sd_pipeline(), ip_dir)
    agentsd.apply_patch(pipe)
    pipe.unload_ip_adapter()
    assert hooked(pipe)
    assert gap(run(pipe), plain_images[1]) < CLOSE
    agentsd.remove_patch(pipe)
    assert np.array_equal(run(pipe), plain_images[0])


def spy_on_ip_processors(monkeypatch):
    """Record (query tokens, masks given) of every IP-Adapter processor call."""
    calls = []
    original = IPAdapterAttnProcessor2_0.__call__

    @functools.wraps(original)  # keeps the signature diffusers reads the keywords from
    def spy(self, attn, hidden_states, *args, ip_adapter_masks=None, **kwargs):
        calls.append((hidden_states.shape[1], ip_adapter_masks is not None))
        return original(self, attn, hidden_states, *args, ip_adapter_masks=ip_adapter_masks, **kwargs)

    monkeypatch.setattr(IPAdapterAttnProcessor2_0, "__call__", spy)
    return calls


def run_masked(pipe, caplog):
    """Masked IP-Adapter images, and the warnings of that run (Python's and diffusers' log)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = run(pipe, ip_adapter_image=IMAGE, cross_attention_kwargs=half_mask())
    return images, caplog.text + "".join(str(w.message) for w in caught)


def test_ip_adapter_masks_reach_the_processor_under_the_patch(ip_dir, ip_images, monkeypatch, caplog):
    pipe = load_ip(tiny.sd_pipeline(), ip_dir)
    agentsd.apply_patch(pipe)
    calls = spy_on_ip_processors(monkeypatch)
    masked, warned = run_masked(pipe, caplog)
    assert "are not expected" not in warned and "aspect ratio" not in warned
    assert calls and all(given for _, given in calls)
    assert gap(masked, ip_images["masked"]) > FAR and gap(masked, ip_images["patched"]) > FAR
    agentsd.remove_patch(pipe)
    assert np.array_equal(run(pipe, ip_adapter_image=IMAGE, cross_attention_kwargs=half_mask()), ip_images["masked"])


def test_ip_adapter_masks_with_merge_crossattn(ip_dir, ip_images, monkeypatch, caplog):
    pipe = load_ip(tiny.sd_pipeline(), ip_dir)
    agentsd.apply_patch(pipe, merge_crossattn=True)
    assert isinstance(processor(pipe, "attn2"), IPAdapterAttnProcessor2_0)
    calls = spy_on_ip_processors(monkeypatch)
    masked, warned = run_masked(pipe, caplog)
    assert "merge_crossattn: its cross-attention has an IP-Adapter processor" in warned
    assert "are not expected" not in warned
    assert calls and all(given for _, given in calls)  # the masks reach every IP-Adapter processor
    assert "aspect ratio" not in warned, f"query tokens seen: {sorted({n for n, _ in calls})}"
    assert {n for n, _ in calls} == {256, 64}  # every token of both levels
    assert gap(masked, ip_images["masked"]) > FAR
    agentsd.remove_patch(pipe)
    assert np.array_equal(run(pipe, ip_adapter_image=IMAGE, cross_attention_kwargs=half_mask()), ip_images["masked"])


def test_set_ip_adapter_scale_with_merge_crossattn(ip_dir):
    pipe = load_ip(tiny.sd_pipeline(), ip_dir)
    agentsd.apply_patch(pipe, merge_crossattn=True)
    pipe.set_ip_adapter_scale(0.25)
    scales = {name: p.scale for name, p in pipe.unet.attn_processors.items() if name.endswith("attn2.processor")}
    assert all(scale == [0.25] for scale in scales.values()), scales
    assert hooked(pipe)


# ----------------------------------------------------------------------------- offloading
def model_offload(pipe):
    # without device= it refuses on CPU ("`enable_model_cpu_offload` requires accelerator, but not
    # found"); with it, it is accelerate's cpu_offload_with_hook on every component
    pipe.enable_model_cpu_offload(device="cpu")


def sequential_offload(pipe):
    # what enable_sequential_cpu_offload does to each model; that method itself, with device="cpu",
    # fails in transformers' CLIP text encoder (accelerate's set_module_tensor_to_device), not in the UNet
    accelerate.cpu_offload(pipe.unet, execution_device="cpu")


def accelerate_hooks(unet):
    return {name: m._hf_hook for name, m in unet.named_modules() if hasattr(m, "_hf_hook")}


@pytest.mark.parametrize("offload", [model_offload, sequential_offload], ids=["model", "sequential"])
@pytest.mark.parametrize("patch_first", [False, True], ids=["offload_first", "patch_first"])
def test_offloading(plain_images, offload, patch_first):
    plain, patched = plain_images
    pipe = tiny.sd_pipeline()
    steps = [lambda: agentsd.apply_patch(pipe), lambda: offload(pipe)]
    for step in steps if patch_first else steps[::-1]:
        step()
    assert accelerate_hooks(pipe.unet) and agentsd.is_patched(pipe)
    images = run(pipe)
    assert gap(images, patched) < CLOSE and gap(images, plain) > FAR
    # model offload makes its hooks anew after every call (maybe_free_model_hooks): compare from here
    hooks = accelerate_hooks(pipe.unet)
    assert hooks and hooked(pipe)
    agentsd.remove_patch(pipe)
    after = accelerate_hooks(pipe.unet)
    assert after.keys() == hooks.keys() and all(after[k] is hooks[k] for k in hooks)
    assert np.array_equal(run(pipe), plain)


# ----------------------------------------------------------------------------- what already works
def test_freeu(plain_images):
    pipe = tiny.sd_pipeline()
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    freeu = run(pipe)
    agentsd.apply_patch(pipe)
    both = run(pipe)
    pipe.disable_freeu()
    patched_only = run(pipe)
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)  # enabled while patched
    assert gap(freeu, plain_images[0]) > FAR and gap(both, freeu) > FAR and gap(both, patched_only) > FAR
    assert np.array_equal(patched_only, plain_images[1])
    assert np.array_equal(run(pipe), both)
    agentsd.remove_patch(pipe)
    assert np.array_equal(run(pipe), freeu)


def guidance_off_after_first_step(steps):
    """A step callback that records the steps and turns classifier-free guidance off after step 0
    (diffusers' dynamic CFG recipe): the UNet batch shrinks from 2 * 2 to 2 * 1 images."""
    def callback(pipe, step, timestep, tensors):
        steps.append(step)
        if step == 0:
            pipe._guidance_scale = 0.0
            return {"prompt_embeds": tensors["prompt_embeds"].chunk(2)[-1]}
        return {}
    return callback


def test_step_callback_and_several_images_per_prompt():
    def generate(pipe):
        steps, batches = [], []
        hook = pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
        images = run(pipe, num_images_per_prompt=2, callback_on_step_end=guidance_off_after_first_step(steps),
                     callback_on_step_end_tensor_inputs=["prompt_embeds"])
        hook.remove()
        # one callback per UNet call (PLMS: 4 for 3 steps); 2 images with CFG, then without
        assert steps == list(range(len(batches))) and batches == [4] + [2] * (len(batches) - 1)
        return images

    pipe = tiny.sd_pipeline()
    reference = generate(pipe)
    agentsd.apply_patch(pipe)
    patched = generate(pipe)
    assert patched.shape == (2, 64, 64, 3) and gap(patched[0], patched[1]) > FAR
    assert gap(patched, reference) > FAR
    agentsd.remove_patch(pipe)
    assert np.array_equal(generate(pipe), reference)


def test_save_pretrained_of_a_patched_pipeline_writes_a_plain_model(plain_images, tmp_path):
    pipe = tiny.sd_pipeline()
    agentsd.apply_patch(pipe)
    pipe.save_pretrained(tmp_path)
    assert agentsd.is_patched(pipe) and hooked(pipe)
    assert CONFIG_KEY not in json.loads((tmp_path / "unet" / "config.json").read_text())
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert not agentsd.is_patched(reloaded) and agentsd.stored_config(reloaded) is None
    assert all(type(p) is AttnProcessor2_0 for p in reloaded.unet.attn_processors.values())
    assert np.array_equal(run(reloaded), plain_images[0])
