"""The AgentSD attention processor for the self-attention (attn1) of UNet transformer blocks."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .agent_attention import agent_attention
from .merge import bipartite_merges, random_dst

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

    from .patch import PatchState


class AgentSDAttnProcessor:
    """Token-merging agent attention, wrapping the processor it replaces.

    In the agent phase the tokens are merged, agents are formed by a stronger merge of the same
    match and projected with ``to_q``, agent attention runs on the merged tokens and its output is
    unmerged to every position. In the ToMe phase plain attention runs on the merged tokens.
    Whenever nothing is to be changed (a phase with no merging and no agents, a mask, an input
    that is not self-attention over the expected grid) the wrapped processor runs unchanged.

    Args:
        base: the processor that was set on this attention module before patching.
        state: the patch state shared by all processors of one UNet.
        downsample: the downsampling factor of this module's level (1 = latent resolution).
    """

    def __init__(self, base: Any, state: "PatchState", downsample: int) -> None:
        self.base = base
        self.state = state
        self.downsample = downsample

    def __call__(
        self,
        attn: "Attention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        state = self.state
        phase = state.phase
        grid = self._grid(hidden_states)
        if (
            phase is None
            or phase.is_identity
            or grid is None
            or encoder_hidden_states is not None
            or attention_mask is not None
            or attn.spatial_norm is not None
            or attn.group_norm is not None
        ):
            if temb is not None:  # passed on only when given: not every processor takes it
                kwargs["temb"] = temb
            return self.base(
                attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
            )

        h, w = grid
        n = h * w
        dst, src = random_dst(h, w, phase.sx, phase.sy, state.generator)
        use_agents = phase.agent_ratio is not None
        removed = [int(n * phase.ratio)]
        if use_agents:
            removed.append(int(n * phase.agent_ratio))
        if dst.numel() > 0:
            merges = bipartite_merges(hidden_states, dst, src, removed)
        else:  # grid smaller than one cell: nothing to merge into
            merges = [None] * len(removed)
        tokens = merges[0] if removed[0] > 0 else None
        x = hidden_states if tokens is None else tokens.merge(hidden_states)

        out = self._attention(attn, x, hidden_states, merges[1] if use_agents else None, use_agents)
        if tokens is not None:
            out = tokens.unmerge(out)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _grid(self, hidden_states: torch.Tensor) -> tuple[int, int] | None:
        """The token grid of this level, or None when it does not fit the input."""
        size = self.state.latent_size
        if size is None or hidden_states.ndim != 3:
            return None
        h, w = (math.ceil(s / self.downsample) for s in size)
        return (h, w) if h * w == hidden_states.shape[1] else None

    def _attention(
        self, attn: "Attention", x: torch.Tensor, full: torch.Tensor, agent_merge: Any, use_agents: bool
    ) -> torch.Tensor:
        """Projections, (agent) attention and output projection on the merged tokens ``x``."""
        b, m, _ = x.shape
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        dtype = q.dtype
        if self.state.config.attn_precision == "fp32":
            q, k, v = q.float(), k.float(), v.float()

        if use_agents:
            agents_in = full if agent_merge is None else agent_merge.merge(full)
            agents = split(attn.to_q(agents_in))
            if attn.norm_q is not None:
                agents = attn.norm_q(agents)
            cfg = self.state.config
            out = agent_attention(
                q, k, v, agents.to(q.dtype),
                scale=attn.scale,
                agent_scale=attn.scale ** cfg.k_scale2,
                shortcut=cfg.k_shortcut,
            )
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)

        out = out.to(dtype).transpose(1, 2).reshape(b, m, -1)
        return attn.to_out[1](attn.to_out[0](out))
