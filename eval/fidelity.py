"""Same-seed fidelity (PSNR, SSIM) to a reference image set, and CLIP score against prompts.

Acceleration papers compare each accelerated image with the unaccelerated image of the same
prompt and seed: :func:`same_seed_fidelity` gives the mean per-image PSNR and SSIM (torchmetrics,
standard SSIM: Gaussian window 11, sigma 1.5) over a row. :func:`clip_score` gives torchmetrics'
``CLIPScore`` of images against their prompts, with a CLIP loaded from a local folder or a hub id
that the caller names explicitly (nothing is downloaded unless asked for).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def float_batches(
    images: np.ndarray, batch_size: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Iterator[torch.Tensor]:
    """uint8 ``(N, H, W, 3)`` images as float ``(n, 3, H, W)`` batches in [0, 1] on ``device``."""
    for i in range(0, len(images), batch_size):
        yield torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).to(device, dtype).div(255)


def same_seed_fidelity(
    images: np.ndarray, reference: np.ndarray, batch_size: int = 50, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Mean per-image PSNR (dB, data range 1) and SSIM of ``images`` against ``reference``, image
    ``i`` against image ``i``; both uint8 ``(N, H, W, 3)``. An image equal to its reference has an
    infinite PSNR, so a row equal to its reference averages to ``inf``.

    Raises:
        ValueError: if the two sets differ in shape or are empty.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if images.shape != reference.shape or not len(images):
        raise ValueError(f"images {images.shape} and reference {reference.shape} must be equal, non-empty shapes")
    psnr, ssim = [], []
    # in float64: SSIM's variances (E[x^2] - E[x]^2) lose ~2e-4 to rounding in float32 on flat images
    for x, y in zip(float_batches(images, batch_size, device, torch.float64),
                    float_batches(reference, batch_size, device, torch.float64)):
        psnr.append(peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3)))
        ssim.append(structural_similarity_index_measure(x, y, data_range=1.0, reduction="none"))
    return {"psnr": float(torch.cat(psnr).mean()), "ssim": float(torch.cat(ssim).mean())}


def _clip_parts(model_name_or_path: str, weights: bool) -> tuple[Any, Any]:
    """The CLIP model (or only its config) and processor at ``model_name_or_path``."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    folder = Path(model_name_or_path).expanduser()
    if model_name_or_path.startswith(("/", ".", "~")) and not folder.is_dir():
        raise ValueError(f"--clip-model {model_name_or_path}: no such folder (give a local CLIP folder or a hub id)")
    path = str(folder) if folder.is_dir() else model_name_or_path
    try:
        processor = CLIPProcessor.from_pretrained(path)
        model = CLIPModel.from_pretrained(path).eval() if weights else CLIPConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - the loaders raise many kinds; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot load --clip-model {model_name_or_path!r} as a CLIP model and processor: {first}"
        ) from None
    return model, processor


def check_clip_model(model_name_or_path: str) -> None:
    """Load the config and processor of the CLIP at ``model_name_or_path`` (quick, no weights),
    so that a bad name fails before any work.

    Raises:
        ValueError: one line, if they cannot be loaded.
    """
    _clip_parts(model_name_or_path, weights=False)


def load_clip(model_name_or_path: str, device: str | torch.device = "cpu") -> Any:
    """torchmetrics' ``CLIPScore`` with the CLIP model and processor at ``model_name_or_path``
    (a local folder as written by ``save_pretrained``, or a hub id, which may download); it
    scores what this process feeds it, also in a multi-process run.

    Raises:
        ValueError: one line, if the model or its processor cannot be loaded.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = _clip_parts(model_name_or_path, weights=True)
    # a callable, so that any folder works (torchmetrics accepts only a few hub ids by name)
    # sync_on_compute=False: it scores what this process fed it, also in a multi-process run
    return CLIPScore(model_name_or_path=lambda: (_FeatureTensors(model), processor), sync_on_compute=False).to(device)


class _FeatureTensors(torch.nn.Module):
    """A CLIP model whose ``get_image_features`` and ``get_text_features`` return the projected
    embeddings as tensors: transformers >= 5 returns model outputs that hold them in
    ``pooler_output``, which torchmetrics <= 1.9.0 does not unwrap (torchmetrics issue #3407)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads the text length limit from it

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return embeddings(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return embeddings(self.model.get_text_features(*args, **kwargs))


def embeddings(features: Any) -> torch.Tensor:
    """The projected CLIP embeddings of ``get_image_features``/``get_text_features``, whether
    they come as a tensor (transformers < 5) or in a model output's ``pooler_output``."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def clip_score(
    metric: Any, images: np.ndarray, prompts: Sequence[str], batch_size: int = 50, device: str | torch.device = "cpu"
) -> float:
    """Mean CLIP score (``100 * max(cos, 0)``) of uint8 ``(N, H, W, 3)`` ``images`` against their
    ``prompts``, with a metric from :func:`load_clip` (reset first)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    metric.reset()
    for i in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).to(device)
        metric.update(batch, list(prompts[i : i + batch_size]))
    return float(metric.compute())
