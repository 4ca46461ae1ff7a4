"""DreamBooth in two data-parallel CPU processes under ``accelerate launch``: the same weights in both
processes, files written once, and a resumed run that ends where the uninterrupted one does.

``accelerate launch --cpu --num_processes 2`` starts one process only (accelerate's simple launcher
needs mpirun for several CPU processes), so the test asks for torchrun with ``--multi_gpu`` and keeps
the processes on the CPU with ``ACCELERATE_USE_CPU=true`` (gloo).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval import REFERENCE_MODEL
from agentsd.training import CHECKPOINT_FILE, checkpoint_dirs, load_pipeline
from dreambooth_driver import unet_digest
from eval.reference import shapes

PROMPT = "a white sks on a black background"
DRIVER = Path(__file__).with_name("dreambooth_driver.py")


def free_port() -> int:
    """A TCP port nobody listens on now (for the rendezvous of the two processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(digests: Path, *args: str) -> list[str]:
    """Run the driver in two CPU processes with ``args``; return the digest of each process's UNet."""
    digests.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(DRIVER), str(digests), *args,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [(digests / f"rank-{r}.txt").read_text() for r in range(2)]


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stars")
    for i in range(2):
        shapes.render_novel("star", "white", "black", rng=np.random.default_rng(i)).save(folder / f"star{i}.png")
    return folder


def test_two_processes_hold_the_same_weights_and_resume(instance_dir: Path, tmp_path: Path) -> None:
    common = [
        "--instance-dir", str(instance_dir), "--instance-prompt", PROMPT, "--resolution", "64",
        "--max-train-steps", "4", "--learning-rate", "1e-4", "--checkpointing-steps", "2", "--inference-steps", "2",
        "--class-prompt", "a white triangle on a black background", "--num-class-images", "3",
        "--class-dir", str(tmp_path / "class"), "--no-progress",
    ]
    whole = tmp_path / "whole"
    digests = launch(
        tmp_path / "digests-whole", *common, "--output-dir", str(whole), "--validation-prompt", PROMPT,
        "--validation-steps", "4", "--num-validation-images", "1",
    )
    assert digests[0] == digests[1]  # data-parallel: both processes end with the same weights
    assert digests[0] == unet_digest(load_pipeline(str(whole)).unet)  # the saved model is that one
    assert digests[0] != unet_digest(load_pipeline(str(REFERENCE_MODEL)).unet)
    assert sorted(p.name for p in (tmp_path / "class").glob("*.png")) == [f"class_{i:05d}.png" for i in range(3)]
    assert sorted(p.name for p in (whole / "validation").iterdir()) == ["step-000004-0.png"]
    assert [p.name for p in checkpoint_dirs(whole)] == ["step-000002", "step-000004"]
    assert not list((whole / "checkpoints").glob("*.tmp"))
    meta = json.loads((whole / "checkpoints" / "step-000002" / CHECKPOINT_FILE).read_text())
    assert meta["step"] == 2 and meta["run"]["num_processes"] == 2
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"} <= set(meta["files"])

    resumed = tmp_path / "resumed"
    again = launch(
        tmp_path / "digests-resumed", *common, "--output-dir", str(resumed),
        "--resume", str(whole / "checkpoints" / "step-000002"),
    )
    assert [p.name for p in checkpoint_dirs(resumed)] == ["step-000004"]  # steps 3 and 4 only
    assert again == digests  # the same weights as without interruption
