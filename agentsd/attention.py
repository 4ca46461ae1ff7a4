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


#: diffusers' processors of plain softmax attention, whose math AgentSD reproduces: self-attention,
#: and SD3's joint attention of image and text tokens.
PLAIN_PROCESSORS = tuple(getattr(ap, name) for name in (
    "AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "XFormersAttnProcessor", "FusedAttnProcessor2_0",
    "AttnProcessorNPU", "XLAFlashAttnProcessor2_0", "JointAttnProcessor2_0", "FusedJointAttnProcessor2_0",
    "XFormersJointAttnProcessor") if hasattr(ap, name))


def computes_plain_attention(processor: Any) -> bool:
    """Whether ``processor`` is one of :data:`PLAIN_PROCESSORS` (exactly that class: a subclass may
    change the math)."""
    return type(processor) in PLAIN_PROCESSORS


def is_joint(attn: "Attention", encoder_hidden_states: torch.Tensor | None) -> bool:
    """Whether this call is a joint attention of image and text tokens (SD3's ``attn``)."""
    return encoder_hidden_states is not None and getattr(attn, "add_q_proj", None) is not None


def text_heads(attn: "Attention", encoder_hidden_states: torch.Tensor) -> list[torch.Tensor]:
    """The text tokens' queries, keys and values of a joint attention, ``(B, heads, T, d)`` each,
    normalised as diffusers' joint processors do."""
    q, k, v = (proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
               for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_added_q is not None:
        q = attn.norm_added_q(q)
    if attn.norm_added_k is not None:
        k = attn.norm_added_k(k)
    return [q, k, v]


def unsupported(attn: "Attention", hidden_states: torch.Tensor, num_tokens: int) -> str | None:
    """Why the reductions of a block cannot apply to this call of ``attn``, or None."""
    if hidden_states.ndim != 3 or hidden_states.shape[1] != num_tokens:
        return f"got {tuple(hidden_states.shape)} hidden states, not {num_tokens} tokens"
    if attn.spatial_norm is not None or attn.group_norm is not None:
        return "has a spatial or group norm"
    return None


def reduced_attention(
    attn: "Attention", hidden_states: torch.Tensor, reductions: "Reductions", config: "AgentSDConfig",
    encoder_hidden_states: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The attention of ``attn`` on ``hidden_states`` ``(B, N, C)`` with ``reductions``: agent
    attention when they have agents, plain attention otherwise, on the merged tokens and the pooled
    keys and values; the output has every token.

    With ``encoder_hidden_states`` (SD3's joint attention) the text tokens are kept whole, as
    queries and as keys and values: the agents gather from the reduced image tokens and every
    text token, the image queries read the agents, and the text queries attend over the reduced
    image tokens and the text tokens. Returns ``(image, text)`` then, as diffusers' joint
    processors do.
    """
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
    keys, values = k, v_heads
    if encoder_hidden_states is not None:
        text_q, text_k, text_v = text_heads(attn, encoder_hidden_states)
        keys, values = torch.cat([k, text_k], dim=2), torch.cat([v_heads, text_v], dim=2)
    if config.attn_precision == "fp32":
        q, keys, values, v_heads = q.float(), keys.float(), values.float(), v_heads.float()

    if agents is not None:
        agents = split(agents)
        if attn.norm_q is not None:
            agents = attn.norm_q(agents)
        out = agent_attention(q, keys, values, agents.to(q.dtype), scale=attn.scale,
                              agent_scale=attn.scale ** config.k_scale2)
        if kv is None:  # the official shortcut on the (merged) image values
            out = out + config.k_shortcut * v_heads
    else:
        out = F.scaled_dot_product_attention(q, keys, values, scale=attn.scale)

    out = out.transpose(1, 2).reshape(b, m, -1)
    if agents is not None and kv is not None:  # the official shortcut on the values at every query
        out = kv.add_unmerged(out, v.to(out.dtype), config.k_shortcut)
    out = attn.to_out[1](attn.to_out[0](out.to(dtype)))
    out = out if tokens is None else tokens.unmerge(out)
    if encoder_hidden_states is not None:
        text = F.scaled_dot_product_attention(text_q.to(keys.dtype), keys, values, scale=attn.scale)
        text = text.transpose(1, 2).reshape(b, text.shape[2], -1).to(dtype)
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return out, text
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
