#!/usr/bin/env python
"""DreamBooth finetuning of a Stable Diffusion pipeline with AgentSD on every step.

Teaches the model a subject from a few images (--instance-dir, --instance-prompt "a photo of sks
dog"), with prior preservation when --class-prompt is given (class images made by the base model,
cached in --class-dir). The whole UNet is finetuned, or LoRA adapters with --lora-rank; the text
encoder and the VAE stay frozen. AgentSD (agent attention with token merging) runs on every
training step unless --no-agentsd, and its settings are stored with the result:

  full:  pipe = StableDiffusionPipeline.from_pretrained(OUT); agentsd.apply_patch(pipe)
  LoRA:  pipe = StableDiffusionPipeline.from_pretrained(BASE); pipe.load_lora_weights(OUT)
         agentsd.apply_patch(pipe, config=agentsd.load_config(OUT))

accelerate handles the device, --mixed-precision and --gradient-accumulation-steps (run it with
plain python, or with `accelerate launch` for data-parallel training on several devices: each
process draws its own --batch-size samples per step and all end with the same weights, e.g.
`accelerate launch --num_processes 8 scripts/train_dreambooth.py ...`). Checkpoints go to
OUT/checkpoints every --checkpointing-steps (accelerate's save_state, weights as safetensors,
nothing loaded with pickle); --resume continues from the latest one (or a given one) at the same
step, with the same result as an uninterrupted run, in as many processes as made it. Validation
images go to OUT/validation; the main process writes them, the checkpoints and the result.

Example (the embedded reference model, a star under the rare token "sks"):

  python scripts/train_dreambooth.py --instance-dir stars/ \\
      --instance-prompt "a white sks on a black background" \\
      --class-prompt "a white triangle on a black background" --num-class-images 50 \\
      --resolution 64 --max-train-steps 300 --learning-rate 1e-4 --output-dir runs/db-star
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import agentsd  # noqa: E402
from eval import REFERENCE_MODEL  # noqa: E402

from agentsd.dreambooth import DreamBoothSettings, train_dreambooth  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[DreamBoothSettings, str | bool]:
    """The settings and the ``resume`` argument of :func:`train_dreambooth` from the command line."""
    d = DreamBoothSettings.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--pretrained", default=str(REFERENCE_MODEL),
                   help="base pipeline folder or hub id (default: the embedded reference model)")
    g.add_argument("--instance-dir", required=True, help="folder of the subject's images")
    g.add_argument("--instance-prompt", required=True, help='e.g. "a photo of sks dog"')
    g.add_argument("--class-prompt", default=None, help='e.g. "a photo of a dog": turns on prior preservation')
    g.add_argument("--class-dir", default=None, help="class image cache (default: OUT/class_images)")
    g.add_argument("--num-class-images", type=int, default=d["num_class_images"].default)
    g.add_argument("--prior-loss-weight", type=float, default=d["prior_loss_weight"].default)
    g.add_argument("--resolution", type=int, default=d["resolution"].default, help="a multiple of 8")
    g = p.add_argument_group("training")
    g.add_argument("--output-dir", required=True)
    g.add_argument("--max-train-steps", type=int, default=d["max_train_steps"].default)
    g.add_argument("--batch-size", type=int, default=d["batch_size"].default,
                   help="instance images per step (plus as many class images)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=d["gradient_accumulation_steps"].default)
    g.add_argument("--learning-rate", type=float, default=d["learning_rate"].default)
    g.add_argument("--lr-scheduler", default=d["lr_scheduler"].default, help="a diffusers.optimization schedule")
    g.add_argument("--lr-warmup-steps", type=int, default=d["lr_warmup_steps"].default)
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=d["mixed_precision"].default)
    g.add_argument("--seed", type=int, default=d["seed"].default)
    g.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank (default: full UNet)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    g.add_argument("--no-agentsd", action="store_true", help="finetune without AgentSD (plain DreamBooth)")
    g.add_argument("--ratio", type=float, default=d["ratio"].default, help="AgentSD token merging ratio")
    g = p.add_argument_group("checkpoints and validation")
    g.add_argument("--checkpointing-steps", type=int, default=d["checkpointing_steps"].default)
    g.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"].default)
    g.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in OUT/checkpoints, or from the folder given")
    g.add_argument("--validation-prompt", default=None)
    g.add_argument("--validation-steps", type=int, default=d["validation_steps"].default)
    g.add_argument("--num-validation-images", type=int, default=d["num_validation_images"].default)
    g.add_argument("--inference-steps", type=int, default=d["inference_steps"].default,
                   help="denoising steps of class and validation images")
    g.add_argument("--guidance-scale", type=float, default=d["guidance_scale"].default,
                   help="classifier-free guidance of class and validation images")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a = p.parse_args(argv)
    settings = DreamBoothSettings(
        pretrained=a.pretrained, instance_dir=a.instance_dir, instance_prompt=a.instance_prompt,
        output_dir=a.output_dir, class_prompt=a.class_prompt, class_dir=a.class_dir,
        num_class_images=a.num_class_images, prior_loss_weight=a.prior_loss_weight, resolution=a.resolution,
        batch_size=a.batch_size, gradient_accumulation_steps=a.gradient_accumulation_steps,
        learning_rate=a.learning_rate, lr_scheduler=a.lr_scheduler, lr_warmup_steps=a.lr_warmup_steps,
        max_train_steps=a.max_train_steps, seed=a.seed, mixed_precision=a.mixed_precision,
        lora_rank=a.lora_rank, lora_alpha=a.lora_alpha, agentsd=not a.no_agentsd, ratio=a.ratio,
        checkpointing_steps=a.checkpointing_steps, keep_checkpoints=a.keep_checkpoints,
        validation_prompt=a.validation_prompt, validation_steps=a.validation_steps,
        num_validation_images=a.num_validation_images, inference_steps=a.inference_steps,
        guidance_scale=a.guidance_scale, progress=not a.no_progress,
    )
    return settings, a.resume


def main(argv: list[str] | None = None) -> int:
    """Run the finetuning; bad input ends with a one-line message and exit status 2."""
    try:
        settings, resume = parse_args(argv)
        out = train_dreambooth(settings, resume=resume)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
