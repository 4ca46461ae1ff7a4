#!/usr/bin/env python
"""Time single denoiser steps (random weights) for every method side by side, interleaved repeat by
repeat, on the SD1.5 UNet or, with --model, the PixArt-Σ or SD3.5-medium transformer (--blocks: only
its first blocks, where a whole step is too slow):  SD, tomesd, ToDo, AgentSD (its agent or late phase, merged or
pooled, with merge_crossattn / merge_mlp), CA-ToMe, DeepCache stacks, and the bounds (parts of the
patched blocks returning zeros). T-GATE wraps the whole pipeline call, so it has no row here (see
benchmark_fid.py). Every method, option and output: docs/benchmarks.md.

--compile compiles the transformer blocks of every method, sd included (compile_repeated_blocks,
fullgraph=True, else with graph breaks, counted); the compiling first call is untimed and reported
apart. --fuse-qkv fuses the attention projections of the UNet once (fuse_qkv_projections), for
every method.

Writes DIR/latency.md (table), DIR/latency.json (settings and rows), DIR/latency.png and
DIR/raw.json (every sample; a rerun resumes from it).

Examples:
  python scripts/benchmark_latency.py --sizes 512
  python scripts/benchmark_latency.py --sizes 512 --methods sd agentsd agentsd:late bound --ratios 0.2 0.4
  python scripts/benchmark_latency.py --sizes 1024 --fuse-qkv --out runs/latency-fused
  python scripts/benchmark_latency.py --model pixart-sigma --blocks 2 --sizes 1024 \\
      --methods sd agentsd agentsd-pool@0.75 todo bound --out runs/latency-pixart
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import cli  # noqa: E402
from eval.latency import DEFAULT_METHODS, PHASES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.Parser(__doc__)
    p.add_argument("--model", default="sd15", choices=("sd15", "pixart-sigma", "sd35-medium"),
                   help="the denoiser's architecture (default: sd15, the SD1.5 UNet)")
    p.add_argument("--blocks", type=int, default=None,
                   help="a transformer's first blocks only (default: all of them)")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 768], help="image sizes in px (default: 512 768)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.4], help="merge ratios (default: 0.4)")
    cli.add_method_arguments(p, list(DEFAULT_METHODS), list(PHASES), off_after=False)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per method and size (default: 5)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch: 2 = one image with guidance (default: 2)")
    cli.add_device_arguments(p, None, "cuda if available, else cpu")
    p.add_argument("--compile", action="store_true",
                   help="compile the transformer blocks of every method (compile_repeated_blocks)")
    p.add_argument("--fuse-qkv", action="store_true",
                   help="fuse the attention projections once before timing (fuse_qkv_projections; SDPA then "
                        "runs FusedAttnProcessor2_0), for every method")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: runs/latency, or runs/latency-compiled with --compile)")
    p.add_argument("--fresh", action="store_true", help="discard samples of an earlier run in --out")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = Path("runs/latency-compiled" if args.compile else "runs/latency")
    if any(s % 64 for s in args.sizes) or min(args.sizes) <= 0:
        p.error(f"--sizes must be positive multiples of 64, got {args.sizes}")
    if any(not 0 <= r < 1 for r in args.ratios):
        p.error(f"--ratios must be in [0, 1), got {args.ratios}")
    if args.repeats < 1 or args.batch < 1:
        p.error("--repeats and --batch must be >= 1")
    if args.blocks is not None and (args.model == "sd15" or args.blocks < 1):
        p.error("--blocks takes a transformer's (--model pixart-sigma or sd35-medium) number of blocks, >= 1")
    cli.check_device(p, args.device)
    args.options = cli.method_options(p, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from eval import plots, report
    from eval.latency import MODELS, SettingsMismatch, build_denoiser, describe_model, run_benchmark
    from eval.methods import build_methods, check_per_step, per_step
    from eval.runtime import DTYPES, dtype_name, machine_name

    try:
        methods = build_methods(args.methods, args.ratios, per_step(args.options))
        check_per_step(methods)
    except ValueError as e:
        sys.exit(f"benchmark_latency.py: error: {e}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[dtype_name(args.dtype, device)]
    args.out.mkdir(parents=True, exist_ok=True)
    raw_path = args.out / "raw.json"
    if args.fresh and raw_path.exists():
        raw_path.unlink()

    torch.manual_seed(0)
    unet = build_denoiser(args.model, args.blocks)
    if (device.type, dtype) != ("cpu", torch.float32):
        unet.to(device=device, dtype=dtype)
    info = dict(model=describe_model(args.model, args.blocks), machine=machine_name(device), dtype=str(dtype),
                torch=torch.__version__, batch=args.batch, repeats=args.repeats, compile=args.compile,
                fuse_qkv=args.fuse_qkv, methods={m.key: m.settings() for m in methods})
    print(f"{info['model']} ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M params), {info['machine']}, "
          f"{str(dtype).removeprefix('torch.')}, batch {args.batch}")
    try:
        raw = run_benchmark(unet, args.sizes, methods, args.repeats, args.batch, raw_path, compile=args.compile,
                            fuse_qkv=args.fuse_qkv, text_tokens=MODELS[args.model][2])
    except SettingsMismatch as e:
        sys.exit(f"benchmark_latency.py: error: {e}")
    rows = report.latency_rows(raw, methods, args.sizes)
    text = report.write_latency_results(rows, info, args.out)
    plots.plot_latency(rows, args.out / "latency.png", title=report.describe_latency(info))
    print(text)


if __name__ == "__main__":
    main()
