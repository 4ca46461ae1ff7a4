"""Checkpoints without pickle: DreamBooth's (accelerate's ``save_state``, checked before loading) and
those of ``scripts/train_reference_model.py`` (``weights_only=True``). A damaged, changed or
malicious checkpoint ends with a one-line error naming the file, runs no code and loads nothing."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from eval import REFERENCE_MODEL
import agentsd.training.dreambooth as dreambooth
from agentsd.training import CHECKPOINT_FILE, DreamBoothSettings, checkpoint_dirs, train_dreambooth
from dreambooth_driver import unet_digest
from eval.reference import shapes
from scripts.train_dreambooth import main as train_main
from scripts.train_reference_model import main as reference_main

PROMPT = "a white sks on a black background"
REPO_ROOT = Path(__file__).resolve().parent.parent


class Payload:
    """Pickled into a checkpoint, it would create ``marker`` when loaded: the code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.marker), "w")


# ----------------------------------------------------------------------------- DreamBooth


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> DreamBoothSettings:
    """Two steps of full finetuning with a checkpoint at step 2."""
    instance = tmp_path_factory.mktemp("stars")
    shapes.render_novel("star", "white", "black", rng=np.random.default_rng(0)).save(instance / "star.png")
    s = DreamBoothSettings(
        pretrained=str(REFERENCE_MODEL), instance_dir=str(instance), instance_prompt=PROMPT,
        output_dir=str(tmp_path_factory.mktemp("run")), resolution=64, max_train_steps=2, learning_rate=1e-4,
        checkpointing_steps=2, progress=False,
    )
    train_dreambooth(s)
    return s


def record(folder: Path, name: str) -> None:
    """Rewrite the size and sha256 of ``name`` in the checkpoint's record (a tampering that hides itself)."""
    meta = json.loads((folder / CHECKPOINT_FILE).read_text())
    data = (folder / name).read_bytes()
    meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / CHECKPOINT_FILE).write_text(json.dumps(meta))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def pickled_code(path: Path) -> None:
    torch.save({"state": {}, "param_groups": [], "x": Payload(path.with_name("marker"))}, path)
    record(path.parent, path.name)


TAMPERINGS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "truncated weights": ("model.safetensors", truncate, "model.safetensors is damaged or was changed"),
    "garbage optimizer": ("optimizer.bin", garbage, "optimizer.bin is damaged or was changed"),
    "pickled code, recorded": ("optimizer.bin", pickled_code, "optimizer.bin cannot be loaded safely"),
    "missing schedule": ("scheduler.bin", Path.unlink, "scheduler.bin is missing"),
    "broken record": (CHECKPOINT_FILE, truncate, f"{CHECKPOINT_FILE} cannot be read"),
}


