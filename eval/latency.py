"""UNet step latency of SD, tomesd and AgentSD, measured side by side in one process.

Every method runs on the same UNet and inputs, interleaved repeat by repeat, so that drifts of a
noisy machine hit all methods alike. Results are medians over the repeats and ratios against the
default SDPA processor. A lower bound is measured too: the same UNet whose patched
self-attention layers return zeros, i.e. the time left if the patched attention cost nothing.
"""
from __future__ import annotations

import ctypes
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch._dynamo.utils import counters

import agentsd

#: The UNet of Stable Diffusion 1.5 (859.5 M parameters), built with random weights.
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
)

METHODS = (
    "sdpa", "tomesd", "agentsd-agent", "agentsd-tome", "bound",
    "agentsd-agent-xattn", "bound-xattn", "agentsd-agent-mlp", "bound-mlp",
    "deepcache", "tomesd+deepcache", "agentsd-agent+deepcache", "bound+deepcache",
)
#: DeepCache's recommended settings for SD1.5 (its README): a full UNet every 3rd step, branch 0.
DEEPCACHE_DEFAULTS = dict(cache_interval=3, cache_branch_id=0)
#: What each bound makes free in the patched blocks, and which AgentSD variant it bounds.
BOUNDS = {"bound": ("attn1",), "bound-xattn": ("attn1", "attn2"), "bound-mlp": ("attn1", "ff")}
AGENTSD_VARIANTS = {  # method: (agent_fraction, extra settings, its bound)
    "agentsd-agent": (1.0, {}, "bound"),
    "agentsd-tome": (0.0, {}, "bound"),
    "agentsd-agent-xattn": (1.0, {"merge_crossattn": True}, "bound-xattn"),
    "agentsd-agent-mlp": (1.0, {"merge_mlp": True}, "bound-mlp"),
}


class ZeroAttnProcessor:
    """Attention that costs nothing: returns zeros (the bound of any attention speed-up)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class ZeroFeedForward(torch.nn.Module):
    """A feed-forward that costs nothing: returns zeros (input and output widths are equal)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


@dataclass
class Method:
    """One configuration to time: how to switch it on and off on a UNet, the timesteps of one
    timed sample (a sample's time is the mean over them), and the rows its share of the possible
    saving is measured between (``baseline`` to ``bound``)."""

    name: str
    ratio: float | None
    apply: Callable[[UNet2DConditionModel], None]
    remove: Callable[[UNet2DConditionModel], None]
    bound: str = "bound"
    baseline: str = "sdpa"
    timesteps: tuple[int, ...] = (500,)

    @property
    def key(self) -> str:
        return self.name if self.ratio is None else f"{self.name}@{self.ratio:g}"


def _bound(name: str) -> Method:
    """A bound: the given parts of the blocks AgentSD patches (by default) cost nothing."""
    parts = BOUNDS[name]
    saved: list[tuple[torch.nn.Module, str, Any]] = []

    def apply(unet: UNet2DConditionModel) -> None:
        for layer, (attn1, _) in agentsd.self_attention_layers(unet).items():
            block = unet.get_submodule(layer.rpartition(".")[0])
            for part in parts:
                module = getattr(block, part, None)
                if part == "ff" and module is not None:
                    saved.append((block, part, module))
                    block.ff = ZeroFeedForward()
                elif module is not None:
                    saved.append((module, "processor", module.processor))
                    module.set_processor(ZeroAttnProcessor())

    def remove(unet: UNet2DConditionModel) -> None:
        while saved:
            owner, attr, original = saved.pop()
            if attr == "processor":
                owner.set_processor(original)
            else:
                setattr(owner, attr, original)

    return Method(name, None, apply, remove, bound=name)


def with_deepcache(method: Method, cache_interval: int, cache_branch_id: int) -> Method:
    """``method`` with DeepCache (PyPI ``deepcache``) on top. One timed sample is one cache cycle:
    ``cache_interval`` UNet calls at consecutive timesteps of a 50-step PNDM schedule (the first
    runs the full UNet, the others only the shallow branch), so its time is the mean step."""
    from DeepCache import DeepCacheSDHelper
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    scheduler.set_timesteps(50)
    helpers: list[Any] = []

    def apply(unet: UNet2DConditionModel) -> None:
        method.apply(unet)
        helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=unet, scheduler=scheduler))
        helper.set_params(cache_interval=cache_interval, cache_branch_id=cache_branch_id)
        helper.enable()
        helpers.append(helper)

    def remove(unet: UNet2DConditionModel) -> None:
        helpers.pop().disable()
        method.remove(unet)

    name = "deepcache" if method.name == "sdpa" else f"{method.name}+deepcache"
    bound = f"{method.bound}+deepcache"
    timesteps = tuple(int(t) for t in scheduler.timesteps[:cache_interval])
    return Method(name, method.ratio, apply, remove, bound=bound, baseline="deepcache", timesteps=timesteps)


