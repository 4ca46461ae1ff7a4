"""Metrics of the FID harness, computed once every shard is generated and kept in ``state.json``
as soon as each is known (a rerun computes only what is missing): FID, prompt adherence,
same-seed PSNR/SSIM against ``sd`` and the CLIP score. The networks and formulas are in
:mod:`eval.fid`, :mod:`eval.reference.adherence` and :mod:`eval.fidelity`."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.methods import Method
from eval.protocols import Protocol
from eval.store import ImageStore, State


def compute_metrics(
    methods: list[Method],
    protocol: Protocol,
    out: Path,
    real_images: Callable[[], np.ndarray],
    device: str | torch.device = "cpu",
    batch_size: int = 50,
    progress: bool = True,
    clip_model: str | None = None,
) -> State:
    """The metrics of every method that keeps images:

    - ``fid`` (and ``adherence``, when the protocol has it); ``real_images`` is called only if
      some FID is still missing;
    - ``psnr`` and ``ssim`` of every image against the ``sd`` image of the same index (when ``sd``
      is among the methods);
    - with ``clip_model`` (a local CLIP folder or hub id), ``clip_score`` against the prompts.

    Returns the state holding them (rows: :func:`eval.report.fid_rows`).
    """
    from tqdm.auto import tqdm

    from eval.fid import fid_metric
    from eval.fidelity import clip_score, float_batches, load_clip, same_seed_fidelity

    store, state = ImageStore(out / "images"), State(out / "state.json")
    n = len(protocol.prompts)
    sd = next((m for m in methods if m.name == "sd"), None)
    fid = clip = reference = None
    for m in tqdm([m for m in methods if m.keeps_images], desc="metrics", disable=not progress):
        entry: dict[str, Any] = state.variant(m.key)
        images = None
        if "fid" not in entry:
            if fid is None:
                fid = fid_metric(device)
                for batch in float_batches(real_images(), batch_size, device):
                    fid.update(batch, real=True)
            images = store.load(m.key, n)
            fid.reset()  # keeps the real features
            for batch in float_batches(images, batch_size, device):
                fid.update(batch, real=False)
            entry["fid"] = float(fid.compute())
            if protocol.scores_adherence:
                from eval.reference.adherence import score_adherence

                entry["adherence"] = score_adherence(images, list(protocol.prompts))
            state.save()
        if sd is not None and m is not sd and "psnr" not in entry:
            images = store.load(m.key, n) if images is None else images
            reference = store.load(sd.key, n) if reference is None else reference
            entry.update(same_seed_fidelity(images, reference, batch_size, device))
            state.save()
        if clip_model is not None and entry.get("clip_score", {}).get("model") != clip_model:
            images = store.load(m.key, n) if images is None else images
            clip = load_clip(clip_model, device) if clip is None else clip
            entry["clip_score"] = {"model": clip_model,
                                   "score": clip_score(clip, images, protocol.prompts, batch_size, device)}
            state.save()
    return state
