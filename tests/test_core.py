"""The step-driven core (engine/core.py): requests added while others run, per-request sampling
and policies, abort, and the padded-prefill bound. Oracles: each request run alone on its own
engine, and the dense store (tests/dense_reference.py)."""

import torch
from helpers import small_engine

import refreekv
from engine.engine import Engine
from engine.sampling import Sampling
from weights.errors import UserError


def prompts(seed, lens):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lens]


def drain(core, log=None):
    """Step until idle; {key: Result}."""
    out = {}
    while core.busy():
        for u in core.step():
            if log is not None:
                log.append(u)
            if u.result is not None:
                out[u.key] = u.result
    return out


def alone(path, ids, policy, s):
    eng = Engine(str(path), device="cpu", kv_memory=0.05, max_seqs=8)
    eng.eos = set()
    return eng.generate([ids], policy, s)[0]


def test_requests_added_mid_run_with_their_own_policy_and_sampling_equal_each_alone(tiny_ckpts):
    """Requests join while others decode; each has its own policy, temperature, top-k/p, seed,
    stop and length; every one gets exactly the tokens and kept counts it gets alone."""
    path = tiny_ckpts["llama", False]
    eng = Engine(str(path), device="cpu", kv_memory=0.05, max_seqs=8)
    eng.eos = set()
    core = eng.core
    ps = prompts(1, (30, 12, 45, 20, 8))
    reqs = [
        (refreekv.make("full"), Sampling(max_new_tokens=20)),
        (refreekv.make("snapkv", budget=0.4), Sampling(max_new_tokens=14, temperature=0.8, seed=3)),
        (
            refreekv.make("refreekv", threshold=0.2, protected=(0,)),
            Sampling(max_new_tokens=25, temperature=1.2, top_k=30, top_p=0.9, seed=2**40 + 9),
        ),
        (refreekv.make("streaming", budget=10), Sampling(max_new_tokens=9)),
        (refreekv.make("h2o", budget=0.5), Sampling(max_new_tokens=17, temperature=1.0, seed=-5)),
    ]
    ids = [core.add_request(ps[0], *reqs[0]), core.add_request(ps[1], *reqs[1])]
    got = {}
    for step in range(40):
        if step == 3:
            ids.append(core.add_request(ps[2], *reqs[2]))
        if step == 6:
            ids += [core.add_request(ps[3], *reqs[3]), core.add_request(ps[4], *reqs[4])]
        for u in core.step():
            if u.result is not None:
                got[u.key] = u.result
    got.update(drain(core))
    for i, rid in enumerate(ids):
        want = alone(path, ps[i], *reqs[i])
        assert got[rid].tokens == want.tokens, i
        assert got[rid].stats["kept_per_head"] == want.stats["kept_per_head"], i
    assert eng.kv.n_free == eng.kv.n_pages


def test_a_seeded_request_does_not_depend_on_its_neighbours(tiny_ckpts):
    path = tiny_ckpts["qwen2", False]
    s = Sampling(max_new_tokens=20, temperature=1.0, seed=77)
    ids = prompts(2, (25,))[0]
    want = alone(path, ids, refreekv.make("full"), s).tokens
    eng = Engine(str(path), device="cpu", kv_memory=0.05, max_seqs=8)
    eng.eos = set()
    others = prompts(3, (10, 40, 33))
    res = eng.generate(others[:1] + [ids] + others[1:], refreekv.make("full"), s)
    assert res[1].tokens == want
    assert res[0].tokens != want  # the same seed on another prompt is another draw


def test_abort_gives_the_pages_back_at_once_and_the_rest_run_on(tiny_ckpts):
    path = tiny_ckpts["llama", False]
    eng = small_engine(path, 30, max_seqs=4)
    eng.eos = set()
    core = eng.core
    ps = prompts(4, (40, 30, 20, 50))
    s = Sampling(max_new_tokens=30)
    rids = [core.add_request(p, refreekv.make("full"), s) for p in ps]
    for _ in range(4):
        core.step()
    assert core.running >= 2 and core.waiting >= 1  # the small pool makes someone wait
    held = eng.kv.used
    victim = core.sched.running[0].idx
    assert core.abort(victim)
    assert eng.kv.used < held  # at once, before any further step
    queued = core.sched.waiting[0][0].idx
    assert core.abort(queued) and not core.abort(queued)  # a waiting one leaves the queue; twice is a no-op
    log = []
    got = drain(core, log)
    ends = {u.key: u.result.finish_reason for u in log if u.result is not None}
    assert ends[victim] == ends[queued] == "abort" and set(got) == set(rids)
    for i, rid in enumerate(rids):
        if rid not in (victim, queued):
            assert got[rid].tokens == alone(path, ps[i], refreekv.make("full"), s).tokens
    assert eng.kv.n_free == eng.kv.n_pages and not core.busy()


