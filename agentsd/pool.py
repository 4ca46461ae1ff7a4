"""Token pooling on the token grid: the reduction of ``reduction="pool"``, with no matching.

A :class:`CellPool` turns the ``h x w`` token grid into a coarser ``gh x gw`` grid. ``merge``
makes one token of every cell, its mean or its top-left token; ``unmerge`` copies every pooled
token back to the tokens of its cell (nearest upsampling). When the cells tile the grid exactly
both are plain reshapes; otherwise the cells are the windows of adaptive pooling, which cover
every token. Shapes depend on the grid only and nothing is read back to the host, so this runs
unchanged under ``torch.compile`` and CUDA graphs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CellPool:
    """Pooling of ``(B, h * w, C)`` tokens (row-major grid) to ``(B, gh * gw, C)``.

    Attributes:
        h, w: the token grid.
        gh, gw: the pooled grid (at most ``h x w``).
        mode: ``"mean"`` (the mean of each cell) or ``"nearest"`` (its top-left token).
    """

    h: int
    w: int
    gh: int
    gw: int
    mode: str = "mean"

    @property
    def num_tokens(self) -> int:
        return self.h * self.w

    @property
    def num_slots(self) -> int:
        return self.gh * self.gw

    @property
    def _exact(self) -> bool:
        return self.h % self.gh == 0 and self.w % self.gw == 0

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """One token per cell: ``(B, h * w, C)`` to ``(B, gh * gw, C)``."""
        b, _, c = x.shape
        h, w, gh, gw = self.h, self.w, self.gh, self.gw
        grid = x.view(b, h, w, c).permute(0, 3, 1, 2)  # a channels-last view, no copy
        if self.mode == "mean":  # pooling kernels read channels-last in one pass
            pooled = F.avg_pool2d(grid, (h // gh, w // gw)) if self._exact else F.adaptive_avg_pool2d(grid, (gh, gw))
        elif self._exact:
            pooled = grid[:, :, :: h // gh, :: w // gw]
        else:
            pooled = F.interpolate(grid, size=(gh, gw), mode="nearest")
        return pooled.permute(0, 2, 3, 1).reshape(b, gh * gw, c)

    def add_unmerged(self, x: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
        """``x + weight * unmerge(y)``, without building ``unmerge(y)`` when the cells tile the grid."""
        if not self._exact:
            return x + weight * self.unmerge(y)
        b, _, c = x.shape
        h, w, gh, gw = self.h, self.w, self.gh, self.gw
        cells = x.view(b, gh, h // gh, gw, w // gw, c) + weight * y.view(b, gh, 1, gw, 1, c)
        return cells.view(b, h * w, c)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Every token gets its cell's pooled token: ``(B, gh * gw, C)`` to ``(B, h * w, C)``."""
        b, _, c = y.shape
        h, w, gh, gw = self.h, self.w, self.gh, self.gw
        if self._exact:
            cells = y.view(b, gh, 1, gw, 1, c).expand(b, gh, h // gh, gw, w // gw, c)
            return cells.reshape(b, h * w, c)
        grid = y.view(b, gh, gw, c).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=(h, w), mode="nearest").permute(0, 2, 3, 1).reshape(b, h * w, c)


def cell_pool(h: int, w: int, sx: int, sy: int, mode: str = "mean") -> CellPool:
    """One pooled token per ``sx x sy`` cell (a grid smaller than a cell gives one token per row or
    column); where the cells do not tile the grid, adaptive pooling to ``h // sy x w // sx``."""
    return CellPool(h, w, max(h // sy, 1), max(w // sx, 1), mode)


def share_pool(h: int, w: int, removed: float, mode: str = "mean") -> CellPool | None:
    """Pooling that removes about ``removed`` of the tokens: each side scaled by
    ``sqrt(1 - removed)`` and rounded (``removed=0.75`` halves each side). None when it keeps
    every token."""
    keep = math.sqrt(1.0 - removed)
    gh, gw = max(round(h * keep), 1), max(round(w * keep), 1)
    return None if (gh, gw) == (h, w) else CellPool(h, w, gh, gw, mode)
