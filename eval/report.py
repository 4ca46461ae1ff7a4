"""Outputs of the FID benchmark: results.json, a markdown table, FID-vs-time plot, sample grid."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "–" if value is None else format(value, spec) + unit


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per variant: FID, adherence (when measured), seconds per image, speed-up over
    ``sd``, share of the possible saving, peak memory and number of images."""
    adherence = any("adherence" in r for r in rows)
    head = ["method", "ratio", "FID", *(["adherence"] if adherence else []), "s/image",
            "speed-up vs sd", "share of possible saving", "peak memory MB", "images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        share = None if r["saving_share"] is None else 100 * r["saving_share"]
        acc = r.get("adherence")
        cells = [
            r["method"], _fmt(r["ratio"], "g"), _fmt(r["fid"], ".2f"),
            *([_fmt(None if acc is None else 100 * acc, ".1f", " %")] if adherence else []),
            _fmt(r["seconds_per_image"], ".4f"), _fmt(r["speedup"], ".2f", "x"), _fmt(share, ".0f", " %"),
            _fmt(r["peak_memory_mb"], ".0f"), str(r["num_images"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_fid_vs_time(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """FID against seconds per image, one curve per method, points labelled with the ratio
    (the paper's Fig. 6a); the bound is a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for method, marker in (("sd", "*"), ("tomesd", "s"), ("agentsd", "o")):
        pts = sorted(((r["seconds_per_image"], r["fid"], r["ratio"]) for r in rows
                      if r["method"] == method and r["fid"] is not None), key=lambda p: p[2] or 0)
        if not pts:
            continue
        xs, ys, ratios = zip(*pts)
        ax.plot(xs, ys, marker=marker, markersize=10 if method == "sd" else 6, label=method)
        for x, y, ratio in pts:
            if ratio is not None:
                ax.annotate(f"{ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    bound = next((r["seconds_per_image"] for r in rows if r["method"] == "bound"), None)
    if bound is not None:
        ax.axvline(bound, color="grey", linestyle=":", label="bound (patched attention free)")
    ax.set_xlabel("seconds per image")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sample_grid(images: dict[str, np.ndarray], path: Path) -> None:
    """A grid of samples, one row per variant (its key on the left), same seeds in each column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(images)
    cols = max(len(v) for v in images.values())
    fig, axes = plt.subplots(len(keys), cols, figsize=(1.1 * cols + 1.2, 1.1 * len(keys)), dpi=100,
                             squeeze=False)
    for row, key in enumerate(keys):
        for col in range(cols):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if col < len(images[key]):
                ax.imshow(images[key][col])
        axes[row][0].set_ylabel(key, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=1.1 / (1.1 * cols + 1.2), right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.05)
    fig.savefig(path)
    plt.close(fig)


def write_results(rows: list[dict[str, Any]], setup: dict[str, Any], out: Path) -> None:
    """``results.json`` (setup and rows) and ``results.md`` (a header line and the table)."""
    (out / "results.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    (out / "results.md").write_text(describe(setup) + "\n\n" + markdown_table(rows) + "\n")


def describe(setup: dict[str, Any]) -> str:
    """One sentence on how the table was measured."""
    p = setup["protocol"]
    return (
        f"{setup['model']}, protocol `{p['name']}`: {p['num_images']} images per row, {p['height']}x{p['width']} px, "
        f"{p['num_inference_steps']} steps of {setup['scheduler']}, guidance {p['guidance_scale']:g}, "
        f"batch {setup['batch_size']}, {setup['dtype']} on {setup['machine']}; FID against "
        f"{setup['num_real']} real images; seconds per image = wall time of all batches / images, "
        "batches interleaved across methods."
    )
