"""The paged pool under per-(layer, sequence, KV head) plans: prompts written, compacted by any plan
(random, or a fixed-budget baseline's), trimmed, then decoded with appends, and every attention
read equal to plain masked attention over the kept keys (with and without a sliding window)."""

import math

import torch
from helpers import budgets, examples
from hypothesis import given, settings
from hypothesis import strategies as st

import refreekv
from engine.kv import PagedKV
from refreekv import Probe


def masked_attention(q, K, V, visible, group):
    """Plain attention: q [B, H, D], K/V [B, Hkv, T, D], visible [B, Hkv, T] -> [B, H, D]."""
    k, v = K.repeat_interleave(group, 1), V.repeat_interleave(group, 1)  # query head h -> KV head h // group
    vis = visible.repeat_interleave(group, 1)
    s = (k @ q[..., None])[..., 0] / math.sqrt(q.shape[-1])  # [B, H, T]
    p = torch.softmax(s.masked_fill(~vis, -math.inf), -1)
    return (p[..., None] * v).sum(-2)


@settings(max_examples=examples(30), deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 4),
    st.sampled_from(["random", "h2o", "snapkv", "streaming"]),
    st.sampled_from([None, 5]),
    st.integers(0, 2**31 - 1),
    st.data(),
)
def test_compacted_per_head_plan_equals_masked_attention(L, B, n_kv, group, steps, plan, window, seed, data):
    D, H = 8, n_kv * group
    lens = data.draw(st.lists(st.integers(1, 16), min_size=B, max_size=B))
    N, lt = max(lens), torch.tensor(lens)
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    real = torch.arange(N) < lt[:, None, None]
    if plan == "random":
        keep = (torch.rand(L, B, n_kv, N, generator=g) < 0.5) & real
    else:
        attn = torch.rand(L, B, H, 3, N, generator=g)
        keep = refreekv.make(plan, budget=data.draw(budgets)).plan(Probe(attn, lt, L, n_kv, N))
    K, V = rnd(L, B, n_kv, N, D), rnd(L, B, n_kv, N, D)
    ps = data.draw(st.sampled_from([1, 4, 16]))
    kv = PagedKV(
        L,
        n_kv,
        D,
        B * L * n_kv * -(-(N + steps) // ps),
        ps,
        max_seqs=B,
        max_len=N + steps,
        dtype=torch.float64,
    )
    slots = torch.arange(B)
    for b, n in enumerate(lens):
        kv.assign(b, n)
    for l in range(L):
        kv.write_prompt(l, slots, K[l], V[l], lt)
    kv.next_pos[:B] = lt
    kv.compact(slots, slots, keep)
    for b in range(B):
        kv.trim(b, keep[:, b].sum(-1))
    assert torch.equal(kv.lengths.long(), keep.sum(-1))
    kv.set_live([True] * B)
    kpos = torch.cat([torch.arange(N).expand(B, N), lt[:, None] + torch.arange(steps)], 1)  # [B, N + steps]
    for t in range(steps):
        newK, newV, q = rnd(L, B, n_kv, 1, D), rnd(L, B, n_kv, 1, D), rnd(L, B, H, D)
        K, V = torch.cat([K, newK], 3), torch.cat([V, newV], 3)
        keep = torch.cat([keep, torch.ones(L, B, n_kv, 1, dtype=torch.bool)], 3)
        assert kv.grow([True] * B) == 0
        step = kv.begin_decode(B, [window] * L)
        for l in range(L):
            kv.append(l, newK[l], newV[l], step)
            got = kv.attend(l, q[l], window, step)
            visible = keep[l].clone()
            if window:
                visible &= ((lt + t)[:, None] - kpos[:, : N + t + 1] < window)[:, None]
            ref = masked_attention(q[l], K[l], V[l], visible, group)
            assert torch.allclose(got, ref, atol=1e-10)
        kv.next_pos[:B] += 1
