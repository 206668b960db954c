"""Fixed-budget baselines (streaming, h2o, snapkv) and the refreekv-h2o ablation: hand-worked
plans, Hypothesis invariants against plain loop references, end to end on a tiny model (the paged
pool under per-head plans: tests/test_per_head_pool.py)."""

import math
from fractions import Fraction

import pytest
import torch
from helpers import budgets, examples, probe, probes
from hypothesis import given, settings
from hypothesis import strategies as st

import refreekv
from refreekv import Probe, budget_tokens
from weights.errors import UserError

SET = settings(max_examples=examples(40), deadline=None)


def rows(keep):
    """[L, B, Hkv, N] bool -> nested lists of kept slot indices."""
    return [[[torch.nonzero(r).flatten().tolist() for r in hs] for hs in bs] for bs in keep]


# ---------------------------------------------------------------- budget semantics


def test_budget_tokens():
    n = torch.tensor([10, 3, 1, 7])
    assert budget_tokens(0.5, n).tolist() == [5, 2, 1, 4]  # ceil(budget * n)
    assert budget_tokens(0.3, n).tolist() == [3, 1, 1, 3]  # 0.3 * 10 = 3.0000000000000004 is still 3
    assert budget_tokens(0.7, n).tolist() == [7, 3, 1, 5]
    assert budget_tokens(1e-4, n).tolist() == [1, 1, 1, 1]  # at least one token
    assert budget_tokens(1.0, n).tolist() == [10, 3, 1, 7]  # 1.0 is the whole prompt
    assert budget_tokens(5, n).tolist() == [5, 3, 1, 5]  # > 1: a token count, capped at the prompt
    assert budget_tokens(5.0, n).tolist() == [5, 3, 1, 5]  # the CLI passes floats


@pytest.mark.parametrize(
    "name,kw",
    [
        ("streaming", dict(budget=0)),
        ("streaming", dict(budget=-0.5)),
        ("streaming", dict(budget=2.5)),
        ("streaming", dict(budget=float("nan"))),
        ("streaming", dict(budget=float("inf"))),
        ("streaming", dict(sinks=-1)),
        ("h2o", dict(budget=0)),
        ("h2o", dict(window=0)),
        ("h2o", dict(recent=-1)),
        ("h2o", dict(protected=[-1])),
        ("snapkv", dict(budget=0)),
        ("snapkv", dict(window=0)),
        ("snapkv", dict(kernel=4)),
        ("snapkv", dict(kernel=0)),
        ("refreekv-h2o", dict(window=0)),
        ("refreekv-h2o", dict(threshold=-1)),
        ("refreekv-h2o", dict(rows=0)),
        ("snapkv", dict(threshold=0.1)),
        ("refreekv-h2o", dict(budget=0.5)),
        ("refreekv-h2o", dict(include_sinks="false")),
        ("refreekv", dict(include_sinks=1)),
        ("streaming", dict(protected="01")),
        ("h2o", dict(protected=[True])),
    ],
)
def test_bad_knobs(name, kw):
    with pytest.raises(UserError):
        refreekv.make(name, **kw)


def test_registered_and_probe_rows():
    assert {"streaming", "h2o", "snapkv", "refreekv-h2o"} <= set(refreekv.available())
    assert refreekv.make("streaming").probe_rows == 0
    assert refreekv.make("h2o").probe_rows == refreekv.make("snapkv").probe_rows == 8
    assert refreekv.make("snapkv", window=3).probe_rows == 3
    assert refreekv.make("refreekv-h2o", rows=2, window=5).probe_rows == 5


# ---------------------------------------------------------------- hand-worked plans


def test_streaming_by_hand():
    p = Probe(None, torch.tensor([10, 6, 2]), 2, 2, 10)
    keep = refreekv.make("streaming", budget=0.5).plan(p)  # k = 5, 3, 1; sinks 4 counted inside
    assert rows(keep)[0] == [[[0, 1, 2, 3, 9]] * 2, [[0, 1, 2]] * 2, [[0]] * 2]
    assert rows(keep)[1] == rows(keep)[0]
    keep = refreekv.make("streaming", budget=6, sinks=2, protected=[1]).plan(p)
    assert rows(keep)[0] == [[[0, 1, 6, 7, 8, 9]] * 2, [[0, 1, 2, 3, 4, 5]] * 2, [[0, 1]] * 2]
    assert rows(keep)[1] == [[list(range(10))] * 2, [list(range(6))] * 2, [[0, 1]] * 2]  # protected layer


