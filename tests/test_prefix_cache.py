"""The prefix cache: a prompt that starts with full page-sized blocks another prompt already
prefilled references their pages instead of prefilling them, and then everything a request sees is
what it would see without the cache: the same greedy tokens, prompt log-probabilities and kept
counts for every policy (pruning copies a row's kept tokens off the shared pages, so the cached
blocks stay whole for the next request), under preemption and under eviction. The oracle is the
same engine with the cache off."""

import pytest
import torch
from conftest import real_text
from helpers import examples, small_engine
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import refreekv
from engine.sampling import Sampling

POLICIES = {
    "full": {},
    "refreekv": dict(threshold=0.2),
    "snapkv": dict(budget=0.5, window=4),
    "h2o": dict(budget=0.4),
    "streaming": dict(budget=0.5),
    "expected-attention": dict(budget=0.5),  # reads every prompt query: never a hit
    "refreekv-decoding": dict(threshold=0.2, interval=5),  # re-plans while decoding: rows of its own
}


def policy(name):
    kw = POLICIES[name]
    return refreekv.make(name.removesuffix("-decoding"), **kw)


def shared_prompts(seed: int, n: int, context: int, suffixes: list[int]) -> list[list[int]]:
    """n prompts: one context of `context` tokens, then each its own suffix."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(3, 256, (context,), generator=g).tolist()
    return [ctx + torch.randint(3, 256, (s,), generator=g).tolist() for s in suffixes[:n]]


def generate(eng, prompts, name, new=6, logprobs=None):
    s = Sampling(max_new_tokens=new, prompt_logprobs=logprobs)
    out = []
    for p in prompts:  # one at a time: the later ones find the earlier ones' blocks
        (r,) = eng.generate([p], policy(name), s)
        out.append(r)
    return out


def same(a, b):
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.stats["kept_per_head"] for r in a] == [r.stats["kept_per_head"] for r in b]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_gives_the_same_tokens_and_kept_counts_with_the_cache(tiny_ckpts, family, name):
    path = tiny_ckpts[family, False]
    prompts = shared_prompts(1, 4, 37, [5, 11, 1, 20])
    plain = small_engine(path, 60)
    cached = small_engine(path, 60, prefix_cache=True)
    plain.eos = cached.eos = set()
    want = generate(plain, prompts, name)
    got = generate(cached, prompts, name)
    same(got, want)
    hits = [r.stats["cached_tokens"] for r in got]
    assert hits[0] == 0
    if name == "expected-attention":
        assert hits == [0, 0, 0, 0]
    else:  # 37 shared tokens: 9 blocks of 4, the probe's rows left to prefill
        assert all(h > 0 and h % 4 == 0 and h <= 36 for h in hits[1:]), hits
    # a second pass over the same prompts hits again: pruning left the cached blocks whole
    again = generate(cached, prompts, name)
    same(again, want)
    _check_pool(cached)


def _check_pool(eng):
    """Every page's holders are counted right: the rows whose tables hold it and the cache's
    blocks; free pages are exactly those no one holds."""
    kv = eng.kv
    held = torch.zeros(kv.n_pages + 1, dtype=torch.int64)
    cols = torch.arange(kv.P)
    owned = cols < kv.h_pages[..., None]
    held.index_add_(0, kv.h_table[owned].long(), torch.ones(int(owned.sum()), dtype=torch.int64))
    for blk in kv.cache.blocks.values():
        held.index_add_(0, blk.pages.reshape(-1).long(), torch.ones(blk.pages.numel(), dtype=torch.int64))
    assert torch.equal(held[1:], kv.ref[1:].long())
    free = kv._free[: kv.n_free].long()
    assert len(set(free.tolist())) == kv.n_free and (kv.ref[free] == 0).all()
    assert kv.n_free + int((kv.ref[1:] > 0).sum()) == kv.n_pages


@pytest.mark.parametrize("name", ["full", "snapkv", "refreekv-decoding"])
def test_echo_logprobs_are_the_same_and_only_the_suffix_is_scored(tiny_ckpts, name):
    """lm-eval's multiple choice: one context, four continuations, the prompt's log-probabilities
    (echo). The later ones prefill only their continuation and still score every token."""
    path = tiny_ckpts["llama", False]
    prompts = shared_prompts(2, 4, 50, [3, 6, 2, 9])
    plain = small_engine(path, 60)
    cached = small_engine(path, 60, prefix_cache=True)
    for k in (0, 3):
        want = generate(plain, prompts, name, new=1, logprobs=k)
        got = generate(cached, prompts, name, new=1, logprobs=k)
        same(got, want)
        for a, b in zip(got, want):
            assert [e[0] for e in a.prompt_logprobs] == [e[0] for e in b.prompt_logprobs]
            for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
                assert x[1] == pytest.approx(y[1], abs=1e-4) and x[2].keys() == y[2].keys()
        assert all(r.stats["cached_tokens"] >= 44 for r in got[1:])
    # scoring with another top-k is no hit on blocks that kept other entries, and stays right
    got = generate(cached, prompts[:1], name, new=1, logprobs=1)
    assert got[0].stats["cached_tokens"] == 0


def test_fan_out_and_batches_share_the_cache(tiny_ckpts):
    """Several policies over one prompt (fan-out), and a batch whose prompts share a context,
    against the same calls without the cache."""
    path = tiny_ckpts["qwen2", False]
    prompts = shared_prompts(3, 4, 30, [4, 9, 2, 13])
    pols = [policy(n) for n in ("full", "snapkv", "refreekv", "refreekv-decoding")]
    s = Sampling(max_new_tokens=8)
    plain = small_engine(path, 80, max_seqs=8)
    cached = small_engine(path, 80, max_seqs=8, prefix_cache=True)
    plain.eos = cached.eos = set()
    want = plain.generate(prompts, pols, s)
    cached.generate(prompts[:1], pols[0], s)  # the context is cached
    got = cached.generate(prompts, pols, s)
    for a, b in zip(got, want):
        same(a, b)
    assert all(r[0].stats["cached_tokens"] > 0 for r in got)
    _check_pool(cached)


@pytest.mark.parametrize("name", ["snapkv", "refreekv-decoding"])
def test_a_batch_copies_off_the_same_cached_pages(tiny_ckpts, name):
    """Several requests of one step hit the same cached blocks and each copies its kept tokens off
    them: every copy drops one reference (a page counted once per row that held it)."""
    path = tiny_ckpts["mistral", False]
    prompts = shared_prompts(5, 4, 33, [2, 7, 4, 5])
    plain = small_engine(path, 90, max_seqs=4)
    cached = small_engine(path, 90, max_seqs=4, prefix_cache=True)
    plain.eos = cached.eos = set()
    want = plain.generate(prompts, policy(name), Sampling(max_new_tokens=6))
    cached.generate(prompts[:1], policy("full"), Sampling(max_new_tokens=1))  # the context is cached
    got = cached.generate(prompts, policy(name), Sampling(max_new_tokens=6))
    same(got, want)
    assert all(r.stats["cached_tokens"] >= 28 for r in got)
    _check_pool(cached)
    cached.kv.cache.clear()
    assert cached.kv.n_free == cached.kv.n_pages


@settings(max_examples=examples(12), deadline=None)
@given(
    seed=st.integers(0, 10**6),
    ps=st.sampled_from([1, 2, 4, 8]),
    pages=st.integers(14, 40),
    budget=st.sampled_from([0, 8, 13]),
    name=st.sampled_from(["full", "snapkv", "refreekv", "refreekv-decoding"]),
)
def test_under_preemption_and_eviction_nothing_changes(tiny_ckpts, seed, ps, pages, budget, name):
    """A pool too small for everyone: sequences are preempted, cached blocks evicted, prompts
    prefilled in chunks over a cached prefix. Tokens and kept counts equal the cache-off run's,
    and the pages are counted right at the end."""
    path = tiny_ckpts["llama", False]
    g = torch.Generator().manual_seed(seed)
    contexts = [torch.randint(3, 256, (int(n),), generator=g).tolist() for n in torch.randint(8, 30, (2,))]
    prompts = [
        contexts[i % 2]
        + torch.randint(3, 256, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        for i in range(6)
    ]
    per_row = max(pages * 4 // ps, max(map(len, prompts)) // ps + 10)
    s = Sampling(max_new_tokens=10)
    kw = dict(page_size=ps, max_seqs=3, max_batched_tokens=budget)
    plain = small_engine(path, per_row, **kw)
    cached = small_engine(path, per_row, prefix_cache=True, **kw)
    plain.eos = cached.eos = set()
    want = plain.generate(prompts, policy(name), s)
    for _ in range(2):
        got = cached.generate(prompts, policy(name), s)
        same(got, want)
        _check_pool(cached)
    assert cached.kv.n_free + cached.kv.cache.cached_pages == cached.kv.n_pages  # nothing leaked


def test_cache_pages_are_evicted_before_anyone_is_preempted(tiny_ckpts):
    """Cached blocks no request uses give their pages back when the pool runs short."""
    path = tiny_ckpts["llama", False]
    eng = small_engine(path, 50, prefix_cache=True)
    eng.eos = set()
    g = torch.Generator().manual_seed(4)
    for _ in range(6):  # unrelated prompts: each leaves its blocks behind
        eng.generate(
            [torch.randint(3, 256, (60,), generator=g).tolist()], policy("full"), Sampling(max_new_tokens=4)
        )
    cache = eng.kv.cache
    assert cache.evictions > 0 and eng.stats["preemptions"] == 0
    _check_pool(eng)
    cache.clear()
    assert eng.kv.n_free == eng.kv.n_pages


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_bundled_models(name):
    """A shared system prompt on a real model: the same greedy tokens and kept counts with the cache."""
    from engine.engine import Engine
    from weights.bundled import ensure_bundled

    path = ensure_bundled(name)
    system = real_text(800)
    questions = ("\nWhat is this about?", "\nName one fact in it.")
    out = {}
    for on in (False, True):
        eng = Engine(str(path), device="cpu", max_seqs=2, prefix_cache=on)
        ids = [eng.encode(system + q, chat=False) for q in questions]
        out[on] = [generate(eng, ids, n, new=6) for n in ("snapkv", "refreekv")]
    for a, b in zip(out[True], out[False]):
        same(a, b)
        assert all(r.stats["cached_tokens"] >= 128 for r in a[1:])


class CacheMachine(RuleBasedStateMachine):
    """Requests over a few shared contexts arrive, step, are aborted, preempted (a small pool) and
    evict cached blocks, in any order, through the real core. After every rule: each page's
    reference count is the number of rows and cached blocks that hold it, the free pages are
    exactly the unheld ones, and every cached block's K/V are the ones it was cached with (a shared
    page is never written). At the end every request that finished has the greedy tokens of the
    same request alone on an engine without the cache."""

    path = None  # set by the test (the tiny checkpoint)

    @initialize(ps=st.sampled_from([2, 4]), per_row=st.integers(24, 60), budget=st.sampled_from([0, 9]))
    def setup(self, ps, per_row, budget):
        self.eng = small_engine(self.path, per_row, page_size=ps, max_seqs=3, prefix_cache=True)
        self.eng.max_batched_tokens = budget
        self.eng.eos = set()
        self.core, self.kv = self.eng.core, self.eng.kv
        g = torch.Generator().manual_seed(per_row)
        self.contexts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (13, 22)]
        self.requests, self.done, self.aborted = {}, {}, set()
        self.snap = {}  # block key -> (its pages' K, V) when first seen

    @rule(
        ctx=st.integers(0, 1),
        tail=st.lists(st.integers(3, 255), min_size=1, max_size=6),
        name=st.sampled_from(["full", "snapkv", "refreekv-decoding"]),
    )
    def add(self, ctx, tail, name):
        prompt = self.contexts[ctx] + tail
        rid = self.core.add_request(prompt, policy(name), Sampling(max_new_tokens=5))
        self.requests[rid] = (prompt, name)

    @precondition(lambda self: self.core.busy())
    @rule(steps=st.integers(1, 4))
    def step(self, steps):
        for _ in range(steps):
            for u in self.core.step():
                if u.result is not None:
                    self.done[u.key] = u.result

    @precondition(lambda self: len(self.requests) > len(self.done) + len(self.aborted))
    @rule(data=st.data())
    def abort(self, data):
        live = sorted(set(self.requests) - set(self.done) - self.aborted)
        rid = data.draw(st.sampled_from(live))
        self.core.abort(rid)
        self.aborted.add(rid)

    @rule(pages=st.integers(1, 200))
    def evict(self, pages):
        self.kv.cache.evict(pages)

    @invariant()
    def pages_are_counted_and_cached_blocks_unchanged(self):
        if not hasattr(self, "eng"):
            return
        _check_pool(self.eng)
        kv = self.kv
        for key, blk in kv.cache.blocks.items():
            ids = blk.pages.reshape(-1).long()
            now = (kv.k[ids].clone(), kv.v[ids].clone())
            if id(blk) not in self.snap:
                self.snap[id(blk)] = (blk, now)
            else:
                assert torch.equal(self.snap[id(blk)][1][0], now[0]) and torch.equal(
                    self.snap[id(blk)][1][1], now[1]
                )

    def teardown(self):
        if not hasattr(self, "eng"):
            return
        while self.core.busy():
            self.step(1)
        _check_pool(self.eng)
        plain = small_engine(self.path, 80, max_seqs=1)
        plain.eos = set()
        for rid, res in self.done.items():
            if rid in self.aborted or res.finish_reason == "abort":
                continue
            prompt, name = self.requests[rid]
            (want,) = plain.generate([prompt], policy(name), Sampling(max_new_tokens=5))
            assert res.tokens == want.tokens, (rid, name)


def test_pages_are_counted_through_any_sequence_of_requests(tiny_ckpts):
    CacheMachine.path = tiny_ckpts["llama", False]
    run_state_machine_as_test(
        CacheMachine, settings=settings(max_examples=examples(15), stateful_step_count=25, deadline=None)
    )
