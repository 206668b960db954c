"""Hypothesis invariants of the ReFreeKV cut (../shared/REFREEKV.md) and its loop reference."""

import math

import torch
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import refreekv
from refreekv.refreekv import (
    ReFreeKV,
    cut_positions,
    cut_reference,
    gap_reference,
    row_scores,
)

SET = settings(max_examples=examples(60), deadline=None)


@st.composite
def scores(draw, max_l=3, max_b=3, max_h=4, max_n=40, garbage=False):
    """Per-layer last-row attention [L, B, H, N] (softmax rows), prompt lengths [B]. Besides strictly
    positive rows: exact zeros (keys a sliding window hides), rows with all their mass on the first
    keys (the sinks), all-zero rows (a probe row before the prompt start); with `garbage`, padding
    slots hold garbage instead of zeros (the cut must never read them)."""
    L, B, H = draw(st.integers(1, max_l)), draw(st.integers(1, max_b)), draw(st.integers(1, max_h))
    lens = draw(st.lists(st.integers(1, max_n), min_size=B, max_size=B))
    N = max(lens)
    seed = draw(st.integers(0, 2**31 - 1))
    sharp = draw(st.sampled_from([0.5, 2.0, 6.0]))
    kind = draw(st.sampled_from(["positive", "positive", "zeros", "on_first", "all_zero"]))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(L, B, H, N, generator=g, dtype=torch.float64) * sharp
    pos = torch.arange(N)
    lt = torch.tensor(lens)[None, :, None, None]
    hidden = torch.zeros_like(logits, dtype=torch.bool)
    if kind == "zeros":  # a random share of keys gets exactly zero attention (never the last one)
        hidden = (torch.rand(logits.shape, generator=g) < 0.5) & (pos < lt - 1)
    elif kind == "on_first":  # every key past the first few gets exactly zero
        hidden = (pos >= draw(st.integers(1, 6))) & (pos < lt - 1) | (
            (pos >= 1) & (pos == lt - 1) & draw(st.booleans())
        )
    a = logits.masked_fill(hidden | (pos >= lt), -math.inf).softmax(-1).nan_to_num(0.0)
    if kind == "all_zero":
        a = a * (torch.rand(L, B, 1, 1, generator=g) < 0.5)
    if garbage:
        a = torch.where(pos >= lt, torch.rand(a.shape, generator=g, dtype=torch.float64) * 3, a)
    return a, torch.tensor(lens)


def probe_of(a, lens, kv_heads=1):
    return refreekv.Probe(a[:, :, :, None].float(), lens, a.shape[0], kv_heads, a.shape[-1])


thresholds = st.sampled_from([0.0, 1e-4, 1e-3, 0.01, 0.05, 0.2, 0.5, 1.0])
# the gap's forms: the authors' code (L2, sinks out), the paper text (sinks in), evicted mass (ours)
forms = st.tuples(st.booleans(), st.sampled_from(["l2", "mass"]))


@SET
@given(scores(), st.integers(0, 6), forms)
def test_t0_keeps_everything(sa, sinks, form):
    """Zero-attention keys included: `cut_positions([.5, 0, 0, .2, .3], T=0, sinks=1)` once cut at 3."""
    a, lens = sa
    p = cut_positions(a, lens, 0.0, sinks, *form)
    assert torch.equal(p, torch.minimum(torch.full_like(p, sinks), lens[None].expand_as(p)))


def test_t0_keeps_zero_attention_keys_and_t_above_0_drops_them():
    a = torch.tensor([[[[0.5, 0.0, 0.0, 0.2, 0.3]]]], dtype=torch.float64)
    lens = torch.tensor([5])
    assert cut_positions(a, lens, 0.0, 1).item() == 1
    assert cut_positions(a, lens, 1e-9, 1).item() == 3  # the zero-mass prefix goes as soon as T > 0
    assert cut_reference(a[0, 0], 5, 0.0, 1) == 1 and cut_reference(a[0, 0], 5, 1e-9, 1) == 3
    keep = ReFreeKV(threshold=0.0, sinks=1, protected=()).plan(
        probe_of(torch.zeros(2, 1, 3, 6), torch.tensor([6]))
    )
    assert keep.all()  # all-zero probe rows: nothing to measure, T = 0 keeps every key


@SET
@given(scores(), st.integers(0, 6), thresholds, thresholds, forms)
def test_monotone_in_threshold(sa, sinks, t1, t2, form):
    a, lens = sa
    lo, hi = sorted((t1, t2))
    assert (cut_positions(a, lens, lo, sinks, *form) <= cut_positions(a, lens, hi, sinks, *form)).all()


