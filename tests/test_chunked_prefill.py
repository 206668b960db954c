"""Chunked prefill: a step's token budget (max_batched_tokens) is spent on the decode rows first and
on chunks of prompts after, so a long prompt never freezes the streams already running; and a prompt
prefilled in chunks is, to its policy and its sequences, the prompt prefilled in one piece: the same
probe (attention rows, keys and values in the pool, query statistics), the same kept counts, the
same greedy tokens and prompt log-probabilities, on the three families and both bundled models,
packed and padded, under preemption and with fan-out."""

import pytest
import torch
from conftest import real_text
from helpers import examples, small_engine
from hypothesis import given, settings
from hypothesis import strategies as st

import refreekv
from engine.engine import Engine
from engine.sampling import Sampling
from weights.errors import UserError

POLICIES = {
    "refreekv": dict(threshold=0.2),
    "snapkv": dict(budget=0.5, window=4),
    "h2o": dict(budget=0.4),
    "streaming": dict(budget=0.5),
    "expected-attention": dict(budget=0.5),
    "full": {},
}


class Watch(refreekv.Policy):
    """Plans with another policy and records, per prompt, what the probe showed it: the attention
    rows, every layer's keys and values as they sit in the pool after prefill, the query stats."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.probe_rows, self.query_stats = inner.probe_rows, inner.query_stats
        self.seen = []  # per prompt, in the order they were planned

    def plan(self, probe):
        L = probe.n_layers
        keys = [probe.keys(layer) for layer in range(L)]
        values = [probe.values(layer) for layer in range(L)]
        stats = [probe.query_stats(layer, 0) for layer in range(L)] if self.query_stats else None
        for b, n in enumerate(probe.lens.tolist()):
            self.seen.append(
                dict(
                    attn=None if probe.attn is None else probe.attn[:, b, ..., :n].clone(),
                    keys=torch.stack([k[b, :, :n] for k in keys]),
                    values=torch.stack([v[b, :, :n] for v in values]),
                    stats=None if stats is None else [(m[b], c[b]) for m, c in stats],
                )
            )
        return self.inner.plan(probe)


class Varying:
    """A step budget that gives each step the next of `chunks` prompt tokens (as the step bound's
    budget, engine/budget.py, does from measured costs): chunk boundaries anywhere."""

    def __init__(self, chunks: list[int]):
        self.chunks, self.i = chunks, 0

    def tokens(self, rows: int) -> int:
        self.i += 1
        return rows + self.chunks[self.i % len(self.chunks)]

    def observe(self, rows, prefilled, seconds):
        pass


def run(path, prompts, policy, budget, page_size=4, padded=False, new=6, varying=None):
    """(results, the Watch, the engine) of greedy generation with a token budget per step (0:
    prompts whole; `varying`: each step's prompt tokens in turn, within it); padded: the
    right-padded prefill of the compiled path, run eagerly."""
    eng = Engine(
        str(path), device="cpu", kv_memory=0.05, max_seqs=4, page_size=page_size, max_batched_tokens=budget
    )
    eng.runner.packed, eng.core.sched.padded = not padded, padded
    if varying:
        eng.core.sched.budget = Varying(varying)
    watch = Watch(policy)
    out = eng.generate(prompts, watch, Sampling(max_new_tokens=new))
    return out, watch, eng


def same_prompt(a, b) -> bool:
    return a["keys"].shape == b["keys"].shape and torch.allclose(a["keys"], b["keys"], atol=1e-4, rtol=1e-3)


def assert_same_probe(whole, chunked):
    """Each prompt's probe in the chunked run is its probe in the whole one (chunks complete prompts
    in another order than a whole batch: the shortest first)."""
    assert len(whole.seen) == len(chunked.seen)
    left = list(chunked.seen)
    for a in whole.seen:
        i = next((i for i, b in enumerate(left) if same_prompt(a, b)), None)
        assert i is not None, "a prompt's keys in the pool differ between the whole and chunked runs"
        b = left.pop(i)
        if a["attn"] is not None:
            w = min(a["attn"].shape[-2], b["attn"].shape[-2])  # a batch may read more rows
            torch.testing.assert_close(b["attn"][..., -w:, :], a["attn"][..., -w:, :], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b["keys"], a["keys"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b["values"], a["values"], atol=1e-5, rtol=1e-4)
        for (m1, c1), (m2, c2) in zip(a["stats"] or [], b["stats"] or []):
            torch.testing.assert_close(m2, m1, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(c2, c1, atol=1e-4, rtol=1e-3)


@settings(max_examples=examples(10), deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2-window"])
def test_chunked_equals_whole(tiny_ckpts, family, data):
    """Budgets from max_seqs to past the prompts, or a different one each step (as the step bound
    sets them), page sizes, policies, packed and padded."""
    lens = data.draw(st.lists(st.integers(1, 45), min_size=1, max_size=3), label="prompt lengths")
    budget = data.draw(st.integers(4, 60), label="max_batched_tokens")
    varying = data.draw(st.none() | st.lists(st.integers(1, 50), min_size=2, max_size=6), label="per step")
    page_size = data.draw(st.sampled_from([1, 4, 16]), label="page size")
    name = data.draw(st.sampled_from(sorted(POLICIES)), label="policy")
    padded = data.draw(st.booleans(), label="padded")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lens]
    path = tiny_ckpts[family, False]
    policy = refreekv.make(name, **POLICIES[name])
    whole, w1, _ = run(path, prompts, policy, 0, page_size, padded)
    chunked, w2, eng = run(path, prompts, policy, budget, page_size, padded, varying=varying)
    for a, b in zip(whole, chunked):
        assert b.tokens == a.tokens
        assert b.stats["kept_per_head"] == a.stats["kept_per_head"]
        assert b.stats["pages_after_prefill"] == a.stats["pages_after_prefill"]
        assert b.stats["pages_after_pruning"] == a.stats["pages_after_pruning"]
        assert b.stats["prefill_chunks"] >= 1
    assert_same_probe(w1, w2)
    if max(lens) > budget and not varying:  # a prompt longer than a step's budget took several chunks
        assert max(r.stats["prefill_chunks"] for r in chunked) > 1
    assert eng.kv.n_free == eng.kv.n_pages and eng.kv.held == 0


def test_no_step_exceeds_the_budget_and_streams_keep_flowing(tiny_ckpts):
    """A 300-token prompt arrives while a stream decodes: every step processes at most the budget
    (decode rows + prefill chunk tokens), and the stream gets a token in every one of them."""
    eng = Engine(
        str(tiny_ckpts["llama", False]), device="cpu", max_seqs=4, page_size=4, max_batched_tokens=24
    )
    eng.eos = set()
    core, runner = eng.core, eng.runner
    seen = []  # tokens of each forward in the current step
    prefill, decode = runner.prefill, runner.decode

    def count_prefill(prompts, *a, decode=None, **k):
        seen.append(sum(map(len, prompts)) + (0 if decode is None else decode.shape[0]))
        return prefill(prompts, *a, decode=decode, **k)

    def count_decode(tokens):
        seen.append(tokens.shape[0])
        return decode(tokens)

    runner.prefill, runner.decode = count_prefill, count_decode
    policy = refreekv.make("snapkv", budget=0.5, window=4)
    stream = core.add_request(list(range(5, 25)), policy, Sampling(max_new_tokens=60))
    for _ in range(3):
        core.step()
    long = core.add_request([7 + i % 200 for i in range(300)], policy, Sampling(max_new_tokens=4))
    chunks, pending = 0, []
    while core.group(long)[0].slot < 0 or core.sched.prefilling:
        seen.clear()
        pending.append(core.prefill_pending)
        updates = core.step()
        assert sum(seen) <= 24, f"a step processed {sum(seen)} tokens"
        assert any(u.key == stream and u.tokens for u in updates), "the running stream froze"
        chunks += 1
    assert chunks >= 300 // 24 and pending[0] == 300 and pending == sorted(pending, reverse=True)
    while core.busy():
        core.step()
    assert eng.kv.n_free == eng.kv.n_pages


def steps_of(eng, prompts, policy, new, late=3):
    """Run prompts[0] alone for `late` steps, then the rest: (tokens of each, the forwards of each
    step as (prefill chunk tokens, decode rows))."""
    core, runner = eng.core, eng.runner
    forwards, prefill, decode = [], runner.prefill, runner.decode

    def spy_prefill(prompts, *a, decode=None, **k):
        forwards[-1].append((sum(map(len, prompts)), 0 if decode is None else decode.shape[0]))
        return prefill(prompts, *a, decode=decode, **k)

    def spy_decode(tokens):
        forwards[-1].append((0, tokens.shape[0]))
        return decode(tokens)

    runner.prefill, runner.decode = spy_prefill, spy_decode
    rids = [core.add_request(prompts[0], policy, Sampling(max_new_tokens=new))]
    out, steps = {}, 0
    while core.busy() or steps <= late:
        if steps == late:
            rids += [core.add_request(p, policy, Sampling(max_new_tokens=new)) for p in prompts[1:]]
        forwards.append([])
        for u in core.step():
            out.setdefault(u.key, []).extend(u.tokens)
        steps += 1
    runner.prefill, runner.decode = prefill, decode
    return [out[r] for r in rids], forwards


@pytest.mark.parametrize("family", ["llama", "qwen2-window"])
def test_a_step_with_chunks_decodes_in_the_same_forward(tiny_ckpts, family, monkeypatch):
    """Eager and chunked, the running batch decodes in the chunks' forward: one forward per step
    (the weights read once), never more tokens than the budget, and the tokens of two forwards per
    step (REFREEKV_STEP=apart)."""
    path = tiny_ckpts[family, False]
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (12, 70, 33)]
    policy = refreekv.make("snapkv", budget=0.5, window=4)
    outs = []
    for step in ("mixed", "apart"):
        monkeypatch.setenv("REFREEKV_STEP", step)
        eng = Engine(str(path), device="cpu", max_seqs=4, page_size=4, max_batched_tokens=16)
        eng.eos = set()
        tokens, forwards = steps_of(eng, prompts, policy, 20)
        outs.append(tokens)
        assert all(sum(t + d for t, d in f) <= 16 for f in forwards)
        mixed = [f for f in forwards if any(t and d for t, d in f)]
        if step == "mixed":
            assert len(mixed) >= 70 // 16 and max(map(len, forwards)) == 1
        else:
            assert not mixed and max(map(len, forwards)) == 2
        assert eng.kv.n_free == eng.kv.n_pages and eng.kv.held == 0
    assert outs[0] == outs[1] and all(len(t) == 20 for t in outs[0])


@pytest.mark.parametrize("where", ["halfway through its layers", "scoring the prompt after it"])
def test_a_failing_mixed_forward_fails_its_prompt_alone(tiny_ckpts, monkeypatch, where):
    """The mixed forward fails (halfway through its layers, or after it, scoring the prompt's
    log-probabilities): the prompt being prefilled ends with "error", and the stream that decoded
    in it goes on with the tokens it has alone (never decoded twice, never a step lost)."""
    from engine import admission

    path = str(tiny_ckpts["llama", False])
    stream = list(range(5, 25))
    eng = Engine(path, device="cpu", max_seqs=4, page_size=4, max_batched_tokens=12)
    eng.eos = set()
    alone = eng.generate([stream], refreekv.make("full"), Sampling(max_new_tokens=30))[0].tokens
    core = eng.core
    rid = core.add_request(stream, refreekv.make("full"), Sampling(max_new_tokens=30))
    for _ in range(3):
        core.step()

    def boom(*_):
        raise RuntimeError("a kernel failed")

    if where == "halfway through its layers":
        core.prefill_progress = lambda done, layers, *_: boom() if done == layers // 2 else None
    else:
        monkeypatch.setattr(admission, "chunk_logprobs", boom)
    bad = core.add_request(
        list(range(40, 90)), refreekv.make("full"), Sampling(max_new_tokens=5, prompt_logprobs=1)
    )
    ends = {}
    while core.busy():
        for u in core.step():
            if u.result is not None:
                ends[u.key] = u.result
    assert ends[bad].finish_reason == "error" and "a kernel failed" in ends[bad].error
    assert ends[rid].finish_reason == "length" and ends[rid].tokens == alone
    assert eng.kv.n_free == eng.kv.n_pages and eng.kv.held == 0


def test_the_step_bound_chunks_by_cost_and_changes_no_token(tiny_ckpts):
    """With the step bound (the server's CPU default) the steps' chunks come from their measured
    costs: a prompt arriving beside a running stream is prefilled in chunks of whatever size, and
    every token is the one whole prefill gives; a prompt arriving at an idle engine goes whole."""
    path = tiny_ckpts["llama", False]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (30, 400, 90)]
    policy = refreekv.make("snapkv", budget=0.5, window=4)
    outs = []
    for bound in (0, 3):
        eng = Engine(str(path), device="cpu", max_seqs=4, page_size=4, max_batched_tokens=bound and 512)
        eng.step_bound = bound
        eng.eos = set()
        tokens, forwards = steps_of(eng, prompts, policy, 40)
        outs.append(tokens)
        chunks = [t for f in forwards for t, d in f if t]
        if bound:
            budget = eng.core.sched.budget
            assert budget.decode_cost(1) is not None and budget._per_token is not None  # measured
            assert chunks[0] == 30  # nobody running: whole
            assert len(chunks) > 2 and max(sum(t + d for t, d in f) for f in forwards) <= 512
        assert eng.kv.n_free == eng.kv.n_pages and eng.kv.held == 0
    assert outs[1] == outs[0] and all(len(t) == 40 for t in outs[0])


def test_a_stream_waiting_for_its_last_token_bounds_the_step(tiny_ckpts):
    """A step that decodes nothing but hands a stream its last token is still a step that stream
    waits for: under the step bound it prefills a chunk, not the whole cap."""
    eng = Engine(str(tiny_ckpts["llama", False]), device="cpu", max_seqs=4, page_size=4, step_bound=3)
    eng.eos = set()
    core, prefill, seen = eng.core, eng.runner.prefill, []

    def spy(prompts, *a, **k):
        seen.append(sum(map(len, prompts)))
        return prefill(prompts, *a, **k)

    eng.runner.prefill = spy
    policy = refreekv.make("full")
    stream = core.add_request(list(range(5, 25)), policy, Sampling(max_new_tokens=4))
    while not core.cur_seqs or any(seq.live for seq in core.cur_seqs):
        core.step()
    core.add_request([7 + i % 200 for i in range(400)], policy, Sampling(max_new_tokens=2))
    seen.clear()
    updates = core.step()
    assert any(u.key == stream and u.result is not None for u in updates)  # its last token, now
    assert seen and seen[0] < 400 and eng.max_batched_tokens == 4096  # a chunk, not the cap
    while core.busy():
        core.step()


def arrivals(eng, schedule, new=2):
    """Add prompt i at step schedule[i][0] (its tokens schedule[i][1]) and run until all are done:
    per prompt, (the prompt tokens the engine had prefilled when it came, the step of its first
    token). The prefill clock is counted here, from the forwards' inputs."""
    core, prefill = eng.core, eng.runner.prefill
    clock = [0]

    def spy(prompts, *a, **k):
        clock[0] += sum(map(len, prompts))
        return prefill(prompts, *a, **k)

    eng.runner.prefill, eng.eos = spy, set()
    policy = refreekv.make("full")
    rids, came, first, step = [], [], {}, 0
    while len(rids) < len(schedule) or core.busy():
        for at, prompt in schedule[len(rids) :]:
            if at > step:
                break
            rids.append(core.add_request(prompt, policy, Sampling(max_new_tokens=new)))
            came.append(clock[0])
        for u in core.step():
            if u.tokens:
                first.setdefault(u.key, step)
        step += 1
    eng.runner.prefill = prefill
    return [(c, first[r]) for c, r in zip(came, rids)]


def test_a_short_prompt_overtakes_a_long_one_being_prefilled(tiny_ckpts):
    """A 20-token prompt arriving while a 300-token one is prefilled 24 tokens a step does not wait
    for it (a whole prefill would make it): its first token comes a step or two after it came."""
    eng = Engine(
        str(tiny_ckpts["llama", False]), device="cpu", max_seqs=4, page_size=4, max_batched_tokens=24
    )
    long, short = [7 + i % 200 for i in range(300)], list(range(30, 50))
    (_, long_first), (_, short_first) = arrivals(eng, [(0, long), (4, short)])
    assert short_first <= 4 + 2 < long_first


def test_a_short_prompt_is_admitted_past_a_long_one_the_pool_cannot_hold_yet(tiny_ckpts):
    """The pool admits waiting prompts in order of due too: a 20-token prompt does not wait for the
    pages a 120-token one queued before it needs (they free only when a running stream ends)."""
    eng = small_engine(tiny_ckpts["llama", False], pages_per_row=40, page_size=4, max_batched_tokens=24)
    stream, long, short = list(range(3, 63)), [7 + i % 200 for i in range(120)], list(range(30, 50))
    (_, stream_first), (_, long_first), (_, short_first) = arrivals(
        eng, [(0, stream), (3, long), (3, short)], new=30
    )
    assert short_first <= 3 + 2 and long_first > stream_first + 30


def test_a_long_prompt_is_not_starved_by_short_ones(tiny_ckpts):
    """Short prompts arriving every step, each due before a long prompt's rest, overtake it only
    until the engine has prefilled the long prompt's length since it came: then it goes first."""
    eng = Engine(str(tiny_ckpts["llama", False]), device="cpu", max_seqs=8, page_size=4, max_batched_tokens=8)
    schedule = [(0, list(range(3, 43)))] + [(1 + i, [50 + i] * 8) for i in range(30)]
    got = arrivals(eng, schedule, new=1)
    (came_long, long_first), shorts = got[0], got[1:]
    assert long_first < max(first for _, first in shorts)  # not last: shorts kept coming
    for came, first in shorts:  # none that came after the clock passed its due overtook it
        if came >= came_long + 40:
            assert first >= long_first


@settings(max_examples=examples(15), deadline=None)
@given(
    lens=st.lists(st.integers(1, 50), min_size=2, max_size=7),
    gaps=st.lists(st.integers(0, 3), min_size=7, max_size=7),
    budget=st.integers(8, 30),
)
def test_no_prompt_is_overtaken_by_one_that_came_after_its_due(tiny_ckpts, lens, gaps, budget):
    """For any arrivals: a prompt that came once the engine had prefilled another's length since
    that one came never gets its first token before it."""
    eng = Engine(
        str(tiny_ckpts["llama", False]), device="cpu", max_seqs=8, page_size=4, max_batched_tokens=budget
    )
    at = [sum(gaps[: i + 1]) for i in range(len(lens))]
    schedule = [(t, [3 + (i * 31 + j * 7) % 250 for j in range(n)]) for i, (t, n) in enumerate(zip(at, lens))]
    got = arrivals(eng, schedule)
    for (came_a, first_a), n in zip(got, lens):
        for came_b, first_b in got:
            if came_b >= came_a + n:
                assert first_b >= first_a


def test_under_preemption(tiny_ckpts):
    """A pool that holds two of five sequences: preemptions, replays, chunks, the same tokens."""
    path = tiny_ckpts["qwen2", False]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (30, 9, 41, 17, 25)]
    outs = []
    for budget in (0, 4, 7):
        eng = small_engine(path, pages_per_row=24, page_size=4, max_batched_tokens=budget)
        res = eng.generate(prompts, refreekv.make("refreekv", threshold=0.2), Sampling(max_new_tokens=40))
        assert eng.stats["preemptions"] > 0
        assert eng.kv.n_free == eng.kv.n_pages and eng.kv.held == 0
        outs.append([r.tokens for r in res])
    assert outs[1] == outs[0] and outs[2] == outs[0]


