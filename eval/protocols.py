"""What the FID harness generates and compares against: the quick, full and paper protocols
(prompts, per-image seeds, sampling settings) and the real images for FID."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_DATA = Path(__file__).resolve().parent / "data"
#: The presets of ``--protocol``: quick and full on the embedded model, paper as ToMeSD/AgentSD.
PRESETS = {
    "quick": dict(num_images=64, ratios=[0.4], steps=25, guidance=3.0, batch_size=32, size=64),
    "full": dict(num_images=500, ratios=[0.1, 0.2, 0.3, 0.4, 0.5], steps=50, guidance=3.0, batch_size=50, size=64),
    "paper": dict(num_images=2000, ratios=[0.1, 0.2, 0.3, 0.4, 0.5], steps=50, guidance=7.5, batch_size=8, size=512),
}


@dataclass(frozen=True)
class Protocol:
    """What to generate: prompts with their seeds and the sampling settings."""

    name: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    scores_adherence: bool  # the prompts are eval.reference.shapes captions

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_images"] = len(d.pop("prompts"))
        d.pop("seeds")
        return d


def shapes_protocol(num_images: int, steps: int, guidance: float, seed: int = 0, size: int = 64,
                    name: str = "shapes") -> Protocol:
    """Captions of the embedded model's generator (its training distribution) as prompts."""
    from eval.reference import shapes

    captions = shapes.make_dataset(num_images, seed=10_000 + seed, size=8).captions
    return Protocol(name, tuple(captions), tuple(seed + i for i in range(num_images)), size, size, steps,
                    guidance, True)


def shapes_real_images(num_images: int, seed: int = 0, size: int = 64) -> np.ndarray:
    """Real images for :func:`shapes_protocol`: the generator's images for the same captions
    (the first ``n`` match the first ``n`` prompts), uint8 ``(num_images, size, size, 3)``."""
    from eval.reference import shapes

    return shapes.make_dataset(num_images, seed=10_000 + seed, size=size).images


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order (first WordNet lemma of each synset)."""
    return (_DATA / "imagenet_classes.txt").read_text().splitlines()


def paper_protocol(num_images: int = 2000, size: int = 512, steps: int = 50, guidance: float = 7.5,
                   seed: int = 0) -> Protocol:
    """The ToMeSD/AgentSD protocol: "A high quality photograph of a {cls}." for the ImageNet-1k
    classes, 512 px, 50 PNDM steps, guidance 7.5. Image ``i`` shows class ``i % 1000``, so 2000
    images are 2 per class and fewer still cover the classes evenly."""
    classes = imagenet_classes()
    prompts = [f"A high quality photograph of a {classes[i % len(classes)]}." for i in range(num_images)]
    return Protocol("paper", tuple(prompts), tuple(seed + i for i in range(num_images)), size, size, steps,
                    guidance, False)


def reference_files(folder: str | Path, limit: int | None = None) -> list[Path]:
    """The image files of ``folder`` (recursively, sorted), at most ``limit``, each checked to open.

    Raises:
        FileNotFoundError: if the folder does not exist.
        ValueError: if it holds no images, or an image cannot be read (named).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--reference-dir {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ValueError(f"--reference-dir {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    for path in files:
        try:
            with Image.open(path) as im:
                im.verify()
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise ValueError(f"cannot read reference image {path}: {e}") from None
    return files


def load_reference_images(files: list[Path], size: int = 299) -> np.ndarray:
    """Centre-cropped squares of ``files`` resized to ``size`` px, uint8 ``(n, size, size, 3)``."""
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        with Image.open(path) as im:
            im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        out[i] = np.asarray(im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC))
    return out


def make_protocol(name: str, num_images: int, size: int, steps: int, guidance: float, seed: int = 0) -> Protocol:
    """The protocol ``name`` of :data:`PRESETS` with these settings."""
    if name == "paper":
        return paper_protocol(num_images, size, steps, guidance, seed)
    return shapes_protocol(num_images, steps, guidance, seed, size, name)