@SET
@given(scores(garbage=True), st.integers(0, 6), thresholds, forms)
def test_cut_is_deepest_within_threshold_and_matches_loop(sa, sinks, t, form):
    """Minimality: gap[j*] <= T and gap[j*+1] > T; equals the per-layer loop reference (float
    rounding of the suffix sums is ~1e-15, so disagreement is allowed only within 1e-9 of T)."""
    a, lens = sa
    p = cut_positions(a, lens, t, sinks, *form)
    for l in range(a.shape[0]):
        for b, n in enumerate(lens.tolist()):
            got, ref = p[l, b].item(), cut_reference(a[l, b], n, t, sinks, *form)
            if n <= sinks:
                assert got == ref == n
                continue
            g = gap_reference(a[l, b], n, sinks, *form)
            j = got - sinks
            if t == 0:
                assert j == 0 and ref == sinks
                continue
            assert 0 <= j < n - sinks and g[j] <= t + 1e-9
            assert j + 1 == len(g) or g[j + 1] > t - 1e-9
            assert got == ref or abs(g[ref - sinks] - t) < 1e-9 or abs(g[j] - t) < 1e-9


@SET
@given(scores(), st.integers(0, 6), thresholds, st.integers(-20, 20), forms)
def test_scale_invariance(sa, sinks, t, k, form):
    """Powers of two scale exactly in floating point; any other c > 0 can only move a cut whose gap
    lies within rounding of T."""
    a, lens = sa
    assert torch.equal(
        cut_positions(a, lens, t, sinks, *form), cut_positions(a * 2.0**k, lens, t, sinks, *form)
    )


@SET
@given(scores(), st.integers(0, 6), thresholds)
def test_mass_gap_bounds_the_evicted_softmax_share(sa, sinks, t):
    """metric="mass" with the sinks in the total: the evicted share of each layer's last-row softmax
    (mean over heads) is at most T, and evicting one more candidate would exceed it."""
    a, lens = sa
    p = cut_positions(a, lens, t, sinks, True, "mass")
    for l in range(a.shape[0]):
        for b, n in enumerate(lens.tolist()):
            j = p[l, b].item()
            evicted = a[l, b, :, sinks:j].sum(-1).mean().item()  # rows sum to 1
            assert evicted <= t + 1e-12
            if sinks <= j < n - 1:
                assert a[l, b, :, sinks : j + 1].sum(-1).mean().item() > t - 1e-12


@SET
@given(scores(max_l=4), st.integers(0, 6), thresholds, st.lists(st.integers(0, 3), max_size=3))
def test_plan_shape_sinks_suffix_protected_budget(sa, sinks, t, protected):
    a, lens = sa
    L, B, H, N = a.shape
    keep = ReFreeKV(threshold=t, sinks=sinks, protected=tuple(protected)).plan(probe_of(a, lens, kv_heads=2))
    assert keep.shape == (L, B, 2, N) and torch.equal(keep[:, :, 0], keep[:, :, 1])  # one cut shared by heads
    for l in range(L):
        for b, n in enumerate(lens.tolist()):
            row = keep[l, b, 0].tolist()
            assert not any(row[n:])  # padding never kept
            assert all(row[: min(sinks, n)]) and row[n - 1]  # sinks and the last token
            kept = [i for i in range(n) if row[i]]
            rest = [i for i in kept if i >= sinks]
            assert rest == list(range(rest[0], n)) if rest else True  # sinks U one suffix
            if l in protected:
                assert len(kept) == n
            assert min(sinks + 1, n) <= len(kept) <= n  # budget in [(m+1)/n, 1]


@SET
@given(scores(max_b=4), st.integers(0, 6), thresholds)
def test_batch_independence(sa, sinks, t):
    a, lens = sa
    keep = ReFreeKV(threshold=t, sinks=sinks).plan(probe_of(a, lens))
    for b, n in enumerate(lens.tolist()):
        alone = ReFreeKV(threshold=t, sinks=sinks).plan(
            probe_of(a[:, b : b + 1, :, :n].contiguous(), lens[b : b + 1])
        )
        assert torch.equal(alone[:, 0], keep[:, b, :, :n])


