#!/usr/bin/env python
"""Run agentsd.tune: time no patch, AgentSD (merge) and AgentSD (pool) on this device, in both
phases, weight them by a whole generation's schedule and print the table with the choice
(docs/tune.md).

Without --model it times the SD1.5-architecture UNet with random weights (eval.latency's
SD15_UNET_CONFIG, a bare UNet: 8 px per latent pixel, the phases weighted by 50 PNDM steps); with
--model, the denoiser of that diffusers pipeline folder (SD 1.x/2.x, SDXL, PixArt, SD3), on its own
scheduler. Results are cached
(agentsd.tune's cache: $AGENTSD_CACHE, else ~/.cache/agentsd/tune); --no-cache measures again.

Writes DIR/tune_<height>x<width>.md (the table) and .json (the whole result) for each size.

Examples:
  python scripts/tune.py --sizes 512 768 --device cpu --out runs/tune-sd15
  python scripts/tune.py --model /tmp/sd15-random --sizes 1024 --num-images 4 --compile regional
  python scripts/tune.py --sizes 512 --extra '{"ratio": 0.6}' '{"reduction": "pool", "agent_fraction": 1.0}'
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = ("fp32", "fp16", "bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a diffusers pipeline folder (default: the SD1.5-architecture UNet, random weights)")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 768],
                   help="square image sizes in px, multiples of 8 (default: 512 768)")
    p.add_argument("--num-images", type=int, default=1, help="images per denoiser call (default: 1)")
    p.add_argument("--no-guidance", action="store_true",
                   help="no classifier-free guidance (default: guidance, the denoiser batch is 2 x --num-images)")
    p.add_argument("--steps", type=int, default=50,
                   help="steps of the generation that weights the phases (default: 50)")
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per candidate and phase (default: 2)")
    p.add_argument("--extra", nargs="+", default=[], metavar="JSON",
                   help='extra candidates, each a JSON object of apply_patch settings, e.g. \'{"ratio": 0.6}\'')
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (torch.set_num_threads; default: torch's own)")
    p.add_argument("--compile", choices=["none", "regional", "whole"], default="none",
                   help="compile the denoiser first: regional (compile_repeated_blocks(fullgraph=True)) or whole "
                        "(torch.compile) (default: none)")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default: agentsd.tune's)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--out", type=Path, default=None, help="write the tables and results here (default: print only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.sizes or min(args.sizes) <= 0 or any(s % 8 for s in args.sizes):
        p.error(f"--sizes must be positive multiples of 8, got {args.sizes}")
    for name in ("num_images", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    try:
        args.extra = [json.loads(text) for text in args.extra]
    except json.JSONDecodeError as err:
        p.error(f"--extra must be JSON objects of apply_patch settings: {err}")
    if not all(isinstance(item, dict) for item in args.extra):
        p.error("--extra must be JSON objects of apply_patch settings, e.g. '{\"ratio\": 0.6}'")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    import agentsd

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    if args.model is None:
        from diffusers import UNet2DConditionModel

        from eval.latency import SD15_UNET_CONFIG

        torch.manual_seed(0)
        model = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
        if (device.type, dtype) != ("cpu", torch.float32):
            model.to(device=device, dtype=dtype)
        denoiser = model
        label = "SD1.5-architecture UNet, random weights"
    else:
        from diffusers import DiffusionPipeline

        model = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
        attribute = "unet" if getattr(model, "unet", None) is not None else "transformer"
        denoiser = getattr(model, attribute)
        label = args.model
    if args.compile == "regional":
        denoiser.compile_repeated_blocks(fullgraph=True)
    elif args.compile == "whole":
        compiled = torch.compile(denoiser)
        if args.model is None:
            model = compiled
        else:
            setattr(model, attribute, compiled)
    cache = False if args.no_cache else (args.cache if args.cache is not None else True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        try:
            result = agentsd.tune(model, height=size, width=size, num_images=args.num_images,
                                  guidance=not args.no_guidance, num_inference_steps=args.steps,
                                  candidates=args.extra or None, repeats=args.repeats, warmup=args.warmup,
                                  cache=cache, progress=not args.no_progress)
        except (TypeError, ValueError) as err:
            sys.exit(f"tune.py: error: {err}")
        text = f"{label}\n\n{result.to_markdown()}\n"
        print(text)
        if args.out is not None:
            stem = args.out / f"tune_{size}x{size}"
            stem.with_suffix(".md").write_text(text)
            stem.with_suffix(".json").write_text(json.dumps(dict(model=label, **result.to_dict()), indent=1) + "\n")


if __name__ == "__main__":
    main()
