#!/usr/bin/env python
"""Run diffusers' own fast pipeline tests twice, on plain pipelines and with every pipeline
patched by AgentSD, and compare the outcomes test by test: the patch should change none.

diffusers' tests are not in its wheel; take them from a checkout of its repository of about the
installed version (``git clone https://github.com/huggingface/diffusers``), and import
``parameterized`` and ``requests_mock`` (``pip install parameterized requests-mock``). They run offline with a
local stand-in tokenizer (tests/diffusers_plugin.py), so the tests that compare images with
hard-coded pixel slices fail in both runs.

Writes DIR/plain.xml and DIR/patched.xml (JUnit), and DIR/summary.md: the counts of each run and
every test whose outcome differs. A run whose report is already in DIR is not run again (each takes
a while on a CPU); delete the report to rerun it.

Example:
  python scripts/run_diffusers_tests.py --diffusers ~/diffusers --out runs/diffusers-tests
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = (
    "tests/pipelines/stable_diffusion/test_stable_diffusion.py",
    "tests/pipelines/stable_diffusion/test_stable_diffusion_img2img.py",
    "tests/pipelines/stable_diffusion/test_stable_diffusion_inpaint.py",
    "tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py",
    "tests/pipelines/controlnet/test_controlnet.py",
)


def outcomes(report: Path) -> dict[str, str]:
    """``{test id: passed | failed | skipped}`` from a JUnit report."""
    result = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        result[f"{case.get('classname')}::{case.get('name')}"] = {"error": "failed", "failure": "failed"}.get(kind, kind)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers", type=Path, required=True, help="a checkout of diffusers' repository")
    p.add_argument("--files", nargs="+", default=list(FILES), help="test files, relative to it (default: SD, "
                   "img2img, inpaint, SDXL, ControlNet)")
    p.add_argument("--settings", default='{"agent_fraction": 1.0}',
                   help="apply_patch settings of the patched run, JSON (default: agent phase on every call)")
    p.add_argument("--out", type=Path, default=Path("runs/diffusers-tests"), help="output folder")
    args = p.parse_args(argv)
    missing = [f for f in args.files if not (args.diffusers / f).is_file()]
    if missing:
        p.error(f"not in {args.diffusers}: {', '.join(missing)}")
    args.out = args.out.resolve()  # pytest runs in the diffusers checkout
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AGENTSD_SETTINGS": args.settings,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    runs = {}
    for name, patch in (("plain", "0"), ("patched", "1")):
        report = args.out / f"{name}.xml"
        if report.is_file():  # finished in an earlier invocation: delete it to run it again
            runs[name] = outcomes(report)
            continue
        partial = report.with_suffix(".partial.xml")
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "diffusers_plugin", "-p", "no:cacheprovider",
                               f"--junitxml={partial}", *args.files], cwd=args.diffusers,
                              env={**env, "AGENTSD_PATCH": patch})
        if not partial.is_file() or done.returncode not in (0, 1):  # 1: some tests failed; others: no run
            sys.exit(f"the {name} run did not complete (pytest exit code {done.returncode}); its output is above. "
                     "diffusers' tests need its test requirements: pip install parameterized requests-mock")
        partial.replace(report)
        runs[name] = outcomes(report)
    plain, patched = runs["plain"], runs["patched"]
    differ = sorted(t for t in plain.keys() | patched.keys() if plain.get(t) != patched.get(t))
    lines = ["| run | passed | failed | skipped |", "|---|---|---|---|"]
    for name, result in runs.items():
        counts = [sum(v == kind for v in result.values()) for kind in ("passed", "failed", "skipped")]
        lines.append(f"| {name} | {' | '.join(map(str, counts))} |")
    lines += ["", f"Tests whose outcome differs: {len(differ)}"]
    lines += [f"- {t}: plain {plain.get(t)}, patched {patched.get(t)}" for t in differ]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
