"""Pruning during decoding (engine/pruning.py): re-plans every `interval` generated tokens and under
pool pressure, compacted in place in the paged pool.

The oracle is transformers itself: one teacher-forced forward over prompt + generated tokens with an
explicit 4-D attention mask in which every query row sees what the engine's cache held when that
token was decoded (the prompt whole for the prompt's rows; after each eviction, only the survivors),
and the original RoPE positions. The eviction rule the mask follows is written here from the
policy's description (StreamingLLM's rolling window), not taken from the engine."""

import pytest
import torch
from helpers import hf_model, small_engine
from hypothesis import given
from hypothesis import strategies as st

import refreekv
from engine.engine import Engine
from engine.sampling import Sampling

W = 8  # the engine's default decode window: the last W tokens of a row always stay


def rolling_visibility(n, new, budget, sinks, interval, window=None):
    """For prompt length n and `new` generated tokens, the positions each query row sees: prompt
    rows causally; decode rows the survivors of every rolling-window cut so far, plus themselves.
    The prefill cut keeps the first min(sinks, k) and the last k - that of the prompt (k = min(budget,
    n)); after the decode step that wrote the g-th generated token (g a multiple of interval), the
    cache is cut the same way with k = min(budget, n + g), the last W tokens kept whatever k is."""

    def cut(cache, k):
        k = min(k, len(cache))
        s = min(sinks, k)
        kept = cache[:s] + cache[len(cache) - (k - s) :] if k > s else cache[:s]
        kept = sorted(set(kept) | set(cache[-W:]))
        return kept

    rows = [list(range(p + 1)) for p in range(n)]
    cache = cut(list(range(n)), min(budget, n))
    for g in range(new - 1):  # the query fed at position n + g (the last token is never fed)
        p = n + g
        cache = cache + [p]
        rows.append(list(cache))
        if interval and (g + 1) % interval == 0:
            cache = cut(cache, min(budget, p + 1))
    if window:
        rows = [[k for k in r if p - k < window] for p, r in enumerate(rows)]
    return rows


def oracle_logits(hf, tokens, rows):
    """transformers' logits at every position of `tokens` with query p seeing rows[p] only."""
    T = len(tokens)
    mask = torch.full((1, 1, T, T), torch.finfo(torch.float32).min)
    for p, seen in enumerate(rows):
        mask[0, 0, p, seen] = 0.0
    with torch.no_grad():
        out = hf(
            torch.tensor([tokens]),
            attention_mask=mask,
            position_ids=torch.arange(T)[None],
        )
    return out.logits[0]


def check_against_oracle(hf, prompt, res, budget, sinks, interval, window):
    n = len(prompt)
    toks = prompt + res.tokens
    rows = rolling_visibility(n, len(res.tokens), budget, sinks, interval, window)
    logits = oracle_logits(hf, toks[: len(rows)], rows)
    want = logits[n - 1 :].argmax(-1).tolist()
    assert res.tokens == want[: len(res.tokens)]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_rolling_window_equals_transformers_with_evicted_positions_masked(tiny_ckpts, family):
    path = tiny_ckpts[family, False]
    hf = hf_model(path)
    window = getattr(hf.config, "sliding_window", None) if family == "mistral" else None
    eng = Engine(str(path), device="cpu", page_size=4, max_seqs=4)
    eng.eos = set()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (30, 17, 41)]
    budget, sinks, interval = 20, 3, 5
    pol = refreekv.make("streaming", budget=budget, sinks=sinks, interval=interval)
    res = eng.generate(prompts, pol, Sampling(max_new_tokens=40))
    for p, r in zip(prompts, res):
        assert r.stats["replans"] == (40 - 1) // interval
        assert r.stats["final_kept"] <= budget + interval
        check_against_oracle(hf, p, r, budget, sinks, interval, window)