def test_row_scores_divides_by_rows_that_see_each_key():
    attn = torch.zeros(1, 1, 1, 3, 5)
    attn[0, 0, 0, 0, :3] = torch.tensor([0.2, 0.3, 0.5])  # query at position 2
    attn[0, 0, 0, 1, :4] = torch.tensor([0.1, 0.1, 0.4, 0.4])  # position 3
    attn[0, 0, 0, 2, :5] = 0.2  # position 4
    s = row_scores(attn, torch.tensor([5]))[0, 0, 0]
    expected = torch.tensor(
        [(0.2 + 0.1 + 0.2) / 3, (0.3 + 0.1 + 0.2) / 3, (0.5 + 0.4 + 0.2) / 3, (0.4 + 0.2) / 2, 0.2]
    )
    assert torch.allclose(s, expected)


def test_hand_worked_cut():
    # one head, sinks 1: candidates 1..4 with attention .01 .01 .48 .48 (+ sink .02)
    a = torch.tensor([[[[0.02, 0.01, 0.01, 0.48, 0.48]]]], dtype=torch.float64)
    lens = torch.tensor([5])
    # base = sqrt(2*.01^2 + 2*.48^2); dropping the two .01 loses (base - sqrt(2)*.48)/base ~ 2.2e-4
    assert cut_positions(a, lens, 1e-3, 1).item() == 3
    assert cut_positions(a, lens, 1.5e-4, 1).item() == 2  # dropping one .01 loses ~1.08e-4
    assert cut_positions(a, lens, 1e-4, 1).item() == 1
    assert cut_positions(a, lens, 0.3, 1).item() == 4  # dropping one .48 too loses 1 - 1/sqrt(2) ~ 0.29
    # paper form: the sink's attention counts in the norm, so the same cut loses slightly less
    assert cut_positions(a, lens, 0.2929, 1, include_sinks=True).item() == 4


@SET
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(0, 4), thresholds, forms)
def test_multi_row_probe_with_garbage_padding_matches_a_loop(seed, rows, sinks, t, form):
    """rows > 1: each key's score is the mean attention over the probe rows that can see it (a row
    at position r sees keys <= r; rows before the prompt start see nothing). Padding slots hold
    garbage; the plan must equal this loop, written without the policy's helpers."""
    g = torch.Generator().manual_seed(seed)
    L, B, H, N = 2, 3, 2, 12
    lens = torch.randint(1, N + 1, (B,), generator=g)
    attn = torch.rand(L, B, H, rows, N, generator=g) * 5  # garbage everywhere first
    for b, n in enumerate(lens.tolist()):
        for r in range(rows):
            q = n - rows + r  # absolute position of probe row r
            if q >= 0:  # a softmax over keys <= q; keys in (q, n) are causally hidden (0); >= n stays garbage
                row = torch.rand(L, H, q + 1, generator=g, dtype=torch.float64)
                attn[:, b, :, r, : q + 1] = (row / row.sum(-1, keepdim=True)).float()
                attn[:, b, :, r, q + 1 : n] = 0.0
            else:
                attn[:, b, :, r, :] = 0.0  # rows before the prompt start are zero (Probe's contract)
    keep = ReFreeKV(
        threshold=t, sinks=sinks, rows=rows, protected=(), include_sinks=form[0], metric=form[1]
    ).plan(refreekv.Probe(attn, lens, L, 1, N))
    for l in range(L):
        for b, n in enumerate(lens.tolist()):
            sc = torch.zeros(H, n, dtype=torch.float64)
            for j in range(n):
                seers = [r for r in range(rows) if 0 <= n - rows + r and j <= n - rows + r]
                if seers:
                    sc[:, j] = sum(attn[l, b, :, r, j].double() for r in seers) / len(seers)
            p = cut_reference(sc, n, t, sinks, *form)
            want = [j < min(sinks, n) or j >= p for j in range(n)] + [False] * (N - n)
            got = keep[l, b, 0].tolist()
            if got != want:  # only a cut whose gap lies within float32 rounding of T may move
                g_ = gap_reference(sc, n, sinks, *form)
                assert any(abs(x - t) < 1e-6 for x in g_), (l, b, got, want)


def test_plan_memory_is_a_small_multiple_of_the_probe():
    """A 7B-shaped probe (28 layers x 28 heads) of 8k tokens: the plan's peak RSS growth stays under
    3x the probe's size (the cut runs layer by layer; all layers at once in float64 took ~15x)."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import resource, torch
torch.set_num_threads(1)
import refreekv
L, H, N = 28, 28, 8192
attn = torch.rand(L, 1, H, 1, N, generator=torch.Generator().manual_seed(0))
attn /= attn.sum(-1, keepdim=True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
refreekv.make("refreekv").plan(refreekv.Probe(attn, torch.tensor([N]), L, 4, N))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, attn.numel() * 4)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()
    grow, probe = int(out[-2]), int(out[-1])
    assert grow < 3 * probe, (grow, probe)
