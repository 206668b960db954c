"""refreekv-topp (threshold-only, per-KV-head attention mass): hand-worked plan, Hypothesis
invariants and a plain loop reference (on the dyadic probes of test_baselines)."""

import torch
from helpers import examples, probe, probes
from hypothesis import given, settings
from hypothesis import strategies as st

import refreekv

SET = settings(max_examples=examples(40), deadline=None)
thresholds = st.sampled_from([0.0, 0.01, 0.0731, 0.2113, 0.5831, 1.0])


def head_scores(attn, lens, n_kv, rows):
    """[L, B, Hkv, N] float64 by plain loops (no policy helper): key j's attention summed over the last
    `rows` probe rows that see it (row r of a prompt of n tokens sits at position n - rows + r and sees
    keys <= it) and over the KV head's query heads, times lcm(1..rows) / (rows that see it)."""
    import math

    a = attn[..., -rows:, :].double()
    L, B, H, _, N = a.shape
    lcm = math.lcm(*range(1, rows + 1))
    out = torch.zeros(L, B, n_kv, N, dtype=torch.float64)
    for b, n in enumerate(lens):
        for j in range(N):
            seers = [r for r in range(rows) if j <= n - rows + r and n - rows + r >= 0]
            if not seers:
                continue
            for l in range(L):
                for h in range(H):
                    out[l, b, h // (H // n_kv), j] += sum(a[l, b, h, r, j].item() for r in seers) * (
                        lcm // len(seers)
                    )
    return out


def reference(attn, lens, n_kv, threshold, sinks, rows, protected):
    """Loop reference: kept slot sets [l][b][kv head]."""
    s = head_scores(attn, lens, n_kv, rows)
    out = []
    for l in range(s.shape[0]):
        out.append([])
        for b, n in enumerate(lens):
            out[l].append([])
            for h in range(n_kv):
                sc = s[l, b, h, :n].tolist()
                keep, budget, evicted = set(range(n)), threshold * sum(sc), 0.0
                if l not in protected and threshold > 0:
                    # lowest first, older first
                    for j in sorted(range(sinks, n - 1), key=lambda j: (sc[j], j)):
                        if evicted + sc[j] > budget:
                            break
                        evicted += sc[j]
                        keep.discard(j)
                out[l][b].append(keep)
    return out


@st.composite
def knobs(draw):
    return dict(
        threshold=draw(thresholds),
        sinks=draw(st.integers(0, 6)),
        rows=draw(st.integers(1, 3)),
        protected=tuple(draw(st.lists(st.integers(0, 3), max_size=2))),
    )


@SET
@given(probes(w=3), knobs())
def test_plan_equals_loop_reference_and_bounds_the_evicted_mass(pa, kw):
    attn, lens, n_kv = pa
    keep = refreekv.make("refreekv-topp", **kw).plan(probe(attn, lens, n_kv))
    ref = reference(attn, lens, n_kv, kw["threshold"], kw["sinks"], kw["rows"], kw["protected"])
    s = head_scores(attn, lens, n_kv, kw["rows"])
    N = attn.shape[-1]
    for l in range(keep.shape[0]):
        for b, n in enumerate(lens):
            for h in range(n_kv):
                row = keep[l, b, h]
                assert set(torch.nonzero(row).flatten().tolist()) == ref[l][b][h]
                assert not row[n:N].any() and row[: min(kw["sinks"], n)].all() and row[n - 1]
                total, ev = s[l, b, h, :n].sum().item(), s[l, b, h, :n][~row[:n]].sum().item()
                assert ev <= kw["threshold"] * total + 1e-12


@SET
@given(probes(w=3), knobs(), thresholds)
def test_t0_keeps_all_monotone_scale_invariant_batch_independent(pa, kw, t2):
    attn, lens, n_kv = pa
    mk = lambda t: refreekv.make("refreekv-topp", **{**kw, "threshold": t})
    real = torch.arange(attn.shape[-1]) < torch.tensor(lens)[:, None]
    assert torch.equal(
        mk(0.0).plan(probe(attn, lens, n_kv)), real[None, :, None].expand(attn.shape[0], -1, n_kv, -1)
    )
    lo, hi = sorted((kw["threshold"], t2))
    a, b = mk(lo).plan(probe(attn, lens, n_kv)), mk(hi).plan(probe(attn, lens, n_kv))
    assert (a.sum(-1) >= b.sum(-1)).all()
    assert torch.equal(mk(lo).plan(probe(attn * 4, lens, n_kv)), a)
    for i, n in enumerate(lens):
        assert torch.equal(mk(lo).plan(probe(attn[:, i : i + 1, ..., :n], [n], n_kv))[:, 0], a[:, i, :, :n])


def test_hand_worked():
    # one layer, one KV head of two query heads, 7 keys, sinks 1; head scores (sum of both rows):
    # [.30, .02, .01, .05, .02, .10, .50] -> candidates 1..5 evicted lowest first: 2 (.01), 1 (.02, older
    # than 4), 4 (.02), 3 (.05), 5 (.10); total 1.0
    attn = torch.tensor(
        [[0.20, 0.01, 0.00, 0.03, 0.01, 0.05, 0.20], [0.10, 0.01, 0.01, 0.02, 0.01, 0.05, 0.30]]
    )[None, None, :, None]
    lens = [7]
    policy = lambda t: refreekv.make("refreekv-topp", threshold=t, sinks=1, protected=())
    kept = lambda t: torch.nonzero(policy(t).plan(probe(attn, lens, 1))[0, 0, 0]).flatten().tolist()
    assert kept(0.0) == [0, 1, 2, 3, 4, 5, 6]
    assert kept(0.01) == [0, 1, 3, 4, 5, 6]
    assert kept(0.03) == [0, 3, 4, 5, 6]
    assert kept(0.05) == [0, 3, 5, 6]
    assert kept(0.1) == [0, 5, 6]
    assert kept(0.2) == [0, 6]  # the last token and the sink stay whatever T
    assert kept(1.0) == [0, 6]
