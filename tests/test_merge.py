import pytest
import torch
import torch.nn.functional as F

from agentsd.merge import bipartite_merges, random_dst


@pytest.mark.parametrize("h,w,sx,sy", [(16, 16, 4, 4), (18, 14, 4, 4), (9, 7, 2, 2), (5, 12, 4, 2), (3, 3, 4, 4)])
def test_random_dst_one_per_cell(h, w, sx, sy):
    dst, src = random_dst(h, w, sx, sy, torch.Generator().manual_seed(0))
    assert dst.numel() == (h // sy) * (w // sx)
    assert sorted(torch.cat([dst, src]).tolist()) == list(range(h * w))
    cells = {(int(p) // w // sy, int(p) % w // sx) for p in dst}
    assert len(cells) == dst.numel()  # every dst in its own whole cell
    assert all(r < h // sy and c < w // sx for r, c in cells)


def test_random_dst_seeded():
    a = random_dst(16, 16, 4, 4, torch.Generator().manual_seed(3))[0]
    b = random_dst(16, 16, 4, 4, torch.Generator().manual_seed(3))[0]
    c = random_dst(16, 16, 4, 4, torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def naive_merge(x, dst, src, r):
    """Reference ToMe merge, one batch element at a time: returns merged tokens as a set of rows."""
    out = []
    for xb in x:
        sim = F.normalize(xb[src], dim=-1) @ F.normalize(xb[dst], dim=-1).T
        best, best_dst = sim.max(-1)
        merged = set(best.argsort(descending=True)[:r].tolist())
        groups = {j: [int(dst[j])] for j in range(len(dst))}
        kept = []
        for i in range(len(src)):
            (groups[int(best_dst[i])].append(int(src[i])) if i in merged else kept.append(int(src[i])))
        rows = [xb[g].mean(0) for g in groups.values()] + [xb[p] for p in kept]
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("h,w,sx,ratio", [(8, 8, 2, 0.4), (9, 7, 2, 0.3), (16, 16, 4, 0.95), (6, 10, 4, 0.0)])
def test_merge_matches_naive_reference_and_unmerge_restores(h, w, sx, ratio):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, h * w, 5, generator=g, dtype=torch.float64)
    dst, src = random_dst(h, w, sx, sx, g)
    r = int(ratio * h * w)
    (m,) = bipartite_merges(x, dst, src, [r])
    r = min(r, src.numel())
    merged = m.merge(x)
    assert merged.shape == (3, h * w - r, 5) and m.num_slots == h * w - r
    torch.testing.assert_close(merged, naive_merge(x, dst, src, r))
    # unmerge(merge(x)) restores every token that was not merged with another one exactly
    restored = m.unmerge(merged)
    assert restored.shape == x.shape
    alone = (m.counts.squeeze(1) == 1)[m.index].view(3, h * w)
    assert torch.equal(restored[alone], x[alone])
    # merged tokens all receive the mean of their group
    torch.testing.assert_close(m.merge(restored), merged)


def test_one_match_serves_several_merges():
    x = torch.randn(2, 256, 8)
    dst, src = random_dst(16, 16, 4, 4, torch.Generator().manual_seed(0))
    tokens, agents = bipartite_merges(x, dst, src, [int(0.4 * 256), int(0.95 * 256)])
    assert tokens.num_slots == 256 - 102
    assert agents.num_slots == 16  # clipped to the number of src tokens: one agent per cell


def test_merge_gradients_flow():
    x = torch.randn(1, 64, 4, requires_grad=True)
    dst, src = random_dst(8, 8, 2, 2)
    (m,) = bipartite_merges(x, dst, src, [20])
    m.unmerge(m.merge(x) * 2).sum().backward()
    torch.testing.assert_close(x.grad.sum(), torch.tensor(2.0 * 64 * 4))