def test_h2o_by_hand():
    # one layer, 4 query heads over 2 KV heads (GQA 2), window 2 rows, n = 8, padding slot 8
    attn = torch.zeros(1, 1, 4, 2, 9)
    attn[0, 0, 0, 1, 1] = 0.5  # KV head 0: slot 1 gets .5 + .25 = .75 ...
    attn[0, 0, 1, 0, 1] = 0.25
    attn[0, 0, 1, 1, 4] = 0.5  # ... slot 4 gets .5, slot 0 .25
    attn[0, 0, 0, 0, 0] = 0.25
    attn[0, 0, 2, 0, 3] = 1.0  # KV head 1: slot 3 gets 1, slot 5 .75
    attn[0, 0, 3, 1, 5] = 0.75
    attn[0, 0, 2, 1, 7] = 1.0  # inside the recent window: no effect on the heavy hitters
    attn[0, 0, :, :, 8] = 9.0  # padding (garbage) is never kept
    # budget 5: recent = ceil(5/2) = 3 (slots 5, 6, 7), heavy = 2 among slots 0..4
    keep = refreekv.make("h2o", budget=5, window=2).plan(probe(attn, [8], n_kv_heads=2))
    assert rows(keep) == [[[[1, 4, 5, 6, 7], [3, 4, 5, 6, 7]]]]
    # KV head 1 has one positive score among 0..4: the tie among zeros goes to the latest slot
    # recent=1: slot 7 only, heavy = 4 among 0..6
    keep = refreekv.make("h2o", budget=5, window=2, recent=1).plan(probe(attn, [8], n_kv_heads=2))
    assert rows(keep) == [[[[0, 1, 4, 6, 7], [3, 4, 5, 6, 7]]]]


def test_snapkv_by_hand():
    # n = 20, window 4 (slots 16..19), kernel 7: spikes 1.0 at slot 2, .5 at 9, .9 at window slot 17
    attn = torch.zeros(1, 1, 1, 4, 21)
    attn[0, 0, 0, 3, 2] = 1.0
    attn[0, 0, 0, 2, 9] = 0.5
    attn[0, 0, 0, 0, 17] = 0.9
    attn[0, 0, 0, :, 20] = 5.0  # padding
    # pooled: slots 0..5 -> 1.0, 6..12 -> .5, 13..15 -> 0 (the window's .9 must not leak in)
    keep = refreekv.make("snapkv", budget=11, window=4).plan(probe(attn, [20]))
    assert rows(keep) == [[[[0, 1, 2, 3, 4, 5, 12, 16, 17, 18, 19]]]]  # 7 heavy: 0..5 + the latest .5 tie
    keep = refreekv.make("snapkv", budget=7, window=4).plan(probe(attn, [20]))
    assert rows(keep) == [[[[3, 4, 5, 16, 17, 18, 19]]]]  # 3 heavy among the 1.0 plateau: latest first
    keep = refreekv.make("snapkv", budget=3, window=4).plan(probe(attn, [20]))
    assert rows(keep) == [[[[17, 18, 19]]]]  # budget below the window: the last k tokens
    # k = 10, no pooling
    keep = refreekv.make("snapkv", budget=0.5, window=4, kernel=1).plan(probe(attn, [20]))
    assert rows(keep) == [[[[2, 9, 12, 13, 14, 15, 16, 17, 18, 19]]]]  # zero-score ties: latest


