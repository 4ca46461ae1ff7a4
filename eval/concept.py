"""Subject fidelity for the DreamBooth benchmark: a classifier that also knows the novel shapes.

The shipped attribute classifier (:mod:`eval.reference.adherence`) knows only the shapes the reference model
was trained on. The *concept classifier* is the same network (:class:`~eval.reference.adherence.AttributeClassifier`)
with :data:`CONCEPT_ATTRIBUTES`, whose shape head also has :data:`eval.reference.shapes.NOVEL_SHAPES`,
trained the same way (augmented generator images) on the usual shapes plus novel ones in random
colours. Its weights live in ``eval/data/concept_classifier/``; regenerate them with
``python -m eval.concept``. :func:`score_concept` scores images against target attributes that may
name a novel shape (which :func:`eval.reference.adherence.score_adherence`, parsing captions, cannot).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from eval.reference import shapes
from eval.reference.adherence import (
    AttributeClassifier, augment, fit_classifier, load_classifier, save_classifier, score_attributes, to_tensor,
)

CONCEPT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": shapes.SHAPES + shapes.NOVEL_SHAPES,
    "color": shapes.COLOR_NAMES,
    "background": shapes.COLOR_NAMES,
}
CONCEPT_CLASSIFIER_DIR = Path(__file__).resolve().parent / "data" / "concept_classifier"


def concept_dataset(n: int, seed: int, novel_share: float = 0.25) -> tuple[np.ndarray, list[dict[str, str]]]:
    """``n`` jittered images, ``novel_share`` of them novel shapes in random colours, with labels.

    The rest come from :func:`eval.reference.shapes.make_dataset` (all 90 combinations). Returns uint8
    images ``(n, 64, 64, 3)`` and one attribute dict per image.
    """
    rng = np.random.default_rng(seed)
    n_novel = int(round(n * novel_share))
    known = shapes.make_dataset(n - n_novel, seed=seed, include_heldout=True)
    labels = [a.as_dict() for a in known.attributes]
    novel = []
    for _ in range(n_novel):
        shape = shapes.NOVEL_SHAPES[int(rng.integers(len(shapes.NOVEL_SHAPES)))]
        color, background = rng.choice(len(shapes.COLOR_NAMES), size=2, replace=False)
        attrs = {"shape": shape, "color": shapes.COLOR_NAMES[color], "background": shapes.COLOR_NAMES[background]}
        novel.append(np.asarray(shapes.render_novel(**attrs, rng=rng)))
        labels.append(attrs)
    images = np.concatenate([known.images, np.stack(novel)]) if novel else known.images
    order = rng.permutation(n)
    return images[order], [labels[i] for i in order]


def train_concept_classifier(
    n_train: int = 16000, epochs: int = 3, batch_size: int = 128, lr: float = 3e-3, seed: int = 0
) -> AttributeClassifier:
    """Train the concept classifier as :func:`eval.reference.adherence.train_classifier` trains the shipped one."""
    torch.manual_seed(seed)
    data, labels = concept_dataset(n_train, seed=seed + 1000)
    model = AttributeClassifier(attributes=CONCEPT_ATTRIBUTES)
    targets = {name: torch.tensor([vals.index(lab[name]) for lab in labels]) for name, vals in model.attributes.items()}
    return fit_classifier(model, to_tensor(data), targets, epochs, batch_size, lr, seed, progress=False)


def load_concept_classifier() -> AttributeClassifier:
    """The shipped concept classifier (FileNotFoundError if it was not trained)."""
    return load_classifier(CONCEPT_CLASSIFIER_DIR)


def score_concept(
    images: Any, targets: Sequence[dict[str, str]], classifier: AttributeClassifier | None = None
) -> dict[str, float]:
    """Share of ``images`` whose predicted attributes match ``targets``, per attribute and all at
    once (:func:`eval.reference.adherence.score_attributes` with the concept classifier by default)."""
    return score_attributes(images, targets, classifier if classifier is not None else load_concept_classifier())


def main(argv: list[str] | None = None) -> int:
    """Train the concept classifier, report its accuracy on fresh images and save it."""
    p = argparse.ArgumentParser(description="Train the concept classifier of the DreamBooth benchmark.")
    p.add_argument("--out", default=str(CONCEPT_CLASSIFIER_DIR))
    p.add_argument("--n-train", type=int, default=16000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    model = train_concept_classifier(a.n_train, a.epochs, seed=a.seed)
    images, labels = concept_dataset(3000, seed=12345)
    clean = to_tensor(images)
    noisy = augment(clean, torch.Generator().manual_seed(12345))
    novel = [i for i, lab in enumerate(labels) if lab["shape"] in shapes.NOVEL_SHAPES]
    accuracy = {
        "clean": score_concept(clean, labels, model),
        "augmented": score_concept(noisy, labels, model),
        "novel_augmented": score_concept(noisy[novel], [labels[i] for i in novel], model),
    }
    save_classifier(model, a.out, {"n_train": a.n_train, "epochs": a.epochs, "seed": a.seed,
                                   "accuracy_on_fresh_images": accuracy})
    print(accuracy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