def build_methods(names: list[str], ratios: list[float], deepcache: dict[str, int] | None = None) -> list[Method]:
    """The methods to compare; ratio-dependent ones once per ratio. ``deepcache`` holds the
    ``cache_interval`` and ``cache_branch_id`` of the ``*deepcache`` methods (default:
    :data:`DEEPCACHE_DEFAULTS`)."""
    methods = []
    for name in names:
        if name.endswith("deepcache"):
            base = "sdpa" if name == "deepcache" else name.removesuffix("+deepcache")
            if base not in ("sdpa", "tomesd", "agentsd-agent", "bound"):
                raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
            settings = {**DEEPCACHE_DEFAULTS, **(deepcache or {})}
            methods += [with_deepcache(m, **settings) for m in build_methods([base], ratios)]
        elif name == "sdpa":
            methods.append(Method(name, None, lambda u: None, lambda u: None))
        elif name in BOUNDS:
            methods.append(_bound(name))
        elif name == "tomesd":
            import tomesd

            for r in ratios:
                methods.append(Method(name, r, lambda u, r=r: tomesd.apply_patch(u, ratio=r), tomesd.remove_patch))
        elif name in AGENTSD_VARIANTS:
            fraction, extra, bound = AGENTSD_VARIANTS[name]
            for r in ratios:
                methods.append(Method(
                    name, r, lambda u, r=r, f=fraction, e=extra: agentsd.apply_patch(u, ratio=r, agent_fraction=f, **e),
                    agentsd.remove_patch, bound=bound,
                ))
        else:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return methods


class PeakMemory:
    """Peak memory of a block: CUDA peak allocated, or on CPU the peak resident set size above
    the resident size at entry, sampled every 2 ms, after ``malloc_trim`` has returned freed
    memory to the system (so earlier blocks' freed tensors do not hide this one's)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _malloc_trim()
            self._base = self._peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._rss())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self._peak, self._rss()) - self._base) / 2**20


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def time_step(
    unet: UNet2DConditionModel, inputs: dict[str, torch.Tensor], timesteps: tuple[int, ...] = (500,)
) -> float:
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


class SettingsMismatch(ValueError):
    """The raw file holds samples taken with other settings."""


def _compile_blocks(unet: UNet2DConditionModel, fullgraph: bool, backend: str) -> None:
    """Regional compilation, as diffusers users do it; recompile limits raised so that every
    method's graphs stay cached side by side (a hit limit would silently fall back to eager)."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 8192
    unet.compile_repeated_blocks(fullgraph=fullgraph, backend=backend)


