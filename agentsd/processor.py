"""The AgentSD attention processors for the attention layers of a patched transformer block.

The merges come from the block's :class:`~agentsd.state.BlockState`, where its
:class:`~agentsd.hooks.MatchHook` left them. Whenever the block has no merges for this forward
(a phase that changes nothing, a level or input that does not fit, a mask), the processor that
was set before patching runs unchanged.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .agent_attention import agent_attention

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

    from .state import BlockMerges, BlockState


class _WrappingProcessor:
    """A processor that wraps the one it replaces: it runs :meth:`_run` on the block's merges when
    they apply to this call (:meth:`_applies`), and the wrapped processor otherwise."""

    def __init__(self, base: Any, block: "BlockState") -> None:
        self.base = base
        self.block = block
        #: the attention module's children before patching (a processor that is an nn.Module
        #: becomes a child; removal puts it back in its place)
        self.module_order: list[str] = []

    def __call__(
        self,
        attn: "Attention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if temb is not None:  # passed on only when given: not every processor takes it
            kwargs["temb"] = temb
        merges = self.block.merges
        if (
            merges is None
            or not self._applies(merges, encoder_hidden_states, attention_mask)
            or hidden_states.ndim != 3
            or hidden_states.shape[1] != (merges.tokens or merges.agents).num_tokens
            or attn.spatial_norm is not None
            or attn.group_norm is not None
            or attn.residual_connection
        ):
            return self.base(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)
        return self._run(attn, hidden_states, merges, encoder_hidden_states, attention_mask, kwargs)

    def _applies(self, merges: "BlockMerges", encoder_hidden_states: Any, attention_mask: Any) -> bool:
        raise NotImplementedError

    def _run(self, attn: "Attention", hidden_states: torch.Tensor, merges: "BlockMerges",
             encoder_hidden_states: Any, attention_mask: Any, kwargs: dict) -> torch.Tensor:
        raise NotImplementedError


class AgentSDAttnProcessor(_WrappingProcessor):
    """Self-attention (attn1) on merged tokens: agent attention, or plain attention when the
    step has no agents; the output is unmerged to every position.

    Args:
        base: the processor that was set on this attention module before patching.
        block: the state of the transformer block this attention belongs to.
    """

    def _applies(self, merges: "BlockMerges", encoder_hidden_states: Any, attention_mask: Any) -> bool:
        return encoder_hidden_states is None and attention_mask is None

    def _run(self, attn: "Attention", hidden_states: torch.Tensor, merges: "BlockMerges",
             encoder_hidden_states: Any, attention_mask: Any, kwargs: dict) -> torch.Tensor:
        tokens = merges.tokens
        x = hidden_states if tokens is None else tokens.merge(hidden_states)
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
        config = self.block.state.config
        if config.attn_precision == "fp32":
            q, k, v = q.float(), k.float(), v.float()

        if merges.agents is not None:
            # agents: the stronger merge of the same match, of the same (normed) input, through to_q
            agents = split(attn.to_q(merges.agents.merge(hidden_states)))
            if attn.norm_q is not None:
                agents = attn.norm_q(agents)
            out = agent_attention(
                q, k, v, agents.to(q.dtype),
                scale=attn.scale, agent_scale=attn.scale ** config.k_scale2, shortcut=config.k_shortcut,
            )
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)

        out = out.to(dtype).transpose(1, 2).reshape(b, m, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out if tokens is None else tokens.unmerge(out)
        return out / attn.rescale_output_factor


class MergedCrossAttnProcessor(_WrappingProcessor):
    """Cross-attention (attn2) on the merged tokens (``merge_crossattn``): the wrapped processor
    runs on them, and its output is unmerged to every position.

    Args:
        base: the processor that was set on this attention module before patching.
        block: the state of the transformer block this attention belongs to.
    """

    def _applies(self, merges: "BlockMerges", encoder_hidden_states: Any, attention_mask: Any) -> bool:
        return merges.tokens is not None

    def _run(self, attn: "Attention", hidden_states: torch.Tensor, merges: "BlockMerges",
             encoder_hidden_states: Any, attention_mask: Any, kwargs: dict) -> torch.Tensor:
        tokens = merges.tokens
        out = self.base(attn, tokens.merge(hidden_states), encoder_hidden_states=encoder_hidden_states,
                        attention_mask=attention_mask, **kwargs)
        return tokens.unmerge(out)