def test_prompt_logprobs_and_fan_out(tiny_ckpts):
    """Echo scoring over chunks (each chunk scores its first token from the last hidden state of
    the one before) and a prompt pruned by two policies: as in one piece."""
    path = tiny_ckpts["mistral", False]
    prompts = [[3 + (i * 7) % 250 for i in range(53)], list(range(10, 31))]
    s = Sampling(max_new_tokens=3, prompt_logprobs=2)
    pols = [refreekv.make("refreekv", threshold=0.2), refreekv.make("snapkv", budget=0.3, window=4)]
    res = []
    for budget in (0, 5):
        eng = Engine(
            str(path), device="cpu", kv_memory=0.05, max_seqs=4, page_size=4, max_batched_tokens=budget
        )
        res.append(eng.generate(prompts, pols, s))
    for whole, chunked in zip(*res):
        for a, b in zip(whole, chunked):
            assert b.tokens == a.tokens and b.stats["kept_per_head"] == a.stats["kept_per_head"]
            assert [t for t, _, _ in b.prompt_logprobs] == [t for t, _, _ in a.prompt_logprobs]
            assert b.prompt_logprobs[0][1] is None and len(b.prompt_logprobs) == len(a.prompt_logprobs)
            for (_, x, tx), (_, y, ty) in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
                assert y == pytest.approx(x, abs=1e-4) and tx.keys() == ty.keys()
    assert res[1][0][0].stats["prefill_chunks"] > 1


