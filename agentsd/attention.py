"""Self-attention on reduced tokens, from the attention module's own projections.

In the agent phase (and with keys and values pooled) AgentSD computes the attention itself, with
the module's ``to_q``/``to_k``/``to_v`` (or fused ``to_qkv``), ``norm_q``/``norm_k`` and ``to_out``,
and two SDPA calls (:func:`agentsd.agent_attention`). That reproduces the math of diffusers' plain
attention processors, listed in :func:`computes_plain_attention`; for any other processor the
layer runs the processor itself on the merged tokens, or keeps every token (see
:mod:`agentsd.hooks`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers.models import attention_processor as ap

from .agent_attention import agent_attention

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

    from .config import AgentSDConfig
    from .reduce import Reductions


#: diffusers' processors of plain softmax attention, whose math AgentSD reproduces.
PLAIN_PROCESSORS = tuple(getattr(ap, name) for name in (
    "AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "XFormersAttnProcessor", "FusedAttnProcessor2_0",
    "AttnProcessorNPU", "XLAFlashAttnProcessor2_0") if hasattr(ap, name))


def computes_plain_attention(processor: Any) -> bool:
    """Whether ``processor`` is one of :data:`PLAIN_PROCESSORS` (exactly that class: a subclass may
    change the math)."""
    return type(processor) in PLAIN_PROCESSORS


def unsupported(attn: "Attention", hidden_states: torch.Tensor, num_tokens: int) -> str | None:
    """Why the reductions of a block cannot apply to this call of ``attn``, or None."""
    if hidden_states.ndim != 3 or hidden_states.shape[1] != num_tokens:
        return f"got {tuple(hidden_states.shape)} hidden states, not {num_tokens} tokens"
    if attn.spatial_norm is not None or attn.group_norm is not None:
        return "has a spatial or group norm"
    return None


def reduced_self_attention(
    attn: "Attention", hidden_states: torch.Tensor, reductions: "Reductions", config: "AgentSDConfig"
) -> torch.Tensor:
    """The self-attention of ``attn`` on ``hidden_states`` ``(B, N, C)`` with ``reductions``:
    agent attention when they have agents, plain attention otherwise, on the merged tokens and
    the pooled keys and values; the output has every token."""
    tokens, kv = reductions.tokens, reductions.kv
    x = hidden_states if tokens is None else tokens.merge(hidden_states)
    x_kv = x if kv is None else kv.merge(x)
    # the agents: the stronger merge of the same match, or the pooled cells, of the same input
    agents_in = reductions.agents.merge(hidden_states) if reductions.agents is not None else None
    q, k, v, agents = _project(attn, x, x_kv, agents_in)
    b, m, _ = x.shape
    heads = attn.heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, t.shape[1], heads, -1).transpose(1, 2)

    q, k, v_heads = split(q), split(k), split(v)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    dtype = q.dtype
    if config.attn_precision == "fp32":
        q, k, v_heads = q.float(), k.float(), v_heads.float()

    if agents is not None:
        agents = split(agents)
        if attn.norm_q is not None:
            agents = attn.norm_q(agents)
        out = agent_attention(
            q, k, v_heads, agents.to(q.dtype), scale=attn.scale, agent_scale=attn.scale ** config.k_scale2,
            shortcut=config.k_shortcut if kv is None else 0.0,
        )
    else:
        out = F.scaled_dot_product_attention(q, k, v_heads, scale=attn.scale)

    out = out.transpose(1, 2).reshape(b, m, -1)
    if agents is not None and kv is not None:  # the official shortcut on the values at every query
        out = kv.add_unmerged(out, v.to(out.dtype), config.k_shortcut)
    out = attn.to_out[1](attn.to_out[0](out.to(dtype)))
    out = out if tokens is None else tokens.unmerge(out)
    if attn.residual_connection:
        out = out + hidden_states
    return out if attn.rescale_output_factor == 1 else out / attn.rescale_output_factor


def _project(attn: "Attention", x: torch.Tensor, x_kv: torch.Tensor,
             agents: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Queries of ``x``, keys and values of ``x_kv`` and queries of ``agents`` (flat heads).

    With fused projections (``fuse_qkv_projections``) and keys and values from the queries'
    tokens, one matmul of ``to_qkv`` projects the tokens and the agents together.
    """
    m = x.shape[1]
    if x_kv is x and getattr(attn, "fused_projections", False) and getattr(attn, "to_qkv", None) is not None:
        rows = x if agents is None else torch.cat([x, agents], dim=1)
        q, k, v = attn.to_qkv(rows).chunk(3, dim=-1)
        return q[:, :m], k[:, :m], v[:, :m], None if agents is None else q[:, m:]
    q, k, v = attn.to_q(x), attn.to_k(x_kv), attn.to_v(x_kv)
    return q, k, v, None if agents is None else attn.to_q(agents)
