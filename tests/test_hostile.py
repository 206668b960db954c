"""Hostile requests: each is refused at the boundary with a 4xx naming its field (OpenAI's error
shape), or served alone; none fails, stalls or starves another request. Numbers in the test names
are the points of the hostile-requests issue. Oracles: Engine.generate on a second engine."""

import json
import threading
import time

import httpx
import pytest
import torch
from helpers import HOSTILE_KEY, Served, hostile_server, post, serve_engine

import refreekv
from engine.sampling import Sampling
from engine.tokenizer import stop_prefix
from weights.errors import UserError

KEY = HOSTILE_KEY


@refreekv.register("boom-hostile")
class Boom(refreekv.Policy):
    """A research policy with a bug: its plan raises."""

    def plan(self, probe):
        raise RuntimeError("bug in a research policy")


@pytest.fixture(scope="module")
def served(chat_tiny):
    with hostile_server(chat_tiny) as s:
        yield s


def refused(r, status=400, param=None, words=""):
    err = r.json()["error"]
    assert r.status_code == status, (r.status_code, err)
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def solo(eng, ids, n, policy=None):
    return eng.generate([ids], policy or refreekv.make("full"), Sampling(max_new_tokens=n))[0]


# ------------------------------------------------------------------------ refused at the boundary
def test_1_probe_widths_and_snapkv_kernel_are_bounded(served):
    for kv, words in [
        ({"policy": "snapkv", "window": 10**6}, "window must be a whole number in [1, 64]"),
        ({"policy": "h2o", "window": 10**4}, "window must be a whole number in [1, 64]"),
        ({"policy": "refreekv", "rows": 65}, "rows must be a whole number in [1, 64]"),
        ({"policy": "refreekv-topp", "rows": 10**9}, "rows must be"),
        ({"policy": "snapkv", "kernel": 10**9}, "kernel must be a whole number in [1, 63]"),
    ]:
        refused(post(served, {"prompt": "Hello", "max_tokens": 2, "kv": kv}), 400, "kv", words)
    # within the row bound, but a 64-row probe over a 400-token prompt is over this engine's bound
    r = post(served, {"prompt": [5] * 400, "max_tokens": 2, "kv": {"policy": "snapkv", "window": 64}})
    refused(r, 400, "kv", "attention probe of")
    ok = post(served, {"prompt": [5] * 400, "max_tokens": 2, "kv": {"policy": "snapkv", "window": 8}})
    assert ok.status_code == 200


@pytest.mark.parametrize("budget", [0, 512])
def test_1_an_admitted_batch_keeps_its_probe_within_the_bound(chat_tiny, budget):
    """Two prompts whose probes fit one at a time are prefilled one at a time (whole, or as
    chunks of a step's token budget that holds both)."""
    eng = serve_engine(chat_tiny)
    eng.max_batched_tokens = budget
    prompts = [[7] * 200, [9] * 180]
    pol = refreekv.make("snapkv", budget=0.5, window=16)
    together = eng.generate(prompts, pol, Sampling(max_new_tokens=3))
    assert [r.stats["batch"] for r in together] == [2, 2]
    eng.max_probe_bytes = eng.probe_bytes(16, 200)  # one fits, two do not
    apart = eng.generate(prompts, pol, Sampling(max_new_tokens=3))
    assert [r.stats["batch"] for r in apart] == [1, 1]
    assert [r.tokens for r in apart] == [r.tokens for r in together]


def test_2_top_k_is_bounded_and_a_sampled_neighbour_hurts_no_one(served, offline):
    huge = int("1" + "0" * 400)
    refused(
        post(served, {"prompt": "x", "top_k": huge, "temperature": 1}), 400, "top_k", "must be in [-1, 256]"
    )
    ids = [11, 12, 13, 14]
    out = {}

    def go(k, body):
        out[k] = post(served, body)

    bodies = {
        "greedy": {"prompt": ids, "max_tokens": 12, "temperature": 0},
        "sampled": {"prompt": ids, "max_tokens": 12, "temperature": 1.0, "top_k": 256, "seed": 3},
    }
    ts = [threading.Thread(target=go, args=kv) for kv in bodies.items()]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out["sampled"].status_code == 200
    assert out["greedy"].json()["choices"][0]["text"] == solo(offline, ids, 12).text


