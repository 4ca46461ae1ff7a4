"""Subject fidelity for the DreamBooth benchmark: a classifier that also knows the novel shapes.

The shipped attribute classifier (:mod:`eval.adherence`) knows only the shapes the reference model
was trained on. The *concept classifier* is the same network (:class:`~eval.adherence.AttributeClassifier`)
with :data:`CONCEPT_ATTRIBUTES`, whose shape head also has :data:`eval.shapes.NOVEL_SHAPES`,
trained the same way (augmented generator images) on the usual shapes plus novel ones in random
colours. Its weights live in ``eval/data/concept_classifier/``; regenerate them with
``python -m eval.concept``. :func:`score_concept` scores images against target attributes that may
name a novel shape (which :func:`eval.adherence.score_adherence`, parsing captions, cannot).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from eval import shapes
from eval.adherence import AttributeClassifier, augment, load_classifier, save_classifier, to_tensor

CONCEPT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": shapes.SHAPES + shapes.NOVEL_SHAPES,
    "color": shapes.COLOR_NAMES,
    "background": shapes.COLOR_NAMES,
}
CONCEPT_CLASSIFIER_DIR = Path(__file__).resolve().parent / "data" / "concept_classifier"


def concept_dataset(n: int, seed: int, novel_share: float = 0.25) -> tuple[np.ndarray, list[dict[str, str]]]:
    """``n`` jittered images, ``novel_share`` of them novel shapes in random colours, with labels.

    The rest come from :func:`eval.shapes.make_dataset` (all 90 combinations). Returns uint8
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


def _label_tensors(labels: Sequence[dict[str, str]], attributes: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([vals.index(lab[name]) for lab in labels]) for name, vals in attributes.items()}


def train_concept_classifier(
    n_train: int = 16000, epochs: int = 3, batch_size: int = 128, lr: float = 3e-3, seed: int = 0
) -> AttributeClassifier:
    """Train the concept classifier as :func:`eval.adherence.train_classifier` trains the shipped one."""
    torch.manual_seed(seed)
    data, labels = concept_dataset(n_train, seed=seed + 1000)
    images = to_tensor(data)
    model = AttributeClassifier(attributes=CONCEPT_ATTRIBUTES)
    targets = _label_tensors(labels, model.attributes)
    gen = torch.Generator().manual_seed(seed)
    steps = math.ceil(n_train / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.15)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        for i in range(steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = augment(images[idx], gen)
            flip = torch.rand(len(idx), generator=gen) < 0.5
            logits = model(torch.where(flip[:, None, None, None], x.flip(3), x))
            loss = sum(F.cross_entropy(logits[name], targets[name][idx]) for name in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def load_concept_classifier() -> AttributeClassifier:
    """The shipped concept classifier (FileNotFoundError if it was not trained)."""
    return load_classifier(CONCEPT_CLASSIFIER_DIR)


@torch.no_grad()
def score_concept(
    images: Any, targets: Sequence[dict[str, str]], classifier: AttributeClassifier | None = None
) -> dict[str, float]:
    """Share of ``images`` whose predicted attributes match ``targets``, per attribute and all at once.

    Args:
        images: anything :func:`eval.adherence.to_tensor` takes, one image per target.
        targets: the expected value of every attribute of the classifier, e.g.
            ``{"shape": "star", "color": "white", "background": "black"}``.
        classifier: default: :func:`load_concept_classifier`.
    """
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    model = classifier if classifier is not None else load_concept_classifier()
    preds = model.predict(to_tensor(images))
    correct = {name: np.array([p == t[name] for p, t in zip(preds[name], targets)]) for name in model.attributes}
    result = {name: float(c.mean()) for name, c in correct.items()}
    result["all_correct"] = float(np.stack(list(correct.values())).all(0).mean())
    return result


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
