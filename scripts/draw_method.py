#!/usr/bin/env python
"""Draw docs/method.png, the README's picture of AgentSD: how the tokens of one patched
self-attention are reduced, by token merging (the official algorithm) or by pooling, and the
agent attention that follows.

  python scripts/draw_method.py --out docs/method.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/method.png"), help="output PNG (default: docs/method.png)")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rng = np.random.default_rng(3)
    n, cell = 12, 4
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.9), gridspec_kw=dict(width_ratios=[1, 1, 1.25]))
    colors = plt.cm.tab10(np.arange(9) % 10)

    # token merging: one random dst per 4x4 cell; 40 % of the tokens (the best matched) merged into theirs
    ax = axes[0]
    dst = {(cy, cx): (cy * cell + rng.integers(cell), cx * cell + rng.integers(cell)) for cy in range(3) for cx in range(3)}
    merged = rng.random((n, n)) < 0.45
    for y in range(n):
        for x in range(n):
            c = (y // cell, x // cell)
            near = min(dst, key=lambda k: abs(dst[k][0] - y) + abs(dst[k][1] - x) + 3 * (k != c))
            face = colors[near[0] * 3 + near[1]] if merged[y, x] else (0.93, 0.93, 0.93)
            ax.add_patch(Rectangle((x, n - 1 - y), 1, 1, facecolor=face, edgecolor="white", alpha=0.55 if merged[y, x] else 1))
    for (cy, cx), (y, x) in dst.items():
        ax.add_patch(Rectangle((x, n - 1 - y), 1, 1, facecolor=colors[cy * 3 + cx], edgecolor="black", lw=1.2))
    ax.set_title('reduction="merge" (official)\none dst per 4x4 cell, similar tokens\naveraged into it; agents: a stronger merge', fontsize=10)

    # pooling: agents are cell means, keys/values 2x2 means, queries every token
    ax = axes[1]
    for y in range(n):
        for x in range(n):
            ax.add_patch(Rectangle((x, n - 1 - y), 1, 1, facecolor=(0.93, 0.93, 0.93), edgecolor="white"))
    for k in range(0, n + 1, 2):
        ax.plot([k, k], [0, n], color="0.55", lw=0.8)
        ax.plot([0, n], [k, k], color="0.55", lw=0.8)
    for cy in range(3):
        for cx in range(3):
            ax.add_patch(Rectangle((cx * cell, n - (cy + 1) * cell), cell, cell, fill=False,
                                   edgecolor=colors[cy * 3 + cx], lw=2.5))
    ax.set_title('reduction="pool"\nagents: 4x4 cell means; keys, values: 2x2 means;\nqueries: every token (no match, no unmerge)', fontsize=10)
    for ax in axes[:2]:
        ax.set_xlim(0, n)
        ax.set_ylim(0, n)
        ax.set_aspect("equal")
        ax.axis("off")

    ax = axes[2]
    ax.axis("off")
    ax.text(0.0, 0.80, "agent attention on fused SDPA kernels", fontsize=12, weight="bold")
    ax.text(0.0, 0.62, r"$V_A = \mathrm{softmax}(A K^\top s_1)\,V$", fontsize=13)
    ax.text(0.0, 0.47, r"$O = \mathrm{softmax}(Q A^\top s_2)\,V_A + k_{shortcut}\,V$", fontsize=13)
    ax.text(0.0, 0.30, r"$s_1 = d^{-1/2},\ s_2 = s_1^{\,0.3},\ k_{shortcut} = 0.075$", fontsize=11)
    ax.text(0.0, 0.10, "agent phase: the first 40 % of the steps;\nthen ToMe (merge) or pooled keys/values (pool)",
            fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.8, bottom=0.02, wspace=0.08)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
