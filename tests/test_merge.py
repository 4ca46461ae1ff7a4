import pytest
import torch
import torch.nn.functional as F

from agentsd.merge import bipartite_merges, cell_dst, mix32


def random_dst(h, w, sx, sy, key=0):
    return cell_dst(h, w, sx, sy, None if key is None else torch.tensor(key))


@pytest.mark.parametrize("h,w,sx,sy", [(16, 16, 4, 4), (18, 14, 4, 4), (9, 7, 2, 2), (5, 12, 4, 2), (3, 3, 4, 4)])
@pytest.mark.parametrize("key", [None, 0, 12345])
def test_dst_one_per_cell(h, w, sx, sy, key):
    dst, src = random_dst(h, w, sx, sy, key)
    assert dst.numel() == (h // sy) * (w // sx)
    assert sorted(torch.cat([dst, src]).tolist()) == list(range(h * w))
    cells = {(int(p) // w // sy, int(p) % w // sx) for p in dst}
    assert len(cells) == dst.numel()  # every dst in its own whole cell
    assert all(r < h // sy and c < w // sx for r, c in cells)
    assert torch.equal(src, src.sort().values)  # src in spatial order
    if key is None:  # top-left of every cell
        assert all(int(p) // w % sy == 0 and int(p) % w % sx == 0 for p in dst)


def test_dst_follows_the_key_only():
    a = random_dst(16, 16, 4, 4, 3)[0]
    b = random_dst(16, 16, 4, 4, 3)[0]
    c = random_dst(16, 16, 4, 4, 4)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every offset in a cell is drawn, about equally often
    offsets = torch.stack([random_dst(64, 64, 4, 4, k)[0] for k in range(64)])
    offsets = (offsets // 64 % 4) * 4 + offsets % 64 % 4
    counts = torch.bincount(offsets.flatten(), minlength=16).float()
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_mix32_same_on_ints_and_tensors():
    values = [0, 1, 2**31 - 1, 2**32 - 1, 123456789]
    assert mix32(torch.tensor(values)).tolist() == [mix32(v) for v in values]
    assert all(0 <= mix32(v) < 2**32 for v in values)
    assert len({mix32(v) for v in range(1000)}) == 1000  # a bijection on 32 bits


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
    dst, src = random_dst(h, w, sx, sx, 7)
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
    dst, src = random_dst(16, 16, 4, 4)
    tokens, agents = bipartite_merges(x, dst, src, [int(0.4 * 256), int(0.95 * 256)])
    assert tokens.num_slots == 256 - 102
    assert agents.num_slots == 16  # clipped to the number of src tokens: one agent per cell


def test_merge_gradients_equal_the_naive_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(2, 64 - 20, 4, dtype=torch.float64, generator=g)
    dst, src = random_dst(8, 8, 2, 2, 3)
    (m,) = bipartite_merges(x.detach(), dst, src, [20])
    (grad,) = torch.autograd.grad((m.merge(x) * weight).sum(), x)
    (expected,) = torch.autograd.grad((naive_merge(x, dst, src, 20) * weight).sum(), x)
    torch.testing.assert_close(grad, expected)
    assert grad.abs().min() > 0  # every token, merged or kept, gets a gradient
