"""Prefix cache: the OpenAI server with the cache off and on, per policy, on two workloads that repeat
their prompts' beginnings (engine/prefix.py).

    python -m bench.prefix --model smollm2-135m-instruct --threads 1 --results-md bench/RESULTS.md

- chat: --chat-requests requests that share one system prompt of --system tokens (real text), each
  with its own question (real text, 20-80 tokens), Poisson arrivals at --rate, streamed,
  --new-tokens each.
- mc: lm-eval's multiple choice: --contexts contexts of --context tokens (real text), 4
  continuations of 3-12 tokens each, scored with echo + logprobs = 1 and max_tokens 0 (lm-eval's
  loglikelihood requests), every request sent at t = 0 (lm-eval sends them concurrently).

The server is bench/load/serve.py's (uvicorn on loopback in this process, the clients in a process
of their own); one engine per setting, the same pool. Per row: TTFT p50 / p99 (chat: the first
token; mc: the response), prompt tokens and those prefilled (the rest came from the cache:
/metrics' refreekv_prefix_cache_* counters), the hit rate, the most pages in use (the cache's
included), and for mc the largest difference of any prompt log-probability from the cache-off run
(tokens must be identical; the target is 0 up to float noise).
"""

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from bench.common import append_results, build_engine, git_commit, log, run_meta
from bench.load.serve import KV, Server, drive_apart, parse_metrics, pct, policy_of, scrape, summarize
from bench.load.throughput import label
from weights.errors import UserError


def workloads(eng, a) -> dict:
    """Token ids: {"chat": [prompt], "mc": [prompt]} from real text."""
    from bench.quality.tasks import Material

    m, rng = Material(eng), random.Random(f"prefix:{a.seed}")
    system = m.tok(m.doc_text(rng, a.system)[0])[: a.system]
    chat = [
        system + m.tok("\n\nQ: " + m.doc_text(rng, rng.randint(20, 80))[0]) for _ in range(a.chat_requests)
    ]
    mc = []
    for _ in range(a.contexts):
        ctx = m.tok(m.doc_text(rng, a.context)[0])[: a.context]
        mc += [ctx + m.tok(" " + m.doc_text(rng, rng.randint(3, 12))[0])[:12] for _ in range(4)]
    return dict(chat=chat, mc=mc)


async def score(root: str, bodies: list[dict]) -> dict:
    """Non-streamed requests all at t = 0: each one's latency and prompt log-probabilities."""
    async with httpx.AsyncClient(timeout=None) as client:
        before = await scrape(client, root)
        t0 = time.perf_counter()

        async def one(body):
            r = await client.post(root + "/v1/completions", json=body)
            return time.perf_counter() - t0, r.json()

        outs = await asyncio.gather(*(one(b) for b in bodies))
        after = await scrape(client, root)
    return dict(outs=outs, before=before, after=after)


def _score_sync(root, bodies):
    return asyncio.run(score(root, bodies))


class PeakPages:
    """The most pool pages in use (the cache's included), from /metrics every 50 ms, in a thread."""

    def __init__(self, root: str):
        self.root, self.peak, self.stop = root, 0, threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        with httpx.Client(timeout=None) as c:
            while not self.stop.is_set():
                used = _scrape(c, self.root)["refreekv_kv_pages_used"]
                self.peak = max(self.peak, int(used))
                time.sleep(0.05)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


def _scrape(client, root) -> dict:
    return parse_metrics(client.get(root + "/metrics").text)


def run_setting(a, on: bool, prompts: dict, spec: dict) -> dict:
    """Both workloads on a fresh engine with the cache off or on (its own server)."""
    import multiprocessing as mp

    eng, name = build_engine(a, kv_memory=a.kv_memory, max_seqs=a.max_seqs, prefix_cache=on)
    eng.serve_defaults()
    pol = policy_of(spec)
    eng.warmup(pol)
    served = eng.path.name
    out = dict(name=name, eng=eng)
    with Server(eng, served) as srv:
        rng = random.Random(f"prefix-arrivals:{a.seed}")
        arrivals = [0.0]
        for _ in prompts["chat"][1:]:
            arrivals.append(arrivals[-1] + rng.expovariate(a.rate))
        bodies = [
            dict(model=served, prompt=p, max_tokens=a.new_tokens, temperature=0, kv=spec, stream=True)
            for p in prompts["chat"]
        ]
        with httpx.Client() as c:
            m0 = _scrape(c, srv.root)
        with PeakPages(srv.root) as peak:
            run = drive_apart(srv.root, bodies, arrivals)
        with httpx.Client() as c:
            m1 = _scrape(c, srv.root)
        row = summarize(label(pol), a.rate, run)
        out["chat"] = dict(row, peak_pages=peak.peak, **_cache_figures(m0, m1, prompts["chat"]))
        bodies = [
            dict(model=served, prompt=p, max_tokens=0, echo=True, logprobs=1, temperature=0, kv=spec)
            for p in prompts["mc"]
        ]
        with mp.get_context("spawn").Pool(1) as pool, PeakPages(srv.root) as peak:
            res = pool.apply(_score_sync, (srv.root, bodies))
        lat = [1e3 * t for t, _ in res["outs"]]
        lps = [body["choices"][0]["logprobs"]["token_logprobs"] for _, body in res["outs"]]
        out["mc"] = dict(
            policy=label(pol),
            requests=len(bodies),
            ttft_p50_ms=pct(lat, 0.5),
            ttft_p99_ms=pct(lat, 0.99),
            logprobs=lps,
            peak_pages=peak.peak,
            **_cache_figures(res["before"], res["after"], prompts["mc"]),
        )
    return out


