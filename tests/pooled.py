"""AgentSD with ``reduction="pool"`` written out plainly, as a test reference.

Written from the formula, with pooling as explicit matrices (nothing is shared with ``agentsd``):
for the attention input ``y = norm1(x)`` of a block on an ``h x w`` grid,

    A = P_a y      one agent per sx x sy cell (the cell's mean, or its top-left token)
    Y = P_kv y     the input pooled to a (h * sqrt(1 - ratio)) x (w * sqrt(1 - ratio)) grid
    O = softmax(Q A'^T s2) softmax(A' K^T s1) V + k_shortcut * U V

with ``Q = to_q(y)`` for every token, ``A' = to_q(A)``, ``K, V = to_k(Y), to_v(Y)``, ``U`` the
nearest upsampling of the pooled grid back to every token, s1 = d^-0.5 and s2 = s1 ** k_scale2.
Agents are used only when ``2 * agents < tokens``; without agents (the late phase) it is plain
attention of every query over the pooled keys and values. A cell of the pooled grid covers the
rows ``floor(i h / g)`` to ``ceil((i + 1) h / g) - 1`` (adaptive pooling windows).
"""
from __future__ import annotations

import math
import types

import torch


def _axis(n: int, g: int, mode: str) -> torch.Tensor:
    """(g, n) pooling of one axis: window means, or the first element of each window."""
    m = torch.zeros(g, n, dtype=torch.float64)
    for i in range(g):
        lo, hi = (i * n) // g, -((-(i + 1) * n) // g)
        if mode == "mean":
            m[i, lo:hi] = 1.0 / (hi - lo)
        else:
            m[i, lo] = 1.0
    return m


def pool_matrix(h: int, w: int, gh: int, gw: int, mode: str) -> torch.Tensor:
    """(gh * gw, h * w): pooling of a row-major grid."""
    return torch.kron(_axis(h, gh, mode), _axis(w, gw, mode))


def upsample_matrix(h: int, w: int, gh: int, gw: int) -> torch.Tensor:
    """(h * w, gh * gw): every token takes the pooled token of its window (nearest)."""
    def axis(n: int, g: int) -> torch.Tensor:
        m = torch.zeros(n, g, dtype=torch.float64)
        for r in range(n):
            m[r, (r * g) // n] = 1.0
        return m
    return torch.kron(axis(h, gh), axis(w, gw))


def pooled_attention(attn, y: torch.Tensor, h: int, w: int, *, ratio: float, sx: int, sy: int, agents: bool,
                     mode: str, k_scale2: float, k_shortcut: float) -> torch.Tensor:
    heads = attn.heads
    keep = math.sqrt(1 - ratio)
    gh, gw = max(round(h * keep), 1), max(round(w * keep), 1)
    p_kv, up = pool_matrix(h, w, gh, gw, mode).to(y), upsample_matrix(h, w, gh, gw).to(y)
    kv_in = torch.einsum("mn,bnc->bmc", p_kv, y)
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)
    q, k, v = split(attn.to_q(y)), split(attn.to_k(kv_in)), split(attn.to_v(kv_in))
    ah, aw = max(h // sy, 1), max(w // sx, 1)
    if agents and 2 * ah * aw < h * w:
        a = split(attn.to_q(torch.einsum("mn,bnc->bmc", pool_matrix(h, w, ah, aw, mode).to(y), y)))
        agent_v = torch.einsum("bhad,bhkd->bhak", a, k).mul(attn.scale).softmax(-1) @ v
        out = torch.einsum("bhqd,bhad->bhqa", q, a).mul(attn.scale**k_scale2).softmax(-1) @ agent_v
        out = out + k_shortcut * torch.einsum("nm,bhmd->bhnd", up, v)
    else:
        out = torch.einsum("bhqd,bhkd->bhqk", q, k).mul(attn.scale).softmax(-1) @ v
    out = out.permute(0, 2, 1, 3).flatten(2)
    return attn.to_out[1](attn.to_out[0](out))


def patch_pooled(unet, size: tuple[int, int], *, ratio: float, sx: int, sy: int, agents: bool, mode: str = "mean",
                 k_scale2: float = 0.3, k_shortcut: float = 0.075, max_downsample: int = 1) -> None:
    """Replace the forward of every transformer block of ``unet`` by the pooled one (for a latent
    of ``size``; blocks below ``max_downsample`` keep plain attention)."""
    lh, lw = size

    def forward(block, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                class_labels=None, added_cond_kwargs=None):
        x = hidden_states
        n = x.shape[1]
        downsample = int(math.ceil(math.sqrt(lh * lw // n)))
        y = block.norm1(x)
        if downsample <= max_downsample:
            h, w = math.ceil(lh / downsample), math.ceil(lw / downsample)
            x = pooled_attention(block.attn1, y, h, w, ratio=ratio, sx=sx, sy=sy, agents=agents, mode=mode,
                                 k_scale2=k_scale2, k_shortcut=k_shortcut) + x
        else:
            x = block.attn1(y) + x
        x = block.attn2(block.norm2(x), encoder_hidden_states=encoder_hidden_states) + x
        return block.ff(block.norm3(x)) + x

    for module in unet.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            module.forward = types.MethodType(forward, module)
