"""Token merging (ToMe for SD) as precomputed index maps, computed on the device.

Tokens on an ``h x w`` grid are split into *dst* tokens, one token per ``sx x sy`` cell, and
*src* tokens, the rest. Each src token is matched to its most cosine-similar dst token and the
``r`` best-matched src tokens are averaged into their dst. A match becomes one index map from
token to slot, so that a merge is one ``scatter_add_`` divided by slot sizes and an unmerge is one
``index_select``.

Everything here has shapes that depend on the grid only, draws no random numbers from a
generator and reads nothing back to the host, so it runs unchanged under ``torch.compile``
(``fullgraph=True``) and CUDA graphs. The random dst choice is a counter-based hash of an integer
key (derived from the seed, the step and the layer) and of the cell index.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

_MASK32 = 0xFFFF_FFFF
IntLike = TypeVar("IntLike", int, torch.Tensor)


def mix32(x: IntLike) -> IntLike:
    """A 32-bit integer hash (xor-shift-multiply), on Python ints or int64 tensors alike.

    Inputs and outputs are in ``[0, 2**32)``; both multipliers are below ``2**31``, so no int64
    product overflows and a tensor gives exactly the Python result on every device.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


@dataclass(frozen=True)
class TokenMerge:
    """A merge of ``B x N`` tokens into ``B x M`` slots.

    The merge uses ``scatter_add_`` rather than ``index_add_``: on CPU it is several times faster.

    Attributes:
        index: ``(B * N,)`` slot of each token, offset by ``b * M`` for batch element ``b``.
        counts: ``(B * M, 1)`` number of tokens in each slot.
        num_tokens: N.
        num_slots: M.
    """

    index: torch.Tensor
    counts: torch.Tensor
    num_tokens: int
    num_slots: int

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Average ``x`` of shape ``(B, N, C)`` into its slots: ``(B, M, C)``."""
        b, n, c = x.shape
        index = self.index.unsqueeze(1).expand(b * n, c)
        summed = x.new_zeros(b * self.num_slots, c).scatter_add_(0, index, x.reshape(b * n, c))
        return (summed / self.counts.to(x.dtype)).view(b, self.num_slots, c)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Copy each slot of ``y`` ``(B, M, C)`` back to all of its tokens: ``(B, N, C)``."""
        b, m, c = y.shape
        return y.reshape(b * m, c).index_select(0, self.index).view(b, self.num_tokens, c)

    @property
    def batch(self) -> int:
        """B, the number of batch elements."""
        return self.index.numel() // self.num_tokens

    def rows(self, start: int, count: int) -> "TokenMerge":
        """The merge of batch elements ``start`` to ``start + count - 1`` alone."""
        n, m = self.num_tokens, self.num_slots
        index = self.index[start * n:(start + count) * n] - start * m
        return TokenMerge(index, self.counts[start * m:(start + count) * m], n, m)


def cell_dst(
    h: int, w: int, sx: int, sy: int, key: torch.Tensor | None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one dst token per ``sx x sy`` cell of an ``h x w`` grid (row-major token order).

    Args:
        h, w: the token grid.
        sx, sy: the cell size.
        key: a 0-dim int64 tensor in ``[0, 2**32)``: the token of cell ``c`` is
            ``mix32(mix32(c) ^ key) % (sx * sy)`` (the same on every device). ``None`` takes the
            top-left token of every cell.
        device: where to build the positions when ``key`` is None.

    Returns:
        ``(dst, src)`` on the key's device: the flat positions of the dst tokens, cell by cell, and
        of all other tokens in ascending order. Rows and columns past the last whole cell are src.
    """
    device = key.device if key is not None else torch.device(device)
    gh, gw = h // sy, w // sx
    cells = torch.arange(gh * gw, device=device)
    offset = torch.zeros_like(cells) if key is None else mix32(mix32(cells) ^ key) % (sx * sy)
    rows = cells.div(gw, rounding_mode="floor") * sy + offset.div(sx, rounding_mode="floor")
    cols = cells.remainder(gw) * sx + offset.remainder(sx)
    dst = rows * w + cols
    # src without boolean indexing: each src token goes to its rank among the src tokens, every
    # dst token to one spare slot past the end, which is dropped
    n, num_src = h * w, h * w - gh * gw
    is_dst = torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, dst, True)
    rank = torch.where(is_dst, num_src, torch.cumsum(~is_dst, 0) - 1)
    src = torch.empty(num_src + 1, dtype=torch.long, device=device)
    src = src.scatter_(0, rank, torch.arange(n, device=device))[:num_src]
    return dst, src


def bipartite_merges(
    x: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, removed: list[int]
) -> list[TokenMerge]:
    """Match the src tokens of ``x`` ``(B, N, C)`` to dst tokens by cosine similarity.

    One similarity pass serves several merges: for each ``r`` in ``removed`` the ``r`` most
    similar src tokens are merged into their dst (``r`` is clipped to the number of src tokens).
    Src tokens that are kept retain their spatial order.
    """
    b, n, _ = x.shape
    device = x.device
    num_dst, num_src = dst.numel(), src.numel()
    removed = [min(r, num_src) for r in removed]
    with torch.no_grad():
        metric = F.normalize(x, dim=-1)
        scores = metric.index_select(1, src) @ metric.index_select(1, dst).transpose(1, 2)
        best, best_dst = scores.max(dim=-1)  # (B, num_src)
        order = best.topk(max(removed), dim=-1).indices if max(removed) > 0 else None
    batch = torch.arange(b, device=device).unsqueeze(1)
    dst_slots = torch.arange(num_dst, device=device).expand(b, num_dst)

    merges = []
    for r in removed:
        is_merged = torch.zeros(b, num_src, dtype=torch.bool, device=device)
        if r > 0:
            is_merged = is_merged.scatter(1, order[:, :r], True)
        kept_rank = (~is_merged).cumsum(dim=1) - 1
        src_slots = torch.where(is_merged, best_dst, num_dst + kept_rank)
        slots = torch.empty(b, n, dtype=torch.long, device=device)
        slots[:, dst] = dst_slots
        slots[:, src] = src_slots
        m = n - r
        index = (slots + batch * m).flatten()
        # not bincount: on CUDA it reads the maximum back to the host, a sync per layer
        counts = torch.zeros(b * m, dtype=torch.long, device=device).scatter_add_(0, index, torch.ones_like(index))
        merges.append(TokenMerge(index, counts.unsqueeze(1), n, m))
    return merges
