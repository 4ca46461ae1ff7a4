"""The cost of the library's own machinery, against an earlier version of it, in one run.

Two measurements, every version interleaved repeat by repeat on the same model and inputs:

- **hooks**: one call of a small UNet whose patch changes nothing (ratio 0, the late phase), so
  what the patch adds is its hooks alone; reported per call in microseconds above the plain UNet.
- **agent phase**: one step of the SD1.5-architecture UNet (random weights) at ``size`` px in the
  agent phase, with the time spent inside the patched transformer blocks (their hooks included)
  per block, from PyTorch forward hooks registered around each block.

The earlier version is the ``agentsd/`` folder of a git ref of this repository, exported to a
temporary folder and imported under another name, so both versions run in one process.
"""
from __future__ import annotations

import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from eval.latency import SD15_UNET_CONFIG

ROOT = Path(__file__).resolve().parents[1]
#: a small UNet of the SD1.5 layout, where a call is short enough for the hooks' cost to show
SMALL_UNET_CONFIG: dict[str, Any] = dict(
    SD15_UNET_CONFIG, block_out_channels=(32, 64, 64, 64), attention_head_dim=4, cross_attention_dim=32,
    norm_num_groups=8, sample_size=16,
)


def import_version(ref: str, folder: Path) -> ModuleType:
    """The ``agentsd`` package of git ``ref``, imported as ``agentsd_<ref>`` from ``folder``."""
    name = "agentsd_" + "".join(c if c.isalnum() else "_" for c in ref)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref, "agentsd"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "agentsd").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class BlockTimer:
    """Seconds spent inside the given blocks (their forward hooks included), summed over calls."""

    def __init__(self, blocks: list[torch.nn.Module]) -> None:
        self.seconds = 0.0
        self._start: list[float] = []
        self.handles = []
        for block in blocks:
            self.handles.append(block.register_forward_pre_hook(self._begin, prepend=True))
            self.handles.append(block.register_forward_hook(self._end, always_call=True))

    def _begin(self, module: Any, args: Any) -> None:
        self._start.append(time.perf_counter())

    def _end(self, module: Any, args: Any, output: Any) -> None:
        self.seconds += time.perf_counter() - self._start.pop()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _patched_blocks(unet: UNet2DConditionModel, library: ModuleType) -> list[torch.nn.Module]:
    names = library.self_attention_layers(unet)
    return [unet.get_submodule(name.rpartition(".")[0]) for name in names]


def run(ref: str, size: int = 512, batch: int = 2, repeats: int = 5, hook_calls: int = 200,
        progress: Any = print) -> dict[str, Any]:
    """Both measurements for the current library and the one of ``ref``; see the module docstring."""
    import agentsd

    with tempfile.TemporaryDirectory() as tmp:
        earlier = import_version(ref, Path(tmp))
        versions = {"plain": None, ref: earlier, "current": agentsd}
        torch.manual_seed(0)
        results: dict[str, Any] = {"ref": ref, "size": size, "batch": batch, "repeats": repeats,
                                   "threads": torch.get_num_threads()}

        small = UNet2DConditionModel(**SMALL_UNET_CONFIG).eval()
        inputs = (torch.randn(batch, 4, 16, 16), torch.randn(batch, 77, 32))
        hooks: dict[str, list[float]] = {name: [] for name in versions}
        with torch.inference_mode():
            for _ in range(repeats):
                for name, library in versions.items():
                    if library is not None:  # a patch whose phase changes nothing: its hooks alone
                        library.apply_patch(small, ratio=0.0, agent_fraction=0.0)
                    for _ in range(5):
                        small(inputs[0], 100, inputs[1])
                    start = time.perf_counter()
                    for _ in range(hook_calls):
                        small(inputs[0], torch.tensor(100), inputs[1])
                    hooks[name].append((time.perf_counter() - start) / hook_calls * 1e6)
                    if library is not None:
                        library.remove_patch(small)
        results["hooks_us"] = {name: _median(v) for name, v in hooks.items()}
        progress(f"hooks: {results['hooks_us']}")

        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
        latent = size // 8
        sample, text = torch.randn(batch, 4, latent, latent), torch.randn(batch, 77, 768)
        blocks = _patched_blocks(unet, agentsd)
        step: dict[str, list[float]] = {name: [] for name in versions}
        block: dict[str, list[float]] = {name: [] for name in versions}
        with torch.inference_mode():
            for repeat in range(repeats + 1):  # the first round warms up, untimed
                for name, library in versions.items():
                    if library is not None:
                        library.apply_patch(unet, agent_fraction=1.0)
                    timer = BlockTimer(blocks)
                    start = time.perf_counter()
                    unet(sample, torch.tensor(500), text)
                    seconds = time.perf_counter() - start
                    timer.remove()
                    if library is not None:
                        library.remove_patch(unet)
                    if repeat:
                        step[name].append(seconds)
                        block[name].append(timer.seconds / len(blocks))
                        progress(f"{name}: step {seconds:.2f} s, block {timer.seconds / len(blocks) * 1e3:.0f} ms")
        results["step_s"] = {name: _median(v) for name, v in step.items()}
        results["block_ms"] = {name: _median(v) * 1e3 for name, v in block.items()}
        results["samples"] = {"hooks_us": hooks, "step_s": step, "block_s": block}
        results["patched_blocks"] = len(blocks)
    return results


def table(results: dict[str, Any]) -> str:
    """The results as a markdown table."""
    ref = results["ref"]
    hooks, step, block = results["hooks_us"], results["step_s"], results["block_ms"]
    lines = [
        f"| | plain | core at {ref} | current core | current / {ref} |",
        "|---|---|---|---|---|",
        f"| small UNet call, patch on but changing nothing (µs) | {hooks['plain']:.0f} | {hooks[ref]:.0f} | "
        f"{hooks['current']:.0f} | {hooks['current'] / hooks[ref]:.3f} |",
        f"| hooks' cost per call (µs above plain) | – | {hooks[ref] - hooks['plain']:.0f} | "
        f"{hooks['current'] - hooks['plain']:.0f} | – |",
        f"| agent phase, one patched block at {results['size']} px (ms) | {block['plain']:.0f} | {block[ref]:.0f} | "
        f"{block['current']:.0f} | {block['current'] / block[ref]:.3f} |",
        f"| agent phase, one UNet step at {results['size']} px (s) | {step['plain']:.2f} | {step[ref]:.2f} | "
        f"{step['current']:.2f} | {step['current'] / step[ref]:.3f} |",
    ]
    return "\n".join(lines)
