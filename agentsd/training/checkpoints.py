"""Checkpoints of a DreamBooth run, loaded without pickle.

A checkpoint (``OUT/checkpoints/step-NNNNNN``) is what ``accelerator.save_state`` writes (the
trainable UNet parameters as safetensors, the optimizer, the LR schedule and the random states, all
loaded with ``weights_only=True``), plus :data:`CHECKPOINT_FILE`: the step, the run settings and the
size and sha256 of every file. It is written into a temporary folder, then renamed. A checkpoint
that was changed or damaged, or made with other settings or another number of processes, raises
ValueError naming the file before anything is loaded from it.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
#: in every checkpoint folder: step, run settings, number of processes, size and sha256 of each file
CHECKPOINT_FILE = "dreambooth_checkpoint.json"


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """The checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    found = root.glob("step-*") if root.exists() else []
    return sorted(p for p in found if p.name[5:].isdigit() and (p / CHECKPOINT_FILE).exists())


def trainable_parameters(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``unet`` that are trained, by name (all of them, or the LoRA adapters)."""
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def unsafe_file_error(path: str | Path, err: BaseException) -> ValueError:
    """The one-line error for a file that ``torch.load(path, weights_only=True)`` refused with ``err``.

    It names the file and the reason, and leaves out torch's advice to load it with pickle anyway:
    the one thing not to do with a checkpoint of unknown origin.
    """
    if isinstance(err, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"the Python object {found[1]}" if found else "more than tensors and plain values"
        reason = f"it holds {what}, which weights_only=True refuses"
    else:
        reason = _first_line(err)
    return ValueError(f"checkpoint file {path} cannot be loaded safely: {reason}")


def register_checkpoint_hooks(accelerator: Any) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` keep only the trainable UNet parameters,
    under their names in the unwrapped UNet (LoRA checkpoints stay small; names do not depend on
    the data-parallel wrapper)."""
    from accelerate.utils import SAFE_WEIGHTS_NAME
    from safetensors import safe_open
    from safetensors.torch import load_file

    def save(models: list, weights: list, output_dir: str) -> None:
        (model,) = models
        weights.clear()
        if accelerator.is_main_process:  # the only one that writes them
            unet = accelerator.unwrap_model(model)
            weights.append({k: v.detach().cpu() for k, v in trainable_parameters(unet).items()})

    def load(models: list, input_dir: str) -> None:
        (model,) = models
        path = Path(input_dir) / SAFE_WEIGHTS_NAME
        params = trainable_parameters(accelerator.unwrap_model(model))
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        wanted = {k: list(p.shape) for k, p in params.items()}
        if shapes != wanted:
            other = sorted(k for k in shapes.keys() | wanted.keys() if shapes.get(k) != wanted.get(k))
            raise ValueError(
                f"checkpoint file {path} does not hold the trainable weights of this UNet "
                f"({len(other)} names or shapes differ, e.g. {other[0]})"
            )
        state = load_file(str(path))
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])
        models.clear()  # loaded: accelerate loads the rest (optimizer, LR schedule, random states)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def save_checkpoint(accelerator: Any, folder: Path, step: int, run: dict[str, Any]) -> None:
    """``accelerator.save_state`` into a temporary folder, :data:`CHECKPOINT_FILE`, then a rename
    to ``folder``; called by every process (each writes its random states, the main one the rest)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        meta = {"step": step, "run": run, "files": files}
        (tmp / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    accelerator.wait_for_everyone()


def verify_checkpoint(folder: Path, accelerator: Any, run: dict[str, Any]) -> int:
    """Check checkpoint ``folder`` before anything is loaded from it and return its step.

    Its :data:`CHECKPOINT_FILE` must be readable and made with the settings ``run``; every file it
    lists must have the recorded size and sha256, the files that ``accelerator.load_state`` reads
    must be among them, and each of them but the safetensors weights must load with
    ``weights_only=True``. Every process checks every file, so all of them fail alike.

    Raises:
        FileNotFoundError: if ``folder`` has no :data:`CHECKPOINT_FILE`.
        ValueError: naming the file, for anything else.
    """
    from accelerate.utils import OPTIMIZER_NAME, SAFE_WEIGHTS_NAME, SCALER_NAME, SCHEDULER_NAME, load

    meta_path = folder / CHECKPOINT_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no checkpoint {CHECKPOINT_FILE} in {folder}")
    try:
        meta = json.loads(meta_path.read_text())
        step, saved = int(meta["step"]), dict(meta["run"])
        files = {str(name): (int(v["bytes"]), str(v["sha256"])) for name, v in meta["files"].items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"checkpoint file {meta_path} cannot be read: {_first_line(err)}") from None
    changed = sorted(k for k in run if saved.get(k) != run[k])
    if changed:
        raise ValueError(
            f"checkpoint {folder} was made with other settings: "
            + ", ".join(f"{k}={saved.get(k)!r} (now {run[k]!r})" for k in changed)
        )
    needed = [SAFE_WEIGHTS_NAME, f"{OPTIMIZER_NAME}.bin", f"{SCHEDULER_NAME}.bin"]
    needed += [SCALER_NAME] if accelerator.scaler is not None else []
    if missing := [name for name in needed if name not in files]:
        raise ValueError(f"checkpoint file {meta_path} lists no {', '.join(missing)}")
    for name, (size, sha256) in sorted(files.items()):
        path = folder / name
        if Path(name).name != name or name.startswith("."):
            raise ValueError(f"checkpoint file {meta_path} lists a file outside its folder: {name!r}")
        if not path.is_file():
            raise ValueError(f"checkpoint file {path} is missing")
        if path.stat().st_size != size or _sha256(path) != sha256:
            raise ValueError(f"checkpoint file {path} is damaged or was changed (its size or sha256 differs)")
        if name != SAFE_WEIGHTS_NAME:
            try:
                load(path, map_location="cpu", mmap=True)  # weights_only=True
            except Exception as err:  # noqa: BLE001 - any failure: the file is not what save_state writes
                raise unsafe_file_error(path, err) from None
    return step
