#!/usr/bin/env python
"""Time the library's own machinery against an earlier version of it, in one run: the hooks' cost
per UNet call (a small UNet, a patch that changes nothing) and the agent phase per patched block
and per UNet step (the SD1.5 architecture, random weights), every version interleaved repeat by
repeat, medians. The earlier version is the agentsd/ folder of a git ref of this repository.

Writes DIR/core.md (table) and DIR/core.json (settings, medians, every sample).

Example:
  python scripts/benchmark_core.py --against cdf9c04 --out runs/core
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import core_timing  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, help="git ref of the earlier version (e.g. a commit)")
    p.add_argument("--size", type=int, default=512, help="image size in px of the UNet step (default: 512)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (default: 2, one image with guidance)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default: 5)")
    p.add_argument("--out", type=Path, default=Path("runs/core"), help="output folder (default: runs/core)")
    args = p.parse_args(argv)
    if args.size % 64 or args.size <= 0 or args.repeats < 1 or args.batch < 1:
        p.error("--size must be a positive multiple of 64, --repeats and --batch >= 1")
    results = core_timing.run(args.against, args.size, args.batch, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "core.json").write_text(json.dumps(results, indent=2) + "\n")
    text = core_timing.table(results)
    (args.out / "core.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
