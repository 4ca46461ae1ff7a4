"""The timestep of a denoiser call, read on the host: what selects the AgentSD phase.

The phase follows the noise level, that is, the timestep the denoiser receives
(:meth:`agentsd.AgentSDConfig.phase_at`); nothing else about the run is needed, so any scheduler,
strength, pipeline or hand-written loop gets the phase of its noise level. A batch with one timestep
per sample is decided by its smallest timestep, the least noisy sample: agent attention runs on a
batch only when every sample in it is noisy enough for it.

Reading a timestep that lives on a GPU would make the host wait for the device at every call.
diffusers' loops pass ``t = timesteps[i]`` (or ``t.expand(batch)``), a view of one element of a
small schedule tensor, so :func:`timestep_value` copies that tensor to the host once and then reads
the element at the view's offset; a tensor changed in place since (its version counter moved) is
copied again. Any other timestep on a device is read directly (one wait).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple

import torch

#: The largest tensor (in elements) whose host copy is kept: a schedule, not a batch of data.
_MAX_COPIED = 4096
_KEPT = 8


class _HostCopy(NamedTuple):
    storage: torch.UntypedStorage  # held, so its memory cannot be reused while the copy is kept
    version: int | None
    values: list[float]


_copies: OrderedDict[tuple[int, torch.dtype], _HostCopy] = OrderedDict()
_lock = threading.Lock()


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter
        return None


def _one_element(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is the same element of its storage (0-dim, or expanded)."""
    return all(stride == 0 or size == 1 for stride, size in zip(t.stride(), t.shape))


def _from_host_copy(t: torch.Tensor) -> float | None:
    """The value of a one-element view of a small device tensor, from its host copy."""
    if t.numel() == 0 or not _one_element(t):
        return None
    storage = t.untyped_storage()
    size = storage.nbytes() // t.element_size()
    if size > _MAX_COPIED:
        return None
    key, version = (storage.data_ptr(), t.dtype), _version(t)
    with _lock:
        copy = _copies.get(key)
        if copy is not None and copy.version == version:
            _copies.move_to_end(key)
            return copy.values[t.storage_offset()]
    try:
        whole = torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, 0, (size,))
        values = whole.to("cpu", torch.float64).tolist()  # the one wait, once per schedule
    except RuntimeError:
        return None
    with _lock:
        _copies[key] = _HostCopy(storage, version, values)
        while len(_copies) > _KEPT:
            _copies.popitem(last=False)
    return values[t.storage_offset()]


def timestep_value(timestep: torch.Tensor | float | int) -> float:
    """The timestep of a call as a Python float: the smallest one of the batch.

    Args:
        timestep: what the denoiser received: a number, a 0-dim tensor or one per sample.
    """
    if not isinstance(timestep, torch.Tensor):
        return float(timestep)
    if timestep.device.type != "cpu":
        value = _from_host_copy(timestep)
        if value is not None:
            return value
    return float(timestep.min())
