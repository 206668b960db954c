"""The threshold-free forms of issue 28 (refreekv-union, refreekv-snap), each against a plain-loop
reference written from its docstring, on dyadic probes (every sum exact, so ties are real ties)."""

import pytest
from helpers import examples, probe, probes
from hypothesis import given, settings
from hypothesis import strategies as st

import refreekv

SET = settings(max_examples=examples(40), deadline=None)
# off the dyadic grid: refreekv-snap's normalised shares are not exact, so a threshold that a
# cumulative share could hit exactly would test float rounding, not the rule
THRESHOLDS = st.sampled_from([0.0, 0.013, 0.047, 0.21, 0.37, 0.9])


def evicted(scores: dict, cands: list, threshold: float, total: float) -> set:
    """Candidates lowest first (ties: the earlier in `cands`) while the evicted mass <= T x total."""
    out, mass = set(), 0.0
    for j in sorted(cands, key=lambda j: (scores[j], cands.index(j))):
        mass += scores[j]
        if threshold == 0 or mass > threshold * total:
            break
        out.add(j)
    return out


def group_votes(attn, layer, b, h, group, row, n):
    return [sum(float(attn[layer, b, h * group + g, row, j]) for g in range(group)) for j in range(n)]


@SET
@given(probes(), THRESHOLDS, st.sampled_from([1, 3, 7]), st.integers(0, 3), st.booleans())
def test_union_matches_loops(case, threshold, kernel, sinks, protect_first):
    attn, lens, n_kv = case
    L, B, H, w, N = attn.shape
    protected = (0,) if protect_first else ()
    pol = refreekv.make(
        "refreekv-union", threshold=threshold, window=w, kernel=kernel, sinks=sinks, protected=protected
    )
    keep = pol.plan(probe(attn, lens, n_kv))
    for layer in range(L):
        for b, n in enumerate(lens):
            always = {j for j in range(n) if j < sinks or j >= n - w}
            cands = [j for j in range(n) if j not in always]
            for h in range(n_kv):
                want = set(range(n)) if layer in protected else set(always)
                if layer not in protected:
                    for r in range(w):
                        if n - w + r < 0:  # a row before the prompt's start votes for nothing
                            continue
                        v = group_votes(attn, layer, b, h, H // n_kv, r, n)
                        s = {j: v[j] for j in range(n)}
                        for j in cands:  # max-pooled over the candidates around j
                            near = [v[t] for t in range(j - kernel // 2, j + kernel // 2 + 1) if t in cands]
                            s[j] = max(near)
                        want |= set(cands) - evicted(s, cands, threshold, sum(s.values()))
                got = {int(j) for j in keep[layer, b, h].nonzero().flatten()}
                assert got == want, (layer, b, h)


@SET
@given(probes(), THRESHOLDS, st.sampled_from([1, 3]), st.integers(0, 3), st.sampled_from(["layer", "kv"]))
def test_snap_matches_loops(case, threshold, kernel, sinks, share):
    attn, lens, n_kv = case
    L, B, H, w, N = attn.shape
    pol = refreekv.make(
        "refreekv-snap", threshold=threshold, window=w, kernel=kernel, sinks=sinks, share=share, protected=()
    )
    keep = pol.plan(probe(attn, lens, n_kv))
    group = H // n_kv
    for layer in range(L):
        for b, n in enumerate(lens):
            win = min(w, n)
            older = list(range(n - win))  # SnapKV pools over the keys before the window
            votes = [
                [sum(group_votes(attn, layer, b, h, group, r, n)[j] for r in range(w)) for j in range(n)]
                for h in range(n_kv)
            ]
            shares = {}
            for h in range(n_kv):
                pooled = {
                    j: max(votes[h][t] for t in range(j - kernel // 2, j + kernel // 2 + 1) if t in older)
                    for j in older
                    if j >= sinks
                }
                total = sum(pooled.values())
                shares[h] = {j: (x / total if total > 0 else 0.0) for j, x in pooled.items()}
            sets = [list(range(n_kv))] if share == "layer" else [[h] for h in range(n_kv)]
            gone = set()
            for heads in sets:  # the heads that share one cut, side by side (head-major)
                flat = {(h, j): shares[h][j] for h in heads for j in shares[h]}
                cands = sorted(flat)
                gone |= evicted(flat, cands, threshold, sum(flat.values()))
            for h in range(n_kv):
                want = {j for j in range(n) if (h, j) not in gone}
                assert {int(j) for j in keep[layer, b, h].nonzero().flatten()} == want, (layer, b, h)


@pytest.mark.parametrize("name", ["refreekv-union", "refreekv-snap"])
def test_bad_knobs_are_named(name):
    with pytest.raises(refreekv.UserError, match="threshold"):
        refreekv.make(name, threshold=1.5)
    with pytest.raises(refreekv.UserError, match="kernel"):
        refreekv.make(name, kernel=4)
