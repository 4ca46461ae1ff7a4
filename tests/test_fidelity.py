"""Same-seed fidelity (PSNR, SSIM) against closed forms, and the CLIP score of a tiny local CLIP."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fid_helpers
from eval.fidelity import check_clip_model, clip_score, embeddings, load_clip, same_seed_fidelity

rng = np.random.default_rng(0)


def test_identical_images_give_infinite_psnr_and_ssim_of_one():
    images = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    fidelity = same_seed_fidelity(images, images.copy(), batch_size=2)
    assert fidelity["psnr"] == np.inf
    assert fidelity["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_a_known_noise_level_gives_its_psnr_per_image_then_averaged():
    # every pixel off by exactly +-d grey levels: MSE = (d / 255)^2, PSNR = 20 log10(255 / d)
    reference = rng.integers(40, 216, size=(2, 16, 16, 3), dtype=np.uint8)
    signs = rng.choice([-1, 1], size=reference.shape)
    for d in (1, 5, 25):
        noisy = (reference + d * signs).astype(np.uint8)
        fidelity = same_seed_fidelity(noisy, reference)
        assert fidelity["psnr"] == pytest.approx(20 * np.log10(255 / d), abs=1e-3)
        assert fidelity["ssim"] < 1
    # image 0 off by 1, image 1 off by 10: the mean of the two PSNRs, not the PSNR of the pooled error
    noisy = (reference + np.array([1, 10])[:, None, None, None] * signs).astype(np.uint8)
    expected = (20 * np.log10(255 / 1) + 20 * np.log10(255 / 10)) / 2
    assert same_seed_fidelity(noisy, reference, batch_size=1)["psnr"] == pytest.approx(expected, abs=1e-3)


def test_ssim_of_constant_images_is_its_luminance_term():
    # no structure: SSIM = (2 a b + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * data range)^2
    a, b = np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 150, np.uint8)
    x, y, c1 = 100 / 255, 150 / 255, 0.01**2
    assert same_seed_fidelity(a, b)["ssim"] == pytest.approx((2 * x * y + c1) / (x * x + y * y + c1), abs=1e-5)


def test_fidelity_refuses_sets_of_other_shapes():
    with pytest.raises(ValueError, match="equal, non-empty shapes"):
        same_seed_fidelity(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((3, 8, 8, 3), np.uint8))


def test_clip_score_from_a_local_folder_matches_clip_by_hand(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    path = fid_helpers.save_tiny_clip(tmp_path / "clip")
    images = rng.integers(0, 256, size=(3, 24, 24, 3), dtype=np.uint8)
    prompts = ["a red circle on a blue background", "a green square", "a yellow triangle"]
    score = clip_score(load_clip(str(path)), images, prompts, batch_size=2)
    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    with torch.no_grad():
        image_features = embeddings(model.get_image_features(**processor(images=list(images), return_tensors="pt")))
        text_features = embeddings(model.get_text_features(**processor(text=prompts, return_tensors="pt",
                                                                       padding=True)))
    by_hand = 100 * F.cosine_similarity(image_features, text_features).mean().item()
    assert by_hand > 0  # else both would be floored at 0 and the comparison would say nothing
    assert score == pytest.approx(by_hand, abs=1e-3)


def test_bad_clip_models_give_one_line(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        check_clip_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="^cannot load --clip-model '.*' as a CLIP model and processor: [^\n]*$"):
        check_clip_model(str(tmp_path))
