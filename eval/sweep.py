"""AgentSD settings side by side on a reference model: how close each variant's images stay to
the unpatched model's (PSNR and SSIM, image ``i`` of the same prompt and seed against image ``i``),
its prompt adherence (the attribute classifier) and its time per image.

It is how a family's recipe (:data:`agentsd.models.RECIPES`) is chosen on the reference DiT:
``scripts/sweep_settings.py`` is its command line, docs/dit.md its results. A variant is written
as ``apply_patch`` keywords, ``"reduction=pool,ratio=0.75,sx=2"``, on top of the family's recipe.
"""
from __future__ import annotations

import dataclasses
import time
import typing
from collections.abc import Callable
from typing import Any

import numpy as np

import agentsd
from eval import fidelity
from eval.protocols import shapes_protocol
from eval.reference import load_pipeline
from eval.reference.adherence import generate, score_adherence


def parse_variant(text: str) -> dict[str, Any]:
    """``"reduction=pool,ratio=0.75"`` as ``apply_patch`` keywords, each value of its setting's
    type (``none`` for None).

    Raises:
        ValueError: for a malformed pair, an unknown setting, or a value of the wrong type.
    """
    hints = typing.get_type_hints(agentsd.AgentSDConfig)
    settings: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, equals, value = pair.partition("=")
        if not equals or name not in hints:
            raise ValueError(f"variant {text!r}: {pair!r} is not setting=value with a setting of "
                             f"{', '.join(sorted(hints))}")
        if value.lower() == "none":
            settings[name] = None
            continue
        kinds = [k for k in typing.get_args(hints[name]) or (hints[name],) if k is not type(None)]
        kind = kinds[0] if kinds and isinstance(kinds[0], type) else str
        try:
            settings[name] = {"True": True, "False": False}[value] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise ValueError(f"variant {text!r}: {name}={value!r} is not a {kind.__name__}") from None
    agentsd.AgentSDConfig(**settings)  # the settings' own checks, now
    return settings


def run(model: str, variants: list[str], num_images: int = 32, steps: int = 25, guidance: float = 3.0,
        seed: int = 0, batch_size: int = 16, progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per variant (the unpatched model first): PSNR and SSIM against the unpatched
    images, adherence, seconds per image, and the settings ``apply_patch`` ran."""
    pipe = load_pipeline(model)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    size = int(pipe.vae_scale_factor) * int(denoiser.config.sample_size)
    protocol = shapes_protocol(num_images, steps, guidance, seed, size)
    prompts, seeds = list(protocol.prompts), list(protocol.seeds)

    def images() -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        out = generate(pipe, prompts, seeds, steps, guidance, batch_size, progress=False)
        return out, (time.perf_counter() - start) / len(prompts)

    plain, seconds = images()
    rows = [dict(variant="no patch", settings=None, psnr=None, ssim=None, seconds=seconds,
                 **_adherence(plain, prompts))]
    progress(f"no patch: {seconds:.3f} s/image")
    for text in variants:
        with agentsd.patched(pipe, **parse_variant(text)):
            config = agentsd.patch_config(pipe)
            out, seconds = images()
        row = dict(variant=text, settings=dataclasses.asdict(config), seconds=seconds,
                   **fidelity.same_seed_fidelity(out, plain), **_adherence(out, prompts))
        progress(f"{text}: PSNR {row['psnr']:.2f} dB, {seconds:.3f} s/image")
        rows.append(row)
    return rows


def _adherence(images: np.ndarray, prompts: list[str]) -> dict[str, float]:
    return {"adherence": score_adherence(images, prompts)["all_correct"]}


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| variant | PSNR vs no patch (dB) | SSIM vs no patch | adherence | s/image |", "|---|---|---|---|---|"]
    for r in rows:
        psnr = "–" if r["psnr"] is None else f"{r['psnr']:.2f}"
        ssim = "–" if r["ssim"] is None else f"{r['ssim']:.4f}"
        lines.append(f"| {r['variant']} | {psnr} | {ssim} | {100 * r['adherence']:.1f} % | {r['seconds']:.3f} |")
    return "\n".join(lines)
