"""What one call of a patched model computes, kept with that call.

A denoiser call pushes a :class:`Step` (its phase, token grid and random key) when it begins and
pops it when it returns; a patched block pushes a :class:`BlockCall` (the token reductions it
matched on its input) around its own forward, where its attention and feed-forward layers read it.
The frames live on a stack of the calling thread, so two threads on one model never see each
other's, and a call made inside another (a nested pipeline, a callback) stacks on top of it and
leaves it as it was. Nothing is written on the shared modules.

The stack is a ``threading.local``: ``contextvars.ContextVar.get`` cannot be traced by
``torch.compile``, while a thread-local list can, so compiled blocks read their frame with no
graph break.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .config import Phase

if TYPE_CHECKING:
    from .reduce import Reductions

_local = threading.local()


class Step(NamedTuple):
    """One call of a patched denoiser.

    Attributes:
        owner: the patch this call runs under (a block only acts on a step of its own patch).
        agent: whether the call's timestep selects the agent phase.
        size: the latent size ``(H, W)`` of the call.
        key: 0-dim int64 on the call's device: the random key of the call, from the seed and the
            timestep.
        notes: why patched layers of this call did not reduce tokens where the phase says they
            should (logged once per patch when the call returns).
    """

    owner: Any
    agent: bool
    size: tuple[int, int]
    key: torch.Tensor
    notes: set[str]

    @property
    def phase(self) -> Phase:
        """The phase of the call. Read through the patch's settings, each phase from its own
        attribute: ``torch.compile`` then sees each phase's numbers stay the same from call to
        call, where one attribute taking both phases' numbers would make it trace them as symbols
        (automatic dynamic shapes), with much longer compilations."""
        config = self.owner.config
        return config.agent_phase if self.agent else config.tome_phase


class BlockCall(NamedTuple):
    """One forward of a patched transformer block.

    Attributes:
        step: the denoiser call it belongs to.
        merges: the token reductions of this forward, matched on the block input.
        rows: the batch rows the feed-forward has seen (``merge_mlp`` with the feed-forward
            chunked over the batch).
    """

    step: Step
    merges: "Reductions"
    rows: list[int]


def frames() -> list[Any]:
    """The calling thread's stack of frames (created empty on first use)."""
    stack = getattr(_local, "frames", None)
    if stack is None:
        stack = _local.frames = []
    return stack


def current() -> Any:
    """The innermost frame of the calling thread, or None."""
    stack = getattr(_local, "frames", None)
    return stack[-1] if stack else None
