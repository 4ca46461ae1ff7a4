"""What the hooks and processors of one patched UNet share.

:class:`PatchState` holds the settings and what changes from one UNet call to the next: the
latent size, the phase, and the step's random key. :class:`BlockState` holds, for one patched
transformer block, the merges that its hook computes from the block input and that its layers
use during that block's forward.

Values that change every step reach the patched layers as device tensors updated in place
(``step_key``), so that compiled code does not guard on them. The Python values the layers read
(latent size, phase) change only with the resolution and between the two phases.
"""
from __future__ import annotations

import copy
import logging
import math
import weakref
from typing import Any, NamedTuple

import torch

from .config import AgentSDConfig, Phase
from .merge import TokenMerge, mix32
from .pool import CellPool
from .schedule import StepTracker

logger = logging.getLogger(__name__)


class BlockMerges(NamedTuple):
    """The token reductions of one block for one forward.

    Attributes:
        tokens: the merge of the tokens that attention runs on (q, k and v), unmerged after; None
            when every token is kept.
        agents: how the agents are made from the attention input (a stronger merge of the same
            match, or the pooling of cells); None when the step uses no agents.
        kv: the pooling of the keys and values (``reduction="pool"``); None when they are not
            pooled.
    """

    tokens: TokenMerge | None
    agents: TokenMerge | CellPool | None
    kv: CellPool | None = None

    @property
    def num_tokens(self) -> int:
        """The number of tokens of the attention input these reductions apply to."""
        return next(r.num_tokens for r in self if r is not None)


class PatchState:
    """Settings and per-call state of one patched UNet.

    Args:
        config: the settings.
        pipeline: the pipeline whose scheduler tells the step in progress, or None for a bare UNet
            (then the phase follows the timestep).
    """

    def __init__(self, config: AgentSDConfig, pipeline: Any | None) -> None:
        self.config = config
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self.latent_size: tuple[int, int] | None = None
        self.phase: Phase | None = None
        #: 0-dim int64 on the UNet's device: the random key of the step in progress.
        self.step_key: torch.Tensor | None = None
        self.blocks: list[BlockState] = []
        self.steps = StepTracker()
        #: why patched blocks ran without reducing where the phase says they should: reasons
        #: noted during a UNet call (:meth:`note_fallback`), reported once per patch after it
        self.pending: set[str] = set()
        self.reported: set[str] = set()

    @property
    def pipeline(self) -> Any | None:
        return self._pipeline() if self._pipeline is not None else None

    def start_step(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> None:
        """Record the latent size, pick the phase and write the step key for a UNet call."""
        size = (int(sample.shape[-2]), int(sample.shape[-1]))
        if size != self.latent_size:  # a new tuple only when it changes
            self.latent_size = size
        pipeline = self.pipeline
        scheduler, num_steps = getattr(pipeline, "scheduler", None), getattr(pipeline, "_num_timesteps", None)
        progress, t = self.steps.progress(timestep, scheduler, num_steps)
        cfg = self.config
        self.phase = cfg.phase_at(progress)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("UNet call at t=%g, progress %.3f: %s, latent %dx%d", t, progress, self.phase, *size)
        if self.step_key is None or self.step_key.device != sample.device:
            self.step_key = torch.zeros((), dtype=torch.long, device=sample.device)
            for block in self.blocks:
                block.layer_key = torch.tensor(mix32(block.layer + 0x9E3779B9), device=sample.device)
        # the same timestep gives the same merges, in every run, process and on every device
        self.step_key.fill_(mix32(mix32(cfg.seed) ^ round(t * 16)))

    def note_fallback(self, reason: str) -> None:
        """Note that a patched block ran without reducing where the phase says it should."""
        if reason not in self.reported:
            self.pending.add(reason)

    def report(self) -> None:
        """Log each reason noted since the last report that this patch has not logged before."""
        for reason in sorted(self.pending - self.reported):
            logger.warning("AgentSD did not reduce tokens where its phase says it should: %s", reason)
        self.reported |= self.pending
        self.pending.clear()

    def __getstate__(self) -> dict[str, Any]:
        # pickle: no weakref; the copy follows the schedule its timesteps come from (see schedule)
        return {**self.__dict__, "_pipeline": None}

    def __deepcopy__(self, memo: dict[int, Any]) -> "PatchState":
        # A copy made with its pipeline follows the copied pipeline; a UNet copied alone has no
        # pipeline (its phase then follows the timestep), never the original's.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name != "_pipeline":
                setattr(new, name, copy.deepcopy(value, memo))
        pipeline = memo.get(id(self.pipeline)) if self.pipeline is not None else None
        new._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        return new


class BlockState:
    """One patched transformer block: its level, its random key, the merges of its forward.

    Args:
        state: the UNet's :class:`PatchState`.
        layer: index of the block among the patched blocks (part of its random key).
        downsample: the downsampling factor of the block's level (1 = latent resolution).
        name: the block's module name in the UNet, for messages.
    """

    def __init__(self, state: PatchState, layer: int, downsample: int, name: str = "") -> None:
        self.state = state
        self.name = name
        self.layer = layer
        self.downsample = downsample
        self.layer_key: torch.Tensor | None = None
        self.merges: BlockMerges | None = None
        #: the attention modules of the block whose processor AgentSD wraps, with the wrapper class
        self.layers: list[tuple[torch.nn.Module, type]] = []

    def grid(self, hidden_states: torch.Tensor) -> tuple[int, int] | None:
        """The token grid of this level, or None when it does not fit ``hidden_states``."""
        size = self.state.latent_size
        if size is None or hidden_states.ndim != 3:
            return None
        h, w = (math.ceil(s / self.downsample) for s in size)
        return (h, w) if h * w == hidden_states.shape[1] else None

    def key(self) -> torch.Tensor:
        """The random key of this block at the step in progress (a device tensor)."""
        return mix32(self.state.step_key ^ self.layer_key)
