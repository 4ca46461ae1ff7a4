#!/usr/bin/env python
"""Compare AgentSD settings side by side on an embedded reference model: each variant's PSNR and
SSIM against the unpatched model's images of the same prompts and seeds, its prompt adherence and
its seconds per image. How a family's recipe is chosen (docs/dit.md).

A variant is apply_patch keywords over the family's recipe, "reduction=pool,ratio=0.75,sx=2".
Writes DIR/sweep.md and DIR/sweep.json.

Example:
  python scripts/sweep_settings.py --model dit --variants "reduction=merge" "reduction=pool" \\
      "reduction=pool,sx=2,sy=2" "reduction=pool,skip_ends=1" --out runs/sweep-dit
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import sweep  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit", help="a reference model (unet, dit) or a pipeline folder (default: dit)")
    p.add_argument("--variants", nargs="+", required=True, help='e.g. "reduction=pool,ratio=0.75"')
    p.add_argument("--num-images", type=int, default=32, help="images per variant (default: 32)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="output folder (default: runs/sweep)")
    args = p.parse_args(argv)
    try:
        for text in args.variants:
            sweep.parse_variant(text)
    except (TypeError, ValueError) as err:
        p.error(str(err))
    if args.num_images < 1 or args.steps < 1:
        p.error("--num-images and --steps must be >= 1")
    rows = sweep.run(args.model, args.variants, args.num_images, args.steps, args.guidance, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(dict(model=args.model, num_images=args.num_images,
                                                         steps=args.steps, guidance=args.guidance, rows=rows),
                                                    indent=1) + "\n")
    text = sweep.table(rows)
    (args.out / "sweep.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
