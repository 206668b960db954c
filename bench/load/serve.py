"""Serving benchmark: the OpenAI-compatible server (engine/serve/) under an open-loop load of
streaming clients, once per KV policy, on one pool.

    python -m bench.serve --model smollm2-135m-instruct --rate 2 --requests 64 --results-md bench/RESULTS.md

The server runs in this process (build_app on uvicorn, a loopback port, a thread); the clients run in
a process of their own and reach it over TCP (httpx.AsyncClient, one asyncio task per request,
launched at its arrival time). Arrivals
are Poisson at --rate requests/s (seeded exponential gaps, the first at t = 0); every policy gets
the same schedule and prompts: bench.throughput's real texts as token ids to /v1/completions,
max_tokens --new-tokens, temperature 0, streamed with usage. Policies, per request through the
`kv` field: full, refreekv (T = 1%), refreekv metric="mass", snapkv 50% (--policies picks some).
The pool holds --pool-tokens full-cache tokens per (layer, KV head) row (as bench/load/throughput.py
sizes it). --long N makes N of the prompts, spread evenly, 4-8x longer than the others' mean;
--max-batched-tokens 0,256,4096:3 runs every policy once per chunked-prefill setting (0: prompts
whole; N:X the step bound X within N tokens; serve: the server's default, each run's costs
measured afresh).

Per policy: TTFT p50/p99 (send to the first chunk with text, or to the final chunk if none had
any), inter-token latency p50/p99 (gaps between successive content chunks: one chunk is what one
engine step accepted, so each gap counts once), output tok/s (usage.completion_tokens over the wall
from first send to last finish), requests/s, peak running and waiting sequences (/metrics every
50 ms), mean KV budget (final chunks' `kv.budget`), preemptions (refreekv_preemptions_total's change).

--offline-check: is HTTP the bottleneck? The same workload, full policy, every request at once,
offline through engine.run_batch.run (before the server starts: one driver at a time), then through
the server (all sent at t = 0). Server tok/s should be >= 0.9 x offline's.
"""

import argparse
import asyncio
import itertools
import json
import random
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

import refreekv
from bench.common import SHAPES, append_results, git_commit, log, run_meta
from bench.load.throughput import label, setup
from engine.sampling import Sampling
from weights.errors import UserError

KV = {
    "full": {"policy": "full"},
    "refreekv": {"policy": "refreekv"},
    "refreekv-mass": {"policy": "refreekv", "metric": "mass"},
    "snapkv": {"policy": "snapkv", "budget": 0.5},
}
POLL_S = 0.05
RATIO = 0.9  # --offline-check: server tok/s >= RATIO x offline tok/s


def policy_of(spec: dict) -> refreekv.Policy:
    return refreekv.make(spec["policy"], **{k: v for k, v in spec.items() if k != "policy"})


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile of xs (linear interpolation), None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


