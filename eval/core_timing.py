"""The cost of the library's own machinery, against an earlier version of it, in one run.

Two measurements, every version interleaved repeat by repeat on the same model and inputs:

- **hooks**: calls of a tiny UNet whose patch changes nothing (ratio 0, the late phase), so what
  the patch adds is its hooks alone: each sample is the mean time of a few patched calls minus
  that of as many plain calls just before, reported per call in microseconds (median and
  quartiles of the samples; a machine whose speed drifts by more than the hooks cost between two
  long runs still gives a tight difference between two short ones).
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
#: a tiny UNet (two levels with attention), whose call is short enough for the hooks' cost to show
TINY_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
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


def _rotated(items: list[Any], round_: int) -> list[Any]:
    k = round_ % len(items)
    return items[k:] + items[:k]


def _quartiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=4) if len(values) > 1 else values * 3


def run(ref: str, size: int = 512, batch: int = 2, repeats: int = 5, hook_pairs: int = 60, hook_calls: int = 20,
        progress: Any = print) -> dict[str, Any]:
    """Both measurements for the current library and the one of ``ref``; see the module docstring."""
    import agentsd

    with tempfile.TemporaryDirectory() as tmp:
        earlier = import_version(ref, Path(tmp))
        versions = {"plain": None, ref: earlier, "current": agentsd}
        torch.manual_seed(0)
        results: dict[str, Any] = {"ref": ref, "size": size, "batch": batch, "repeats": repeats,
                                   "threads": torch.get_num_threads()}

        tiny = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
        inputs = (torch.randn(batch, 4, 8, 8), torch.randn(batch, 77, 32))

        def mean_call_us() -> float:
            start = time.perf_counter()
            for _ in range(hook_calls):
                tiny(inputs[0], torch.tensor(100), inputs[1])
            return (time.perf_counter() - start) / hook_calls * 1e6

        libraries = {name: library for name, library in versions.items() if library is not None}
        hooks: dict[str, list[float]] = {name: [] for name in libraries}
        with torch.inference_mode():
            for _ in range(5):
                tiny(inputs[0], 100, inputs[1])
            for round_ in range(hook_pairs):
                for name, library in _rotated(list(libraries.items()), round_):
                    plain = mean_call_us()
                    library.apply_patch(tiny, ratio=0.0, agent_fraction=0.0)  # its hooks, changing nothing
                    tiny(inputs[0], 100, inputs[1])
                    hooks[name].append(mean_call_us() - plain)
                    library.remove_patch(tiny)
        results["hooks_us"] = {name: _quartiles(v) for name, v in hooks.items()}
        progress(f"hooks (quartiles, us per call): {results['hooks_us']}")

        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
        latent = size // 8
        sample, text = torch.randn(batch, 4, latent, latent), torch.randn(batch, 77, 768)
        blocks = _patched_blocks(unet, agentsd)
        step: dict[str, list[float]] = {name: [] for name in versions}
        block: dict[str, list[float]] = {name: [] for name in versions}
        with torch.inference_mode():
            for repeat in range(repeats + 1):  # the first round warms up, untimed
                for name, library in _rotated(list(versions.items()), repeat):
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
        results["tiny_unet"] = TINY_UNET_CONFIG
        results["patched_blocks"] = len(blocks)
    return results


def table(results: dict[str, Any]) -> str:
    """The results as a markdown table."""
    ref = results["ref"]
    hooks, step, block = results["hooks_us"], results["step_s"], results["block_ms"]

    def quartiles(name: str) -> str:
        low, mid, high = hooks[name]
        return f"{mid:.0f} ({low:.0f} to {high:.0f})"

    lines = [
        f"| | plain | core at {ref} | current core | current / {ref} |",
        "|---|---|---|---|---|",
        f"| hooks' cost per UNet call, µs (median, quartiles) | – | {quartiles(ref)} | {quartiles('current')} | – |",
        f"| agent phase, one patched block at {results['size']} px (ms) | {block['plain']:.0f} | {block[ref]:.0f} | "
        f"{block['current']:.0f} | {block['current'] / block[ref]:.3f} |",
        f"| agent phase, one UNet step at {results['size']} px (s) | {step['plain']:.2f} | {step[ref]:.2f} | "
        f"{step['current']:.2f} | {step['current'] / step[ref]:.3f} |",
    ]
    return "\n".join(lines)