def test_abort_mid_prefill_gives_every_page_back(tiny_ckpts):
    eng = Engine(str(tiny_ckpts["llama", False]), device="cpu", max_seqs=4, page_size=4, max_batched_tokens=8)
    core = eng.core
    pols = [refreekv.make("full"), refreekv.make("streaming", budget=0.5)]  # a source and a fork
    rid = core.add_request(list(range(3, 90)), pols, Sampling(max_new_tokens=5))
    core.step()
    core.step()
    assert core.sched.prefilling and eng.kv.held > 0 and core.prefill_pending == 87 - 16
    assert core.abort(rid)
    assert not core.busy() and eng.kv.n_free == eng.kv.n_pages and eng.kv.held == 0
    ended = core.step()  # the aborted sequences' results go out with the next step
    assert sorted(u.key for u in ended) == [(rid, 0), (rid, 1)]
    assert all(u.result.finish_reason == "abort" for u in ended)
    out = eng.generate([list(range(3, 90))], pols, Sampling(max_new_tokens=5))  # the engine goes on
    assert out[0][0].stats["prefill_chunks"] == -(-87 // 8)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_bundled_models(name):
    """Real weights, real text: a 64-token budget equals prompts prefilled whole."""
    from weights.bundled import ensure_bundled

    path = ensure_bundled(name)
    res = []
    for budget in (0, 64):
        eng = Engine(str(path), device="cpu", max_seqs=4, max_batched_tokens=budget)
        prompts = [eng.encode(real_text(1400)), eng.encode(real_text(500, "for"))]
        pols = [refreekv.make("refreekv"), refreekv.make("snapkv", budget=0.5)]
        res.append(eng.generate(prompts, pols, Sampling(max_new_tokens=12)))
    for whole, chunked in zip(*res):
        for a, b in zip(whole, chunked):
            assert b.tokens == a.tokens and b.stats["kept_per_head"] == a.stats["kept_per_head"]
    assert res[1][0][0].stats["prefill_chunks"] > 1


def test_budget_is_checked_in_the_users_words(tiny_ckpts):
    path = str(tiny_ckpts["llama", False])
    with pytest.raises(UserError, match=r"max_batched_tokens must be 0 .* at least max_seqs \(8\)"):
        Engine(path, device="cpu", max_seqs=8, max_batched_tokens=5, load=False)
    with pytest.raises(UserError, match="max_batched_tokens"):
        Engine(path, device="cpu", max_batched_tokens=-1, load=False)
    offline = Engine(path, device="cpu", max_seqs=300, load=False)
    assert offline.max_batched_tokens == 0 and offline.step_bound == 0
    offline.serve_defaults()  # the server on CPU: the step bound within the prefill cap
    assert offline.max_batched_tokens == 4096 and offline.step_bound == 2.5
    offline.step_bound, offline.max_batched_tokens = 0, 512
    offline.step_bound = 2
    offline.cuda = True  # (the check only) on CUDA a fixed budget, and no bound left from before
    offline.serve_defaults()
    assert offline.max_batched_tokens == 2048 and offline.step_bound == 0
    for bad in (1, 0.5, -2, float("nan")):
        with pytest.raises(UserError, match=r"step_bound must be 0 .* or more than 1"):
            Engine(path, device="cpu", step_bound=bad, load=False)
    with pytest.raises(UserError, match="step_bound bounds chunked prefill, but max_batched_tokens 0"):
        Engine(path, device="cpu", step_bound=3, max_batched_tokens=0, load=False)
    bound_alone = Engine(path, device="cpu", step_bound=2.5, max_prefill_tokens=1000, load=False)
    assert bound_alone.max_batched_tokens == 1000 and bound_alone.step_bound == 2.5
