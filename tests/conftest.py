"""Fixtures shared by the tests: tiny models built from configs, instance images, a clean dynamo."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import tiny
from eval.reference import shapes


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters empty before and after the test."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SD pipeline saved as a folder (``from_pretrained`` works offline)."""
    path = tmp_path_factory.mktemp("tiny_sd")
    tiny.sd_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three white stars on black: a shape the reference model never saw (DreamBooth's subject)."""
    folder = tmp_path_factory.mktemp("stars")
    for i in range(3):
        shapes.render_novel("star", "white", "black", rng=np.random.default_rng(i)).save(folder / f"star{i}.png")
    return folder
