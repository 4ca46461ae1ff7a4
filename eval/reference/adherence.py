"""Prompt adherence of images generated from :mod:`eval.reference.shapes` captions.

A small CNN (:class:`AttributeClassifier`, one linear head per attribute, ~100 K parameters)
is trained on generator ground truth with noise, blur and colour augmentation, so that it also
reads the imperfect images a diffusion model makes. :func:`score_adherence` compares its
predictions with the attributes parsed from the prompts.

The shipped weights live in ``eval/reference/unet/attribute_classifier.safetensors`` with a
JSON config beside it; ``scripts/train_attribute_classifier.py`` regenerates them (into
``runs/attribute_classifier``, or over the shipped ones with
``--out eval/reference/unet --overwrite-shipped-model``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from eval.reference import generation_kwargs, shapes

CLASSIFIER_FILE = "attribute_classifier.safetensors"
CONFIG_FILE = "attribute_classifier.json"


def reference_model_dir() -> Path:
    """Folder of the embedded reference model and its attribute classifier
    (:data:`eval.REFERENCE_MODEL`)."""
    from eval import REFERENCE_MODEL

    return REFERENCE_MODEL


class AttributeClassifier(nn.Module):
    """Four stride-2 conv stages, global average + max pooling, one linear head per attribute.

    Input: float images ``(B, 3, H, W)`` in ``[0, 1]`` (any size; trained at 64 x 64).
    Output: dict attribute name -> logits ``(B, n_values)``.
    """

    def __init__(
        self,
        attributes: dict[str, Sequence[str]] | None = None,
        channels: Sequence[int] = (32, 48, 64, 96),
    ) -> None:
        super().__init__()
        self.attributes = {k: list(v) for k, v in (attributes or shapes.ATTRIBUTES).items()}
        self.channels = list(channels)
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(2 * c_in, len(vals)) for name, vals in self.attributes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x * 2.0 - 1.0)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, list[str]]:
        """Return the predicted value name of every attribute for a batch of images."""
        logits = self(x)
        return {name: [self.attributes[name][i] for i in out.argmax(1).tolist()] for name, out in logits.items()}

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments."""
        return {"attributes": self.attributes, "channels": self.channels, "image_size": 64}


# ----------------------------------------------------------------------------- image helpers


def to_tensor(images: Any, size: int = 64) -> torch.Tensor:
    """Convert images to a float ``(B, 3, size, size)`` tensor in ``[0, 1]``.

    Accepts a list of PIL images, a uint8 or float numpy array ``(B, H, W, 3)``, or a float tensor
    ``(B, 3, H, W)`` in ``[0, 1]``. Other sizes are resized (bilinear, antialiased).
    """
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
    elif isinstance(images, np.ndarray):
        arr = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    else:
        arrs = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images]
        return to_tensor(np.stack(arrs), size=size)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0.0, 1.0)


