#!/usr/bin/env python
"""Train agentsd's embedded reference text-to-image model on procedural shapes (CPU).

The result is a small Stable Diffusion pipeline in the diffusers layout, saved into ``--out``
(default ``runs/reference_model``) so that ``StableDiffusionPipeline.from_pretrained(out)`` loads it
offline, with its model card ``README.md`` and ``training_info.json``. Phases: the autoencoder
(``--vae-steps``), the UNet and text encoder (``--steps``), then the export of the EMA weights and
the prompt-adherence evaluation (``--no-eval`` skips it). The training itself is
``eval/reference/training.py``.

The shipped model lives in ``eval/reference/unet``: writing there needs
``--out eval/reference/unet --overwrite-shipped-model``; without the flag that ``--out`` is refused.

Training is reproducible from ``--seed`` (for a given thread count) and resumable: a checkpoint
(weights, EMA, optimisers, LR schedulers, step, RNG states) is written to ``--ckpt-dir`` every
``--ckpt-minutes`` and when a phase ends or time runs out; ``--resume`` continues from it.
Checkpoints and the latent cache are loaded with ``torch.load(..., weights_only=True)``: a damaged
or changed checkpoint ends the run with a one-line error naming the file.

Examples (2 threads)::

    python scripts/train_reference_model.py --threads 2 --resume
    python scripts/train_reference_model.py --threads 2 --resume \\
        --out eval/reference/unet --overwrite-shipped-model
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from eval.reference.components import OVERWRITE_FLAG, inside_shipped_model, refuse_shipped_model  # noqa: E402

DEFAULT_OUT = "runs/reference_model"


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _float_tuple(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--out", default=DEFAULT_OUT, help=f"pipeline folder (default: {DEFAULT_OUT})")
    g.add_argument(OVERWRITE_FLAG, action="store_true",
                   help="allow --out to be the shipped model's folder, eval/reference/unet (replaces it)")
    g.add_argument("--ckpt-dir", default=None, help="checkpoint folder (default: <out>_ckpt, beside --out)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --ckpt-dir if there is one")
    g.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget of this invocation for training; when reached, a checkpoint is "
                        "saved and the current EMA weights are exported and evaluated")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="stop after this UNet step, save a checkpoint and exit without exporting "
                        "(for chunked runs and tests)")
    g.add_argument("--ckpt-minutes", type=float, default=5.0, help="checkpoint interval")
    g.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")

    g = p.add_argument_group("UNet + text encoder (phase 2)")
    g.add_argument("--steps", type=int, default=4000, help="UNet training steps")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    g.add_argument("--warmup-steps", type=int, default=200)
    g.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine decay floor, relative to --lr")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay (with a 1+s/10+s warmup)")
    g.add_argument("--cfg-drop", type=float, default=0.1, help="share of captions replaced by ''")
    g.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR loss weighting (0: plain MSE)")
    g.add_argument("--noise-offset", type=float, default=0.05, help="per-channel offset noise scale")
    g.add_argument("--n-train-images", type=int, default=20000, help="size of the (cached) training set")

    g = p.add_argument_group("autoencoder (phase 1)")
    g.add_argument("--vae-steps", type=int, default=1200)
    g.add_argument("--vae-batch-size", type=int, default=16)
    g.add_argument("--vae-lr", type=float, default=1e-3)

    g = p.add_argument_group("model size")
    g.add_argument("--text-hidden", type=int, default=128, help="text encoder width = cross-attention dim")
    g.add_argument("--text-layers", type=int, default=4)
    g.add_argument("--unet-channels", type=_int_tuple, default=(64, 128, 128), help="e.g. 64,128,128")
    g.add_argument("--vae-channels", type=_int_tuple, default=(16, 32, 64), help="e.g. 16,32,64")

    g = p.add_argument_group("evaluation")
    g.add_argument("--no-eval", action="store_true", help="export without measuring adherence")
    g.add_argument("--eval-n", type=int, default=200, help="held-out prompts to generate")
    g.add_argument("--eval-train-n", type=int, default=78, help="training-combination prompts to generate")
    g.add_argument("--eval-steps", type=int, default=25, help="PNDM inference steps")
    g.add_argument("--guidance", type=_float_tuple, default=(3.0, 5.0, 7.5),
                   help="classifier-free guidance scale(s), e.g. 3,5,7.5: with several, each is tried on the "
                        "training-combination prompts and the best one is used for the held-out prompts")
    g.add_argument("--eval-batch-size", type=int, default=50)
    args = p.parse_args(argv)
    refuse_shipped_model(args.out, args.overwrite_shipped_model)
    if args.ckpt_dir is None:
        out = Path(args.out).resolve()
        args.ckpt_dir = str(out.with_name(out.name + "_ckpt"))
    elif inside_shipped_model(args.ckpt_dir):
        raise SystemExit(f"--ckpt-dir {args.ckpt_dir} is inside the shipped reference model; choose another folder")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the training, export, evaluate and write the model card."""
    args = parse_args(argv)
    from eval.reference.training import train

    command = "python scripts/train_reference_model.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    return train(args, command)


if __name__ == "__main__":
    sys.exit(main())