@pytest.mark.parametrize("case", TAMPERINGS)
def test_tampered_checkpoint_is_refused_before_anything_loads(
    case: str, run: DreamBoothSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    name, change, message = TAMPERINGS[case]
    folder = tmp_path / "step-000002"
    shutil.copytree(checkpoint_dirs(run.output_dir)[-1], folder)
    change(folder / name)
    loaded: list[str] = []
    monkeypatch.setattr(dreambooth, "load_pipeline", loaded.append)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        train_dreambooth(dataclasses.replace(run, output_dir=str(out), max_train_steps=3), resume=str(folder))
    assert str(folder) in str(err.value) and "\n" not in str(err.value)
    assert loaded == [] and not out.exists()  # refused before the model was even loaded; nothing written
    assert not (folder / "marker").exists()  # no pickled code ran
    args = ["--instance-dir", run.instance_dir, "--instance-prompt", PROMPT, "--output-dir", str(out),
            "--resolution", "64", "--learning-rate", "1e-4", "--resume", str(folder)]
    assert train_main(args) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and message in stderr and stderr.count("\n") == 1


def test_checkpoint_of_other_weights_loads_nothing(
    run: DreamBoothSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "step-000002"
    shutil.copytree(checkpoint_dirs(run.output_dir)[-1], folder)
    weights = load_file(folder / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first][:1]
    save_file(weights, folder / "model.safetensors")
    record(folder, "model.safetensors")  # consistent with its record: found when the shapes are compared
    pipes: list[Any] = []
    load = dreambooth.load_pipeline
    monkeypatch.setattr(dreambooth, "load_pipeline", lambda path: pipes.append(load(path)) or pipes[-1])
    with pytest.raises(ValueError, match=f"model.safetensors does not hold the trainable weights .* {first}") as err:
        train_dreambooth(dataclasses.replace(run, output_dir=str(tmp_path / "out")), resume=str(folder))
    assert "\n" not in str(err.value)
    assert unet_digest(pipes[0].unet) == unet_digest(load(run.pretrained).unet)  # untouched


def test_checkpoint_holds_safetensors_weights_and_a_record(run: DreamBoothSettings) -> None:
    (folder,) = checkpoint_dirs(run.output_dir)
    meta = json.loads((folder / CHECKPOINT_FILE).read_text())
    assert meta["step"] == 2 and meta["run"] == {**run.run_dict(), "num_processes": 1}
    assert set(meta["files"]) == {p.name for p in folder.iterdir()} - {CHECKPOINT_FILE}
    trainable = dict(dreambooth.load_pipeline(run.output_dir).unet.named_parameters())
    weights = load_file(folder / "model.safetensors")
    assert weights.keys() == trainable.keys()  # the trainable parameters, under the UNet's own names
    assert all(torch.equal(weights[k], p.detach()) for k, p in trainable.items())  # the final step's


def test_no_pickle_loading_left_in_python_files() -> None:
    """The library, the harness and the scripts never unpickle a file (tests/test_interop.py does,
    on purpose: it checks that a user's pickled patched model loads)."""
    needle = "weights_only=" + "False"  # not spelled out: this file would find itself
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "agentsd/*.py", "eval/*.py", "scripts/*.py"],
        cwd=REPO_ROOT,
        capture_output=True, text=True, check=True,
    ).stdout.split()
    found = [
        f"{name}:{i}" for name in listed if (REPO_ROOT / name).is_file()
        for i, line in enumerate((REPO_ROOT / name).read_text().splitlines(), 1)
        if needle in line.split("#")[0]
    ]
    assert found == []


# ----------------------------------------------------------------------------- reference model training


def reference(tmp_path: Path, name: str, *extra: str) -> int:
    """A tiny run of ``scripts/train_reference_model.py`` into ``tmp_path/name`` (checkpoints beside)."""
    return reference_main([
        "--out", str(tmp_path / name), "--ckpt-dir", str(tmp_path / f"{name}-ckpt"), "--vae-steps", "2",
        "--vae-batch-size", "2", "--steps", "4", "--batch-size", "2", "--warmup-steps", "1", "--n-train-images", "8",
        "--text-hidden", "32", "--text-layers", "1", "--unet-channels", "32,32,32", "--vae-channels", "8,8,8",
        "--no-eval", "--no-progress", "--threads", str(torch.get_num_threads()), *extra,
    ])


def test_reference_training_resumes_without_pickle(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert reference(tmp_path, "whole") == 0
    assert reference(tmp_path, "parts", "--stop-at-step", "2") == 0
    ckpt = tmp_path / "parts-ckpt" / "checkpoint.pt"
    good = ckpt.read_bytes()
    truncate(ckpt)
    with pytest.raises(SystemExit, match=r"checkpoint.pt cannot be loaded safely") as err:
        reference(tmp_path, "parts", "--resume")
    assert "\n" not in str(err.value.code)
    marker = tmp_path / "marker"
    torch.save({"version": 2, "x": Payload(marker)}, ckpt)
    with pytest.raises(SystemExit, match=r"checkpoint.pt cannot be loaded safely: it holds the Python object .*open"):
        reference(tmp_path, "parts", "--resume")
    assert not marker.exists()
    ckpt.write_bytes(good)
    (tmp_path / "parts-ckpt" / "latents.pt").write_bytes(b"garbage")  # a damaged cache is made again
    capsys.readouterr()
    assert reference(tmp_path, "parts", "--resume") == 0
    assert "latents.pt cannot be loaded safely" in capsys.readouterr().out
    for part in ("unet", "text_encoder", "vae"):
        (a,), (b,) = ((tmp_path / run / part).glob("*.safetensors") for run in ("whole", "parts"))
        whole, parts = load_file(a), load_file(b)
        assert all(torch.equal(whole[k], parts[k]) for k in whole), part  # the same as without interruption
