"""What the harnesses keep on disk: images, JSON records replaced atomically, the FID run's state
and each process's timings, and the rule that refuses to mix settings in one folder."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class ImageStore:
    """Generated images on disk: ``root/<method key>/<index:05d>.png``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str, index: int) -> Path:
        return self.root / key / f"{index:05d}.png"

    def has(self, key: str, indices: Iterable[int]) -> bool:
        return all(self.path(key, i).exists() for i in indices)

    def save(self, key: str, start: int, images: np.ndarray) -> None:
        (self.root / key).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            tmp = self.path(key, start + i).with_suffix(".tmp.png")
            Image.fromarray(image).save(tmp)
            tmp.replace(self.path(key, start + i))  # never a half-written image

    def load(self, key: str, n: int) -> np.ndarray:
        return np.stack([np.asarray(Image.open(self.path(key, i)).convert("RGB")) for i in range(n)])


class JsonRecord:
    """A JSON file held in memory; ``save`` replaces it atomically (never half-written)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def merge_settings(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Fold ``new`` settings into the recorded ``old`` ones, or say why they cannot be mixed.

    Every key must be equal, except ``methods`` (method key: its settings): a method recorded
    with other settings cannot be mixed, a method not recorded yet is added (a folder can take
    more methods later). Returns None when merged, else the differences in one line.
    """
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted((old.keys() | new.keys()) - {"methods"})
            if old.get(k) != new.get(k)]
    recorded, given = old.get("methods", {}), new.get("methods", {})
    diff += [f"{k}: {recorded[k]!r} -> {given[k]!r}" for k in given if k in recorded and recorded[k] != given[k]]
    if diff:
        return ", ".join(diff)
    if given:
        old["methods"] = {**recorded, **given}
    return None


class State(JsonRecord):
    """``state.json`` of an FID run, written by the main process only: the run's setup, the machine
    it was generated on (``generated_with``) and the computed metrics of every method."""

    def variant(self, key: str) -> dict[str, Any]:
        return self.data.setdefault("variants", {}).setdefault(key, {})

    def check_setup(self, setup: dict[str, Any]) -> None:
        """Record the run's settings, or refuse to mix with a run made with other settings.

        Raises:
            ValueError: if the folder holds a run with different settings.
        """
        diff = merge_settings(self.data.setdefault("setup", setup), setup)
        if diff:
            raise ValueError(f"{self.path.parent} holds a run with other settings ({diff}); "
                             "use another --out or --fresh")


class Timings(JsonRecord):
    """The timings of one process, ``OUT/timings/process-<rank>.json`` (no other process writes
    it): per method key the wall time of each of its batches (``"start:stop"``), how many
    batches this process has generated for it (``generated``, over every resume), the peak
    memory of its warm-up batch and, when compiled, its compile report."""

    def variant(self, key: str) -> dict[str, Any]:
        return self.data.setdefault(key, {"batch_seconds": {}})


def timings_path(out: Path, rank: int) -> Path:
    """The timings file of process ``rank`` of the run in ``out``."""
    return out / "timings" / f"process-{rank}.json"


def process_timings(out: Path) -> list[Timings]:
    """The timings of every process of the run in ``out``, in process order."""
    paths = sorted((out / "timings").glob("process-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [Timings(p) for p in paths]
