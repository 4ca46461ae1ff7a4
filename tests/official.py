"""The official AgentSD algorithm written out plainly, as a test reference.

Written from the description of LeapLabTHU/Agent-Attention's ``agentsd/patch.py`` and
``merge.py`` (which follow tomesd): the match is computed on the transformer block's input
(before ``norm1``), dst tokens are the top-left token of every ``sx x sy`` cell (``use_rand``
off), src tokens are ranked by their best cosine similarity and the ``r`` best are averaged into
their dst (a mean that includes the dst); agents are the same ranking merged with ``agent_r``,
projected with ``to_q``; agent attention runs with einsum (s1 = d^-0.5, s2 = s1 ** k_scale2,
plus ``k_shortcut * v``) only when ``2 * agents < merged tokens``, plain attention otherwise; the
output is unmerged and added to the block input. Nothing here is shared with ``agentsd``.
"""
from __future__ import annotations

import math
import types

import torch


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, i]]`` for ``x (B, T, C)`` and ``index (B, I)``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class OfficialMerge:
    """tomesd's bipartite soft matching with top-left dst tokens (``no_rand=True``)."""

    def __init__(self, x: torch.Tensor, w: int, h: int, sx: int, sy: int, r: int):
        b, n, _ = x.shape
        is_dst = torch.zeros(h, w, dtype=torch.bool)
        is_dst[: (h // sy) * sy : sy, : (w // sx) * sx : sx] = True
        is_dst = is_dst.flatten()
        self.a_idx = (~is_dst).nonzero().squeeze(1)  # src
        self.b_idx = is_dst.nonzero().squeeze(1)  # dst, in cell order
        self.n = n
        metric = x / x.norm(dim=-1, keepdim=True)
        a, bb = metric[:, self.a_idx], metric[:, self.b_idx]
        scores = a @ bb.transpose(1, 2)
        node_max, self.node_idx = scores.max(dim=-1)
        self.edge_idx = node_max.argsort(dim=-1, descending=True)
        self.r = min(r, self.a_idx.numel())

    def merge(self, t: torch.Tensor, r: int | None = None) -> torch.Tensor:
        r = self.r if r is None else min(r, self.a_idx.numel())
        src, dst = t[:, self.a_idx], t[:, self.b_idx]
        unm_idx, src_idx = self.edge_idx[:, r:], self.edge_idx[:, :r]
        dst_idx = self.node_idx.gather(1, src_idx)
        unm, moved = _gather(src, unm_idx), _gather(src, src_idx)
        index = dst_idx.unsqueeze(-1).expand(-1, -1, t.shape[-1])
        dst = dst.scatter_reduce(1, index, moved, reduce="mean", include_self=True)
        return torch.cat([unm, dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        r = self.r
        unm_len = self.a_idx.numel() - r
        unm, dst = y[:, :unm_len], y[:, unm_len:]
        unm_idx, src_idx = self.edge_idx[:, r:], self.edge_idx[:, :r]
        src = _gather(dst, self.node_idx.gather(1, src_idx))
        out = y.new_zeros(y.shape[0], self.n, y.shape[-1])
        out[:, self.b_idx] = dst
        for bi in range(y.shape[0]):
            out[bi, self.a_idx[unm_idx[bi]]] = unm[bi]
            out[bi, self.a_idx[src_idx[bi]]] = src[bi]
        return out


def official_attention(attn, x: torch.Tensor, agent: torch.Tensor | None, k_scale2: float, k_shortcut: float):
    """The official ``AgentAttention.forward`` (self-attention, no mask) with einsum."""
    heads = attn.heads
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3).flatten(0, 1)
    q, k, v = split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x))
    if agent is not None and agent.shape[1] * 2 < x.shape[1]:
        a = split(attn.to_q(agent))
        agent_feature = torch.einsum("bid,bjd->bij", a, k).mul(attn.scale).softmax(-1) @ v
        sim2 = torch.einsum("bid,bjd->bij", q, a) * attn.scale**k_scale2
        out = sim2.softmax(-1) @ agent_feature + v * k_shortcut
    else:
        out = torch.einsum("bid,bjd->bij", q, k).mul(attn.scale).softmax(-1) @ v
    out = out.view(x.shape[0], heads, x.shape[1], -1).permute(0, 2, 1, 3).flatten(2)
    return attn.to_out[1](attn.to_out[0](out))


def patch_official(unet, size: tuple[int, int], *, ratio: float, agent_ratio: float | None, sx: int, sy: int,
                   k_scale2: float = 0.3, k_shortcut: float = 0.075, max_downsample: int = 1) -> None:
    """Replace the forward of every transformer block of ``unet`` by the official one (for a
    latent of ``size``; blocks below ``max_downsample`` keep running unmerged)."""
    original_h, original_w = size

    def forward(block, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                class_labels=None, added_cond_kwargs=None):
        x = hidden_states
        n = x.shape[1]
        downsample = int(math.ceil(math.sqrt(original_h * original_w // n)))
        y = block.norm1(x)
        if downsample <= max_downsample:
            w, h = math.ceil(original_w / downsample), math.ceil(original_h / downsample)
            m = OfficialMerge(x, w, h, sx, sy, int(n * ratio))  # matched on the block input
            agent = m.merge(y, int(n * agent_ratio)) if agent_ratio is not None else None
            x = m.unmerge(official_attention(block.attn1, m.merge(y), agent, k_scale2, k_shortcut)) + x
        else:
            x = official_attention(block.attn1, y, None, k_scale2, k_shortcut) + x
        x = block.attn2(block.norm2(x), encoder_hidden_states=encoder_hidden_states) + x
        return block.ff(block.norm3(x)) + x

    for module in unet.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            module.forward = types.MethodType(forward, module)
