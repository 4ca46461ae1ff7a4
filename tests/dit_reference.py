"""AgentSD on diffusion transformers written out plainly, as a test reference.

The blocks of PixArt (``BasicTransformerBlock`` with ``ada_norm_single``) and of SD3/SD3.5
(``JointTransformerBlock``) are transcribed from diffusers' forward, with their self-attention
replaced by the reference attention: the merge of :mod:`official` (tomesd's matching on the block
input, top-left dst) or the pooling matrices of :mod:`pooled`, and einsum attention. In SD3's
joint attention the image tokens are reduced and the text tokens kept whole, as queries and as
keys and values:

    K = [K_img ; K_txt], V = [V_img ; V_txt]
    O_img = softmax(Q_img A^T s2) softmax(A K^T s1) V + k_shortcut V_img   (with agents)
    O_img = softmax(Q_img K^T s1) V                                       (without)
    O_txt = softmax(Q_txt K^T s1) V

Nothing here is shared with ``agentsd``.
"""
from __future__ import annotations

import math
import types

import torch

from official import OfficialMerge
from pooled import pool_matrix, upsample_matrix


def _grid(n: int, size: tuple[int, int]) -> tuple[int, int]:
    down = int(math.ceil(math.sqrt(size[0] * size[1] // n)))
    return math.ceil(size[0] / down), math.ceil(size[1] / down)


class Reference:
    """The settings of one reference run: ``reduction`` ("merge" or "pool"), ``agents`` (the agent
    phase or not), the cells, the ratios and the constants."""

    def __init__(self, size: tuple[int, int], reduction: str, agents: bool, *, ratio: float, sx: int, sy: int,
                 agent_ratio: float = 0.95, k_scale2: float = 0.3, k_shortcut: float = 0.075) -> None:
        self.size, self.reduction, self.agents = size, reduction, agents
        self.ratio, self.sx, self.sy, self.agent_ratio = ratio, sx, sy, agent_ratio
        self.k_scale2, self.k_shortcut = k_scale2, k_shortcut

    def attention(self, attn, x: torch.Tensor, y: torch.Tensor, text: torch.Tensor | None = None):
        """Self-attention of the image tokens ``y = norm(x)`` (``x``: the block input, what the merge
        matches on), joint with ``text`` when given (SD3): then ``(image, text)``."""
        heads, b, n = attn.heads, y.shape[0], x.shape[1]
        h, w = _grid(n, self.size)
        split = lambda t: t.view(b, t.shape[1], heads, -1).permute(0, 2, 1, 3)
        merge = None
        if self.reduction == "pool":
            keep = math.sqrt(1 - self.ratio)
            gh, gw = max(round(h * keep), 1), max(round(w * keep), 1)
            kv_in = torch.einsum("mn,bnc->bmc", pool_matrix(h, w, gh, gw, "mean").to(y), y)
            queries = y
            cells = pool_matrix(h, w, max(h // self.sy, 1), max(w // self.sx, 1), "mean").to(y)
            agent_in = torch.einsum("mn,bnc->bmc", cells, y)
            has_agents = self.agents and 2 * agent_in.shape[1] < n
        else:
            merge = OfficialMerge(x, w, h, self.sx, self.sy, int(n * self.ratio))
            queries = kv_in = merge.merge(y)
            agent_in = merge.merge(y, int(n * self.agent_ratio))
            has_agents = self.agents and 2 * agent_in.shape[1] < queries.shape[1]
        norm = lambda module, t: module(t) if module is not None else t
        q = norm(attn.norm_q, split(attn.to_q(queries)))
        k, v = norm(attn.norm_k, split(attn.to_k(kv_in))), split(attn.to_v(kv_in))
        keys, values = k, v
        if text is not None:
            tq = norm(attn.norm_added_q, split(attn.add_q_proj(text)))
            tk, tv = norm(attn.norm_added_k, split(attn.add_k_proj(text))), split(attn.add_v_proj(text))
            keys, values = torch.cat([k, tk], dim=2), torch.cat([v, tv], dim=2)
        attend = lambda a, kk, scale: torch.einsum("bhqd,bhkd->bhqk", a, kk).mul(scale).softmax(-1)
        if has_agents:
            a = norm(attn.norm_q, split(attn.to_q(agent_in)))
            agent_v = attend(a, keys, attn.scale) @ values
            out = attend(q, a, attn.scale ** self.k_scale2) @ agent_v
            if merge is None:
                shortcut = torch.einsum("nm,bhmd->bhnd", upsample_matrix(h, w, gh, gw).to(y), v)
            else:
                shortcut = v
            out = out + self.k_shortcut * shortcut
        else:
            out = attend(q, keys, attn.scale) @ values
        out = attn.to_out[1](attn.to_out[0](out.permute(0, 2, 1, 3).flatten(2)))
        if merge is not None:
            out = merge.unmerge(out)
        if text is None:
            return out
        text_out = (attend(tq, keys, attn.scale) @ values).permute(0, 2, 1, 3).flatten(2)
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return out, text_out


def patch_pixart(transformer, reference: Reference) -> None:
    """Replace the forward of every block of a PixArt transformer by the reference one."""

    def forward(block, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        x = hidden_states
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)
        y = block.norm1(x) * (1 + scale_msa) + shift_msa
        x = gate_msa * reference.attention(block.attn1, x, y) + x
        x = block.attn2(x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask) + x
        y = block.norm2(x) * (1 + scale_mlp) + shift_mlp
        return gate_mlp * block.ff(y) + x

    for block in transformer.transformer_blocks:
        block.forward = types.MethodType(forward, block)


def patch_sd3(transformer, reference: Reference) -> None:
    """Replace the forward of every block of an SD3 transformer by the reference one."""

    def forward(block, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
        x, c = hidden_states, encoder_hidden_states
        if block.use_dual_attention:
            y, gate_msa, shift_mlp, scale_mlp, gate_mlp, y2, gate_msa2 = block.norm1(x, emb=temb)
        else:
            y, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
        if block.context_pre_only:
            yc = block.norm1_context(c, temb)
        else:
            yc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(c, emb=temb)
        block_input = x
        out, text_out = reference.attention(block.attn, block_input, y, yc)
        x = x + gate_msa.unsqueeze(1) * out
        if block.use_dual_attention:  # the same reductions, matched on the block input
            x = x + gate_msa2.unsqueeze(1) * reference.attention(block.attn2, block_input, y2)
        y = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp.unsqueeze(1) * block.ff(y)
        if block.context_pre_only:
            return None, x
        c = c + c_gate_msa.unsqueeze(1) * text_out
        yc = block.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        return c + c_gate_mlp.unsqueeze(1) * block.ff_context(yc), x

    for block in transformer.transformer_blocks:
        block.forward = types.MethodType(forward, block)
