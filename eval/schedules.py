"""Noise schedules the harness modules share, below both :mod:`eval.methods` and
:mod:`eval.peers` (which must not import each other both ways)."""
from __future__ import annotations

from typing import Any


def pndm_schedule(steps: int = 50) -> Any:
    """A 50-step PNDM scheduler (SD's), the schedule of a bare UNet under DeepCache."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    scheduler.set_timesteps(steps)
    return scheduler
