"""The one shim CA-ToMe (PyPI ``ca-tome`` 0.1.3) needs to run in diffusers' own pipelines: the step.

What CA-ToMe does: ``apply_CA_ToMe(pipe, cache_conf, r)`` swaps the class of the UNet's transformer
blocks (the merge), sets ``pipe.unet.forward`` to its own copy of the UNet forward, whose third
positional parameter is ``inference_step``, and adds ``pipe.call``, its own copy of the denoising
loop, which passes ``i + 1`` with the ``i``-th timestep of the scheduler's schedule. The forward
hands that number to the blocks; they recompute their token match at the steps its cache
configuration lists (``CacheConf.CONFIG_3``, ...) and reuse the last one in between.

Why a shim: diffusers' pipelines (``pipe(...)``) and the latency harness call the UNet as diffusers
defines it, ``unet(sample, timestep, encoder_hidden_states, ...)``. CA-ToMe's forward then raises
``TypeError: ... missing 1 required positional argument: 'inference_step'``.

What it changes, and nothing else: :func:`pass_step` replaces ``unet.forward`` (CA-ToMe's) by a
:class:`StepArgument`. It takes diffusers' arguments, numbers the step as CA-ToMe's loop does
(``i + 1`` where the timestep is ``scheduler.timesteps[i]``) and calls CA-ToMe's forward with it. The
step is read from the timestep's place in the schedule tensor (diffusers passes a view of
``timesteps[i]``, so the GPU is not waited for), else found by value (its first place). A call that
passes the step already (CA-ToMe's ``pipe.call``) goes through unchanged. The merge, its cache, the
forward and ``pipe.call`` stay CA-ToMe's own, and the installed package is not edited. With the
shim, ``pipe(...)`` gives the same images as CA-ToMe's ``pipe.call(...)``, bit for bit
(tests/test_peers.py). A bare UNet has no scheduler: its steps are numbered in the schedule given
to :func:`pass_step` (the latency harness gives SD's 50 PNDM steps, which CA-ToMe's configurations
are written for).
"""
from __future__ import annotations

import weakref
from typing import Any

import torch



def position_in(timestep: torch.Tensor, schedule: torch.Tensor) -> int | None:
    """The index ``i`` when ``timestep`` is a view of ``schedule[i]`` (possibly expanded), read
    from storage offsets on the host; None otherwise."""
    one_element = all(stride == 0 or size == 1 for stride, size in zip(timestep.stride(), timestep.shape))
    if (schedule.ndim != 1 or schedule.stride(0) != 1 or not one_element
            or timestep.untyped_storage().data_ptr() != schedule.untyped_storage().data_ptr()):
        return None
    index = timestep.storage_offset() - schedule.storage_offset()
    return index if 0 <= index < schedule.numel() else None


class StepArgument:
    """``unet.forward`` with diffusers' signature around CA-ToMe's forward, which takes the step."""

    def __init__(self, forward: Any, pipeline: Any | None, schedule: torch.Tensor | None) -> None:
        self.forward = forward
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self.schedule = schedule

    def step(self, timestep: torch.Tensor | float | int) -> int:
        """CA-ToMe's number of the step at ``timestep``: its place in the schedule, plus one.

        Raises:
            ValueError: if the timestep is not in the schedule.
        """
        pipe = self._pipeline() if self._pipeline is not None else None
        schedule = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        schedule = schedule if isinstance(schedule, torch.Tensor) and schedule.numel() else self.schedule
        if schedule is None:
            raise ValueError("CA-ToMe numbers the steps of a schedule, and this UNet has none")
        index = position_in(timestep, schedule) if isinstance(timestep, torch.Tensor) else None
        if index is None:
            t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
            places = [i for i, v in enumerate(schedule.tolist()) if v == t]
            if not places:
                raise ValueError(f"CA-ToMe: timestep {t:g} is not in the schedule, so its step has no number")
            index = places[0]
        return index + 1

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], int):  # the step given already: CA-ToMe's own loop, pipe.call
            return self.forward(sample, timestep, *args, **kwargs)
        return self.forward(sample, timestep, self.step(timestep), *args, **kwargs)


def pass_step(unet: torch.nn.Module, pipeline: Any | None = None, schedule: torch.Tensor | None = None) -> None:
    """Wrap CA-ToMe's ``unet.forward`` (set by its ``apply_CA_ToMe`` or ``modify_unet``) in a
    :class:`StepArgument`; the steps are those of ``pipeline``'s scheduler, else of ``schedule``.
    Deleting the instance attribute ``unet.forward`` takes both away."""
    unet.forward = StepArgument(unet.forward, pipeline, schedule)
