"""Per-step denoiser latency of every method, measured side by side in one process.

The denoiser is the SD1.5 UNet, the PixArt-Σ transformer or the SD3.5-medium one (:data:`MODELS`),
built from its published configuration with random weights; a transformer can keep only its first
blocks (``blocks``), where a whole step is too slow for the machine.

Every method runs on the same UNet and inputs, interleaved repeat by repeat, so that drifts of a
noisy machine hit all methods alike; results are medians over the repeats
(:func:`eval.report.latency_rows`).
AgentSD methods are timed in one phase (agent by default, or late); ToDo is on at every timed
step. A DeepCache sample is one cache cycle (a full step and its cached steps), its time the
mean step, and so is a CA-ToMe sample: one cycle of its cache (the match computed, then reused).
The bounds are the same UNet with parts of the patched blocks returning zeros. A method that wraps
the whole pipeline call (T-GATE) has no per-step row and is refused; a method that does not run
here (a peer that does not import or fails) is a row with its reason, and a rerun tries it again.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from torch._dynamo.utils import counters

from agentsd.tuning import denoiser_inputs

from eval import runtime
from eval.methods import Method, build_methods, check_per_step, pndm_schedule
from eval.peers import failure
from eval.report import saving_share
from eval.store import JsonRecord, merge_settings

#: The UNet of Stable Diffusion 1.5 (859.5 M parameters), built with random weights.
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
)
#: PixArt-Σ's transformer (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS): 28 blocks of width 1152 (16
#: heads of 72), patch 2, T5 captions (4096 channels, 300 tokens).
PIXART_SIGMA_CONFIG: dict[str, Any] = dict(
    sample_size=128, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16,
    caption_channels=4096, cross_attention_dim=1152, in_channels=4, out_channels=8, attention_bias=True,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2, use_additional_conditions=False,
)
#: SD3.5 Medium's transformer: 24 joint blocks of width 1536 (24 heads of 64), SD3.5's image-only
#: attention in blocks 0-12, RMS qk-norm, patch 2, 16 latent channels.
SD35_MEDIUM_CONFIG: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
#: The denoisers of the harness: name -> (class, configuration, prompt tokens, what it is).
MODELS: dict[str, tuple[type, dict[str, Any], int, str]] = {
    "sd15": (UNet2DConditionModel, SD15_UNET_CONFIG, 77, "SD1.5-architecture UNet"),
    "pixart-sigma": (PixArtTransformer2DModel, PIXART_SIGMA_CONFIG, 300, "PixArt-Σ-architecture transformer"),
    "sd35-medium": (SD3Transformer2DModel, SD35_MEDIUM_CONFIG, 77 + 256, "SD3.5-medium-architecture transformer"),
}


def build_denoiser(name: str, blocks: int | None = None) -> torch.nn.Module:
    """The denoiser ``name`` of :data:`MODELS` with random weights; a transformer with only its first
    ``blocks`` blocks (None: all of them).

    Raises:
        ValueError: for an unknown name, or ``blocks`` given for the UNet or out of range.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    cls, config, _, _ = MODELS[name]
    config = dict(config)
    if blocks is not None:
        if cls is UNet2DConditionModel or not 1 <= blocks <= config["num_layers"]:
            raise ValueError(f"blocks: a transformer keeps 1 to its {config.get('num_layers')} blocks; "
                             f"{name} {'has no blocks to keep' if cls is UNet2DConditionModel else 'cannot keep ' + str(blocks)}")
        config["num_layers"] = blocks
        if "dual_attention_layers" in config:
            config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < blocks)
    return cls(**config).eval()


def describe_model(name: str, blocks: int | None) -> str:
    """What the harness times, in words."""
    what = MODELS[name][3]
    return f"{what}, random weights" + (f", its first {blocks} blocks" if blocks is not None else "")


#: The methods timed by default (the DeepCache ones only when asked for).
DEFAULT_METHODS = ("sd", "tomesd", "todo", "agentsd", "agentsd-pool", "bound", "agentsd-xattn", "bound-xattn",
                   "agentsd-mlp", "bound-mlp")
PHASES = ("agent", "late")
#: Also importable from here, where earlier versions had them.
__all__ = ["SD15_UNET_CONFIG", "PIXART_SIGMA_CONFIG", "SD35_MEDIUM_CONFIG", "MODELS", "DEFAULT_METHODS", "PHASES",
           "SettingsMismatch", "build_denoiser", "build_methods", "describe_model", "run_benchmark", "sample_timesteps",
           "saving_share", "time_step"]


class SettingsMismatch(ValueError):
    """The raw file holds samples taken with other settings."""


def sample_timesteps(method: Method) -> tuple[int, ...]:
    """The timesteps of one timed sample: one step at t = 500, a DeepCache cycle
    (``cache_interval`` consecutive steps of a 50-step PNDM schedule), or a CA-ToMe cycle (the
    steps of that schedule from its checkpoint at or before the middle to the next one)."""
    if method.deepcache is None:
        cycle = getattr(method.peer, "cycle", None)
        return (500,) if cycle is None else cycle(pndm_schedule().timesteps)
    return tuple(int(t) for t in pndm_schedule().timesteps[: method.deepcache.cache_interval])


def time_step(denoiser: torch.nn.Module, inputs: dict[str, Any], timesteps: tuple[int, ...] = (500,)) -> float:
    """Mean seconds of one denoiser forward at each of ``timesteps`` (a UNet's inputs positional:
    tomesd's hook reads ``args[0]``, DeepCache's ``args[1]``; a transformer's by name, with one
    timestep per sample, as its pipelines pass them)."""
    sample = next(iter(inputs.values()))
    sync = torch.cuda.synchronize if sample.is_cuda else (lambda: None)
    steps = [torch.tensor(t, device=sample.device) for t in timesteps]
    rest = {k: v for k, v in inputs.items() if k not in ("sample", "encoder_hidden_states")}
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        for t in steps:
            if "sample" in inputs:
                denoiser(inputs["sample"], t, inputs["encoder_hidden_states"], **rest)
            else:
                denoiser(**inputs, timestep=t.expand(sample.shape[0]))
    sync()
    return (time.perf_counter() - start) / len(steps)