def test_rolling_window_oracle_holds_under_preemption(tiny_ckpts, monkeypatch):
    """Continuous batching through a pool too small for everyone: sequences wait, are preempted,
    replay their tokens (and their re-plans) and still equal the oracle. Probes bounded to one
    sequence each (PROBE_BYTES) change nothing."""
    import engine.pruning as prune

    monkeypatch.setattr(prune, "PROBE_BYTES", 1)
    path = tiny_ckpts["qwen2", False]
    hf = hf_model(path)
    eng = small_engine(path, 28, page_size=4, max_seqs=4)
    eng.eos = set()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (40, 33, 25, 47, 18, 36)]
    budget, sinks, interval = 40, 4, 10
    pol = refreekv.make("streaming", budget=budget, sinks=sinks, interval=interval)
    res = eng.generate(prompts, pol, Sampling(max_new_tokens=60))
    assert eng.stats["preemptions"] > 0
    for p, r in zip(prompts, res):
        check_against_oracle(hf, p, r, budget, sinks, interval, None)
    assert eng.kv.n_free == eng.kv.n_pages


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_keeping_everything_changes_no_token_on_the_bundled_models(name):
    """T = 0 (L2 and mass) and budgets of 100%, re-planned every 8 tokens: the tokens of the full
    cache (one prompt, every policy a fork of it)."""
    from weights.bundled import ensure_bundled

    eng = Engine(str(ensure_bundled(name)), device="cpu")
    ids = eng.encode("Write a long story about a lighthouse keeper and a storm.")
    pols = [
        refreekv.make("full"),
        refreekv.make("refreekv", threshold=0.0, interval=8),
        refreekv.make("refreekv", threshold=0.0, metric="mass", interval=8),
        refreekv.make("snapkv", budget=1.0, interval=8),
        refreekv.make("streaming", budget=1.0, interval=8),
    ]
    base, *rest = eng.generate([ids], pols, Sampling(max_new_tokens=33))[0]
    assert len(base.tokens) == 33
    for r in rest:
        assert r.stats["replans"] == 3  # at 8, 16, 24 generated (the 33rd token is never fed)
        assert r.tokens == base.tokens
        assert r.stats["final_kept"] == len(ids) + 33 - 1


def test_pressure_prunes_before_anyone_is_preempted(tiny_ckpts):
    """A pool too small for four long outputs: with on_pressure the running sequences give pages
    back instead of being preempted; without it, they are preempted."""
    path = tiny_ckpts["llama", False]
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (20, 22, 24, 26)]
    s = Sampling(max_new_tokens=70)
    figures = {}
    for pressure in (False, True):
        eng = small_engine(path, 48, page_size=4, max_seqs=4)
        eng.eos = set()
        pol = refreekv.make("streaming", budget=0.5, interval=0, on_pressure=True) if pressure else None
        res = eng.generate(prompts, pol or refreekv.make("streaming", budget=0.5), s)
        figures[pressure] = eng.stats["preemptions"], sum(r.stats.get("replans_pressure", 0) for r in res)
        assert eng.kv.n_free == eng.kv.n_pages
    assert figures[False][0] > 0 and figures[False][1] == 0
    assert figures[True][0] < figures[False][0] and figures[True][1] > 0