def run_benchmark(
    unet: UNet2DConditionModel,
    sizes: list[int],
    methods: list[Method],
    repeats: int,
    batch: int,
    raw_path: Path,
    progress: Callable[[str], None] = print,
    compile: bool = False,
    backend: str = "inductor",
) -> dict[str, Any]:
    """Time every method at every size, interleaved; finished samples are kept in ``raw_path``
    (JSON) after each step, and a rerun continues from them.

    With ``compile``, the transformer blocks are compiled with ``compile_repeated_blocks``
    (``fullgraph=True``; a method that cannot trace without graph breaks falls back to
    ``fullgraph=False``, and its breaks are counted). The first call of every method, which
    compiles, is untimed; its duration is kept as ``first_call_s``. ``backend`` is the
    ``torch.compile`` backend (tests use ``aot_eager``, which traces alike but compiles nothing).
    """
    raw: dict[str, Any] = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    param = next(unet.parameters())
    settings = dict(batch=batch, compile=compile, dtype=str(param.dtype), device=param.device.type)
    if raw.setdefault("settings", settings) != settings:
        raise SettingsMismatch(
            f"{raw_path} holds samples taken with {raw['settings']}, not {settings}; use another --out or --fresh"
        )
    fullgraph: dict[str, bool] = {}

    def enter(method: Method) -> None:
        if compile:
            _compile_blocks(unet, fullgraph.get(method.key, True), backend)
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
            breaks = sum(counters["graph_break"].values())
            enter(method)
            try:
                entry["first_call_s"] = time_step(unet, inputs, method.timesteps)
            except Exception as err:  # noqa: BLE001 - whatever stops a full graph, retry with breaks
                if not compile:
                    raise
                method.remove(unet)
                fullgraph[method.key] = False
                entry["fullgraph_error"] = str(err).strip().splitlines()[0][:200]
                enter(method)
                entry["first_call_s"] = time_step(unet, inputs, method.timesteps)
            if compile:  # a second untimed call: a compiled method settles its guards
                time_step(unet, inputs, method.timesteps)
            method.remove(unet)
            if compile:
                entry["fullgraph"] = fullgraph.get(method.key, True)
                entry["graph_breaks"] = sum(counters["graph_break"].values()) - breaks
        for rep in range(repeats):
            for method in methods:
                entry = results[method.key]
                if len(entry["seconds"]) > rep:
                    continue
                enter(method)
                seconds = time_step(unet, inputs, method.timesteps)
                method.remove(unet)
                entry["seconds"].append(seconds)
                raw_path.write_text(json.dumps(raw, indent=1))
                progress(f"{size}px {method.key:>24} repeat {rep + 1}/{repeats}: {seconds:.3f} s")
        for method in methods:  # memory in a separate, untimed pass: its sampling costs time
            entry = results[method.key]
            if "peak_mb" not in entry:
                enter(method)
                with PeakMemory(param.device) as mem:
                    time_step(unet, inputs, method.timesteps)
                method.remove(unet)
                entry["peak_mb"] = mem.peak_mb
                raw_path.write_text(json.dumps(raw, indent=1))
    return raw


def saving_share(
    t_base: float | None, t: float | None, t_bound: float | None, min_saving: float = 0.02
) -> float | None:
    """``(t_base - t) / (t_base - t_bound)``: the share of the possible saving reached. None when a
    time is missing or the bound saves less than ``min_saving`` of ``t_base``: then there is
    nothing to share, and the ratio would only magnify noise."""
    if not (t_base and t and t_bound) or t_base - t_bound < min_saving * t_base:
        return None
    return (t_base - t) / (t_base - t_bound)


def summarize(raw: dict[str, Any], methods: list[Method], sizes: list[int]) -> list[dict[str, Any]]:
    """One row per (size, method): median seconds, speed-up, share of the possible saving (against
    the method's own bound), and with compilation the first call's seconds and graph breaks."""
    rows = []
    for size in sizes:
        results = raw[str(size)]
        median = {key: statistics.median(entry["seconds"]) for key, entry in results.items()}
        t_sdpa = median.get("sdpa")
        for method in methods:
            entry = results[method.key]
            t = median[method.key]
            rows.append(dict(
                size=size, method=method.name, ratio=method.ratio, median_s=t,
                min_s=min(entry["seconds"]), repeats=len(entry["seconds"]),
                peak_mb=entry["peak_mb"],
                speedup=t_sdpa / t if t_sdpa else None,
                bound=method.bound,
                baseline=method.baseline,
                saving_share=saving_share(median.get(method.baseline), t, median.get(method.bound)),
                first_call_s=entry.get("first_call_s"),
                graph_breaks=entry.get("graph_breaks"),
            ))
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The summary as a markdown table (with first-call time and graph breaks when compiled)."""
    compiled = any(r["graph_breaks"] is not None for r in rows)
    header = "| size | method | ratio | median s/step | speed-up vs SDPA | share of possible saving | peak memory MB |"
    if compiled:
        header += " first call s (compiles) | graph breaks |"
    lines = [header, "|---" * header.count(" |") + "|"]

    def fmt(value: float | None, spec: str, unit: str = "") -> str:
        return "–" if value is None else format(value, spec) + unit

    for r in rows:
        share = None if r["saving_share"] is None else 100 * r["saving_share"]
        bound = "" if r["bound"] == "bound" or r["saving_share"] is None else f" ({r['baseline']} -> {r['bound']})"
        line = (
            f"| {r['size']} | {r['method']} | {fmt(r['ratio'], 'g')} | {r['median_s']:.3f} | "
            f"{fmt(r['speedup'], '.2f', 'x')} | {fmt(share, '.0f', ' %')}{bound} | {r['peak_mb']:.0f} |"
        )
        if compiled:
            line += f" {fmt(r['first_call_s'], '.1f')} | {fmt(r['graph_breaks'], 'd')} |"
        lines.append(line)
    return "\n".join(lines)
