"""Per-step UNet latency of every method, measured side by side in one process.

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
from diffusers import UNet2DConditionModel
from torch._dynamo.utils import counters

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
#: The methods timed by default (the DeepCache ones only when asked for).
DEFAULT_METHODS = ("sd", "tomesd", "todo", "agentsd", "agentsd-pool", "bound", "agentsd-xattn", "bound-xattn",
                   "agentsd-mlp", "bound-mlp")
PHASES = ("agent", "late")
#: Also importable from here, where earlier versions had them.
__all__ = ["SD15_UNET_CONFIG", "DEFAULT_METHODS", "PHASES", "SettingsMismatch", "build_methods", "run_benchmark",
           "sample_timesteps", "saving_share", "time_step"]


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


def time_step(unet: UNet2DConditionModel, inputs: dict[str, torch.Tensor],
              timesteps: tuple[int, ...] = (500,)) -> float:
    """Mean seconds of one UNet forward at each of ``timesteps`` (inputs positional: tomesd's hook
    reads ``args[0]``, DeepCache's ``args[1]``)."""
    sample = inputs["sample"]
    sync = torch.cuda.synchronize if sample.is_cuda else (lambda: None)
    steps = [torch.tensor(t, device=sample.device) for t in timesteps]
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        for t in steps:
            unet(sample, t, inputs["encoder_hidden_states"])
    sync()
    return (time.perf_counter() - start) / len(steps)


def run_benchmark(
    unet: UNet2DConditionModel,
    sizes: list[int],
    methods: list[Method],
    repeats: int,
    batch: int,
    raw_path: Path,
    progress: Callable[[str], None] = print,
    compile: bool = False,
    backend: str | Any = "inductor",
    fuse_qkv: bool = False,
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
        g = torch.Generator().manual_seed(0)
        latent = size // 8
        inputs = dict(
            sample=torch.randn(batch, 4, latent, latent, generator=g).to(param),
            encoder_hidden_states=torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(param),
        )
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


def _warm_up(method: Method, entry: dict[str, Any], unet: UNet2DConditionModel, inputs: dict[str, torch.Tensor],
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
