"""The agent attention formula on fused attention kernels.

    O = softmax(Q A^T s2) softmax(A K^T s1) V + k_shortcut V

Stage 1 (agent aggregation) lets the agents ``A`` attend over ``K, V``; stage 2 (agent
broadcast) lets the queries attend over the agents with the aggregated agent features as
values. Each stage is an ordinary softmax attention, so both run on
``torch.nn.functional.scaled_dot_product_attention`` and its flash / memory-efficient kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    *,
    scale: float,
    agent_scale: float,
    shortcut: float = 0.0,
) -> torch.Tensor:
    """Agent attention of ``q`` over ``k, v`` through ``agents``.

    Args:
        q, k, v: ``(..., N, d)`` queries, keys and values.
        agents: ``(..., n, d)`` agent tokens.
        scale: s1, the logit scale of the aggregation (agents over keys).
        agent_scale: s2, the logit scale of the broadcast (queries over agents).
        shortcut: weight of the value shortcut ``k_shortcut * V``.

    Returns:
        ``(..., N, d)``.
    """
    agent_values = F.scaled_dot_product_attention(agents, k, v, scale=scale)
    out = F.scaled_dot_product_attention(q, agents, agent_values, scale=agent_scale)
    if shortcut:
        out = out + shortcut * v
    return out
