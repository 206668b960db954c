"""Hostile requests under load: benign streams stay right while every kind of hostile request is
sent beside them, and a flood of small requests gets answers or 429s, never a 5xx."""

import asyncio
import json
import threading
import time

import httpx
import pytest
from helpers import HOSTILE_KEY, Served, greedy, hostile_server, post, serve_engine

import refreekv

KEY = HOSTILE_KEY


@pytest.fixture(scope="module")
def served(chat_tiny):
    with hostile_server(chat_tiny) as s:
        yield s


def solo(eng, ids, n):
    return greedy(eng, ids, n, refreekv.make("full"))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024


HOSTILE = [  # (path, body or raw bytes, expected status)
    ("/completions", {"prompt": "Hello", "kv": {"policy": "snapkv", "window": 10**6}}, 400),
    ("/completions", {"prompt": "Hello", "kv": {"policy": "snapkv", "kernel": 10**9}}, 400),
    ("/completions", {"prompt": "Hello", "kv": {"policy": "h2o", "window": 0}}, 400),
    ("/completions", {"prompt": "Hello", "kv": {"policy": "refreekv", "rows": 10**4}}, 400),
    ("/completions", {"prompt": "Hello", "kv": {"policy": "refreekv-topp", "rows": 1000}}, 400),
    ("/completions", {"prompt": [5] * 400, "kv": {"policy": "snapkv", "window": 64}}, 400),
    ("/completions", {"prompt": "x", "top_k": 10**400, "temperature": 1}, 400),
    ("/completions", {"prompt": [[5, 6]] * 200}, 400),
    ("/completions", {"prompt": "x", "n": 17}, 400),
    ("/completions", {"prompt": "x", "stop": ["a" * 300]}, 400),
    ("/completions", {"prompt": "x", "stop": ["a"] * 17}, 400),
    ("/completions", {"prompt": "x", "kv": {"policy": "refreekv", "interval": 1}}, 400),
    ("/completions", ('{"prompt": ' + "[" * 50000 + "]" * 50000 + "}").encode(), 400),
    ("/completions", b'{"prompt": "x", "kv": {"policy": "snapkv", "budget": Infinity}}', 400),
    ("/completions", b'{"prompt": "x", "temperature": NaN}', 400),
    ("/completions", ('{"prompt": "x", "temperature": 1' + "0" * 400 + "}").encode(), 400),
    ("/completions", b'{"prompt": "a\\ud800b"}', 400),
    ("/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400),
    ("/completions", {"prompt": "x", "kv": {"policy": "streaming", "sinks": 1e300}}, 400),
    ("/completions", {"prompt": "x", "kv": {"policy": "snapkv", "budget": 1e300}}, 400),
    ("/completions", {"prompt": "x", "kv": {"policy": "snapkv", "protected": [10**30]}}, 400),
    ("/completions", {"prompt": "x", "kv": {"policy": "snapkv", "window": "8"}}, 400),
    ("/completions", {"prompt": "x", "kv": {"policy": "no-such"}}, 400),
    ("/completions", {"prompt": "x", "kv": {"policy": "snapkv", "nope": 1}}, 400),
    ("/completions", {"prompt": [5, 10**9]}, 400),
    ("/completions", {"prompt": "x", "max_tokens": -1}, 400),
    ("/completions", {"prompt": "x", "max_tokens": 10**30}, 400),
    ("/completions", {"prompt": "x", "seed": 2**70}, 400),
    ("/completions", {"prompt": "x", "top_p": 0}, 400),
    ("/completions", {"prompt": "x", "logprobs": 1000}, 400),
    ("/completions", [1, 2, 3], 400),
    ("/completions", b"{not json", 400),
    ("/completions", {"prompt": "x", "model": "gpt-17"}, 404),
    ("/completions", {"prompt": "x" * 300000}, 413),
    ("/chat/completions", {"messages": "hi"}, 400),
    ("/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400),
    ("/completions", {"prompt": [5] * 300, "max_tokens": 3, "kv": {"policy": "snapkv", "window": 8}}, 200),
]


def test_hostile_load_hurts_no_benign_stream(served, offline):
    """Benign streams stay in flight while every kind of hostile request above is sent (twice, from
    four threads): each benign answer equals its solo greedy output, each hostile request gets its
    4xx (one is served correctly) and none a 5xx, /health answers within a second
    throughout, the pool comes back whole, and the process's RSS grows by less than 300 MiB."""
    assert (
        len({json.dumps(b) if not isinstance(b, bytes) else b.decode() for _, b, s in HOSTILE if s != 200})
        >= 25
    )
    benign = [[20 + i, 30 + i, 40 + i, 50 + i] for i in range(6)]
    want = [solo(offline, ids, 48).text for ids in benign]
    rss0 = _rss_mib()
    got, statuses, health, stop = {}, [], [], threading.Event()

    def stream(i):
        body = {"prompt": benign[i], "max_tokens": 48, "temperature": 0, "stream": True}
        with httpx.stream(
            "POST",
            served.url + "/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        ) as r:
            parts = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        got[i] = "".join(p["choices"][0]["text"] for p in parts)

    def hostile(k):
        for path, body, want_status in HOSTILE[k::4] * 2:
            raw = body if isinstance(body, bytes) else None
            r = post(served, None if raw else body, path=path, raw=raw)
            statuses.append((path, str(body)[:60], r.status_code, want_status))
            if r.status_code != 200:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    def poll():
        while not stop.is_set():
            t0 = time.time()
            ok = httpx.get(served.root + "/health", timeout=5).status_code == 200
            health.append((ok, time.time() - t0))
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    ts = [threading.Thread(target=stream, args=(i,)) for i in range(len(benign))]
    ts += [threading.Thread(target=hostile, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    stop.set()
    poller.join()
    assert [got.get(i) for i in range(len(benign))] == want
    wrong = [s for s in statuses if s[2] != s[3]]
    assert not wrong and len(statuses) == 2 * len(HOSTILE), wrong
    assert health and all(ok for ok, _ in health) and max(dt for _, dt in health) < 1.0
    served.idle()
    assert _rss_mib() - rss0 < 300


def test_a_flood_of_small_requests_gets_answers_or_429s(chat_tiny, offline):
    """300 concurrent small requests against a server that holds 32 sequences: every answer is a
    200 equal to its solo output or a 429 with Retry-After, never a 5xx; /health keeps answering."""

    eng = serve_engine(chat_tiny)
    want = {i: solo(offline, [3 + i % 200, 7], 4).text for i in range(0, 300, 37)}

    async def flood(url):
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=300)) as c:

            async def one(i):
                return await c.post(
                    url + "/completions", json={"prompt": [3 + i % 200, 7], "max_tokens": 4, "temperature": 0}
                )

            async def health():
                t0 = time.time()
                r = await c.get(url.removesuffix("/v1") + "/health")
                return r.status_code, time.time() - t0

            tasks = [asyncio.create_task(one(i)) for i in range(300)]
            probes = []
            while not all(t.done() for t in tasks):
                probes.append(await health())
                await asyncio.sleep(0.05)
            return [t.result() for t in tasks], probes

    with Served(eng, refreekv.make("full"), "tiny", max_queued=32) as s:
        rs, probes = asyncio.run(flood(s.url))
        s.idle()
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429} and codes.count(200) >= 32, sorted(set(codes))
    for i, r in enumerate(rs):
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
        elif i in want:
            assert r.json()["choices"][0]["text"] == want[i]
    assert probes and all(code == 200 for code, _ in probes)
