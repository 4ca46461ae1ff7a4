"""Test driver: ``scripts/train_dreambooth.py`` in every process of ``accelerate launch``, then the
digest of the UNet weights that the process holds at the end, written to
``DIGEST_DIR/rank-<process index>.txt``.

Usage: ``accelerate launch [...] tests/dreambooth_driver.py DIGEST_DIR [train_dreambooth.py options]``
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402

import agentsd.training.dreambooth as dreambooth  # noqa: E402
from scripts.train_dreambooth import main as train_main  # noqa: E402


def unet_digest(unet: torch.nn.Module) -> str:
    """sha256 of every entry of ``unet.state_dict()`` (names and float32 values), in name order."""
    digest = hashlib.sha256()
    for name, value in sorted(unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv: list[str]) -> int:
    """Train with ``argv[1:]``; on success write this process's digest into the folder ``argv[0]``."""
    digest_dir, *args = argv
    pipes: list[Any] = []
    load = dreambooth.load_pipeline

    def recording_load(pretrained: str) -> Any:  # keeps the pipeline whose UNet is trained in place
        pipes.append(load(pretrained))
        return pipes[-1]

    dreambooth.load_pipeline = recording_load
    status = train_main(args)
    if status == 0:
        Path(digest_dir, f"rank-{PartialState().process_index}.txt").write_text(unet_digest(pipes[0].unet))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
