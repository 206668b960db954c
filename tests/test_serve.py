"""The OpenAI-compatible server (engine/serve/) driven over loopback by real clients: the
`openai` package, httpx, and lm-evaluation-harness's own `local-completions` model. Oracles:
Engine.generate on a second engine (its own pool), and transformers for log-probabilities.
Shared fixtures (conftest.py): `chat_tiny`, `offline`, `served`; the bad requests are
tests/test_serve_errors.py's, the load tests tests/test_serve_load.py's."""

import json
import random
import threading
import time

import httpx
import openai
import pytest
import torch
from helpers import SERVE_KEY as KEY
from helpers import Served, greedy, hf_model, serve_engine

import refreekv
from engine.engine import Engine
from engine.sampling import Sampling


def client(s, **kw):
    return openai.OpenAI(base_url=s.url, api_key=KEY, max_retries=0, **kw)


def test_a_request_prunes_during_decoding_through_its_kv_object(served, offline):
    c = client(served)
    prompt = "The river ran past the mill"
    spec = {"policy": "streaming", "budget": 10, "interval": 16}
    want = greedy(
        offline, offline.encode(prompt, chat=False), 40, refreekv.make("streaming", budget=10, interval=16)
    )
    r = c.completions.create(
        model="tiny", prompt=prompt, max_tokens=40, temperature=0, extra_body={"kv": spec}
    )
    kv = r.choices[0].model_extra["kv"]
    assert r.choices[0].text == want.text
    assert kv["replans"] == want.stats["replans"] == (40 - 1) // 16
    assert kv["final_kept"] == want.stats["final_kept"] < kv["final_seen"]


