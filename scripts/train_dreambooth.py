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
import dataclasses
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the embedded model (eval/) lives in the checkout

from agentsd.training import DreamBoothSettings, train_dreambooth  # noqa: E402
from agentsd.training.settings import CHECKS  # noqa: E402
from eval import REFERENCE_MODEL  # noqa: E402

#: fields whose command-line default differs from the dataclass's (it has none)
DEFAULTS = {"pretrained": str(REFERENCE_MODEL)}


def _type(hint: type) -> type:
    """The argparse type of a field's annotation: the annotation without ``| None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def parse_args(argv: list[str] | None = None) -> tuple[DreamBoothSettings, str | bool]:
    """The settings and the ``resume`` argument of :func:`train_dreambooth`, with one option per
    field of :class:`DreamBoothSettings` (its help, group and default; ``--no-<name>`` for the
    fields that are on by default)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(DreamBoothSettings)
    for field in dataclasses.fields(DreamBoothSettings):
        meta = field.metadata
        if meta["group"] not in groups:
            groups[meta["group"]] = p.add_argument_group(meta["group"])
        group = groups[meta["group"]]
        flag = "--" + field.name.replace("_", "-")
        kind = _type(hints[field.name])
        if kind is bool:
            group.add_argument(f"--no-{field.name.replace('_', '-')}", dest=field.name, action="store_false",
                               help=f"off: {meta['help']}")
            continue
        default = DEFAULTS.get(field.name, field.default)
        required = default is dataclasses.MISSING
        shown = "" if required or default is None else f" (default: {default})"
        group.add_argument(flag, type=kind, required=required, default=None if required else default,
                           choices=meta.get("choices"), help=meta["help"] + shown)
    groups[CHECKS].add_argument(
        "--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
        help="continue from the latest checkpoint in OUT/checkpoints, or from the folder given")
    a = vars(p.parse_args(argv))
    resume = a.pop("resume")
    return DreamBoothSettings(**a), resume


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
