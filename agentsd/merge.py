"""Token merging (ToMe for SD) as precomputed index maps.

Tokens on an ``h x w`` grid are split into *dst* tokens, one random token per ``sx x sy`` cell,
and *src* tokens, the rest. Each src token is matched to its most cosine-similar dst token and
the ``r`` best-matched src tokens are averaged into their dst. A match becomes one index map from
token to slot, so that a merge is one ``index_add`` divided by slot sizes and an unmerge is one
``index_select``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def random_dst(
    h: int, w: int, sx: int, sy: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one dst token per ``sx x sy`` cell of an ``h x w`` grid (row-major token order).

    Returns ``(dst, src)``: the flat positions of the dst tokens and of all other tokens, on
    the CPU. Rows and columns past the last whole cell are all src. Without a generator the
    top-left token of each cell is taken.
    """
    gh, gw = h // sy, w // sx
    if generator is None:
        offset = torch.zeros(gh, gw, dtype=torch.long)
    else:
        offset = torch.randint(sx * sy, (gh, gw), generator=generator)
    rows = torch.arange(gh).unsqueeze(1) * sy + offset // sx
    cols = torch.arange(gw).unsqueeze(0) * sx + offset % sx
    dst = (rows * w + cols).flatten()
    is_src = torch.ones(h * w, dtype=torch.bool)
    is_src[dst] = False
    return dst, is_src.nonzero().squeeze(1)


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
    dst, src = _to_device(dst, device), _to_device(src, device)
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
            is_merged.scatter_(1, order[:, :r], True)
        kept_rank = (~is_merged).cumsum(dim=1) - 1
        src_slots = torch.where(is_merged, best_dst, num_dst + kept_rank)
        slots = torch.empty(b, n, dtype=torch.long, device=device)
        slots[:, dst] = dst_slots
        slots[:, src] = src_slots
        m = n - r
        index = (slots + batch * m).flatten()
        # not bincount: on CUDA it reads the maximum back to the host, a sync per layer
        counts = torch.zeros(b * m, dtype=torch.long, device=device).scatter_add_(0, index, torch.ones_like(index))
        counts = counts.unsqueeze(1)
        merges.append(TokenMerge(index, counts, n, m))
    return merges


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU index tensor to ``device`` without stalling the host: from pageable
    memory a CUDA copy waits for the GPU queue to drain, from pinned memory it is queued."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