def test_3_echo_scoring_counts_every_prompt_token_against_the_pool(chat_tiny):
    """A prompt of pages_per_row x page_size + 1 tokens scored with max_tokens 0 needs one page
    more than a row holds: refused (it used to be admitted and trip the pool's assertion)."""
    from engine.kv import page_bytes
    from weights.config import load_config

    c = load_config(chat_tiny)
    rows = 20  # pages per (layer, KV head) row
    gib = rows * c.n_layers * c.n_kv_heads * page_bytes(4, c.head_dim, torch.float32) / 2**30
    eng = serve_engine(chat_tiny, kv_memory=gib, page_size=4)
    assert eng.pool_pages() == rows * c.n_layers * c.n_kv_heads
    with pytest.raises(UserError, match="needs"):
        eng.check_fits([[5] * (rows * 4 + 1)], 0)
    eng.check_fits([[5] * (rows * 4)], 0)
    eng.check_fits([[5] * (rows * 4)], 1)
    with Served(eng, refreekv.make("full"), "tiny") as s:
        body = {"prompt": [5] * (rows * 4 + 1), "max_tokens": 0, "echo": True, "logprobs": 0}
        refused(httpx.post(s.url + "/completions", json=body, timeout=30), 400, "max_tokens", "never fit")
        body["prompt"] = [5] * (rows * 4)
        r = httpx.post(s.url + "/completions", json=body, timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) == rows * 4
        s.idle()


