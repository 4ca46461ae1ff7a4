"""Where the denoising stands: the progress that selects the AgentSD phase.

On a pipeline the progress is the index of the current timestep among the steps of the run in
progress, divided by their number. The steps of the run are ``scheduler.timesteps`` from the
scheduler's begin index on or, for schedulers without one, the last ``num_steps`` of them (the
pipeline's ``_num_timesteps``), so img2img counts only the steps it runs. This works for
every scheduler and step count, with classifier-free guidance on or off, and does not count UNet
calls. Without a scheduler, or for a timestep that is not in its schedule, the progress follows
the timestep itself: ``1 - t / num_train_timesteps``.
"""
from __future__ import annotations

from typing import Any

import torch


def _as_float(timestep: torch.Tensor | float | int) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)


def denoising_progress(
    timestep: torch.Tensor | float | int, scheduler: Any | None = None, num_steps: int | None = None
) -> float:
    """Share of the denoising done before ``timestep``, in [0, 1].

    Args:
        timestep: the timestep passed to the UNet (a scalar or one per batch element).
        scheduler: the pipeline's scheduler, if any.
        num_steps: the number of timesteps the pipeline runs, if known.
    """
    t = _as_float(timestep)
    num_train = 1000
    if scheduler is not None:
        num_train = getattr(getattr(scheduler, "config", None), "num_train_timesteps", num_train)
        timesteps = getattr(scheduler, "timesteps", None)
        if isinstance(timesteps, torch.Tensor) and timesteps.numel() > 0:
            begin = getattr(scheduler, "_begin_index", None)
            if begin is None:
                begin = timesteps.numel() - num_steps if num_steps else 0
            hits = (timesteps.detach().cpu().double() - t).abs().lt(1e-4).nonzero()
            hits = hits[hits >= begin]
            if hits.numel() > 0:
                return (int(hits[0]) - begin) / (timesteps.numel() - begin)
    return min(max(1.0 - t / num_train, 0.0), 1.0)