def test_refreekv_h2o_by_hand():
    # one head, sinks 1; last-row attention of candidates 1..7 (the sink's .5 is excluded)
    a = [0.5, 0.4, 0.01, 0.02, 0.3, 0.03, 0.2, 0.04]
    attn = torch.tensor(a)[None, None, None, None]
    # squares .16 1e-4 4e-4 .09 9e-4 .04 1.6e-3 (sum .293); eviction order by attention:
    # slots 2, 3, 5, 7, 6, 4, 1. Evicting 2, 3, 5, 7 leaves .29: gap 1 - sqrt(.29/.293) = .0051;
    # evicting 6 too leaves .25: gap .076 > T. So slots 2, 3, 5, 7 go (the last token among them).
    keep = refreekv.make("refreekv-h2o", window=1, protected=(), sinks=1).plan(probe(attn, [8]))
    assert rows(keep) == [[[[0, 1, 4, 6]]]]
    # ReFreeKV's positional order cannot drop slot 1 (.4): it keeps everything
    assert rows(refreekv.make("refreekv", protected=(), sinks=1).plan(probe(attn, [8]))) == [
        [[list(range(8))]]
    ]
    keep = refreekv.make("refreekv-h2o", window=1, protected=(), sinks=1, threshold=0.1).plan(
        probe(attn, [8])
    )
    # gap after evicting 6: .076 <= .1; after 4: 1 - sqrt(.16/.293) = .26
    assert rows(keep) == [[[[0, 1, 4]]]]
    keep = refreekv.make("refreekv-h2o", window=1, sinks=1).plan(probe(attn.expand(2, 1, 1, 1, 8), [8]))
    assert rows(keep)[0] == [[list(range(8))]]  # layers 0, 1 protected by default
    # ranking by the window (2 rows) but metric on the last row: the first row makes slot 7 the top
    attn2 = torch.cat([torch.zeros(8).index_fill(0, torch.tensor([7]), 1.0)[None], torch.tensor(a)[None]])
    keep = refreekv.make("refreekv-h2o", window=2, protected=(), sinks=1).plan(
        probe(attn2[None, None, None], [8])
    )
    assert rows(keep) == [[[[0, 1, 4, 6, 7]]]]  # 7 is ranked highest: evicting it is no longer cheap


# ---------------------------------------------------------------- loop references


def ref_k(budget, n):
    if budget <= 1:
        return min(max(math.ceil(Fraction(str(budget)) * n), 1), n)
    return min(int(budget), n)


def ref_scores(attn, l, b, kh, n_kv):
    """Python sum over the probe rows and the group's query heads: list over slots."""
    H, w, N = attn.shape[2:]
    G = H // n_kv
    a = attn[l, b].tolist()
    return [sum(a[h][r][j] for h in range(kh * G, (kh + 1) * G) for r in range(w)) for j in range(N)]


def ref_topk(scores, cands, k):
    """The k best candidates by (score, position), highest first: ties go to the later slot."""
    return set(sorted(cands, key=lambda j: (-scores[j], -j))[:k])


def ref_plan(name, kw, attn, lens, L, n_kv):
    """Plain per-(layer, sequence, KV head) loops for every method: list-of-sets [L][B][Hkv]."""
    out = []
    for l in range(L):
        out.append([])
        for b, n in enumerate(lens):
            out[l].append([])
            for kh in range(n_kv):
                if l in kw.get("protected", ()) or (
                    name == "refreekv-h2o" and l in kw.get("protected", (0, 1))
                ):
                    out[l][b].append(set(range(n)))
                    continue
                if name == "refreekv-h2o":
                    out[l][b].append(ref_refreekv_h2o(kw, attn, lens, l, b, n))
                    continue
                k = ref_k(kw["budget"], n)
                if name == "streaming":
                    s = min(kw.get("sinks", 4), k)
                    kept = set(range(s)) | set(range(n - (k - s), n))
                elif name == "h2o":
                    r = math.ceil(k / 2) if kw.get("recent") is None else min(kw["recent"], k)
                    sc = ref_scores(attn, l, b, kh, n_kv)
                    kept = ref_topk(sc, range(n - r), k - r) | set(range(n - r, n))
                else:  # snapkv
                    win = min(kw.get("window", 8), n)
                    kw_ = min(win, k)
                    sc = ref_scores(attn, l, b, kh, n_kv)
                    half, older = kw.get("kernel", 7) // 2, n - win
                    pooled = [
                        max(sc[i] for i in range(max(0, j - half), min(older, j + half + 1)))
                        for j in range(older)
                    ]
                    kept = ref_topk(pooled, range(older), k - kw_) | set(range(n - kw_, n))
                out[l][b].append(kept)
    return out