def test_4_prompts_times_n_is_capped_and_a_full_server_answers_429(chat_tiny):
    eng = serve_engine(chat_tiny)
    with Served(eng, refreekv.make("full"), "tiny", max_choices=8, max_queued=8) as s:
        r = httpx.post(s.url + "/completions", json={"prompt": [[5, 6]] * 3, "n": 3}, timeout=30)
        refused(r, 400, "prompt", "9 sequences; this server takes at most 8")
        # the engine thread is held, so eight requests stay queued; the ninth is told to come back
        entered, gate = threading.Event(), threading.Event()
        s.worker.inbox.put(("call", lambda: (entered.set(), gate.wait(60)), lambda result: None))
        assert entered.wait(30)
        out = []
        body = {"prompt": [5, 6, 7], "max_tokens": 8}
        send = lambda: out.append(httpx.post(s.url + "/completions", json=body, timeout=120))
        ts = [threading.Thread(target=send) for _ in range(8)]
        for t in ts:
            t.start()
        t0 = time.time()
        while s.worker.outstanding < 8 and time.time() - t0 < 30:
            time.sleep(0.01)
        r = httpx.post(s.url + "/completions", json={"prompt": [5], "max_tokens": 2}, timeout=30)
        gate.set()
        refused(r, 429, None, "retry shortly")
        assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
        for t in ts:
            t.join()
        assert [x.status_code for x in out] == [200] * 8
        s.idle()
        assert s.worker.outstanding == 0
        ok = httpx.post(s.url + "/completions", json={"prompt": [5], "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200


def test_5_stop_strings_are_capped_and_their_scan_reads_only_the_tail(served):
    refused(post(served, {"prompt": "x", "stop": ["a" * 257]}), 400, "stop", "at most 256 characters")
    refused(post(served, {"prompt": "x", "stop": ["a"] * 17}), 400, "stop", "at most 16")
    # the held-back tail equals its definition (the longest proper prefix of a stop ending the
    # text), whatever the text's length: only the last len(stop) - 1 characters are read
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        text = "".join("ab"[i] for i in torch.randint(0, 2, (int(torch.randint(0, 40, ())),), generator=g))
        stops = ["".join("ab"[i] for i in torch.randint(0, 2, (int(torch.randint(1, 8, ())),), generator=g))]
        if any(st in text for st in stops):
            continue
        want = max(
            [
                k
                for st in stops
                for k in range(1, min(len(text), len(st) - 1) + 1)
                if st.startswith(text[-k:])
            ],
            default=0,
        )
        long = "c" * 10**6 + text  # a million characters before: the same answer
        assert stop_prefix(text, stops) == want and stop_prefix(long, stops) == want


def test_6_a_stream_whose_client_stops_reading_is_aborted():
    """Outbox: updates waiting while nothing is taken for stall_s, or more than max_pending of
    them, abort the request once; a client that reads keeps it alive however slow the engine."""
    import asyncio

    from engine.serve.streams import Outbox

    now = [0.0]
    calls = []

    async def run():
        box = Outbox(5.0, lambda: calls.append(now[0]), max_pending=100, clock=lambda: now[0])
        for t in range(20):  # a reader that takes each update as it comes: never stalled
            now[0] = t * 10.0
            box.put(t)
            await box.get()
        assert calls == [] and not box.stalled
        box.put("a")  # the client stops reading
        now[0] += 6.0
        box.put("b")
        box.put("c")
        assert calls == [now[0]] and box.stalled  # once
        many = Outbox(1e9, lambda: calls.append("many"), max_pending=100, clock=lambda: now[0])
        for i in range(101):
            many.put(i)
        assert calls[-1] == "many"

    asyncio.run(run())


def test_6_a_stalled_stream_holds_its_text_once(served):
    """What waits for a stream is deltas: the pieces of a streamed answer add up to its text, each
    character once (an update used to carry the whole text so far)."""
    r = httpx.post(
        served.url + "/completions",
        json={"prompt": [5, 6, 7], "max_tokens": 60, "temperature": 0, "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    parts = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    texts = [p["choices"][0]["text"] for p in parts]
    whole = post(served, {"prompt": [5, 6, 7], "max_tokens": 60, "temperature": 0}).json()["choices"][0][
        "text"
    ]
    assert "".join(texts) == whole and sum(map(len, texts)) == len(whole)


def test_7_a_request_cannot_replan_every_step(served, offline):
    refused(
        post(served, {"prompt": "x", "kv": {"policy": "refreekv", "interval": 1}}),
        400,
        "kv.interval",
        "at least 16",
    )
    kv = {"policy": "streaming", "budget": 8, "interval": 16}
    ok = post(served, {"prompt": [40 + i for i in range(30)], "max_tokens": 40, "temperature": 0, "kv": kv})
    want = solo(offline, [40 + i for i in range(30)], 40, refreekv.make("streaming", budget=8, interval=16))
    choice = ok.json()["choices"][0]
    assert choice["text"] == want.text and choice["kv"].get("replans") == want.stats.get("replans")


def test_8_run_batch_keeps_every_line_when_an_n2_line_fails(offline):
    from engine.serve.run_batch import run
    from engine.serve.schema import RequestParser

    parser = RequestParser(offline, "tiny", refreekv.make("full"), offline.context)

    def line(cid, body):
        return json.dumps({"custom_id": cid, "url": "/v1/completions", "body": body})

    lines = [
        line("ok1", {"prompt": [5, 6], "max_tokens": 6, "temperature": 0}),
        line("boom", {"prompt": [5, 6], "max_tokens": 6, "n": 2, "kv": "boom-hostile"}),
        "not json",
        line("ok2", {"prompt": [7, 8], "max_tokens": 40, "n": 2, "temperature": 0}),
    ]
    emitted = []
    outs = run(offline, parser, lines, emit=emitted.append)
    assert [o["custom_id"] for o in outs] == ["ok1", "boom", None, "ok2"]
    assert [o["response"]["status_code"] for o in outs] == [200, 500, 400, 200]
    # written as each line finished: the bad line first, the long one last
    assert emitted[0]["response"]["status_code"] == 400 and emitted[-1]["custom_id"] == "ok2"
    assert sorted(map(json.dumps, emitted)) == sorted(map(json.dumps, outs))
    want = solo(offline, [7, 8], 40).text
    assert [c["text"] for c in outs[3]["response"]["body"]["choices"]] == [want, want]


def test_9_streamed_usage_counts_each_prompt_once(served):
    body = {"prompt": [5, 6], "max_tokens": 4, "n": 3, "temperature": 0}
    whole = post(served, body).json()["usage"]
    r = httpx.post(
        served.url + "/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    parts = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    assert parts[-1]["usage"] == whole and whole["prompt_tokens"] == 2


def test_10_streamed_text_offsets_run_on_and_chat_bytes_are_the_tokens_own(served, chat_tiny):
    from engine.tokenizer import Tokenizer

    body = {"prompt": "The mill", "max_tokens": 30, "temperature": 0, "logprobs": 1, "echo": True}
    whole = post(served, body).json()["choices"][0]["logprobs"]["text_offset"]
    r = httpx.post(
        served.url + "/completions",
        json={**body, "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    parts = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    got = [
        o for p in parts if p["choices"][0]["logprobs"] for o in p["choices"][0]["logprobs"]["text_offset"]
    ]
    assert got == whole and got == sorted(got) and len(set(got)) > 20
    # byte-level tokens: each token is one byte, part of a character or not (never U+FFFD's three)
    r = post(
        served,
        {
            "messages": [{"role": "user", "content": "é"}],
            "max_tokens": 40,
            "logprobs": True,
            "top_logprobs": 3,
        },
        path="/chat/completions",
    )
    entries = r.json()["choices"][0]["logprobs"]["content"]
    assert entries and all(len(e["bytes"]) == 1 for e in entries)
    assert all(len(t["bytes"]) == 1 for e in entries for t in e["top_logprobs"])
    tok = Tokenizer(chat_tiny)
    text = "naïve — 世界"
    assert b"".join(tok.token_bytes(i) for i in tok.encode(text, special=False)) == text.encode()


def test_11_a_failed_step_leaves_no_stale_updates(offline, monkeypatch):
    from engine import core as core_mod

    real = core_mod.pruning.due
    fail = {"left": 1}

    def due(running):
        if fail["left"] and any(q.n_accepted >= 3 for q in running):
            fail["left"] = 0
            raise RuntimeError("a failing step")
        return real(running)

    monkeypatch.setattr(core_mod.pruning, "due", due)
    with pytest.raises(RuntimeError, match="a failing step"):
        offline.generate([[5, 6, 7]], refreekv.make("full"), Sampling(max_new_tokens=10))
    assert offline.core.updates == {}
    seen = []
    res = offline.generate(
        [[9, 8]], refreekv.make("full"), Sampling(max_new_tokens=5), on_token=lambda k, t: seen.append(k)
    )
    assert set(seen) == {0} and res[0].tokens == solo(offline, [9, 8], 5).tokens


def test_12_aborting_a_group_leaves_its_finished_forks_alone(offline):
    core = offline.core
    rid = core.add_request(
        [5, 6, 7], [refreekv.make("boom-hostile"), refreekv.make("full")], Sampling(max_new_tokens=50)
    )
    results = {}
    while not results:
        for u in core.step():
            if u.result is not None:
                results.setdefault(u.key, []).append(u.result)
    assert list(results) == [(rid, 0)] and results[(rid, 0)][0].finish_reason == "error"
    before = core.totals["new_tokens"]
    assert core.abort(rid)
    while core.busy():
        for u in core.step():
            if u.result is not None:
                results.setdefault(u.key, []).append(u.result)
    for u in core.step():  # the abort's own update
        if u.result is not None:
            results.setdefault(u.key, []).append(u.result)
    assert len(results[(rid, 0)]) == 1 and [r.finish_reason for r in results[(rid, 1)]] == ["abort"]
    assert core.totals["new_tokens"] == before + len(results[(rid, 1)][0].tokens)
    assert offline.kv.n_free == offline.kv.n_pages


def test_13_a_preempted_sequence_keeps_its_pressure_replans_and_trace(tiny_ckpts, monkeypatch):
    """Pressure re-plans are not replayed after a preemption: each sequence's replans_pressure is
    every one it had (counted by a spy), and its budget trace runs on in tokens seen."""
    from helpers import small_engine

    from engine import core as core_mod

    real, spy = core_mod.pruning.replan, []

    def replan(runner, seqs, pressure=False):
        if pressure:
            spy.extend((seq.key, seq.stats.get("preempted", 0)) for seq in seqs)
        return real(runner, seqs, pressure)

    monkeypatch.setattr(core_mod.pruning, "replan", replan)
    eng = small_engine(tiny_ckpts["llama", False], 26, page_size=4, max_seqs=4)
    eng.eos = set()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (20, 22, 24, 26, 28, 18)]
    res = eng.generate(
        prompts, refreekv.make("streaming", budget=0.9, on_pressure=True), Sampling(max_new_tokens=70)
    )
    assert any(adm < res[k].stats["preempted"] for k, adm in spy)  # some came before a preemption
    for k, r in enumerate(res):
        assert r.stats.get("replans_pressure", 0) == sum(key == k for key, _ in spy)
        seen = [s for s, _ in r.stats.get("budget_trace", [])]
        assert seen == sorted(set(seen))
    assert eng.kv.n_free == eng.kv.n_pages


def test_14_malformed_values_are_400s_naming_their_field(served):
    nested = "[" * 100000 + "]" * 100000
    refused(post(served, None, raw=('{"prompt": ' + nested + "}").encode()), 400, None, "nests too deeply")
    raw = b'{"prompt": "x", "kv": {"policy": "snapkv", "budget": Infinity}}'
    refused(post(served, None, raw=raw), 400, None, "Infinity is not valid JSON")
    refused(post(served, None, raw=b'{"prompt": "x", "temperature": NaN}'), 400, None, "NaN")
    digits = '{"prompt": "x", "temperature": 1' + "0" * 400 + "}"
    refused(post(served, None, raw=digits.encode()), 400, "temperature", "finite number")
    refused(post(served, None, raw=b'{"prompt": "a\\ud800b"}'), 400, "prompt", "lone surrogate")
    chat = b'{"messages": [{"role": "user", "content": "\\udfff"}]}'
    refused(
        post(served, None, raw=chat, path="/chat/completions"), 400, "messages[0].content", "lone surrogate"
    )
    for kv in ({"policy": "streaming", "sinks": 1e300}, {"policy": "snapkv", "budget": 1e300}):
        refused(post(served, {"prompt": "x", "kv": kv}), 400, "kv", "whole number")
    assert post(served, {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_15_the_key_is_compared_in_constant_time(served, monkeypatch):
    import hmac

    import engine.serve.app as serve

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(serve.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    same_length = "Bearer " + "x" * len(KEY)
    r = httpx.post(served.url + "/completions", json={"prompt": "x"}, headers={"Authorization": same_length})
    refused(r, 401, None, "API key")
    assert calls and post(served, {"prompt": "x", "max_tokens": 2}).status_code == 200
