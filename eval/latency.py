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
from typing import Any

import torch
from diffusers import UNet2DConditionModel

import agentsd

#: The UNet of Stable Diffusion 1.5 (859.5 M parameters), built with random weights.
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
)

METHODS = ("sdpa", "tomesd", "agentsd-agent", "agentsd-tome", "bound")


class ZeroAttnProcessor:
    """Attention that costs nothing: returns zeros (the bound of any attention speed-up)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


@dataclass
class Method:
    """One configuration to time: how to switch it on and off on a UNet."""

    name: str
    ratio: float | None
    apply: Callable[[UNet2DConditionModel], None]
    remove: Callable[[UNet2DConditionModel], None]

    @property
    def key(self) -> str:
        return self.name if self.ratio is None else f"{self.name}@{self.ratio:g}"


def build_methods(names: list[str], ratios: list[float]) -> list[Method]:
    """The methods to compare; ratio-dependent ones once per ratio."""
    methods = []
    for name in names:
        if name == "sdpa":
            methods.append(Method(name, None, lambda u: None, lambda u: None))
        elif name == "bound":
            saved: dict[str, Any] = {}

            def apply_bound(unet: UNet2DConditionModel) -> None:
                for layer, (module, _) in agentsd.self_attention_layers(unet, 1).items():
                    saved[layer] = module.processor
                    module.set_processor(ZeroAttnProcessor())

            def remove_bound(unet: UNet2DConditionModel) -> None:
                for layer, (module, _) in agentsd.self_attention_layers(unet, 1).items():
                    module.set_processor(saved.pop(layer))

            methods.append(Method(name, None, apply_bound, remove_bound))
        elif name == "tomesd":
            import tomesd

            for r in ratios:
                methods.append(Method(name, r, lambda u, r=r: tomesd.apply_patch(u, ratio=r), tomesd.remove_patch))
        elif name in ("agentsd-agent", "agentsd-tome"):
            fraction = 1.0 if name == "agentsd-agent" else 0.0
            for r in ratios:
                methods.append(Method(
                    name, r, lambda u, r=r, f=fraction: agentsd.apply_patch(u, ratio=r, agent_fraction=f),
                    agentsd.remove_patch,
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


def time_step(unet: UNet2DConditionModel, inputs: dict[str, torch.Tensor]) -> float:
    """Seconds for one UNet forward (inputs positional: tomesd's hook reads ``args[0]``)."""
    sync = torch.cuda.synchronize if inputs["sample"].is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    sync()
    return time.perf_counter() - start


def run_benchmark(
    unet: UNet2DConditionModel,
    sizes: list[int],
    methods: list[Method],
    repeats: int,
    batch: int,
    raw_path: Path,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time every method at every size, interleaved; finished samples are kept in ``raw_path``
    (JSON) after each step, and a rerun continues from them."""
    raw: dict[str, Any] = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    param = next(unet.parameters())
    for size in sizes:
        g = torch.Generator().manual_seed(0)
        latent = size // 8
        inputs = dict(
            sample=torch.randn(batch, 4, latent, latent, generator=g).to(param),
            timestep=torch.tensor(500, device=param.device),
            encoder_hidden_states=torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(param),
        )
        for method in methods:  # warm-up, untimed: first-call allocations and kernel selection
            if len(raw.get(str(size), {}).get(method.key, {}).get("seconds", [])) < repeats:
                method.apply(unet)
                time_step(unet, inputs)
                method.remove(unet)
        for rep in range(repeats):
            for method in methods:
                entry = raw.setdefault(str(size), {}).setdefault(method.key, {"seconds": []})
                if len(entry["seconds"]) > rep:
                    continue
                method.apply(unet)
                seconds = time_step(unet, inputs)
                method.remove(unet)
                entry["seconds"].append(seconds)
                raw_path.write_text(json.dumps(raw, indent=1))
                progress(f"{size}px {method.key:>18} repeat {rep + 1}/{repeats}: {seconds:.3f} s")
        for method in methods:  # memory in a separate, untimed pass: its sampling costs time
            entry = raw[str(size)][method.key]
            if "peak_mb" not in entry:
                method.apply(unet)
                with PeakMemory(param.device) as mem:
                    time_step(unet, inputs)
                method.remove(unet)
                entry["peak_mb"] = mem.peak_mb
                raw_path.write_text(json.dumps(raw, indent=1))
    return raw


def saving_share(t_base: float | None, t: float | None, t_bound: float | None, min_saving: float = 0.02) -> float | None:
    """``(t_base - t) / (t_base - t_bound)``: the share of the possible saving reached. None when a
    time is missing or the bound saves less than ``min_saving`` of ``t_base``: then there is
    nothing to share, and the ratio would only magnify noise."""
    if not (t_base and t and t_bound) or t_base - t_bound < min_saving * t_base:
        return None
    return (t_base - t) / (t_base - t_bound)


def summarize(raw: dict[str, Any], methods: list[Method], sizes: list[int]) -> list[dict[str, Any]]:
    """One row per (size, method): median seconds, speed-up, share of the possible saving."""
    rows = []
    for size in sizes:
        results = raw[str(size)]
        t_sdpa = statistics.median(results["sdpa"]["seconds"]) if "sdpa" in results else None
        t_bound = statistics.median(results["bound"]["seconds"]) if "bound" in results else None
        for method in methods:
            entry = results[method.key]
            t = statistics.median(entry["seconds"])
            row = dict(
                size=size, method=method.name, ratio=method.ratio, median_s=t,
                min_s=min(entry["seconds"]), repeats=len(entry["seconds"]),
                peak_mb=entry["peak_mb"],
                speedup=t_sdpa / t if t_sdpa else None,
                saving_share=saving_share(t_sdpa, t, t_bound),
            )
            rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The summary as a markdown table."""
    lines = [
        "| size | method | ratio | median s/step | speed-up vs SDPA | share of possible saving | peak memory MB |",
        "|---|---|---|---|---|---|---|",
    ]
    def fmt(value: float | None, spec: str, unit: str = "") -> str:
        return "–" if value is None else format(value, spec) + unit

    for r in rows:
        share = None if r["saving_share"] is None else 100 * r["saving_share"]
        lines.append(
            f"| {r['size']} | {r['method']} | {fmt(r['ratio'], 'g')} | {r['median_s']:.3f} | "
            f"{fmt(r['speedup'], '.2f', 'x')} | {fmt(share, '.0f', ' %')} | {r['peak_mb']:.0f} |"
        )
    return "\n".join(lines)
