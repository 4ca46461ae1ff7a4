"""The plots of both harnesses: FID and same-seed fidelity against seconds per image, the sample
grid (FID harness), and seconds per step by method (latency harness). Every method keeps one
colour and marker in every plot."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from eval.methods import DEEPCACHE, REGISTRY

_MARKERS = "*sDoXPvhpd^<>8"


def _style(method: str) -> dict[str, Any]:
    """How ``method`` is drawn: the colour and marker of its base method in the registry; with
    DeepCache, a hollow marker and a dashed line."""
    cached = method == "deepcache" or method.endswith(DEEPCACHE)
    base = "sd" if method == "deepcache" else method.removesuffix(DEEPCACHE)
    i = list(REGISTRY).index(base) if base in REGISTRY else len(REGISTRY)
    style = dict(color=f"C{i % 10}", marker=_MARKERS[i % len(_MARKERS)])
    return {**style, "markerfacecolor": "none", "linestyle": "--"} if cached else style


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _lines(ax: Any, rows: list[dict[str, Any]], key: str | None, x: str) -> None:
    """Vertical lines at the time of each bound and, where it has no ``key`` value, of ``sd``."""
    styles = {"bound": ("grey", ":", "bound (patched attention free)"), "bound+deepcache":
              ("grey", "-.", "bound with DeepCache"), "bound-xattn": ("silver", ":", "bound-xattn"),
              "bound-mlp": ("silver", "--", "bound-mlp")}
    for r in rows:
        if r[x] is None:
            continue
        if r["method"] == "sd" and (key is None or r.get(key) is None):
            ax.axvline(r[x], color="black", linestyle="--", label="sd (the reference)")
        elif r["method"] in styles:
            color, style, label = styles[r["method"]]
            ax.axvline(r[x], color=color, linestyle=style, label=label)


def _plot_against_time(ax: Any, rows: list[dict[str, Any]], key: str, ylabel: str) -> None:
    """``key`` against seconds per image on ``ax``, one curve per method and phase, points labelled
    with the ratio; the bounds (and ``sd`` where it has no value) as vertical lines."""
    curves: dict[tuple[str, Any], list[tuple[float, float, Any]]] = {}
    for r in rows:
        if r.get(key) is not None and np.isfinite(r[key]) and r["seconds_per_image"] is not None:
            curves.setdefault((r["method"], r.get("phase")), []).append((r["seconds_per_image"], r[key], r["ratio"]))
    for (method, phase), pts in curves.items():
        pts.sort(key=lambda p: p[2] or 0)
        xs, ys, _ = zip(*pts)
        label = method if phase in (None, "schedule") else f"{method} ({phase})"
        ax.plot(xs, ys, markersize=10 if method == "sd" else 6, label=label, **_style(method))
        for x, y, ratio in pts:
            if ratio is not None:
                ax.annotate(f"{ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    _lines(ax, rows, key, "seconds_per_image")
    ax.set_xlabel("seconds per image")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_fid_vs_time(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """FID against seconds per image, one curve per method, points labelled with the ratio
    (the paper's Fig. 6a); the bounds are vertical lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    _plot_against_time(ax, rows, "fid", "FID (lower is better)")
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_fidelity_vs_time(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Same-seed fidelity to ``sd`` against seconds per image: PSNR (left) and SSIM (right), one
    curve per method; ``sd`` (the reference) and the bounds are vertical lines."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    _plot_against_time(left, rows, "psnr", "PSNR vs sd, dB (higher is closer)")
    _plot_against_time(right, rows, "ssim", "SSIM vs sd (higher is closer)")
    fig.suptitle(textwrap.fill(title, 130), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_latency(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Median seconds per step of every timed row, one panel per size, bars in the method's colour."""
    rows = [r for r in rows if r.get("median_s") is not None]
    if not rows:
        return
    plt = _pyplot()
    sizes = sorted({r["size"] for r in rows})
    per = [[r for r in rows if r["size"] == s] for s in sizes]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 0.32 * max(map(len, per)) + 1.4),
                             dpi=120, squeeze=False)
    for ax, size, group in zip(axes[0], sizes, per):
        labels = [r["method"] + ("" if r["ratio"] is None else f" {r['ratio']:g}")
                  + ("" if r.get("phase") in (None, "schedule") else f" ({r['phase']})") for r in group]
        ax.barh(range(len(group)), [r["median_s"] for r in group], color=[_style(r["method"])["color"] for r in group])
        for bar, r in zip(ax.patches, group):  # DeepCache rows hatched
            if _style(r["method"]).get("linestyle"):
                bar.set_hatch("//")
        ax.set_yticks(range(len(group)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("median seconds per UNet step")
        ax.set_title(f"{size} px", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(textwrap.fill(title, 60 * len(sizes)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sample_grid(images: dict[str, np.ndarray], path: Path) -> None:
    """A grid of samples, one row per method (its key on the left), same seeds in each column."""
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