# ------------------------------------------------------------------------- properties of a re-plan
def random_probe(L, B, Hkv, G, N, seed):
    """A DecodeProbe with random rows: per-(layer, sequence) lengths (equal across KV heads when
    `same`), random causal softmax rows over the live slots."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, N + 1, (L, B, 1), generator=g).expand(L, B, Hkv).clone()
    seen = torch.full((B,), N + 20)
    prompt = torch.full((B,), N + 10)
    real = torch.arange(N) < lens[..., None]
    pos = torch.where(real, torch.arange(N) + (seen[None, :, None, None] - lens[..., None]), -1)
    w = 4
    scores = torch.randn(L, B, Hkv * G, w, N, generator=g) * 3
    mask = real.repeat_interleave(G, 2)[..., None, :].expand(L, B, Hkv * G, w, N)
    attn = scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    queries = torch.full((B,), w)
    return refreekv.DecodeProbe(attn, lens, pos, seen, prompt, queries, Hkv)


@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.sampled_from([(1, 2), (2, 2), (2, 1)]),
    st.integers(1, 40),
    st.integers(0, 10**6),
    st.sampled_from(["streaming", "snapkv"]),
    st.sampled_from([0.3, 0.7, 5, 17]),
)
def test_fixed_budget_rows_never_exceed_their_bound_and_keep_sinks_and_window(L, B, heads, N, seed, name, b):
    Hkv, G = heads
    pr = random_probe(L, B, Hkv, G, N, seed)
    pol = refreekv.make(name, budget=b) if name == "snapkv" else refreekv.make(name, budget=b, sinks=2)
    keep = pol.replan(pr)
    assert keep.shape == pr.real.shape and not (keep & ~pr.real).any()
    k = refreekv.decode_budget(b, pr)  # tokens per row, of the tokens seen
    bound = torch.minimum(k[None, :, None], pr.lens)
    assert (keep.sum(-1) == bound).all()
    j = torch.arange(N)
    if name == "streaming":  # the sinks
        assert (keep | ~(j < torch.minimum(bound, torch.tensor(2))[..., None])).all()
    else:  # snapkv keeps its observation window (the last min(window, k) slots)
        win = torch.minimum(torch.minimum(pr.lens, torch.tensor(pol.probe_rows)), bound)
        assert (keep | ~((j >= (pr.lens - win)[..., None]) & pr.real)).all()


@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 40),
    st.integers(0, 10**6),
    st.sampled_from([0.0, 0.01, 0.1, 0.5]),
    st.sampled_from(["l2", "mass"]),
)
def test_threshold_free_decode_cut_keeps_the_gap_within_T(L, B, N, seed, T, metric):
    """The kept suffix of each (layer, sequence) row: sinks + a suffix whose gap (gap_reference, the
    loop form, on the decode scores) is <= T, and the next deeper cut would pass T."""
    from refreekv.refreekv import decode_scores, gap_reference

    pr = random_probe(L, B, 2, 2, N, seed)
    pol = refreekv.make("refreekv", threshold=T, metric=metric, protected=())
    keep = pol.replan(pr)
    a = decode_scores(pr)
    for l in range(L):
        for b in range(B):
            n = int(pr.lens[l, b, 0])
            row = keep[l, b, 0, :n].tolist()
            assert all(row[: min(4, n)]), "a sink was evicted"
            assert (keep[l, b] == keep[l, b, :1]).all(), "KV heads of a layer cut apart"
            if n <= 4:
                assert all(row)
                continue
            p = next((j for j in range(4, n) if row[j]), n)
            assert all(row[p:]) and not any(row[4:p]), "not sinks + one suffix"
            gaps = gap_reference(a[l, b], n, 4, metric=metric)
            assert gaps[p - 4] <= T + 1e-9
            if T > 0 and p < n:
                assert p - 4 + 1 >= len(gaps) or gaps[p - 4 + 1] > T - 1e-9


@given(st.integers(0, 10**6), st.sampled_from(["refreekv", "snapkv", "streaming"]))
def test_a_replan_conserves_pages_and_keeps_the_last_window(tiny_ckpts, seed, name):
    """Through the engine: after every re-plan, free + owned = the pool, each row owns exactly the
    pages of its length, and the last W tokens of each row are the newest W positions."""
    eng = _pages_engine(tiny_ckpts)
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(5, 40, (3,), generator=g).tolist()
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lens]
    kw = dict(threshold=0.3, protected=()) if name == "refreekv" else dict(budget=0.4)
    pol = refreekv.make(name, interval=int(torch.randint(1, 9, (1,), generator=g)), **kw)
    kv = eng.kv
    checks = []
    import engine.pruning as prune

    real_replan = prune.replan

    def rows(q):  # each row's positions in slot order
        out = []
        for l in range(kv.L):
            for h in range(kv.H):
                page = kv.h_table[l, q.slot, h]
                n = int(kv.h_len[l, q.slot, h])
                out.append([int(kv.pos[page[j // kv.ps], j % kv.ps]) for j in range(n)])
        return out

    def spy(runner, seqs, pressure=False):
        before = {id(q): rows(q) for q in seqs}
        out = real_replan(runner, seqs, pressure)
        owned = int(kv.h_pages.sum())
        checks.append(kv.n_free + owned == kv.n_pages)
        checks.append(bool((kv.h_pages == kv.pages_for(kv.h_len)).all()))
        for q in seqs:
            if q.slot < 0:
                continue
            for old, new in zip(before[id(q)], rows(q)):
                checks.append(set(new) <= set(old) and new == sorted(new))  # survivors, in order
                checks.append(new[-W:] == old[-W:])  # the last W stay
        return out

    prune.replan = spy
    try:
        eng.generate(prompts, pol, Sampling(max_new_tokens=25))
    finally:
        prune.replan = real_replan
    assert checks and all(checks)
    assert kv.n_free == kv.n_pages


_ENG = {}


def _pages_engine(tiny_ckpts):
    if "eng" not in _ENG:
        eng = small_engine(tiny_ckpts["llama", False], 40, page_size=4, max_seqs=3)
        eng.eos = set()
        _ENG["eng"] = eng
    return _ENG["eng"]


def test_decode_knobs_are_checked(tiny_ckpts):
    from weights.errors import UserError

    with pytest.raises(UserError, match="does not prune during decoding"):
        refreekv.make("h2o", interval=8)
    with pytest.raises(UserError, match="interval must be a whole number"):
        refreekv.make("refreekv", interval=-1)
    with pytest.raises(UserError, match="on_pressure must be true or false"):
        refreekv.make("snapkv", on_pressure="yes")
    eng = Engine(str(tiny_ckpts["llama", False]), device="cpu", decode_window=4)
    with pytest.raises(UserError, match="reads 8 queries but the engine keeps the last 4"):
        eng.core.add_request([5, 6, 7], refreekv.make("snapkv", interval=16), Sampling(max_new_tokens=4))


def test_a_failing_replan_ends_its_own_sequences_and_stats_are_per_admission(tiny_ckpts):
    """A policy whose replan raises ends its sequences with finish reason "error" (the others run
    on, their re-plans counted once per admission even when preempted and replayed)."""

    from refreekv.streaming import StreamingLLM

    class Broken(StreamingLLM):
        def replan(self, probe):
            raise RuntimeError("boom")

    eng = small_engine(tiny_ckpts["qwen2", False], 28, page_size=4, max_seqs=4)
    eng.eos = set()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (40, 33, 25, 47, 18, 36)]
    good = refreekv.make("streaming", budget=40, interval=10)
    bad = Broken(budget=40)
    bad.interval = 10
    ok_ids = [eng.core.add_request(p, good, Sampling(max_new_tokens=60)) for p in prompts]
    bad_id = eng.core.add_request(prompts[0], bad, Sampling(max_new_tokens=60))
    results = {}
    while eng.core.busy():
        for u in eng.core.step():
            if u.result is not None:
                results[u.key] = u.result
    assert results[bad_id].finish_reason == "error" and "boom" in results[bad_id].error
    assert len(results[bad_id].tokens) == 10  # it ended at its first re-plan
    assert "replans" not in results[bad_id].stats
    for i in ok_ids:
        r = results[i]
        assert r.finish_reason == "length" and len(r.tokens) == 60
        assert r.stats["replans"] == 5 and len(r.stats["budget_trace"]) == 5
    assert eng.core.sched.preemptions > 0
    assert eng.kv.n_free == eng.kv.n_pages
