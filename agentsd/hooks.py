"""The hooks of an AgentSD patch: where each UNet call and each patched block begins.

- :class:`StepHook`, a forward pre-hook on the UNet, puts the AgentSD processors back on top of
  any processor set since the last call, records the latent size, selects the phase and writes the
  step's random key. It is the one host-side decision per UNet call, so it runs eagerly
  (``torch.compiler.disable``), outside any compiled region. :class:`ReportHook`, a forward hook on
  the UNet, logs why patched blocks did not reduce tokens where they should have.
- :class:`MatchHook`, a forward pre-hook on each patched ``BasicTransformerBlock``, matches the
  tokens on the block input, before ``norm1``, as the official code does, and leaves the merges
  in the block's :class:`~agentsd.state.BlockState` for its layers. :class:`ReleaseHook` drops
  them when the block returns.
- :class:`FeedForwardMergeHook` and :class:`FeedForwardUnmergeHook` run the block's feed-forward
  on the merged tokens (``merge_mlp``).

The hooks are objects holding their state, not closures, so ``copy.deepcopy`` of a patched
model gives hooks bound to the copy's state.
"""
from __future__ import annotations

from typing import Any

import torch

from .merge import bipartite_merges, cell_dst
from .pool import cell_pool, share_pool
from .processor import wrap
from .state import BlockMerges, BlockState, PatchState


class StepHook:
    """UNet forward pre-hook: the processors, then :meth:`PatchState.start_step`, every UNet call."""

    def __init__(self, state: PatchState) -> None:
        self.state = state

    @torch.compiler.disable
    def __call__(self, unet: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        for block in self.state.blocks:  # a processor set since (slicing, fusing, ...) becomes the base
            for attn, cls in block.layers:
                wrap(attn, cls, block)
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.state.start_step(sample, timestep)


class ReportHook:
    """UNet forward hook: :meth:`PatchState.report` after every UNet call."""

    def __init__(self, state: PatchState) -> None:
        self.state = state

    @torch.compiler.disable
    def __call__(self, unet: torch.nn.Module, args: tuple, output: Any) -> None:
        if self.state.pending:
            self.state.report()


class MatchHook:
    """Block forward pre-hook: the merges of this block's forward, matched on its input."""

    def __init__(self, block: BlockState) -> None:
        self.block = block

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        block = self.block
        block.merges = None
        phase = block.state.phase
        if phase is None or phase.is_identity:
            return
        x = args[0] if args else kwargs.get("hidden_states")
        grid = block.grid(x) if isinstance(x, torch.Tensor) else None
        if grid is None:
            size = block.state.latent_size
            block.state.note_fallback(
                f"{block.name}: its {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__} "
                f"input is not the token grid of a {size[0]}x{size[1]} latent at downsampling {block.downsample}"
            )
            return
        (h, w), n = grid, x.shape[1]
        if phase.reduction == "pool":
            agents = None
            if phase.agent_ratio is not None:
                agents = cell_pool(h, w, phase.sx, phase.sy, phase.pool_mode)
                if 2 * agents.num_slots >= n:  # the official rule: agents only when they pay
                    agents = None
            kv = share_pool(h, w, phase.ratio, phase.pool_mode)
            if agents is not None or kv is not None:
                block.merges = BlockMerges(tokens=None, agents=agents, kv=kv)
            return
        # one dst pattern for the whole batch; an odd batch cannot hold both CFG halves, so it
        # takes the top-left token of each cell, as the official code does
        random = block.state.config.use_rand and x.shape[0] % 2 == 0
        dst, src = cell_dst(h, w, phase.sx, phase.sy, block.key() if random else None, x.device)
        if dst.numel() == 0:  # grid smaller than one cell: nothing to merge into
            block.state.note_fallback(f"{block.name}: its {h}x{w} token grid is smaller than one "
                                      f"{phase.sx}x{phase.sy} cell")
            return
        r = min(int(n * phase.ratio), src.numel())
        removed = [r]
        if phase.agent_ratio is not None:
            num_agents = n - min(int(n * phase.agent_ratio), src.numel())
            if 2 * num_agents < n - r:  # the official rule: agents only when they pay
                removed.append(n - num_agents)
        if removed == [0]:  # no merging and no agents: plain attention
            return
        merges = bipartite_merges(x, dst, src, removed)
        block.merges = BlockMerges(
            tokens=merges[0] if r > 0 else None, agents=merges[1] if len(merges) > 1 else None
        )


class ReleaseHook:
    """Block forward hook: forget the merges once the block has returned."""

    def __init__(self, block: BlockState) -> None:
        self.block = block

    def __call__(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.block.merges = None


class FeedForwardMergeHook:
    """Feed-forward pre-hook (``merge_mlp``): the feed-forward gets the merged tokens."""

    def __init__(self, block: BlockState) -> None:
        self.block = block

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        tokens = self.block.merges.tokens if self.block.merges is not None else None
        x = args[0] if args else None
        if tokens is None or not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[1] != tokens.num_tokens:
            return None
        return (tokens.merge(x), *args[1:])


class FeedForwardUnmergeHook:
    """Feed-forward hook (``merge_mlp``): its output goes back to every token."""

    def __init__(self, block: BlockState) -> None:
        self.block = block

    def __call__(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        tokens = self.block.merges.tokens if self.block.merges is not None else None
        if tokens is None or not isinstance(output, torch.Tensor) or output.shape[1] != tokens.num_slots:
            return None
        return tokens.unmerge(output)


HOOK_TYPES = (StepHook, ReportHook, MatchHook, ReleaseHook, FeedForwardMergeHook, FeedForwardUnmergeHook)
