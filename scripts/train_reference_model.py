#!/usr/bin/env python
"""Train one of agentsd's embedded reference text-to-image models on procedural shapes (CPU).

The result is a small pipeline in the diffusers layout, saved into ``--out`` (default
``runs/reference_model``) so that ``DiffusionPipeline.from_pretrained(out)`` loads it offline, with
its model card ``README.md`` and ``training_info.json``: a Stable Diffusion pipeline (``--denoiser
unet``, the default) or a PixArt pipeline with a small PixArt-layout transformer (``--denoiser
dit``). Phases: the autoencoder (``--vae-steps``; ``--vae-from`` takes a trained one instead), the
denoiser and text encoder (``--steps``), then the export of the EMA weights and the
prompt-adherence evaluation (``--no-eval`` skips it). The training itself is
``eval/reference/training.py``.

The shipped models live in ``eval/reference/unet`` and ``eval/reference/dit``: writing there needs
``--overwrite-shipped-model``; without the flag such an ``--out`` is refused.

Training is reproducible from ``--seed`` (for a given thread count) and resumable: a checkpoint
(weights, EMA, optimisers, LR schedulers, step, RNG states) is written to ``--ckpt-dir`` every
``--ckpt-minutes`` and when a phase ends or time runs out; ``--resume`` continues from it.
Checkpoints and the latent cache are loaded with ``torch.load(..., weights_only=True)``: a damaged
or changed checkpoint ends the run with a one-line error naming the file.

Examples (2 threads)::

    python scripts/train_reference_model.py --threads 2 --resume
    python scripts/train_reference_model.py --threads 2 --resume \\
        --out eval/reference/unet --overwrite-shipped-model
    python scripts/train_reference_model.py --threads 2 --resume --denoiser dit --image-size 128 \\
        --vae-from eval/reference/unet --text-from eval/reference/unet --out runs/reference_dit
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
                   help="allow --out to be a shipped model's folder, eval/reference/unet or dit (replaces it)")
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

    g = p.add_argument_group("denoiser + text encoder (phase 2)")
    g.add_argument("--steps", type=int, default=4000, help="denoiser training steps")
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
    g.add_argument("--vae-from", default=None,
                   help="a pipeline folder whose trained autoencoder to take (e.g. eval/reference/unet): no phase 1")
    g.add_argument("--text-from", default=None,
                   help="a pipeline folder whose trained text encoder to start from (e.g. eval/reference/unet); it "
                        "goes on training with the denoiser")

    g = p.add_argument_group("model")
    g.add_argument("--denoiser", choices=("unet", "dit"), default="unet",
                   help="unet: a Stable Diffusion UNet (StableDiffusionPipeline); dit: a PixArt-layout transformer "
                        "(PixArtAlphaPipeline)")
    g.add_argument("--image-size", type=int, default=64, choices=(64, 128),
                   help="image side in px; the latents are a quarter of it (default: 64)")
    g.add_argument("--dit-width", type=int, default=192, help="DiT width (default: 192)")
    g.add_argument("--dit-layers", type=int, default=8, help="DiT blocks (default: 8)")
    g.add_argument("--dit-heads", type=int, default=3, help="DiT attention heads (default: 3)")
    g.add_argument("--dit-patch", type=int, default=1, help="DiT patch size in latent pixels (default: 1)")
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
    if args.dit_width % args.dit_heads:
        p.error(f"--dit-width {args.dit_width} must be a multiple of --dit-heads {args.dit_heads}")
    if args.vae_from and not (Path(args.vae_from) / "vae" / "config.json").is_file():
        p.error(f"--vae-from {args.vae_from}: no vae/config.json there")
    if args.text_from and not (Path(args.text_from) / "text_encoder" / "config.json").is_file():
        p.error(f"--text-from {args.text_from}: no text_encoder/config.json there")
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
