"""The server under load: concurrent clients, a quarter of which hang up mid-stream."""

import json
import random
import threading
import time

import httpx
from helpers import SERVE_KEY as KEY

import refreekv
from engine.sampling import Sampling


def test_load_with_disconnects(served, offline):
    """200 requests from 32 concurrent clients, a quarter of which hang up mid-stream: every
    completed one equals its offline greedy output, none is lost, /health answers throughout, and
    every page is back in the pool afterwards."""
    rng = random.Random(7)
    reqs = [
        dict(
            prompt=[rng.randrange(3, 256) for _ in range(rng.randrange(4, 70))],
            max_tokens=rng.randrange(4, 40),
            stream=rng.random() < 0.7,
            drop=rng.random() < 0.25,
        )
        for _ in range(200)
    ]
    for r in reqs:
        r["stream"] |= r["drop"]
        r["drop_after"] = rng.randrange(1, 4)
    pol = refreekv.make("refreekv", threshold=0.2)
    rids = [
        offline.core.add_request(r["prompt"], pol, Sampling(max_new_tokens=r["max_tokens"])) for r in reqs
    ]
    done = {}
    while offline.core.busy():
        done.update({u.key: u.result for u in offline.core.step() if u.result is not None})
    want = [done[rid] for rid in rids]
    got, health, lock = {}, [], threading.Lock()
    todo = list(range(len(reqs)))
    stop = threading.Event()

    def worker():
        with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as h:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                r = reqs[i]
                body = {
                    "model": "tiny",
                    "prompt": r["prompt"],
                    "max_tokens": r["max_tokens"],
                    "temperature": 0,
                    "stream": r["stream"],
                }
                if not r["stream"]:
                    got[i] = ("done", h.post("/completions", json=body).json()["choices"][0]["text"])
                    continue
                text, n, finished = "", 0, False
                with h.stream("POST", "/completions", json=body) as resp:
                    for line in resp.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ch = json.loads(line[6:])["choices"][0]
                        text += ch["text"]
                        n += 1
                        finished |= ch["finish_reason"] is not None
                        if r["drop"] and n >= r["drop_after"] and not finished:
                            break  # hang up mid-stream
                got[i] = ("done" if finished else "dropped", text)

    def probe():
        with httpx.Client(timeout=10) as h:
            while not stop.is_set():
                health.append(h.get(served.root + "/health").status_code)
                time.sleep(0.05)

    pr = threading.Thread(target=probe)
    pr.start()
    threads = [threading.Thread(target=worker) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    stop.set()
    pr.join()
    assert sorted(got) == list(range(len(reqs)))  # none lost
    dropped = 0
    for i, (how, text) in got.items():
        offline_text = want[i].text
        if how == "done":
            assert text == offline_text, i
        else:
            dropped += 1
            assert offline_text.startswith(text), i
    assert dropped > 20 and health and set(health) == {200}
    snap = served.idle()
    assert snap["pages_free"] + snap["cache_pages"] == snap["pages_total"]