def test_completions_streaming_and_chat_equal_engine_generate(served, offline):
    c = client(served)
    prompt = "The river ran past the mill"
    want = greedy(offline, offline.encode(prompt, chat=False), 24)
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.tokens) + bool(
        want.stats.get("eos")
    )
    assert r.choices[0].finish_reason == want.finish_reason
    kv = r.choices[0].model_extra["kv"]
    assert kv["policy"] == "refreekv" and kv["kept_per_head"] == want.stats["kept_per_head"]
    assert kv["pages_after_pruning"] == want.stats["pages_after_pruning"] <= kv["pages_after_prefill"]
    parts = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == want.text
    assert parts[-1].choices[0].finish_reason == want.finish_reason
    # token ids, a list of them, and a list of strings: one choice each, in order
    ids = [[5, 6, 7, 8, 9], [40, 41, 42]]
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert [ch.text for ch in r.choices] == [greedy(offline, i, 10).text for i in ids]
    r = c.completions.create(model="tiny", prompt=ids[0], max_tokens=10, temperature=0)
    assert r.choices[0].text == greedy(offline, ids[0], 10).text
    # chat: the messages through the checkpoint's template
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}]
    chat_ids = offline.tokenizer.encode(offline.tokenizer.apply_messages(msgs), special=False)
    want = greedy(offline, chat_ids, 16)
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == len(chat_ids)
    parts = list(
        c.chat.completions.create(
            model="tiny",
            messages=msgs,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want.text
    assert parts[-1].usage.prompt_tokens == len(chat_ids)
    served.idle()


def test_stop_strings_and_seeded_sampling(served, offline):
    c = client(served)
    ids = [9, 8, 7, 6, 5, 4, 3 + 7]
    text = greedy(offline, ids, 30).text
    stop = text[5:8]
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == text[: text.find(stop)] and r.choices[0].finish_reason == "stop"
    s = Sampling(max_new_tokens=20, temperature=1.0, top_k=20, seed=11)
    want = offline.generate([ids], refreekv.make("refreekv", threshold=0.2), s)[0].text
    r = c.completions.create(
        model="tiny", prompt=ids, max_tokens=20, temperature=1.0, seed=11, n=3, extra_body={"top_k": 20}
    )
    texts = [ch.text for ch in r.choices]
    assert texts[0] == want and len(set(texts)) > 1  # n > 1: seed, seed + 1, ... (not n copies)


def test_echo_logprobs_equal_transformers_teacher_forced(served, chat_tiny):
    """What lm-eval's loglikelihood sends: token ids, echo, logprobs 1, max_tokens 1 (and 0)."""
    ids = [12, 200, 45, 45, 3 + 90, 17, 250, 8, 64, 31]
    with torch.no_grad():
        lp = hf_model(chat_tiny)(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    body = {
        "model": "tiny",
        "prompt": [ids],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "echo": True,
        "seed": 1234,
    }
    r = httpx.post(served.url + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}).json()
    got = r["choices"][0]["logprobs"]
    assert len(got["token_logprobs"]) == len(ids) + 1 and got["token_logprobs"][0] is None  # prompt + 1 new
    want = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(
        torch.tensor(got["token_logprobs"][1 : len(ids)], dtype=torch.float64), want, atol=1e-4
    )
    # the top-1 at every position, the new token's too
    best = [max(t.values()) for t in got["top_logprobs"][1:]]
    assert torch.allclose(torch.tensor(best, dtype=torch.float64), lp.max(-1).values, atol=1e-4)
    assert got["token_logprobs"][-1] == pytest.approx(lp[-1].max().item(), abs=1e-4)  # greedy: the top-1
    r0 = httpx.post(
        served.url + "/completions",
        json={**body, "max_tokens": 0},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()
    assert r0["choices"][0]["logprobs"]["token_logprobs"] == got["token_logprobs"][:-1]
    assert r0["usage"]["completion_tokens"] == 0


def test_requests_with_their_own_policies_get_what_they_get_alone(served, offline):
    policies = [
        None,
        {"policy": "full"},
        {"policy": "snapkv", "budget": 0.3},
        {"policy": "streaming", "budget": 12},
        "h2o",
        {"policy": "refreekv", "metric": "mass", "threshold": 0.05},
    ]
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randrange(20, 60))] for _ in policies]
    out = [None] * len(policies)

    def go(i):
        body = {"model": "tiny", "prompt": prompts[i], "max_tokens": 12, "temperature": 0}
        if policies[i] is not None:
            body["kv"] = policies[i]
        out[i] = httpx.post(
            served.url + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        ).json()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(policies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, spec in enumerate(policies):
        name, kw = (
            ("refreekv", {"threshold": 0.2})
            if spec is None
            else (spec, {})
            if isinstance(spec, str)
            else (spec["policy"], {k: v for k, v in spec.items() if k != "policy"})
        )
        want = greedy(offline, prompts[i], 12, refreekv.make(name, **kw))
        ch = out[i]["choices"][0]
        assert ch["text"] == want.text and ch["kv"]["kept_per_head"] == want.stats["kept_per_head"], i
        assert ch["kv"]["policy"] == name


def test_lm_eval_local_completions_client(served, chat_tiny):
    """lm-evaluation-harness's own client, in process, with hand-built requests (no dataset)."""
    import os

    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    os.environ["OPENAI_API_KEY"] = KEY
    lm = LocalCompletionsAPI(
        base_url=served.url + "/completions",
        model="tiny",
        tokenizer=str(chat_tiny),
        tokenizer_backend="huggingface",
        num_concurrent=1,
        max_retries=1,
    )
    pairs = [("The capital of France is", " Paris"), ("One two three", " four five")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    model = hf_model(chat_tiny)
    eng = serve_engine(chat_tiny)
    for (ctx, cont), (ll, is_greedy) in zip(pairs, got):
        a, b = eng.tokenizer.encode(ctx), eng.tokenizer.encode(ctx + cont)[len(eng.tokenizer.encode(ctx)) :]
        with torch.no_grad():
            lp = model(torch.tensor([a + b])).logits[0].double().log_softmax(-1)
        rows = lp[len(a) - 1 : len(a) + len(b) - 1]
        assert ll == pytest.approx(rows[torch.arange(len(b)), torch.tensor(b)].sum().item(), abs=1e-3)
        assert is_greedy == (rows.argmax(-1).tolist() == b)
    gen = lm.generate_until(
        [Instance("generate_until", {}, ("Q: rivers? A:", {"until": ["\n"], "max_gen_toks": 8}), 0)]
    )
    ids = eng.tokenizer.encode("Q: rivers? A:")
    want = eng.generate(
        [ids], refreekv.make("refreekv", threshold=0.2), Sampling(max_new_tokens=8, stop=["\n"])
    )[0]
    assert gen == [want.text]


def test_models_health_and_metrics(served):
    h = {"Authorization": f"Bearer {KEY}"}
    m = httpx.get(served.url + "/models", headers=h).json()
    assert m["data"][0]["id"] == "tiny" and m["data"][0]["max_model_len"] == 512
    assert httpx.get(served.root + "/health").json() == {"status": "ok"}
    before = _metrics(served)
    httpx.post(
        served.url + "/completions",
        json={"prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0, "kv": "full"},
        headers=h,
        timeout=30,
    )
    served.idle()
    after = _metrics(served)
    assert after["refreekv_requests_total"] == before["refreekv_requests_total"] + 1
    assert after["refreekv_generation_tokens_total"] > before["refreekv_generation_tokens_total"]
    assert (
        after["refreekv_kv_pages_free"] + after["refreekv_prefix_cache_pages"]
        == after["refreekv_kv_pages_total"]
        and after["refreekv_requests_running"] == 0
    )
    assert 0 < after["refreekv_kv_budget_mean"] <= 1
    assert after["refreekv_prefill_tokens_pending"] == 0
    # a prompt arriving at an idle server is prefilled whole (no stream waits for it: the step
    # bound's cap), and says so; the same prompt again finds its full blocks in the prefix cache
    prompt = [5 + i % 200 for i in range(300)]
    kvs = []
    for _ in range(2):
        r = httpx.post(
            served.url + "/completions",
            json={"prompt": prompt, "max_tokens": 2, "kv": "full"},
            headers=h,
            timeout=60,
        ).json()
        kvs.append(r["choices"][0]["kv"])
    assert kvs[0]["prefill_chunks"] == 1 and kvs[0]["cached_tokens"] == 0
    assert kvs[1]["prefill_chunks"] == 1 and kvs[1]["cached_tokens"] == 288  # 18 pages of 16, 12 left
    served.idle()
    m = _metrics(served)
    assert m["refreekv_prefix_cache_pages"] > 0 and m["refreekv_prefix_cache_hit_tokens_total"] >= 288


def _metrics(s) -> dict:
    out = {}
    for line in httpx.get(s.root + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.split()
            out[k] = float(v)
    return out


def test_serve_cli_drains_on_sigterm_and_exits_0(chat_tiny):
    """The real command: binds, serves, and on SIGTERM lets the in-flight stream finish, exit 0."""
    import signal

    proc, line, url = serve_cli(chat_tiny, "--kv", "full", "--kv-memory", "0.05", "--drain-s", "20")
    try:
        chunks = []

        def stream():
            body = {"prompt": [5, 6, 7], "max_tokens": 300, "temperature": 0, "stream": True}
            with httpx.stream("POST", url + "/completions", json=body, timeout=120) as r:
                chunks.extend(ln for ln in r.iter_lines() if ln.startswith("data: "))

        t = threading.Thread(target=stream)
        t.start()
        while not chunks:
            time.sleep(0.01)
            assert t.is_alive() or chunks
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert proc.wait(120) == 0
        assert chunks[-1] == "data: [DONE]"  # drained, not cut
        tail = proc.stderr.read()
        assert "Traceback" not in tail
    finally:
        proc.kill()


def test_serve_cli_bad_flags_are_one_line_before_loading(chat_tiny):
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, msg in [
            (["--port", "70000"], "--port must be in [0, 65535]"),
            (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
            (["--kv", "nope"], "unknown KV policy 'nope'"),
        ]:
            r = subprocess.run(
                [sys.executable, "-m", "engine.serve", "--model", str(chat_tiny), *args],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert (
                r.returncode == 2 and r.stderr.strip() == f"error: {r.stderr.strip()[7:]}" and msg in r.stderr
            ), r.stderr
            assert r.stderr.count("\n") == 1


def test_run_batch_follows_the_openai_batch_format(chat_tiny, offline, tmp_path):
    import subprocess
    import sys

    lines = [
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "The mill", "max_tokens": 12, "temperature": 0},
        },
        {
            "custom_id": "b",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "prompt": [[5, 6, 7, 8]],
                "max_tokens": 1,
                "temperature": 0,
                "echo": True,
                "logprobs": 1,
            },
        },
        {
            "custom_id": "c",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 10,
                "temperature": 0,
                "kv": {"policy": "snapkv", "budget": 0.5},
            },
        },
        {"custom_id": "d", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "e", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "top_p": 2}},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    out = tmp_path / "out.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.run_batch",
            "-i",
            str(inp),
            "-o",
            str(out),
            "--model",
            str(chat_tiny),
            "--kv",
            "refreekv",
            "--threshold",
            "0.2",
            "--device",
            "cpu",
            "--kv-memory",
            "0.05",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    # one line each, in the order they finished (bad lines at once): matched by custom_id
    got = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert len(out.read_text().splitlines()) == 6 and set(got) == {"a", "b", "c", "d", "e", None}
    res = [got[k] for k in ("a", "b", "c", "d", "e", None)]
    assert [x["response"]["status_code"] for x in res] == [200, 200, 200, 400, 400, 400]
    a = res[0]["response"]["body"]["choices"][0]
    assert a["text"] == greedy(offline, offline.encode("The mill", chat=False), 12).text
    b = res[1]["response"]["body"]["choices"][0]["logprobs"]
    assert len(b["token_logprobs"]) == 5 and b["token_logprobs"][0] is None
    c = res[2]["response"]["body"]["choices"][0]
    ids = offline.tokenizer.encode(
        offline.tokenizer.apply_messages([{"role": "user", "content": "Hi"}]), special=False
    )
    assert c["message"]["content"] == greedy(offline, ids, 10, refreekv.make("snapkv", budget=0.5)).text
    assert c["kv"]["policy"] == "snapkv"
    assert "'url' must be one of" in res[3]["response"]["body"]["error"]["message"]
    assert res[4]["response"]["body"]["error"]["param"] == "top_p"
    assert "5/6 requests ok" not in r.stderr and "3/6 requests ok" in r.stderr


@pytest.mark.slow
def test_bundled_model_through_the_openai_client(smollm_gen, smollm):
    """The real bundled model: chat and completions, streamed and not, equal Engine.generate."""
    eng = Engine(str(smollm), device="cpu", kv_memory=0.25, max_seqs=4)
    q = "What is the capital of France?"
    want_chat = smollm_gen.generate(
        [smollm_gen.encode(q)], refreekv.make("refreekv"), Sampling(max_new_tokens=24)
    )[0]
    raw = smollm_gen.encode("The capital of France is", chat=False)
    want_raw = smollm_gen.generate([raw], refreekv.make("refreekv"), Sampling(max_new_tokens=16))[0]
    with Served(eng, refreekv.make("refreekv"), "smollm") as s:
        c = openai.OpenAI(base_url=s.url, api_key="none", max_retries=0)
        r = c.chat.completions.create(
            model="smollm", messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0
        )
        assert r.choices[0].message.content == want_chat.text and "Paris" in want_chat.text
        assert r.choices[0].model_extra["kv"]["budget"] == pytest.approx(want_chat.stats["budget"])
        parts = c.completions.create(
            model="smollm", prompt="The capital of France is", max_tokens=16, temperature=0, stream=True
        )
        assert "".join(p.choices[0].text for p in parts) == want_raw.text
        s.idle()


def test_serve_tensor_parallel_equals_one_process(chat_tiny, offline):
    """--tp 2 on CPU (gloo): rank 0 serves, rank 1 follows its requests step by step; the text equals
    one process's, and SIGTERM stops every rank with exit 0."""
    import signal

    proc, line, url = serve_cli(
        chat_tiny, "--tp", "2", "--kv", "refreekv", "--threshold", "0.2", "--kv-memory", "0.05", wait_s=180
    )
    try:
        assert "tensor parallel over 2 ranks" in line
        ids = [[5, 6, 7, 8, 9, 10], [40, 41, 42], [200, 100, 50, 25]]
        out = {}

        def go(i):
            body = {"prompt": ids[i], "max_tokens": 12, "temperature": 0, "stream": i == 1}
            if i == 1:
                with httpx.stream("POST", url + "/completions", json=body, timeout=120) as r:
                    parts = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
                out[i] = "".join(p["choices"][0]["text"] for p in parts)
            else:
                out[i] = httpx.post(url + "/completions", json=body, timeout=120).json()["choices"][0]["text"]

        ts = [threading.Thread(target=go, args=(i,)) for i in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        for i in range(3):
            assert out[i] == greedy(offline, ids[i], 12).text, i
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        proc.kill()


def serve_cli(chat_tiny, *args, wait_s=120):
    """`python -m engine.serve` on a free port in a process of its own: (process, its "serving" line,
    the /v1 URL), once it serves."""
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "engine.serve",
        "--model",
        str(chat_tiny),
        "--port",
        "0",
        "--device",
        "cpu",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    line = ""
    t0 = time.time()
    while "serving" not in line:
        line = proc.stderr.readline()
        if not (line or proc.poll() is None) or time.time() - t0 > wait_s:
            proc.kill()
            raise AssertionError(f"the server did not start: {line}")
    return proc, line, line.split(" on ")[-1].strip()
