"""Where the denoising stands: the progress that selects the AgentSD phase, read on the host.

On a pipeline the progress is the index of the current timestep among the steps of the run in
progress, divided by their number. The steps of the run are the schedule from the scheduler's
begin index on or, for schedulers without one, the last ``num_steps`` of them (the pipeline's
``_num_timesteps``), so img2img counts only the steps it runs. A timestep that appears twice in a
row (Heun's two evaluations of a step, PNDM's repeated first step) counts at its first place, so
both evaluations of a step run the same phase. This works for every scheduler and step count,
with classifier-free guidance on or off, and does not count UNet calls.

The GPU is never waited for: diffusers' loops pass ``t = timesteps[i]``, a view of the schedule
tensor, so the index is read from the view's storage offset, and the schedule's values are copied
to the host once per run. A timestep that is not such a view is looked up by value (a device
read). Without a scheduler (a bare UNet, or a pickled copy), a timestep that is a view of a
longer 1-D tensor is taken as its place in that schedule, counted from the first place seen in
it; any other timestep gives ``1 - t / 1000``.
"""
from __future__ import annotations

from typing import Any

import torch

NUM_TRAIN_TIMESTEPS = 1000


def _one_element(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is the same element of its storage (0-dim, or expanded)."""
    return all(stride == 0 or size == 1 for stride, size in zip(t.stride(), t.shape))


def _same_tensor(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and (a is b or (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.dtype == b.dtype
        and a.shape == b.shape and a.storage_offset() == b.storage_offset()
    ))


def position_in(timestep: torch.Tensor, schedule: torch.Tensor) -> int | None:
    """The index ``i`` when ``timestep`` is a view of ``schedule[i]`` (possibly expanded), read
    from storage offsets on the host; None otherwise."""
    if (
        schedule.ndim != 1
        or schedule.stride(0) != 1
        or not _one_element(timestep)
        or timestep.untyped_storage().data_ptr() != schedule.untyped_storage().data_ptr()
    ):
        return None
    index = timestep.storage_offset() - schedule.storage_offset()
    return index if 0 <= index < schedule.numel() else None


def _storage_schedule(timestep: torch.Tensor) -> torch.Tensor | None:
    """The whole 1-D tensor that ``timestep`` is one element of, when its storage holds more
    than one element; None otherwise."""
    if not _one_element(timestep):
        return None
    storage = timestep.untyped_storage()
    size = storage.nbytes() // timestep.element_size()
    if size < 2:
        return None
    return torch.empty(0, dtype=timestep.dtype, device=timestep.device).set_(storage, 0, (size,))


class StepTracker:
    """Progress of the denoising from the timestep of each UNet call (see the module docstring).

    It keeps the schedule of the run in progress (the tensor and its values on the host); copies
    and pickles start afresh.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._schedule: torch.Tensor | None = None
        self._values: list[float] = []
        self._first: list[int] = []
        self._begin_seen: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._reset()

    def _use(self, schedule: torch.Tensor) -> None:
        if _same_tensor(schedule, self._schedule):  # the held tensor keeps its memory from reuse
            return
        self._schedule = schedule
        self._values = schedule.detach().to("cpu", torch.float64).tolist()  # once per run
        self._first = list(range(len(self._values)))
        for i in range(1, len(self._values)):
            if self._values[i] == self._values[i - 1]:
                self._first[i] = self._first[i - 1]
        self._begin_seen = None

    def _index(self, timestep: torch.Tensor | float | int, schedule: torch.Tensor) -> int | None:
        index = position_in(timestep, schedule) if isinstance(timestep, torch.Tensor) else None
        if index is None:  # not a view of the schedule: by value (reads the device)
            t = _as_float(timestep)
            index = next((i for i, v in enumerate(self._values) if abs(v - t) < 1e-4), None)
        return None if index is None else self._first[index]

    def progress(
        self, timestep: torch.Tensor | float | int, scheduler: Any | None = None, num_steps: int | None = None
    ) -> tuple[float, float]:
        """``(progress in [0, 1], timestep value)`` for a UNet call at ``timestep``.

        Args:
            timestep: the timestep passed to the UNet (a scalar or one per batch element).
            scheduler: the pipeline's scheduler, if any.
            num_steps: the number of timesteps the pipeline runs, if known.
        """
        schedule = getattr(scheduler, "timesteps", None)
        linked = isinstance(schedule, torch.Tensor) and schedule.ndim == 1 and schedule.numel() > 0
        if not linked and isinstance(timestep, torch.Tensor):
            schedule = _storage_schedule(timestep)
        if schedule is not None and (linked or isinstance(timestep, torch.Tensor)):
            self._use(schedule)
            index = self._index(timestep, schedule)
            if index is not None:
                n = len(self._values)
                if linked:
                    begin = getattr(scheduler, "_begin_index", None)
                    begin = begin if begin is not None else (n - num_steps if num_steps else 0)
                else:  # a schedule without its scheduler: the run began where it was first seen
                    if self._begin_seen is None or index < self._begin_seen:
                        self._begin_seen = index
                    begin = self._begin_seen
                if index >= begin:
                    return (index - begin) / (n - begin), self._values[index]
        t = _as_float(timestep)
        num_train = getattr(getattr(scheduler, "config", None), "num_train_timesteps", NUM_TRAIN_TIMESTEPS)
        return min(max(1.0 - t / num_train, 0.0), 1.0), t


def _as_float(timestep: torch.Tensor | float | int) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)


def denoising_progress(
    timestep: torch.Tensor | float | int, scheduler: Any | None = None, num_steps: int | None = None
) -> float:
    """Share of the denoising done before ``timestep``, in [0, 1] (see the module docstring).

    Args:
        timestep: the timestep passed to the UNet (a scalar or one per batch element).
        scheduler: the pipeline's scheduler, if any.
        num_steps: the number of timesteps the pipeline runs, if known.
    """
    return StepTracker().progress(timestep, scheduler, num_steps)[0]
