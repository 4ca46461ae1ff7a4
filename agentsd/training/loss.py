"""The DreamBooth loss: the UNet's prediction against the scheduler's target, plus the weighted
prior-preservation part on the class samples."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .data import Batch


def dreambooth_loss(
    unet: Any, scheduler: Any, batch: Batch, prior_loss_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The DreamBooth loss on ``batch``.

    Returns ``(loss, instance_loss, prior_loss)``: the MSE of the UNet's prediction against the
    target of the scheduler's ``prediction_type`` (epsilon or v), the prior part weighted by
    ``prior_loss_weight``; ``prior_loss`` is None without class samples.
    """
    latents, embeddings, noise, timesteps, n = batch
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, embeddings).sample.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")
    target = target.float()
    instance = F.mse_loss(pred[:n], target[:n])
    if n == len(pred):
        return instance, instance, None
    prior = F.mse_loss(pred[n:], target[n:])
    return instance + prior_loss_weight * prior, instance, prior
