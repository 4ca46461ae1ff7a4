#!/usr/bin/env python
"""Time UNet steps of the SD1.5 architecture: SDPA vs tomesd vs AgentSD (agent and ToMe phases,
and the agent phase with merge_crossattn / merge_mlp) vs bounds (the parts of the patched blocks
that each variant merges returning zeros), side by side in one run.

With --compile every method, SDPA included, runs with its transformer blocks compiled by
``unet.compile_repeated_blocks(fullgraph=True)``; the compiling first call is untimed and reported
on its own, with the graph breaks of each method.

Writes DIR/latency.md (markdown table), DIR/latency.json (summary rows and machine) and
DIR/raw.json (every sample; a rerun resumes from it).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 768], help="image sizes in px (default: 512 768)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.4], help="merge ratios (default: 0.4)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods to time: sdpa tomesd agentsd-agent agentsd-tome bound agentsd-agent-xattn "
                        "bound-xattn agentsd-agent-mlp bound-mlp deepcache tomesd+deepcache "
                        "agentsd-agent+deepcache bound+deepcache (default: all but the deepcache ones)")
    p.add_argument("--deepcache-interval", type=int, default=3,
                   help="DeepCache: a full UNet every N steps; the *deepcache rows time one such cycle "
                        "and report its mean step (default: 3)")
    p.add_argument("--deepcache-branch", type=int, default=0, help="DeepCache cache_branch_id (default: 0)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per method and size (default: 5)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch: 2 = one image with guidance (default: 2)")
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true",
                   help="compile the transformer blocks of every method (compile_repeated_blocks)")
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
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.deepcache_interval < 1 or args.deepcache_branch < 0:
        p.error("--deepcache-interval must be >= 1 and --deepcache-branch >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from diffusers import UNet2DConditionModel

    from eval.latency import (
        METHODS, SD15_UNET_CONFIG, SettingsMismatch, build_methods, markdown_table, run_benchmark, summarize,
    )

    try:
        default = [m for m in METHODS if not m.endswith("deepcache")]
        deepcache = dict(cache_interval=args.deepcache_interval, cache_branch_id=args.deepcache_branch)
        methods = build_methods(args.methods or default, args.ratios, deepcache)
    except ValueError as e:
        sys.exit(f"error: {e}")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    raw_path = args.out / "raw.json"
    if args.fresh and raw_path.exists():
        raw_path.unlink()

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    if (args.device, dtype) != ("cpu", torch.float32):
        unet.to(device=args.device, dtype=dtype)
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"SD1.5 UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M params), {machine}, "
          f"{str(dtype).removeprefix('torch.')}, batch {args.batch}")
    try:
        raw = run_benchmark(unet, args.sizes, methods, args.repeats, args.batch, raw_path, compile=args.compile)
    except SettingsMismatch as e:
        sys.exit(f"error: {e}")
    rows = summarize(raw, methods, args.sizes)
    header = (f"SD1.5-architecture UNet, random weights, batch {args.batch}, "
              f"{'transformer blocks compiled (compile_repeated_blocks), ' if args.compile else 'eager, '}"
              f"{str(dtype).removeprefix('torch.')}, {machine}; torch {torch.__version__}; "
              f"median of {args.repeats} interleaved steps.")
    table = header + "\n\n" + markdown_table(rows) + "\n"
    (args.out / "latency.md").write_text(table)
    (args.out / "latency.json").write_text(
        json.dumps(dict(machine=machine, dtype=str(dtype), compile=args.compile, rows=rows), indent=1)
    )
    print(table)


if __name__ == "__main__":
    main()