def test_padded_prefill_work_is_bounded(tiny_ckpts):
    """Padded prefill (the compiled path's static shapes) pads a batch to its longest prompt: one
    long prompt among many short ones must not make every row long. Every padded prefill's B x N
    stays within max_prefill_tokens; packed prefill counts real tokens. (Whole prompts: the chunked
    step's bound is tests/test_chunked_prefill.py's.)"""
    path = tiny_ckpts["llama", False]
    ps = prompts(5, (300,) + (10,) * 12 + (120, 15))
    out = {}
    for packed in (False, True):
        eng = Engine(
            str(path), device="cpu", kv_memory=0.1, max_seqs=16, max_prefill_tokens=400, max_batched_tokens=0
        )
        eng.eos = set()
        eng.runner.packed = packed
        eng.core.sched.padded = not packed
        shapes = []
        if packed:
            inner = eng.model.prefill_packed

            def spy(tokens, lens, *a, **kw):
                shapes.append((len(lens), sum(lens)))
                return inner(tokens, lens, *a, **kw)

            eng.model.prefill_packed = spy
        else:
            inner = eng.runner.prefill_step

            def spy(model, tokens, *a, **kw):
                shapes.append(tuple(tokens.shape))
                return inner(model, tokens, *a, **kw)

            eng.runner.prefill_step = spy
        out[packed] = [r.tokens for r in eng.generate(ps, refreekv.make("full"), Sampling(max_new_tokens=3))]
        if packed:
            assert all(t <= 400 for b, t in shapes if b > 1) and sum(b for b, _ in shapes) == len(ps), shapes
        else:
            assert all(b * n <= 400 for b, n in shapes if b > 1), shapes
            # short ones still batch
            assert sum(b for b, _ in shapes) == len(ps) and max(b for b, _ in shapes) > 1
    assert out[False] == out[True]


def test_packed_prefill_equals_padded(tiny_ckpts):
    """The packed prompts write the same K/V and positions into the pool, give the same last-token
    logits and the same probe as the right-padded batch, windowed layers included."""
    from helpers import paged

    for family in ("llama", "qwen2-window"):
        eng = Engine(str(tiny_ckpts[family, False]), device="cpu", kv_memory=0.05)
        c, m = eng.config, eng.model
        lens = [37, 5, 20]
        ps = prompts(8, lens)
        pad = torch.zeros(3, 37, dtype=torch.long)
        for b, p in enumerate(ps):
            pad[b, : len(p)] = torch.tensor(p)
        kv1, slots = paged(c, lens)
        kv2, _ = paged(c, lens)
        l1, p1 = m.prefill(pad, torch.tensor(lens), kv1, slots, probe_rows=3)
        l2, p2, h = m.prefill_packed(torch.tensor(sum(ps, [])), lens, kv2, slots, probe_rows=3, hidden=True)
        assert (
            torch.allclose(l1, l2, atol=1e-5)
            and torch.allclose(p1, p2, atol=1e-6)
            and h.shape[0] == sum(lens)
        )
        assert torch.equal(kv1.lengths, kv2.lengths) and torch.equal(kv1.next_pos, kv2.next_pos)
        for b, n in enumerate(lens):
            for layer in range(c.n_layers):
                for hd in range(c.n_kv_heads):
                    pages = kv1.table[layer, b, hd, : -(-n // kv1.ps)].long()
                    k1 = kv1.k[pages].flatten(0, 1)[:n]
                    k2 = kv2.k[kv2.table[layer, b, hd, : -(-n // kv2.ps)].long()].flatten(0, 1)[:n]
                    assert torch.allclose(k1, k2, atol=1e-5)
                    assert torch.equal(kv1.pos[pages].flatten()[:n], kv2.pos[pages].flatten()[:n])


def test_add_request_checks_everything_up_front(tiny_ckpts):
    eng = Engine(str(tiny_ckpts["llama", False]), device="cpu", kv_memory=0.0002, max_seqs=4)
    core = eng.core
    full = refreekv.make("full")
    cases = [
        ([], full, Sampling(), "the prompt is empty"),
        ([5, 300], full, Sampling(), "outside the vocabulary"),
        ([5], "refreekv", Sampling(), "refreekv.make('refreekv')"),
        ([5], full, Sampling(max_new_tokens=0), "max_new_tokens must be a whole number >= 1"),
        ([5], full, Sampling(top_p=0), "top_p"),
        ([5] * 400, full, Sampling(max_new_tokens=200), "exceeds the context"),
        ([5] * 100, full, Sampling(max_new_tokens=300), "needs"),
    ]
    for ids, pol, s, msg in cases:
        try:
            core.add_request(ids, pol, s)
        except UserError as e:
            assert msg in str(e), (msg, str(e))
        else:
            raise AssertionError(f"no error for {msg}")
    assert not core.busy()
    # the Python API takes a policy by name too (generate), and names the field, not a CLI flag
    r = eng.generate([[5, 6, 7]], "full", Sampling(max_new_tokens=2))[0]
    assert len(r.tokens) <= 2


def test_prompt_logprobs_equal_the_full_sequence_forward(tiny_ckpts):
    """Prompt scoring (max_new_tokens 0) from the chunked hidden states equals log-softmax of the
    model's own all-position logits, for prompts longer than a chunk."""
    from helpers import paged

    from engine import admission as core_mod

    path = tiny_ckpts["mistral", False]
    eng = Engine(str(path), device="cpu", kv_memory=0.1, max_seqs=4)
    old = core_mod.PROMPT_LOGPROB_CHUNK
    core_mod.PROMPT_LOGPROB_CHUNK = 7  # many chunks
    try:
        ids = prompts(6, (40,))[0]
        rid = eng.core.add_request(ids, refreekv.make("full"), Sampling(max_new_tokens=0, prompt_logprobs=2))
        res = drain(eng.core)[rid]
    finally:
        core_mod.PROMPT_LOGPROB_CHUNK = old
    kv, slots = paged(eng.config, [40])
    logits, _ = eng.model.prefill(
        torch.tensor([ids]), torch.tensor([40]), kv, slots, probe_rows=0, all_logits=True
    )
    lp = logits[0].double().log_softmax(-1)
    assert res.tokens == [] and res.prompt_logprobs[0] == (ids[0], None, None)
    for i, (t, v, top) in enumerate(res.prompt_logprobs[1:]):
        assert t == ids[i + 1] and abs(v - lp[i, t].item()) < 1e-4
        assert sorted(top) == sorted(lp[i].topk(2).indices.tolist())
