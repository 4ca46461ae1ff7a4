"""Outputs of the FID benchmark: results.json, a markdown table, the FID-vs-time and
fidelity-vs-time plots, the sample grid."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "–" if value is None else format(value, spec) + unit


def markdown_table(rows: list[dict[str, Any]], num_processes: int = 1) -> str:
    """One line per variant: FID, adherence, PSNR and SSIM against ``sd``, CLIP score (each when
    measured), seconds per image, speed-up over ``sd``, share of the possible saving, images per
    second of the ``num_processes`` processes together, peak memory, the compile report (when
    compiled) and number of images."""

    def has(key: str) -> bool:
        return any(r.get(key) is not None for r in rows)

    optional = [column for column in (  # key, header, format, scale, unit
        ("adherence", "adherence", ".1f", 100, " %"), ("psnr", "PSNR vs sd dB", ".2f", 1, ""),
        ("ssim", "SSIM vs sd", ".4f", 1, ""), ("clip_score", "CLIP score", ".2f", 1, ""),
    ) if has(column[0])]
    compiled = has("compile_mode")
    plural = "es" if num_processes > 1 else ""
    head = ["method", "ratio", "FID", *(name for _, name, *_ in optional), "s/image", "speed-up vs sd",
            "share of possible saving", f"images/s ({num_processes} process{plural})", "peak memory MB",
            *(["compiled", "compile s", "graph breaks"] if compiled else []), "images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        share = None if r["saving_share"] is None else 100 * r["saving_share"]
        cells = [
            r["method"], _fmt(r["ratio"], "g"), _fmt(r["fid"], ".2f"),
            *(_fmt(None if r.get(key) is None else scale * r[key], spec, unit)
              for key, _, spec, scale, unit in optional),
            _fmt(r["seconds_per_image"], ".4f"), _fmt(r["speedup"], ".2f", "x"), _fmt(share, ".0f", " %"),
            _fmt(r["images_per_second"], ".2f"), _fmt(r["peak_memory_mb"], ".0f"),
            *([r.get("compile_mode", "–"), _fmt(r.get("compile_seconds"), ".1f"), _fmt(r.get("graph_breaks"), "d")]
              if compiled else []),
            str(r["num_images"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_against_time(ax: Any, rows: list[dict[str, Any]], key: str, ylabel: str) -> None:
    """``key`` against seconds per image on ``ax``, one curve per method (the same colour in every
    plot), points labelled with the ratio; the bound (and ``sd`` where it has no value) as vertical lines."""
    markers = (("sd", "*"), ("tomesd", "s"), ("agentsd", "o"), ("deepcache", "P"), ("tomesd+deepcache", "D"),
               ("agentsd+deepcache", "X"))
    for color, (method, marker) in enumerate(markers):
        pts = sorted(((r["seconds_per_image"], r[key], r["ratio"]) for r in rows if r["method"] == method
                      and r.get(key) is not None and np.isfinite(r[key]) and r["seconds_per_image"] is not None),
                     key=lambda p: p[2] or 0)
        if not pts:
            continue
        xs, ys, ratios = zip(*pts)
        ax.plot(xs, ys, marker=marker, markersize=10 if method == "sd" else 6, color=f"C{color}", label=method)
        for x, y, ratio in pts:
            if ratio is not None:
                ax.annotate(f"{ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    sd = next((r for r in rows if r["method"] == "sd"), None)
    if sd is not None and sd.get(key) is None and sd["seconds_per_image"] is not None:
        ax.axvline(sd["seconds_per_image"], color="black", linestyle="--", label="sd (the reference)")
    bound = next((r["seconds_per_image"] for r in rows if r["method"] == "bound"), None)
    if bound is not None:
        ax.axvline(bound, color="grey", linestyle=":", label="bound (patched attention free)")
    cached_bound = next((r["seconds_per_image"] for r in rows if r["method"] == "bound+deepcache"), None)
    if cached_bound is not None:
        ax.axvline(cached_bound, color="grey", linestyle="-.", label="bound with DeepCache")
    ax.set_xlabel("seconds per image")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fid_vs_time(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """FID against seconds per image, one curve per method, points labelled with the ratio
    (the paper's Fig. 6a); the bound is a vertical line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    _plot_against_time(ax, rows, "fid", "FID (lower is better)")
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_fidelity_vs_time(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Same-seed fidelity to ``sd`` against seconds per image: PSNR (left) and SSIM (right), one
    curve per method, points labelled with the ratio; ``sd`` (the reference) and the bound are
    vertical lines."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    _plot_against_time(left, rows, "psnr", "PSNR vs sd, dB (higher is closer)")
    _plot_against_time(right, rows, "ssim", "SSIM vs sd (higher is closer)")
    fig.suptitle(textwrap.fill(title, 130), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sample_grid(images: dict[str, np.ndarray], path: Path) -> None:
    """A grid of samples, one row per variant (its key on the left), same seeds in each column."""
    plt = _pyplot()
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
    (out / "results.md").write_text(describe(setup) + "\n\n" + markdown_table(rows, setup["num_processes"]) + "\n")


def describe(setup: dict[str, Any]) -> str:
    """One paragraph on how the table was measured."""
    p, n = setup["protocol"], setup["num_processes"]
    compiled = (f"transformer blocks compiled ({setup['compile']}; compile time excluded from the timings, "
                "reported apart); " if setup.get("compile") else "")
    return (
        f"{setup['model']}, protocol `{p['name']}`: {p['num_images']} images per row, {p['height']}x{p['width']} px, "
        f"{p['num_inference_steps']} steps of {setup['scheduler']}, guidance {p['guidance_scale']:g}, "
        f"batch {setup['batch_size']}, {setup['dtype']} on {setup['machine']}, {n} process{'es' if n > 1 else ''}; "
        f"{compiled}FID against {setup['num_real']} real images; PSNR and SSIM against the sd image of the same "
        "seed; seconds per image = summed wall time of the row's batches in all processes / images (the device "
        "time an image costs); images/s = images / the longest summed time of one process (the wall-clock "
        "throughput of the run); batches interleaved across methods."
    )
