#!/usr/bin/env python
"""Every GPU table from one command, unattended: SD, tomesd, ToDo, AgentSD, AgentSD pooled and
the bound per UNet step (SD1.5 at 512 and 1024 px, batch 2 and 8; SDXL at 1024 px), eager, with
regional compile and with the whole UNet under CUDA graphs; whole generations (25 steps, with
DeepCache and its AgentSD stacks), eager and with CUDA graphs; a check that no patched UNet call
makes the host wait for the GPU; peak memory. Random weights (the cost of a step does not depend
on them), fp16.

Writes OUT/<table>.md and .json as soon as each table is done and OUT/summary.md (the machine,
versions, every table, what was skipped). A rerun resumes: finished tables are kept. Tables that
would start after --budget-s are skipped and named; they come in order of value (the sync check,
eager steps, CUDA graphs at 512 px batch 2 and 1024 px, whole generations, SDXL, the rest).

  python scripts/benchmark_gpu.py --out runs/gpu
  python scripts/benchmark_gpu.py --smoke --device cpu --out /tmp/gpu-smoke   # the same code path, tiny, CPU
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the harness (eval/) lives in the checkout
for _lib in ("TRANSFORMERS", "DIFFUSERS"):
    os.environ.setdefault(f"{_lib}_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (a rerun resumes in it)")
    p.add_argument("--device", default="cuda", help="default: cuda")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default: fp16 (fp32 with --smoke)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no table after this many seconds (default: 480; 120 with --smoke)")
    p.add_argument("--repeats", type=int, default=None, help="samples per row (default: 10; 1 with --smoke)")
    p.add_argument("--inner", type=int, default=None, help="UNet calls per step sample (default: 10; 1 with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps of a generation (default: 25; 2 with --smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny models and sizes, compiled with dynamo's eager backend: the same code path in "
                        "under a minute")
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda, but no CUDA device is visible (use --smoke --device cpu for a check on the CPU)")
    for name in ("repeats", "inner", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from eval.gpu_suite import Settings, run

    smoke = args.smoke
    if smoke:  # tiny ops: one thread does not wait on a second one that the machine has busy
        import torch

        torch.set_num_threads(1)
    settings = Settings(
        device=args.device, dtype=args.dtype or ("fp32" if smoke else "fp16"),
        repeats=args.repeats or (1 if smoke else 10), inner=args.inner or (1 if smoke else 10),
        steps=args.steps or (2 if smoke else 25), budget_s=args.budget_s or (120 if smoke else 480),
        backend="eager" if smoke else "inductor", smoke=smoke,
    )
    summary = run(args.out, settings)
    print((args.out / "summary.md").read_text())
    if summary["skipped"]:
        print(f"skipped: {', '.join(summary['skipped'])}")


if __name__ == "__main__":
    main()
