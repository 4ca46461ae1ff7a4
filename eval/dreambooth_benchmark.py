"""The DreamBooth benchmark behind ``scripts/benchmark_dreambooth.py``: the new concept (a white
star as "sks"), the two finetunes (with and without AgentSD on every training step), the five
configurations compared, their quality scores, interleaved timings, and the results table. Every
finished part stays in the output folder, so a rerun continues from there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

import agentsd
from agentsd.training import DreamBoothSettings, load_pipeline, train_dreambooth
from eval.reference import shapes
from eval.reference.adherence import generate, score_adherence
from eval.concept import load_concept_classifier, score_concept
from eval.latency import build_methods, saving_share

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