def _cache_figures(m0: dict, m1: dict, prompts) -> dict:
    tokens = sum(map(len, prompts))
    hit = int(m1["refreekv_prefix_cache_hit_tokens_total"] - m0["refreekv_prefix_cache_hit_tokens_total"])
    return dict(
        prompt_tokens=tokens,
        prefilled=tokens - hit,
        hit_rate=hit / tokens,
        evictions=int(
            m1["refreekv_prefix_cache_evictions_total"] - m0["refreekv_prefix_cache_evictions_total"]
        ),
        cache_pages=int(m1["refreekv_prefix_cache_pages"]),
    )


def render(rows: list[dict]) -> str:
    out = [
        "| workload | policy | prefix cache | TTFT p50 ms | TTFT p99 ms | prompt tokens | prefilled "
        "| hit rate | peak pages | cached pages after | evictions | logprobs vs cache off |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['workload']} | {r['policy']} | {'on' if r['on'] else 'off'} | {r['ttft_p50_ms']:.0f} | "
            f"{r['ttft_p99_ms']:.0f} | {r['prompt_tokens']} | {r['prefilled']} | {r['hit_rate']:.0%} | "
            f"{r['peak_pages']} | {r['cache_pages']} | {r['evictions']} | {r.get('same', '')} |"
        )
    return "\n".join(out)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m bench.prefix",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="real checkpoint (default: the bundled smollm2-135m-instruct)")
    p.add_argument("--policies", default="full,refreekv,snapkv", help=f"some of {', '.join(KV)}")
    p.add_argument("--system", type=int, default=1500, help="tokens of the shared system prompt (chat)")
    p.add_argument("--chat-requests", type=int, default=12)
    p.add_argument("--rate", type=float, default=0.5, help="chat arrivals, requests/s (Poisson)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--contexts", type=int, default=6, help="multiple-choice contexts (4 continuations each)")
    p.add_argument("--context", type=int, default=600, help="tokens of each context")
    p.add_argument("--kv-memory", type=float, default=0.2, help="KV pool, GiB")
    p.add_argument("--max-seqs", type=int, default=16)
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--results-md")
    a = p.parse_args(argv)
    a.device, a.dtype, a.compile, a.shape = "cpu", None, False, None
    commit = git_commit()
    if a.threads:
        torch.set_num_threads(a.threads)
    specs = []
    for x in a.policies.split(","):
        if x not in KV:
            print(f"error: --policies: unknown {x!r}; choose from {', '.join(KV)}", file=sys.stderr)
            return 2
        specs.append(KV[x])
    try:
        tok_eng, _ = build_engine(a, load=False)
        prompts = workloads(tok_eng, a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, meta = [], None
    try:
        for spec in specs:
            base = None
            for on in (False, True):
                log(f"[prefix] {label(policy_of(spec))}, cache {'on' if on else 'off'} ...")
                res = run_setting(a, on, prompts, spec)
                meta = meta or run_meta(res["eng"], res["name"], commit, "bench.prefix", argv, a.kv_memory)
                mc = res["mc"]
                if base is None:
                    base = mc["logprobs"]
                else:
                    diff = max(abs(x - y) for s, t in zip(mc["logprobs"], base) for x, y in zip(s[1:], t[1:]))
                    mc["same"] = f"max diff {diff:.1e}"
                for w in ("chat", "mc"):
                    r = dict(res[w], workload=w, on=on)
                    r.pop("logprobs", None)
                    rows.append(r)
                    log(
                        f"[prefix]   {w}: TTFT p50 {r['ttft_p50_ms']:.0f} ms, "
                        f"prefilled {r['prefilled']} of {r['prompt_tokens']}"
                    )
                del res
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = render(rows)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(meta, rows=rows), indent=1, default=str))
    if a.results_md:
        append_results(
            Path(a.results_md),
            f"## Prefix cache: {meta['model']} ({meta['date']})\n\n- device: {meta['device']}, dtype "
            f"{meta['dtype']}; commit `{commit}`\n- command: `{meta['command']}`\n- workloads: chat, "
            f"{a.chat_requests} requests sharing a {a.system}-token system prompt, Poisson {a.rate:g} req/s, "
            f"{a.new_tokens} new tokens; mc, {a.contexts} contexts of {a.context} tokens x 4 continuations, "
            "echo + logprobs, max_tokens 0, all at once\n\n" + text + "\n",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
