#!/usr/bin/env python
"""DreamBooth benchmark: finetuning with vs without AgentSD, then agent attention on every step.

On the embedded reference model (64 px procedural shapes, never shown a star), DreamBooth teaches
a new concept: a white five-pointed star under the rare token "sks" (--num-instance images from
eval/reference/shapes.py, prompt "a white sks on a black background"), with prior preservation on "a white
triangle on a black background". Two finetunes with the same seed, steps and data: with AgentSD on
every training step, and without (plain DreamBooth). Then five configurations are compared:

  base                      the reference model, unpatched
  dreambooth                plain finetune, unpatched (the original DreamBooth)
  dreambooth + agent        plain finetune, agent attention on every step (training-free)
  agentsd-ft                AgentSD finetune, unpatched
  agentsd-ft + agent        AgentSD finetune, agent attention on every step (apply_patch() with the
                            settings stored by the finetune): the paper's fast path

on: generation time (seconds per image, median over --repeats interleaved repeats, same prompts
and seeds); subject fidelity (the concept classifier of eval/concept.py, which also knows stars:
share of images that show a star, and with all attributes right, for the instance prompt and for
the star in new colours, "a red sks on a blue background"); adherence to ordinary held-out prompts
(the shipped attribute classifier, eval/reference/adherence.py), to see that the finetune did not break the
model. Writes OUT/results.json and OUT/results.md. Every finished part (instance images, class
images, finetunes and their checkpoints, generated images, timing samples) stays in OUT, and a rerun
continues from there.

  quick smoke test:  python scripts/benchmark_dreambooth.py --quick --out runs/dreambooth-quick
  full benchmark:    python scripts/benchmark_dreambooth.py --out runs/dreambooth
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from eval import REFERENCE_MODEL  # noqa: E402
from eval.dreambooth_benchmark import CONFIGS, QUICK, Runner, table  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--quick`` changes the defaults of the sizes to a smoke-test preset)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder (a rerun resumes from it)")
    p.add_argument("--base", default=str(REFERENCE_MODEL), help="base pipeline folder")
    p.add_argument("--quick", action="store_true", help=f"smoke-test sizes (options given still apply): {QUICK}")
    p.add_argument("--steps", type=int, default=400, help="finetuning steps")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4, help="instance images per step (plus as many class images)")
    p.add_argument("--lora-rank", type=int, default=None, help="finetune LoRA adapters instead of the whole UNet")
    p.add_argument("--ratio", type=float, default=0.4, help="AgentSD merging ratio (training and inference)")
    p.add_argument("--num-instance", type=int, default=6, help="instance images of the new concept")
    p.add_argument("--num-class-images", type=int, default=100)
    p.add_argument("--prior-loss-weight", type=float, default=1.0)
    p.add_argument("--n-eval", type=int, default=50, help="images per prompt set and configuration")
    p.add_argument("--inference-steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=3.0,
                   help="classifier-free guidance (default: 3.0, the embedded model's best; see its model card)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats")
    p.add_argument("--timing-images", type=int, default=8, help="images per timed generation (one batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    if a.quick:
        p.set_defaults(**QUICK)
        a = p.parse_args(argv)
    for name in ("steps", "batch_size", "num_instance", "num_class_images", "n_eval", "inference_steps", "repeats",
                 "timing_images"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    return a


def main(argv: list[str] | None = None) -> int:
    """Run (or continue) the benchmark; bad input ends with a one-line message and status 2."""
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    try:
        runner = Runner(a, out)
        for config in CONFIGS:
            runner.quality(config)
        runner.timing()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    (out / "results.md").write_text(table(runner.results))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
