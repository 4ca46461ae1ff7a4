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
import math
import weakref
from typing import Any, NamedTuple

import torch

from .config import AgentSDConfig, Phase
from .merge import TokenMerge, mix32
from .schedule import denoising_progress


class BlockMerges(NamedTuple):
    """The merges of one block for one forward: ``tokens`` (the merged tokens, None when no token
    is merged away) and ``agents`` (the stronger merge that forms the agents, None when the step
    uses no agents)."""

    tokens: TokenMerge | None
    agents: TokenMerge | None


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

    @property
    def pipeline(self) -> Any | None:
        return self._pipeline() if self._pipeline is not None else None

    def start_step(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> None:
        """Record the latent size, pick the phase and write the step key for a UNet call."""
        size = (int(sample.shape[-2]), int(sample.shape[-1]))
        if size != self.latent_size:  # a new tuple only when it changes
            self.latent_size = size
        pipeline = self.pipeline
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        scheduler, num_steps = getattr(pipeline, "scheduler", None), getattr(pipeline, "_num_timesteps", None)
        progress = denoising_progress(t, scheduler, num_steps)
        cfg = self.config
        self.phase = cfg.phase_at(progress)
        if self.step_key is None or self.step_key.device != sample.device:
            self.step_key = torch.zeros((), dtype=torch.long, device=sample.device)
            for block in self.blocks:
                block.layer_key = torch.tensor(mix32(block.layer + 0x9E3779B9), device=sample.device)
        # the same timestep gives the same merges, in every run, process and on every device
        self.step_key.fill_(mix32(mix32(cfg.seed) ^ round(t * 16)))

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
    """

    def __init__(self, state: PatchState, layer: int, downsample: int) -> None:
        self.state = state
        self.layer = layer
        self.downsample = downsample
        self.layer_key: torch.Tensor | None = None
        self.merges: BlockMerges | None = None

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