def ref_refreekv_h2o(kw, attn, lens, l, b, n):
    """Loops only, no policy helper: the metric is each key's mean attention over the probe rows that
    see it; candidates are ranked by accumulated window attention and cut by the L2 gap."""
    sinks, rows_, window, T = (
        kw.get("sinks", 4),
        kw.get("rows", 1),
        kw.get("window", 8),
        kw.get("threshold", 0.01),
    )
    if n <= sinks or T == 0:  # T = 0 keeps everything, zero-attention keys included
        return set(range(n))
    w = attn.shape[-2]
    pos = [n - w + r for r in range(w)][-rows_:]  # absolute positions of the metric's rows
    rows = attn[l, b, :, -rows_:].double()  # [H, rows, N]
    H = rows.shape[0]
    a = [[0.0] * n for _ in range(H)]
    for h in range(H):
        for j in range(n):
            seers = [i for i, q in enumerate(pos) if q >= 0 and j <= q]
            a[h][j] = sum(float(rows[h, i, j]) for i in seers) / len(seers) if seers else 0.0
    rank = [sum(x) for x in zip(*[r for h in attn[l, b, :, -window:].tolist() for r in h])]
    perm = list(range(sinks)) + sorted(range(sinks, n), key=lambda j: (rank[j], j))
    cand = [[a[h][j] for j in perm[sinks:]] for h in range(H)]  # in eviction order
    norm = lambda h, k: math.sqrt(sum(x * x for x in cand[h][k:]))
    base = sum(norm(h, 0) for h in range(H)) / H
    keep_from = 0
    for k in range(1, len(perm) - sinks):  # evict the first k candidates while the L2 gap stays <= T
        # no attention on any candidate: every gap is 0, and T > 0 evicts zero-mass keys
        # (REFREEKV.md's T = 0 rule)
        if base == 0 or (base - sum(norm(h, k) for h in range(H)) / H) / base <= T:
            keep_from = k
    return set(perm[:sinks]) | set(perm[sinks + keep_from :])


def test_refreekv_h2o_on_zero_attention_cuts_as_refreekv():
    """Found by the thorough Hypothesis profile (the loop reference kept everything when no candidate
    had attention): with T > 0 zero-mass keys go, as ReFreeKV's own cut does; T = 0 keeps them."""
    zero = probe(torch.zeros(1, 1, 1, 1, 2), [2], 1)
    for name in ("refreekv", "refreekv-h2o"):
        kw = dict(threshold=0.0137, sinks=0, protected=()) | ({"window": 1} if name == "refreekv-h2o" else {})
        assert as_sets(refreekv.make(name, **kw).plan(zero), [2]) == [[[{1}]]], name
        assert as_sets(refreekv.make(name, **kw | {"threshold": 0.0}).plan(zero), [2]) == [[[{0, 1}]]], name
    assert ref_refreekv_h2o(
        dict(threshold=0.0137, sinks=0, rows=1, window=1), torch.zeros(1, 1, 1, 1, 2), [2], 0, 0, 2
    ) == {1}


def as_sets(keep, lens):
    return [
        [
            [set(torch.nonzero(keep[l, b, h]).flatten().tolist()) for h in range(keep.shape[2])]
            for b in range(keep.shape[1])
        ]
        for l in range(keep.shape[0])
    ]


METHODS = ["streaming", "h2o", "snapkv", "refreekv-h2o"]


@st.composite
def method(draw, name):
    """(name, knobs, probe rows the method reads)."""
    protected = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    if name == "refreekv-h2o":
        kw = dict(
            threshold=draw(st.sampled_from([0.0, 0.0137, 0.0731, 0.2113, 0.5831])),
            sinks=draw(st.integers(0, 6)),
            rows=draw(st.integers(1, 3)),
            window=draw(st.integers(1, 5)),
            protected=protected,
        )
        return name, kw, max(kw["rows"], kw["window"])
    kw = dict(budget=draw(budgets), protected=protected)
    if name == "streaming":
        kw["sinks"] = draw(st.integers(0, 6))
        return name, kw, 1
    kw["window"] = draw(st.integers(1, 5))
    if name == "h2o":
        kw["recent"] = draw(st.one_of(st.none(), st.integers(0, 12)))
    else:
        kw["kernel"] = draw(st.sampled_from([1, 3, 7]))
    return name, kw, kw["window"]


