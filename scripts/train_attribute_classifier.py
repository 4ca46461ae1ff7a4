#!/usr/bin/env python
"""Train the attribute classifier used to score prompt adherence of the reference model.

Writes ``attribute_classifier.safetensors`` and ``attribute_classifier.json`` into ``--out``
(default ``runs/attribute_classifier``) and prints its accuracy on fresh generator images. The
shipped classifier lives beside the shipped model in ``eval/reference/unet``; replacing it needs
``--out eval/reference/unet --overwrite-shipped-model``.

Examples (about 1-2 minutes on one CPU thread)::

    python scripts/train_attribute_classifier.py --threads 1
    python scripts/train_attribute_classifier.py --threads 1 --out eval/reference/unet --overwrite-shipped-model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from eval.reference.components import OVERWRITE_FLAG, refuse_shipped_model  # noqa: E402

DEFAULT_OUT = "runs/attribute_classifier"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument(OVERWRITE_FLAG, action="store_true",
                   help="allow --out to be the shipped model's folder, eval/reference/unet (replaces its classifier)")
    p.add_argument("--n-train", type=int, default=20000, help="generated training images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=3000, help="fresh images for the accuracy report")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    args = p.parse_args(argv)
    refuse_shipped_model(args.out, args.overwrite_shipped_model)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate and save the classifier; return the accuracy report."""
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from eval.reference.adherence import evaluate_classifier, save_classifier, train_classifier

    model, info = train_classifier(
        n_train=args.n_train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    report = evaluate_classifier(model, n=args.n_eval)
    info["accuracy_on_fresh_images"] = report
    info["command"] = "python scripts/train_attribute_classifier.py " + " ".join(sys.argv[1:] if argv is None else argv)
    path = save_classifier(model, args.out, extra=info)
    print(json.dumps(info, indent=2))
    print(f"saved {path}")
    return report


if __name__ == "__main__":
    main()
