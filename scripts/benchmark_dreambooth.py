#!/usr/bin/env python
"""DreamBooth benchmark: finetuning with vs without AgentSD, then agent attention on every step.

On the embedded reference model (64 px procedural shapes, never shown a star), DreamBooth teaches
a new concept: a white five-pointed star under the rare token "sks" (--num-instance images from
eval/shapes.py, prompt "a white sks on a black background"), with prior preservation on "a white
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
(the shipped attribute classifier, eval/adherence.py), to see that the finetune did not break the
model. Writes OUT/results.json and OUT/results.md. Every finished part (instance images, class
images, finetunes and their checkpoints, generated images, timing samples) stays in OUT, and a rerun
continues from there.

  quick smoke test:  python scripts/benchmark_dreambooth.py --quick --out runs/dreambooth-quick
  full benchmark:    python scripts/benchmark_dreambooth.py --out runs/dreambooth
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import agentsd  # noqa: E402
from eval import REFERENCE_MODEL  # noqa: E402
from agentsd.training import DreamBoothSettings, load_pipeline, train_dreambooth  # noqa: E402
from eval import shapes  # noqa: E402
from eval.adherence import generate, score_adherence  # noqa: E402
from eval.concept import load_concept_classifier, score_concept  # noqa: E402
from eval.latency import build_methods, saving_share  # noqa: E402

SUBJECT = {"shape": "star", "color": "white", "background": "black"}
TOKEN = "sks"
CLASS_PROMPT = shapes.format_caption("white", "triangle", "black")
#: (finetune variant or None for the base model, agent attention on every step)
CONFIGS: dict[str, tuple[str | None, bool]] = {
    "base": (None, False),
    "dreambooth": ("plain", False),
    "dreambooth + agent": ("plain", True),
    "agentsd-ft": ("agentsd", False),
    "agentsd-ft + agent": ("agentsd", True),
}
BOUND = "bound"  # timing only: the finetuned UNet with its patched self-attention free
QUICK = {"steps": 4, "num_instance": 2, "num_class_images": 2, "batch_size": 1, "n_eval": 2, "inference_steps": 3,
         "repeats": 2, "timing_images": 2}


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


def run_settings(a: argparse.Namespace) -> dict[str, Any]:
    """What defines the results (compared with those of a previous run in the same folder)."""
    return {k: v for k, v in vars(a).items() if k not in ("out", "quick", "repeats", "threads")}


def instance_prompt() -> str:
    """The prompt of the subject: "a white sks on a black background"."""
    return shapes.format_caption(SUBJECT["color"], TOKEN, SUBJECT["background"])


def recontext_targets(n: int) -> list[dict[str, str]]:
    """``n`` targets cycling through the star in every other colour pair."""
    pairs = [(c, b) for c in shapes.COLOR_NAMES for b in shapes.COLOR_NAMES
             if c != b and (c, b) != (SUBJECT["color"], SUBJECT["background"])]
    return [dict(zip(("shape", "color", "background"), ("star", *pairs[i % len(pairs)]))) for i in range(n)]


def make_instance_images(folder: Path, n: int, seed: int) -> None:
    """``n`` jittered renders of the subject in ``folder`` (kept if already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"star_{i:03d}.png"
        if not path.exists():
            shapes.render_novel(**SUBJECT, rng=np.random.default_rng([seed, i])).save(path)


def finetune(a: argparse.Namespace, out: Path, variant: str) -> Path:
    """The finetune of ``variant`` ("agentsd" or "plain"), trained or resumed unless already saved."""
    folder = out / f"finetune-{variant}"
    if (folder / "model_index.json").exists() or (folder / "pytorch_lora_weights.safetensors").exists():
        return folder
    settings = DreamBoothSettings(
        pretrained=a.base, instance_dir=str(out / "instance"), instance_prompt=instance_prompt(),
        output_dir=str(folder), class_prompt=CLASS_PROMPT, class_dir=str(out / "class_images"),
        num_class_images=a.num_class_images, prior_loss_weight=a.prior_loss_weight, resolution=64,
        batch_size=a.batch_size, learning_rate=a.learning_rate, max_train_steps=a.steps, seed=a.seed,
        lora_rank=a.lora_rank, agentsd=variant == "agentsd", ratio=a.ratio,
        checkpointing_steps=max(1, a.steps // 4), keep_checkpoints=1, inference_steps=a.inference_steps,
        guidance_scale=a.guidance_scale,
    )
    return train_dreambooth(settings, resume=True)


def load(a: argparse.Namespace, folder: Path | None) -> Any:
    """The base pipeline (``folder=None``) or a finetune: a saved pipeline or LoRA weights on the base."""
    if folder is None or a.lora_rank is None:
        return load_pipeline(str(folder) if folder is not None else a.base)
    pipe = load_pipeline(a.base)
    pipe.load_lora_weights(folder)
    pipe.fuse_lora()  # into the weights: generation time as for a full finetune
    return pipe


class Runner:
    """The pipelines of every configuration, patched on demand, and the results file."""

    def __init__(self, a: argparse.Namespace, out: Path) -> None:
        self.a, self.out = a, out
        self.results_path = out / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        if self.results.get("settings", run_settings(a)) != run_settings(a):
            raise ValueError(f"{out} holds results of other settings ({self.results['settings']}); use another --out")
        self.results.update(settings=run_settings(a))
        self.results.setdefault("quality", {})
        self.results.setdefault("timing", {})
        make_instance_images(out / "instance", a.num_instance, a.seed)
        folders = {"agentsd": finetune(a, out, "agentsd"), "plain": finetune(a, out, "plain")}
        self.pipes = {None: load(a, None), **{v: load(a, f) for v, f in folders.items()}}
        # agent attention on every step: the AgentSD finetune uses the settings it stored (in its
        # UNet config, or beside LoRA weights); the plain finetune gets the same ones explicitly
        self.agent = agentsd.AgentSDConfig(ratio=a.ratio, agent_fraction=1.0)
        self.patch_config = {
            "agentsd": agentsd.load_config(folders["agentsd"]) if a.lora_rank else None,
            "plain": self.agent,
        }
        self.save()

    def save(self) -> None:
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        tmp.replace(self.results_path)

    def pipe(self, config: str) -> Any:
        variant, agent = CONFIGS[config]
        pipe = self.pipes[variant]
        if agent:
            agentsd.apply_patch(pipe, config=self.patch_config[variant])
            assert agentsd.patch_config(pipe) == self.agent
        else:
            agentsd.remove_patch(pipe)
        return pipe

    def images(self, config: str, name: str, prompts: list[str]) -> np.ndarray:
        """Generated images of one prompt set (kept in OUT/images)."""
        path = self.out / "images" / f"{config.replace(' + ', '+')}-{name}.npz"
        if path.exists():
            return np.load(path)["images"]
        a = self.a
        seeds = [a.seed + i for i in range(len(prompts))]
        images = generate(self.pipe(config), prompts, seeds, a.inference_steps, a.guidance_scale, progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, images=images)
        return images

    def quality(self, config: str) -> None:
        if config in self.results["quality"]:
            return
        n, concept = self.a.n_eval, load_concept_classifier()
        subject = [SUBJECT] * n
        contexts = recontext_targets(n)
        prompts = [shapes.format_caption(t["color"], TOKEN, t["background"]) for t in contexts]
        heldout = shapes.heldout_prompts(n)
        self.results["quality"][config] = {
            "subject": score_concept(self.images(config, "subject", [instance_prompt()] * n), subject, concept),
            "new_contexts": score_concept(self.images(config, "contexts", prompts), contexts, concept),
            "heldout_adherence": {
                k: v for k, v in score_adherence(self.images(config, "heldout", heldout), heldout).items() if k != "n"
            },
        }
        self.save()

    def timing(self) -> None:
        """Interleaved repeats: every configuration once per repeat, same prompts and seeds; plus the
        bound: the plain finetune whose patched self-attention layers return zeros."""
        prompts = [instance_prompt()] * self.a.timing_images
        seeds = list(range(self.a.timing_images))
        samples = self.results["timing"]
        bound = build_methods(["bound"], [])[0]

        def run(config: str) -> float:
            pipe = self.pipe("dreambooth" if config == BOUND else config)
            if config == BOUND:
                bound.apply(pipe.unet)
            start = time.perf_counter()
            generate(pipe, prompts, seeds, self.a.inference_steps, self.a.guidance_scale, progress=False)
            seconds = time.perf_counter() - start
            if config == BOUND:
                bound.remove(pipe.unet)
            return seconds / len(prompts)

        timed = [*CONFIGS, BOUND]
        if min(len(samples.get(c, [])) for c in timed) >= self.a.repeats:
            return
        for config in timed:  # warm-up, untimed
            run(config)
        while min(len(samples.get(c, [])) for c in timed) < self.a.repeats:
            for config in timed:
                if len(samples.get(config, [])) < self.a.repeats:
                    samples.setdefault(config, []).append(run(config))
            self.save()


def table(results: dict[str, Any]) -> str:
    """The markdown table of ``results``."""
    t = results["timing"]
    median = {c: statistics.median(t[c]) for c in [*CONFIGS, BOUND]}
    ref, floor = median["dreambooth"], median[BOUND]
    s = results["settings"]
    model = f"LoRA rank {s['lora_rank']}" if s["lora_rank"] else "full UNet"
    lines = [
        f"DreamBooth on `{Path(s['base']).name}`: new concept = white star as \"{TOKEN}\", {s['num_instance']} "
        f"instance images, {s['steps']} steps, {model}, "
        f"AgentSD ratio {s['ratio']}; {s['inference_steps']} PLMS steps, guidance {s['guidance_scale']}, "
        f"{s['n_eval']} images per prompt set; time = median of {len(t['dreambooth'])} interleaved repeats of "
        f"{s['timing_images']} images.",
        "",
        "| configuration | finetuned with AgentSD | agent attention at inference | s/image | speed-up vs dreambooth "
        "| share of possible saving | star (subject prompt) | all right (subject prompt) | star (new colours) "
        "| all right (new colours) | held-out adherence (all right) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def share(seconds: float) -> str:
        value = saving_share(ref, seconds, floor)
        return "–" if value is None else f"{value:.0%}"

    for config, (variant, agent) in CONFIGS.items():
        q = results["quality"][config]
        tuned = "–" if variant is None else ("yes" if variant == "agentsd" else "no")
        lines.append(
            f"| {config} | {tuned} | {'every step' if agent else 'no'} | {median[config]:.3f} | "
            f"{ref / median[config]:.2f}x | {share(median[config])} | {q['subject']['shape']:.0%} | "
            f"{q['subject']['all_correct']:.0%} | "
            f"{q['new_contexts']['shape']:.0%} | {q['new_contexts']['all_correct']:.0%} | "
            f"{q['heldout_adherence']['all_correct']:.0%} |"
        )
    lines.append(f"| bound: patched self-attention free | no | – | {floor:.3f} | {ref / floor:.2f}x | 100% "
                 "| – | – | – | – | – |")
    return "\n".join(lines) + "\n"


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
