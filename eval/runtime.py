"""Where the harnesses run and how they measure: the dtype names of the command lines, the
machine's name, peak memory, and regional compilation as diffusers users do it."""
from __future__ import annotations

import ctypes
import os
import platform
import threading
from typing import Any

import torch

#: The ``--dtype`` names of both command lines.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(name: str | None, device: torch.device | str) -> str:
    """``name``, or the default for ``device``: fp16 on CUDA, fp32 elsewhere."""
    return name or ("fp16" if torch.device(device).type == "cuda" else "fp32")


def machine_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU and its thread count: where the timings were taken."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


class PeakMemory:
    """Peak memory of a block: CUDA peak allocated, or on CPU the peak resident set size above
    the resident size at entry, sampled every 2 ms, after ``malloc_trim`` has returned freed
    memory to the system (so earlier blocks' freed tensors do not hide this one's)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
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


def compile_blocks(unet: torch.nn.Module, fullgraph: bool, backend: str | Any) -> None:
    """Regional compilation (``compile_repeated_blocks``), with dynamo's recompile limits raised so
    that every method's graphs stay cached side by side (a hit limit would silently fall back
    to eager)."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 8192
    if getattr(unet, "_repeated_blocks", None):
        unet.compile_repeated_blocks(fullgraph=fullgraph, backend=backend)
    else:  # what compile_repeated_blocks does, for a transformer that does not list its blocks (PixArt)
        for block in unet.transformer_blocks:
            block.compile(fullgraph=fullgraph, backend=backend)
