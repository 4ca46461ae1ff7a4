"""The token reductions of one block forward: what the phase asks for, on the block's token grid.

``"merge"`` matches the block input ToMe-style (:mod:`agentsd.merge`): one dst per cell, the
``ratio`` best-matched tokens averaged into it, and the agents as a stronger merge of the same
match. ``"pool"`` needs no match (:mod:`agentsd.pool`): one agent per cell, the keys and values
pooled to ``1 - ratio`` of the tokens. Either way, as in the official code, agents are used only
when they are fewer than half of the tokens attention runs on.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .config import Phase
from .merge import TokenMerge, bipartite_merges, cell_dst
from .pool import CellPool, cell_pool, share_pool


class Reductions(NamedTuple):
    """The token reductions of one block for one forward.

    Attributes:
        tokens: the merge of the tokens that attention runs on (q, k and v), unmerged after; None
            when every token is kept.
        agents: how the agents are made from the attention input (a stronger merge of the same
            match, or the pooling of cells); None when the step uses no agents.
        kv: the pooling of the keys and values (``reduction="pool"``); None when they are not
            pooled.
    """

    tokens: TokenMerge | None
    agents: TokenMerge | CellPool | None
    kv: CellPool | None = None

    @property
    def num_tokens(self) -> int:
        """The number of tokens of the attention input these reductions apply to."""
        return next(r.num_tokens for r in self if r is not None)


def block_reductions(
    x: torch.Tensor, grid: tuple[int, int], phase: Phase, key: torch.Tensor | None
) -> Reductions | str | None:
    """The reductions of a block whose input ``x`` ``(B, h * w, C)`` lies on the ``grid`` ``(h, w)``.

    Args:
        x: the block input (before ``norm1``), which ``"merge"`` matches on.
        grid: the token grid.
        phase: the phase of the call.
        key: the block's random key (a 0-dim int64 device tensor), or None for the top-left dst.

    Returns:
        the reductions; None when the phase keeps every token and uses no agents; or, when the
        phase cannot apply to this grid, why not.
    """
    (h, w), n = grid, x.shape[1]
    uses_cells = phase.reduction == "merge" or phase.agent_ratio is not None
    if uses_cells and (h < phase.sy or w < phase.sx):
        return f"its {h}x{w} token grid is smaller than one {phase.sx}x{phase.sy} cell"
    if phase.reduction == "pool":
        agents = cell_pool(h, w, phase.sx, phase.sy, phase.pool_mode) if phase.agent_ratio is not None else None
        if agents is not None and 2 * agents.num_slots >= n:  # the official rule: agents only when they pay
            agents = None
        kv = share_pool(h, w, phase.ratio, phase.pool_mode)
        return Reductions(None, agents, kv) if agents is not None or kv is not None else None
    dst, src = cell_dst(h, w, phase.sx, phase.sy, key, x.device)
    r = min(int(n * phase.ratio), src.numel())
    removed = [r]
    if phase.agent_ratio is not None:
        num_agents = n - min(int(n * phase.agent_ratio), src.numel())
        if 2 * num_agents < n - r:  # the official rule: agents only when they pay
            removed.append(n - num_agents)
    if removed == [0]:  # no merging and no agents: plain attention
        return None
    merges = bipartite_merges(x, dst, src, removed)
    return Reductions(merges[0] if r > 0 else None, merges[1] if len(merges) > 1 else None)