def run_benchmark(
    unet: torch.nn.Module,
    sizes: list[int],
    methods: list[Method],
    repeats: int,
    batch: int,
    raw_path: Path,
    progress: Callable[[str], None] = print,
    compile: bool = False,
    backend: str | Any = "inductor",
    fuse_qkv: bool = False,
    text_tokens: int | None = None,
) -> dict[str, Any]:
    """Time every method at every size, interleaved; finished samples are kept in ``raw_path``
    (JSON, with the settings and every method's settings) after each step, and a rerun
    continues from them. Samples of other settings are refused (:class:`SettingsMismatch`).

    With ``fuse_qkv`` the UNet's attention projections are fused once before timing
    (``fuse_qkv_projections``: SDPA runs ``FusedAttnProcessor2_0``), for every method. With
    ``compile`` the transformer blocks are compiled with ``compile_repeated_blocks``
    (``fullgraph=True``; a method that cannot trace without graph breaks falls back to
    ``fullgraph=False``, and its breaks are counted). The first call of every method, which
    compiles, is untimed; its duration is kept as ``first_call_s``. ``backend`` is the
    ``torch.compile`` backend (tests use ``aot_eager``, which traces alike but compiles nothing).
    A method that cannot run keeps the first line of its error (``error``) instead of samples.
    ``unet`` is any denoiser :func:`agentsd.apply_patch` takes; ``text_tokens`` the prompt length
    of its inputs (None: its family's).

    Raises:
        ValueError: for a method that has no per-step row (it wraps the whole pipeline call).
    """
    check_per_step(methods)
    record = JsonRecord(raw_path)
    raw = record.data
    param = next(unet.parameters())
    settings = dict(batch=batch, compile=compile, dtype=str(param.dtype), device=param.device.type,
                    fuse_qkv=fuse_qkv, methods={m.key: m.settings() for m in methods})
    diff = merge_settings(raw.setdefault("settings", settings), settings)
    if diff:
        raise SettingsMismatch(f"{raw_path} holds samples taken with other settings ({diff}); "
                               "use another --out or --fresh")
    if fuse_qkv and not any(getattr(m, "fused_projections", False) for m in unet.modules()):
        unet.fuse_qkv_projections()
    fullgraph: dict[str, bool] = {}

    def enter(method: Method) -> None:
        if compile:
            runtime.compile_blocks(unet, fullgraph.get(method.key, True), backend)
        method.apply(unet)

    for size in sizes:
        latent = size // 8
        inputs = denoiser_inputs(unet, batch, (latent, latent), device=param.device, dtype=param.dtype,
                                 text_tokens=text_tokens)
        results = raw.setdefault(str(size), {})
        for method in methods:  # warm-up, untimed: compilation, first-call allocations, kernel selection
            entry = results.setdefault(method.key, {"seconds": []})
            if len(entry["seconds"]) >= repeats:
                continue
            entry.pop("error", None)
            reason = method.unavailable()
            if reason is None:
                try:
                    _warm_up(method, entry, unet, inputs, enter, compile, fullgraph)
                except Exception as err:  # noqa: BLE001 - a method that does not run here is a row with its reason
                    method.remove(unet)
                    reason = failure(err)
            if reason is not None:
                entry["error"] = reason
                record.save()
        live = [m for m in methods if "error" not in results[m.key]]
        for rep in range(repeats):
            for method in live:
                entry = results[method.key]
                if len(entry["seconds"]) > rep:
                    continue
                enter(method)
                seconds = time_step(unet, inputs, sample_timesteps(method))
                method.remove(unet)
                entry["seconds"].append(seconds)
                record.save()
                progress(f"{size}px {method.key:>26} repeat {rep + 1}/{repeats}: {seconds:.3f} s")
        for method in live:  # memory in a separate, untimed pass: its sampling costs time
            entry = results[method.key]
            if "peak_mb" not in entry:
                enter(method)
                with runtime.PeakMemory(param.device) as mem:
                    time_step(unet, inputs, sample_timesteps(method))
                method.remove(unet)
                entry["peak_mb"] = mem.peak_mb
                record.save()
    record.save()
    return raw


def _warm_up(method: Method, entry: dict[str, Any], unet: torch.nn.Module, inputs: dict[str, Any],
             enter: Callable[[Method], None], compile: bool, fullgraph: dict[str, bool]) -> None:
    """The untimed first call(s) of ``method`` (see :func:`run_benchmark`); raises what stops it."""
    timesteps, breaks = sample_timesteps(method), sum(counters["graph_break"].values())
    enter(method)
    try:
        entry["first_call_s"] = time_step(unet, inputs, timesteps)
    except Exception as err:  # noqa: BLE001 - whatever stops a full graph, retry with breaks
        method.remove(unet)
        if not compile:
            raise
        fullgraph[method.key] = False
        entry["fullgraph_error"] = str(err).strip().splitlines()[0][:200]
        enter(method)
        entry["first_call_s"] = time_step(unet, inputs, timesteps)
    if compile:  # a second untimed call: a compiled method settles its guards
        time_step(unet, inputs, timesteps)
    method.remove(unet)
    if compile:
        entry["fullgraph"] = fullgraph.get(method.key, True)
        entry["graph_breaks"] = sum(counters["graph_break"].values()) - breaks