def _gaussian_kernel(sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    return k / k.sum(dim=1, keepdim=True)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, colour jitter, low-frequency blotches, down-up sampling and pixel noise.

    Meant to make the classifier robust to the soft edges and colour drift of generated images.
    """
    b = x.shape[0]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    # separable gaussian blur with a per-image sigma in [0.1, 1.6]
    sigma = 0.1 + 1.5 * rand(b)
    k = _gaussian_kernel(sigma)  # (b, 7)
    pad = k.shape[1] // 2
    xb = x.reshape(1, b * 3, *x.shape[2:])
    kh = k.repeat_interleave(3, dim=0)[:, None, None, :]
    kv = k.repeat_interleave(3, dim=0)[:, None, :, None]
    xb = F.conv2d(F.pad(xb, (pad, pad, 0, 0), mode="replicate"), kh, groups=b * 3)
    xb = F.conv2d(F.pad(xb, (0, 0, pad, pad), mode="replicate"), kv, groups=b * 3)
    x = xb.reshape_as(x)
    # occasional down-up sampling (blocky / soft decoder look)
    down = rand(b) < 0.3
    if down.any():
        small = F.interpolate(x[down], scale_factor=0.5, mode="bilinear", align_corners=False, antialias=True)
        x = x.clone()
        x[down] = F.interpolate(small, size=x.shape[2:], mode="bilinear", align_corners=False)
    # colour jitter: brightness, contrast, per-channel gain and offset
    brightness = 1.0 + 0.3 * (rand(b, 1, 1, 1) - 0.5)
    contrast = 1.0 + 0.4 * (rand(b, 1, 1, 1) - 0.5)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    x = x * brightness * (1.0 + 0.16 * (rand(b, 3, 1, 1) - 0.5)) + 0.12 * (rand(b, 3, 1, 1) - 0.5)
    # smooth low-frequency blotches
    blotch = torch.randn(b, 3, 4, 4, generator=generator) * 0.05 * rand(b, 1, 1, 1)
    x = x + F.interpolate(blotch, size=x.shape[2:], mode="bicubic", align_corners=False)
    # pixel noise with a per-image strength in [0, 0.08]
    x = x + torch.randn(x.shape, generator=generator) * (0.08 * rand(b, 1, 1, 1))
    return x.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- training


def _labels(attrs: Sequence[shapes.ShapeAttributes], attributes: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    return {
        name: torch.tensor([vals.index(a.as_dict()[name]) for a in attrs], dtype=torch.long)
        for name, vals in attributes.items()
    }


@torch.no_grad()
def accuracy(
    model: AttributeClassifier, images: torch.Tensor, attrs: Sequence[shapes.ShapeAttributes], batch_size: int = 256
) -> dict[str, float]:
    """Per-attribute and all-correct accuracy of ``model`` on ``images`` with known attributes."""
    model.eval()
    labels = _labels(attrs, model.attributes)
    correct = {name: torch.zeros(len(attrs), dtype=torch.bool) for name in model.attributes}
    for i in range(0, len(attrs), batch_size):
        logits = model(images[i : i + batch_size])
        for name, out in logits.items():
            correct[name][i : i + batch_size] = out.argmax(1) == labels[name][i : i + batch_size]
    result = {name: float(c.float().mean()) for name, c in correct.items()}
    result["all_correct"] = float(torch.stack(list(correct.values())).all(0).float().mean())
    return result


def train_classifier(
    n_train: int = 20000,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[AttributeClassifier, dict[str, Any]]:
    """Train an :class:`AttributeClassifier` on fresh generator images (all 90 combinations).

    Returns the model (eval mode) and a dict of training facts.
    """
    torch.manual_seed(seed)
    start = time.time()
    data = shapes.make_dataset(n_train, seed=seed + 1000, include_heldout=True)
    model = AttributeClassifier()
    fit_classifier(model, to_tensor(data.images), _labels(data.attributes, model.attributes),
                   epochs, batch_size, lr, seed, progress)
    info = {
        "n_train": n_train,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_seconds": round(time.time() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, info


def fit_classifier(
    model: AttributeClassifier,
    images: torch.Tensor,
    labels: dict[str, torch.Tensor],
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> AttributeClassifier:
    """Train ``model`` on ``images`` (float ``(n, 3, H, W)`` in [0, 1]) with ``labels`` (value
    indices per attribute): AdamW with a one-cycle schedule, :func:`augment` and random flips
    (every attribute is flip-invariant). Returns ``model`` in eval mode."""
    from tqdm.auto import tqdm

    n = len(images)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    bar = tqdm(total=total, desc="classifier", disable=not progress)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = augment(images[idx], gen)
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            logits = model(x)
            loss = sum(F.cross_entropy(logits[name], labels[name][idx]) for name in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return model.eval()


def evaluate_classifier(model: AttributeClassifier, n: int = 3000, seed: int = 12345) -> dict[str, dict[str, float]]:
    """Accuracy on fresh generator images (clean, and with the training augmentation)."""
    data = shapes.make_dataset(n, seed=seed, include_heldout=True)
    clean = to_tensor(data.images)
    noisy = augment(clean, torch.Generator().manual_seed(seed))
    return {"clean": accuracy(model, clean, data.attributes), "augmented": accuracy(model, noisy, data.attributes)}


def save_classifier(model: AttributeClassifier, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``attribute_classifier.safetensors`` and ``attribute_classifier.json`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / CLASSIFIER_FILE))
    config = model.config()
    if extra:
        config["training"] = extra
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder / CLASSIFIER_FILE


def load_classifier(path: str | Path | None = None) -> AttributeClassifier:
    """Load the attribute classifier (eval mode).

    Args:
        path: the ``.safetensors`` file or the folder holding it; default: the shipped weights
            (see :func:`reference_model_dir`). The JSON config is read from beside it.

    Raises:
        FileNotFoundError: if there are no weights at ``path``.
    """
    from safetensors.torch import load_file

    p = Path(path) if path is not None else reference_model_dir()
    weights = p / CLASSIFIER_FILE if p.is_dir() or p.suffix != ".safetensors" else p
    if not weights.exists():
        raise FileNotFoundError(
            f"no attribute classifier at {weights}; run scripts/train_attribute_classifier.py first"
        )
    config_path = weights.with_name(CONFIG_FILE)
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    model = AttributeClassifier(attributes=config.get("attributes"), channels=config.get("channels", (32, 48, 64, 96)))
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


# ----------------------------------------------------------------------------- scoring


def score_adherence(
    images: Any,
    prompts: Sequence[str],
    classifier: AttributeClassifier | None = None,
    batch_size: int = 128,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Score how well ``images`` follow their ``prompts`` (captions of :mod:`eval.reference.shapes`).

    Args:
        images: PIL images, a uint8/float array ``(B, H, W, 3)`` or a tensor ``(B, 3, H, W)`` in
            ``[0, 1]``; one per prompt.
        prompts: captions parseable by :func:`eval.reference.shapes.parse_caption`.
        classifier: default: :func:`load_classifier` ().
        batch_size: classifier batch size.
        return_predictions: also return the predicted attributes of every image.

    Returns:
        ``{"all_correct": share of images with every attribute right, "<attribute>": accuracy
        for each attribute, "n": number of images}`` (plus ``"predictions"`` if asked).
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    targets = [shapes.parse_caption(p).as_dict() for p in prompts]
    return score_attributes(images, targets, classifier, batch_size, return_predictions)


@torch.no_grad()
def score_attributes(
    images: Any,
    targets: Sequence[dict[str, str]],
    classifier: AttributeClassifier | None = None,
    batch_size: int = 128,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Like :func:`score_adherence`, against the expected value of every attribute of the
    classifier, e.g. ``{"shape": "star", "color": "white", "background": "black"}`` per image."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    model = classifier if classifier is not None else load_classifier()
    model.eval()
    x = to_tensor(images)
    preds: dict[str, list[str]] = {name: [] for name in model.attributes}
    for i in range(0, len(x), batch_size):
        for name, vals in model.predict(x[i : i + batch_size]).items():
            preds[name].extend(vals)
    correct = {name: np.array([p == t[name] for p, t in zip(preds[name], targets)]) for name in model.attributes}
    result: dict[str, Any] = {"all_correct": float(np.stack(list(correct.values())).all(0).mean()) if len(x) else 0.0}
    result.update({name: float(c.mean()) if len(x) else 0.0 for name, c in correct.items()})
    result["n"] = len(x)
    if return_predictions:
        result["predictions"] = [
            {name: preds[name][i] for name in model.attributes} for i in range(len(x))
        ]
    return result


@torch.no_grad()
def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 50,
    progress: bool = True,
) -> np.ndarray:
    """Generate one image per (prompt, seed) with a diffusers text-to-image pipeline.

    Returns uint8 images ``(N, H, W, 3)``. Every image depends only on its own seed.
    """
    from tqdm.auto import tqdm

    out: list[np.ndarray] = []
    batches = range(0, len(prompts), batch_size)
    for i in tqdm(batches, desc="generate", disable=not progress):
        p = list(prompts[i : i + batch_size])
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        res = pipe(
            prompt=p,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=gens,
            output_type="np",
            **generation_kwargs(pipe),
        )
        out.append((np.clip(res.images, 0.0, 1.0) * 255.0).round().astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), dtype=np.uint8)


def evaluate_pipeline(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    n: int = 200,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 50,
    classifier: AttributeClassifier | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], np.ndarray]:
    """Generate images for ``prompts`` (default: ``n`` held-out prompts) and score adherence.

    Image ``i`` uses seed ``seed + i``. Returns ``(scores, images)``.
    """
    prompts = list(prompts) if prompts is not None else shapes.heldout_prompts(n)
    seeds = [seed + i for i in range(len(prompts))]
    images = generate(pipe, prompts, seeds, num_inference_steps, guidance_scale, batch_size, progress)
    scores = score_adherence(images, prompts, classifier=classifier)
    scores.update(
        {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed}
    )
    return scores, images