class Server:
    """engine/serve/app.py's app on a free loopback port, served by uvicorn in a thread of this process."""

    def __init__(self, eng, name: str, warm=None):
        self.eng, self.name, self.warm = eng, name, warm

    def __enter__(self):
        import uvicorn

        from engine.serve.app import build_app

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.root = f"http://127.0.0.1:{sock.getsockname()[1]}"
        from engine.serve.worker import Worker

        worker = Worker(self.eng)
        if self.warm is not None:  # on the engine thread, whose CUDA graphs the server replays
            worker.call(self.warm)
        app = build_app(self.eng, refreekv.make("full"), self.name, worker=worker)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[sock]), daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 60 or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def parse_metrics(text: str) -> dict:
    """/metrics' Prometheus text as {name: value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.split()
            out[k] = float(v)
    return out


async def scrape(client, root) -> dict:
    return parse_metrics((await client.get(root + "/metrics")).text)


async def poll(client, root, done: asyncio.Event, peak: dict) -> dict:
    """Max running and waiting sequences on /metrics until `done` is set and the engine is idle
    (nothing running or waiting, every page back: free or held by the prefix cache alone); returns
    the last scrape."""
    while True:
        m = await scrape(client, root)
        peak["running"] = max(peak["running"], int(m["refreekv_requests_running"]))
        peak["waiting"] = max(peak["waiting"], int(m["refreekv_requests_waiting"]))
        if (
            done.is_set()
            and m["refreekv_requests_running"] == m["refreekv_requests_waiting"] == 0
            and m["refreekv_kv_pages_free"] + m["refreekv_prefix_cache_pages"] == m["refreekv_kv_pages_total"]
        ):
            return m
        await asyncio.sleep(POLL_S)


async def one(client, root, body: dict, at: float) -> dict:
    """One streamed request sent at perf_counter() == at: its timings, tokens, budget, error."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    rec = dict(sent=time.perf_counter(), first=None, done=None, gaps=[], tokens=0, budget=None, error=None)
    last = None
    try:
        async with client.stream("POST", root + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}"
                return rec
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    break
                if not line.startswith("data: "):
                    continue
                obj = json.loads(line[len("data: ") :])
                if "error" in obj:
                    rec["error"] = obj["error"].get("message")
                    break
                if obj.get("usage"):
                    rec["tokens"] = obj["usage"]["completion_tokens"]
                for ch in obj.get("choices", []):
                    if not (ch.get("text") or ch.get("finish_reason")):
                        continue
                    now = time.perf_counter()
                    rec["first"] = rec["first"] or now
                    rec["gaps"] += [] if last is None else [now - last]
                    last = now
                    if ch.get("kv"):
                        rec["budget"] = ch["kv"]["budget"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        rec["done"] = time.perf_counter()
    return rec


async def drive(root: str, bodies: list[dict], arrivals: list[float]) -> dict:
    """Send bodies at their arrival offsets (s), polling /metrics; wait until the engine is idle."""
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        before = await scrape(client, root)
        peak = dict(running=0, waiting=0)
        done = asyncio.Event()
        poller = asyncio.create_task(poll(client, root, done, peak))
        t0 = time.perf_counter()
        recs = await asyncio.gather(*(one(client, root, b, t0 + t) for b, t in zip(bodies, arrivals)))
        done.set()
        after = await asyncio.wait_for(poller, 60)
    preempt = after["refreekv_preemptions_total"] - before["refreekv_preemptions_total"]
    return dict(recs=recs, peak=peak, preemptions=int(preempt))


def drive_apart(root: str, bodies: list[dict], arrivals: list[float]) -> dict:
    """drive() in a process of its own: the clients' Python (asyncio, SSE parsing) does not share the
    server's interpreter lock, as real clients would not (started before the timing begins)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_drive_sync, (root, bodies, arrivals))


def _drive_sync(root, bodies, arrivals):
    return asyncio.run(drive(root, bodies, arrivals))


def summarize(policy: str, rate: float | None, run: dict) -> dict:
    """A table row (and per-request TTFT, content chunks and tokens for the JSON)."""
    recs = run["recs"]
    ok = [r for r in recs if r["error"] is None]
    wall = max(r["done"] for r in recs) - min(r["sent"] for r in recs)
    toks = sum(r["tokens"] for r in ok)
    ttft = [1e3 * (r["first"] - r["sent"]) for r in ok if r["first"] is not None]
    itl = [1e3 * g for r in ok for g in r["gaps"]]
    budgets = [r["budget"] for r in ok if r["budget"] is not None]
    return dict(
        policy=policy,
        rate=rate,
        requests=len(recs),
        ok=len(ok),
        errors=[r["error"] for r in recs if r["error"] is not None],
        mean_budget=sum(budgets) / len(budgets) if budgets else None,
        ttft_p50_ms=pct(ttft, 0.5),
        ttft_p99_ms=pct(ttft, 0.99),
        itl_p50_ms=pct(itl, 0.5),
        itl_p99_ms=pct(itl, 0.99),
        new_tokens=toks,
        wall_s=wall,
        tok_s=toks / wall if wall else 0.0,
        req_s=len(ok) / wall if wall else 0.0,
        peak_running=run["peak"]["running"],
        peak_waiting=run["peak"]["waiting"],
        preemptions=run["preemptions"],
        ttft_ms=[None if r["first"] is None else 1e3 * (r["first"] - r["sent"]) for r in recs],
        chunks=[len(r["gaps"]) + (r["first"] is not None) for r in recs],
        completion_tokens=[r["tokens"] for r in recs],
    )


def offline(eng, parser, bodies: list[dict]) -> dict:
    """The same bodies (non-streaming) through engine.run_batch.run, every request at once."""
    from engine.serve.run_batch import run

    lines = [
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": b})
        for i, b in enumerate(bodies)
    ]
    t0 = time.perf_counter()
    outs = run(eng, parser, lines)
    wall = time.perf_counter() - t0
    ok = [o["response"]["body"] for o in outs if o["response"]["status_code"] == 200]
    toks = sum(b["usage"]["completion_tokens"] for b in ok)
    return dict(
        requests=len(lines),
        ok=len(ok),
        new_tokens=toks,
        wall_s=wall,
        tok_s=toks / wall,
        completion_tokens=[b["usage"]["completion_tokens"] for b in ok],
    )


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(rows: list[dict]) -> str:
    head = [
        "policy",
        "max batched tok",
        "rate req/s",
        "n",
        "mean budget",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "ITL p50 ms",
        "ITL p99 ms",
        "out tok/s",
        "req/s",
        "peak running",
        "peak waiting",
        "preempt.",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        budget = None if r["mean_budget"] is None else 100 * r["mean_budget"]
        n = str(r["requests"]) + (f" ({len(r['errors'])} failed)" if r["errors"] else "")
        out.append(
            "| "
            + " | ".join(
                [
                    r["policy"],
                    str(r.get("max_batched_tokens") or "whole prompts"),  # (older JSON: ints)
                    "all at t=0" if r["rate"] is None else f"{r['rate']:g}",
                    n,
                    fmt(budget, ".1f") + "%",
                    fmt(r["ttft_p50_ms"], ".0f"),
                    fmt(r["ttft_p99_ms"], ".0f"),
                    fmt(r["itl_p50_ms"], ".1f"),
                    fmt(r["itl_p99_ms"], ".1f"),
                    f"{r['tok_s']:.1f}",
                    f"{r['req_s']:.2f}",
                    str(r["peak_running"]),
                    str(r["peak_waiting"]),
                    str(r["preemptions"]),
                ]
            )
            + " |"
        )
    return "\n".join(out)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="real checkpoint (dir / hub id / bundled name; default: SmolLM2)")
    src.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape")
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate, requests/s (default 2)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--min-tokens", type=int, default=500)
    p.add_argument("--max-tokens", type=int, default=4000)
    p.add_argument("--new-tokens", type=int, default=32, help="max_tokens of every request")
    p.add_argument("--pool-tokens", type=int, default=48000, help="KV pool size in full-cache tokens per row")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-seqs", type=int, default=64)
    p.add_argument("--offline-check", action="store_true", help="also compare with engine.run_batch (full)")
    p.add_argument(
        "--long", type=int, default=0, help="prompts 4-8x longer than the others' mean (spread evenly)"
    )
    p.add_argument(
        "--max-batched-tokens",
        type=lambda x: x.split(","),
        help="chunked-prefill settings to run every policy at, e.g. 0,256,4096:3: N tokens per step, "
        "N:X within N tokens a step costs at most X decode steps (--step-bound), 0 prompts whole, "
        "serve the server's default (the default)",
    )
    p.add_argument("--policies", default=",".join(KV), help=f"some of {', '.join(KV)} (default all)")
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--results-md")
    a = p.parse_args(argv)
    if not 1 <= a.min_tokens <= a.max_tokens:
        raise UserError("need 1 <= --min-tokens <= --max-tokens")
    if a.requests < 1 or a.new_tokens < 1:
        raise UserError("--requests and --new-tokens must be >= 1")
    if not a.rate > 0:
        raise UserError(f"--rate must be > 0, got {a.rate}")
    a.policies = a.policies.split(",")
    bad = [x for x in a.policies if x not in KV]
    if bad:
        raise UserError(f"--policies: unknown {bad[0]!r}; choose from {', '.join(KV)}")
    if not 0 <= a.long <= a.requests:
        raise UserError("--long must be in [0, --requests]")
    return a


def chunking(eng, setting: str) -> str:
    """Set the engine's chunked prefill from a --max-batched-tokens item; how the tables name it."""
    if setting == "serve":
        eng.serve_defaults()
    else:
        tokens, _, bound = setting.partition(":")
        try:
            eng.max_batched_tokens = int(tokens)
            eng.step_bound = float(bound or 0)
        except ValueError:
            raise UserError(f"--max-batched-tokens: {setting!r} is not N or N:X") from None
    if not eng.max_batched_tokens:
        return "whole prompts"
    bound = f", bound {eng.step_bound:g}x" if eng.step_bound else ""
    return f"{eng.max_batched_tokens}{bound}"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commit = git_commit()  # at the start: the code this run imported
    try:
        a = parse_args(argv)
        if a.threads:
            torch.set_num_threads(a.threads)
        eng, name, kv_gib, prompts, kinds = setup(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from engine.serve.schema import RequestParser

    served = eng.path.name
    rng = random.Random(f"serve:{a.seed}")
    arrivals = list(itertools.accumulate([0.0] + [rng.expovariate(a.rate) for _ in prompts[1:]]))
    pt = [len(p) for p in prompts]
    log(
        f"[serve] {name}: {len(prompts)} requests, {sum(pt)} prompt tokens ({min(pt)}-{max(pt)}), "
        f"pool {eng.kv.n_pages} pages ({kv_gib:.2f} GiB), arrivals over {arrivals[-1]:.1f} s"
    )

    def bodies(spec, stream=True):
        extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        return [
            dict(model=served, prompt=p, max_tokens=a.new_tokens, temperature=0, kv=spec, **extra)
            for p in prompts
        ]

    specs = [KV[x] for x in a.policies]
    budgets = a.max_batched_tokens or ["serve"]
    try:
        for b in budgets:  # every setting checked before anything runs
            chunking(eng, b)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chunking(eng, budgets[0])

    def warm():  # compile (if on) and first-call costs, outside every timing
        for spec in specs:
            pol = policy_of(spec)
            eng.warmup(pol)
            eng.generate(prompts[:2], pol, Sampling(max_new_tokens=2))

    warm()  # here for the offline check, and on the server's engine thread below
    check = None
    if a.offline_check:  # offline first: the engine takes one driver at a time
        log("[serve] offline check: engine.run_batch ...")
        parser = RequestParser(eng, served, refreekv.make("full"), eng.context)
        check = dict(offline=offline(eng, parser, bodies(KV["full"], stream=False)))
    rows = []
    with Server(eng, served, warm) as srv:
        if a.offline_check:
            log("[serve] offline check: the server, every request at t=0 ...")
            run = drive_apart(srv.root, bodies(KV["full"]), [0.0] * len(prompts))
            check["server"] = summarize(label(policy_of(KV["full"])), None, run)
            check["server"]["max_batched_tokens"] = eng.max_batched_tokens
            check["ratio"] = check["server"]["tok_s"] / check["offline"]["tok_s"]
            check["met"] = check["ratio"] >= RATIO
            rows.append(dict(check["server"], policy=check["server"]["policy"] + " (offline check)"))
        for budget in budgets:
            for spec in specs:
                setting = chunking(eng, budget)  # the engine is idle between runs; its costs anew
                log(f"[serve] {label(policy_of(spec))} at {a.rate:g} req/s, max batched tokens {setting} ...")
                run = drive_apart(srv.root, bodies(spec), arrivals)
                r = summarize(label(policy_of(spec)), a.rate, run)
                r["max_batched_tokens"] = setting
                rows.append(r)
                first_error = f": {r['errors'][0]}" if r["errors"] else ""
                log(
                    f"[serve]   TTFT p50 {fmt(r['ttft_p50_ms'], '.0f')} ms, ITL p50 / p99 "
                    f"{fmt(r['itl_p50_ms'], '.0f')} / {fmt(r['itl_p99_ms'], '.0f')} ms, "
                    f"{r['tok_s']:.1f} tok/s, "
                    f"peak running {r['peak_running']}; {len(r['errors'])} errors{first_error}"
                )
    res = dict(
        **run_meta(eng, name, commit, "bench.serve", argv, kv_gib),
        rate=a.rate,
        arrivals=arrivals,
        prompt_tokens=pt,
        kinds=kinds,
        rows=rows,
        offline_check=check,
    )
    text = render(rows)
    if check:
        o, s = check["offline"], check["server"]
        text += (
            f"\n\nOffline check (full, every request at once): server {s['tok_s']:.1f} tok/s "
            f"({s['new_tokens']} tokens, streaming) vs engine.run_batch {o['tok_s']:.1f} tok/s "
            f"({o['new_tokens']} tokens): ratio {check['ratio']:.2f} "
            f"({'met' if check['met'] else 'MISSED'}: >= {RATIO})"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    if a.results_md:
        longs = f"; {a.long} of them 4-8x the mean of the others" if a.long else ""
        append_results(
            Path(a.results_md),
            (
                f"## Serving: {name} ({res['date']})\n\n"
                f"- device: {res['device']}, dtype {res['dtype']}; commit `{commit}`\n"
                f"- command: `{res['command']}`\n"
                f"- workload: {len(prompts)} requests, Poisson arrivals at {a.rate:g} req/s, prompts "
                f"{min(pt)}-{max(pt)} tokens (mean {sum(pt) / len(pt):.0f}{longs}), "
                f"{a.new_tokens} new tokens each, "
                f"streaming; pool {eng.kv.n_pages} pages of {eng.page_size} tokens ({kv_gib:.2f} GiB), "
                f"max {a.max_seqs} sequences\n\n" + text + "\n"
            ),
        )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