@pytest.mark.parametrize("name", METHODS)
@SET
@given(data=st.data())
def test_plan_equals_loop_reference(name, data):
    """Exact plan (hence per-KV-head top-k, tie rule, budget, sinks/window/recent, padding) vs loops."""
    name, kw, w = data.draw(method(name))
    attn, lens, n_kv = data.draw(probes(w=w))
    L = attn.shape[0]
    keep = refreekv.make(name, **kw).plan(probe(attn, lens, n_kv))
    assert keep.dtype == torch.bool and keep.shape == (L, len(lens), n_kv, max(lens))
    assert as_sets(keep, lens) == ref_plan(name, kw, attn, lens, L, n_kv)


@pytest.mark.parametrize("name", METHODS)
@SET
@given(data=st.data())
def test_budget_window_sinks_padding(name, data):
    """Stated directly (not via the reference): exact count, always-kept slots, no padding."""
    name, kw, w = data.draw(method(name))
    attn, lens, n_kv = data.draw(probes(w=w))
    keep = refreekv.make(name, **kw).plan(probe(attn, lens, n_kv))
    for b, n in enumerate(lens):
        assert not keep[:, b, :, n:].any()  # padding never kept
        for l in range(attn.shape[0]):
            got = keep[l, b].sum(-1).tolist()
            if l in kw["protected"]:
                assert got == [n] * n_kv
                continue
            if name == "refreekv-h2o":
                s = min(kw["sinks"], n)
                assert keep[l, b, :, :s].all() and min(s + 1, n) <= got[0] <= n
                assert (keep[l, b] == keep[l, b, :1]).all()  # one set per layer
                continue
            k = ref_k(kw["budget"], n)
            assert got == [k] * n_kv  # exactly min(budget tokens, n) per row
            if name == "streaming":
                always = list(range(min(kw["sinks"], k))) + list(range(n - (k - min(kw["sinks"], k)), n))
            elif name == "h2o":
                always = range(n - (math.ceil(k / 2) if kw["recent"] is None else min(kw["recent"], k)), n)
            else:
                always = range(n - min(kw["window"], n, k), n)
            assert keep[l, b][:, list(always)].all()


@pytest.mark.parametrize("name", METHODS)
@SET
@given(data=st.data())
def test_batch_independence(name, data):
    """A sequence's plan is the same alone (no padding) as in a batch with others' lengths."""
    name, kw, w = data.draw(method(name))
    attn, lens, n_kv = data.draw(probes(w=w))
    policy = refreekv.make(name, **kw)
    keep = policy.plan(probe(attn, lens, n_kv))
    for b, n in enumerate(lens):
        alone = policy.plan(probe(attn[:, b : b + 1, ..., :n], [n], n_kv))
        assert torch.equal(alone[:, 0], keep[:, b, :, :n])


@SET
@given(
    probes(),
    st.integers(0, 6),
    st.integers(1, 3),
    st.sampled_from([0.0, 0.0137, 0.0731, 0.2113]),
    st.sampled_from([0.0731, 0.2113, 0.5831, 1.0]),
)
def test_refreekv_h2o_monotone_and_scale_invariant(pa, sinks, window, t1, t2):
    attn, lens, n_kv = pa
    lo, hi = sorted((t1, t2))
    mk = lambda t: refreekv.make(
        "refreekv-h2o", threshold=t, sinks=sinks, window=min(window, attn.shape[3]), protected=()
    )
    a, b = mk(lo).plan(probe(attn, lens, n_kv)), mk(hi).plan(probe(attn, lens, n_kv))
    assert (a.sum(-1) >= b.sum(-1)).all()
    assert torch.equal(mk(lo).plan(probe(attn * 4, lens, n_kv)), a)


# ---------------------------------------------------------------- end to end on a tiny model


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    from helpers import write_tiny

    from engine.engine import Engine

    return Engine(str(write_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")), device="cpu")


def test_end_to_end(tiny_generator):
    from engine.sampling import Sampling

    g = tiny_generator
    prompts = [list(range(5, 45)), list(range(50, 71))]
    run = lambda name, **kw: g.generate(prompts, refreekv.make(name, **kw), Sampling(max_new_tokens=12))
    full = run("full")
    assert [r.tokens for r in run("streaming", budget=1.0)] == [r.tokens for r in full]
    for name in ("streaming", "h2o", "snapkv"):
        for r, n in zip(run(name, budget=0.5), (40, 21)):
            assert r.stats["kept_per_layer"] == [math.ceil(n / 2)] * 3
    for r in run("refreekv-h2o"):
        assert r.stats["kept_per_layer"][:2] == [r.stats["prompt_tokens"]] * 2
