import pytest
import torch

from agentsd import agent_attention


def einsum_reference(q, k, v, a, s1, s2, shortcut):
    """O = softmax(Q A^T s2) softmax(A K^T s1) V + shortcut V, written out plainly."""
    agent_attn = torch.einsum("bhnd,bhmd->bhnm", a, k).mul(s1).softmax(-1)
    agent_v = torch.einsum("bhnm,bhmd->bhnd", agent_attn, v)
    q_attn = torch.einsum("bhid,bhnd->bhin", q, a).mul(s2).softmax(-1)
    return torch.einsum("bhin,bhnd->bhid", q_attn, agent_v) + shortcut * v


@pytest.mark.parametrize("n_tokens,n_agents,d", [(64, 16, 8), (37, 5, 40), (10, 10, 4)])
def test_matches_einsum_formula(n_tokens, n_agents, d):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n_tokens, d, generator=g, dtype=torch.float64) for _ in range(3))
    a = torch.randn(2, 3, n_agents, d, generator=g, dtype=torch.float64)
    s1 = d**-0.5
    s2 = s1**0.3
    out = agent_attention(q, k, v, a, scale=s1, agent_scale=s2, shortcut=0.075)
    torch.testing.assert_close(out, einsum_reference(q, k, v, a, s1, s2, 0.075))


def test_shortcut_zero_is_pure_attention_and_shortcut_adds_v():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 20, 8, generator=g) for _ in range(3))
    a = torch.randn(1, 2, 4, 8, generator=g)
    base = agent_attention(q, k, v, a, scale=0.3, agent_scale=0.5)
    with_shortcut = agent_attention(q, k, v, a, scale=0.3, agent_scale=0.5, shortcut=0.5)
    torch.testing.assert_close(with_shortcut - base, 0.5 * v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_fp32(dtype):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 50, 16, generator=g) for _ in range(3))
    a = torch.randn(1, 2, 8, 16, generator=g)
    ref = agent_attention(q, k, v, a, scale=0.25, agent_scale=0.66, shortcut=0.075)
    low = agent_attention(*(t.to(dtype) for t in (q, k, v, a)), scale=0.25, agent_scale=0.66, shortcut=0.075)
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)
