"""Throughput benchmark: does pruning free memory that other requests use? A workload of real
prompts (more than the KV pool holds at once) through a fixed pool with continuous batching, once
per policy: mean budget, peak and mean concurrent sequences, pages held after prefill vs after
pruning, decode steps, output tokens/s and requests/s; optionally `transformers` static batching of
the same workload on the same weights.

    python -m bench.throughput --model smollm2-135m-instruct --results-md bench/RESULTS.md
    python -m bench.throughput --shape qwen2.5-7b --budgets 1,0.5,0.25 --hf static-compile --device cuda

Workload (--requests, default 64): prompt lengths drawn uniformly from [--min-tokens, --max-tokens]
(default 500 to 4,000), alternating four kinds built from material nobody here wrote (Python's
documentation topics and standard-library sources, bench/quality/tasks.py): a document with a
question (chat template), a document to continue (raw), code to explain (chat), code to continue
(raw). Random-weight shapes (--shape) use random token ids of the same lengths. Every request asks
for --new-tokens tokens, greedy; real models stop at EOS.

Pool: --pool-tokens full-cache tokens of every (layer, KV head) row (pages = pool_tokens /
page_size x layers x KV heads), so the pool, not --max-seqs, is the limit. Policies: with a real
model `full`, `refreekv` (T = 1%), `refreekv` with metric="mass" and `snapkv` at 50%; with
--budgets, forced budgets instead (`streaming` at each budget; 1 = full).

Check (printed and in the JSON): where the pool is the limit, pruning should let concurrency grow
as 1 / budget: mean concurrency over the decode steps during which requests waited for pages
(`mean_concurrent_pool_bound`) >= 0.9 x (1 / mean budget) x full's (`conc_target_met`). The mean
over all steps includes the ramp-down at the end of the workload, where nothing waits.
"""

import argparse
import json
import random
import sys
from pathlib import Path

import torch

import refreekv
from bench.common import (
    SHAPES,
    append_results,
    build_engine,
    floats,
    git_commit,
    log,
    policy_label,
    run_meta,
    write_shape_dir,
)
from engine.kv import page_bytes, seq_pages
from engine.sampling import Sampling
from weights.errors import UserError

LONG_FACTOR = (4, 8)  # a long prompt of a mixed workload, against the mean of the others
ASKS = {
    "doc": "What is this text about? Answer in two sentences.",
    "code": "Explain what this code does, briefly.",
}


def workload(
    eng, n: int, lo: int, hi: int, seed: int, real: bool, long: int = 0
) -> tuple[list[list[int]], list[str]]:
    """n prompts of lengths uniform in [lo, hi] tokens and their kinds; `long` of them, spread
    evenly, 4-8x the mean of [lo, hi] instead (LONG_FACTOR)."""
    rng = random.Random(f"throughput:{seed}")
    lengths = [rng.randint(lo, hi) for _ in range(n)]
    for j in range(long):
        lengths[j * n // long + n // (2 * long)] = round(rng.uniform(*LONG_FACTOR) * (lo + hi) / 2)
    if not real:
        g = torch.Generator().manual_seed(seed)
        return [
            torch.randint(3, min(eng.config.vocab_size, 150000), (k,), generator=g).tolist() for k in lengths
        ], ["random"] * n
    from bench.quality.tasks import Material

    m = Material(eng)
    chat_ok = eng.tokenizer.chat_template is not None
    prompts, kinds = [], []
    for i, k in enumerate(lengths):
        src = "doc" if i % 4 < 2 else "code"
        chat = i % 2 == 0 and chat_ok
        body_tokens = k - (len(m.tok(ASKS[src])) + 40 if chat else 0)
        text, _ = m.doc_text(rng, body_tokens) if src == "doc" else m.code_text(rng, body_tokens)
        ids = eng.encode(f"{text}\n\n{ASKS[src]}", chat=True) if chat else eng.tokenizer.encode(text)
        prompts.append(ids[: max(k, hi)])
        kinds.append(f"{src}/{'chat' if chat else 'raw'}")
    return prompts, kinds


def policies_for(a) -> list[refreekv.Policy]:
    if a.budgets:
        return [refreekv.make("full") if b >= 1 else refreekv.make("streaming", budget=b) for b in a.budgets]
    return [
        refreekv.make("full"),
        refreekv.make("refreekv"),
        refreekv.make("refreekv", metric="mass"),
        refreekv.make("snapkv", budget=0.5),
    ]


def label(p) -> str:
    return policy_label(p) + (" mass" if getattr(p, "metric", "l2") == "mass" else "")


def run_policy(eng, prompts, policy, new) -> dict:
    res = eng.generate(prompts, policy, Sampling(max_new_tokens=new))
    st = eng.stats
    budgets = [r.stats["budget"] for r in res]
    return dict(
        policy=label(policy),
        requests=len(prompts),
        mean_budget=sum(budgets) / len(budgets),
        peak_concurrent=st["peak_concurrent"],
        mean_concurrent=st["mean_concurrent"],
        pool_bound_steps=st["pool_bound_steps"],
        mean_concurrent_pool_bound=st["mean_concurrent_pool_bound"],
        pages_after_prefill=st["pages_after_prefill"],
        pages_after_pruning=st["pages_after_pruning"],
        peak_pages=st["peak_pages"],
        pool_pages=st["pool_pages"],
        steps=st["steps"],
        preemptions=st["preemptions"],
        admission_waits=st["admission_waits"],
        new_tokens=st["new_tokens"],
        wall_s=st["wall_s"],
        tok_s=st["tok_s"],
        req_s=st["req_s"],
        peak_memory_bytes=st["peak_memory_bytes"],
    )


@torch.no_grad()
def run_hf(eng, prompts, mode, batch, new) -> dict:
    """transformers static batching: the workload in order, `batch` requests at a time, left-padded,
    each batch running until its last request ends (static-compile: compiled and recorded on the
    first batch before the timing starts)."""
    import time

    from bench.speed import hf as hfb

    model = hfb.views(eng)
    if mode == "static-compile":
        from transformers import CompileConfig

        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    eos = sorted(eng.eos) or None
    N = max(map(len, prompts))

    def run(chunk):
        """One static batch: `batch` rows left-padded to the workload's longest prompt, so every batch
        has one shape (static cache + compile: one program, as a static-batching server would run)."""
        rows = chunk + [chunk[0]] * (batch - len(chunk))  # filler rows, not counted
        ids = torch.zeros(len(rows), N, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(rows):
            ids[b, N - len(p) :], mask[b, N - len(p) :] = torch.tensor(p), 1
        out = model.generate(
            ids.to(eng.device),
            attention_mask=mask.to(eng.device),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )[: len(chunk), N:].cpu()
        return sum(next((k for k, t in enumerate(row) if eos and t in eos), len(row)) for row in out.tolist())

    t0 = time.perf_counter()
    for _ in range(2 if mode == "static-compile" else 0):  # compile and record first, outside the timing
        run(prompts[:batch])
    warm = time.perf_counter() - t0
    made, t0 = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        made += run(prompts[i : i + batch])
    wall = time.perf_counter() - t0
    return dict(
        policy=f"transformers {mode}, batches of {batch}",
        requests=len(prompts),
        new_tokens=made,
        wall_s=wall,
        tok_s=made / wall,
        req_s=len(prompts) / wall,
        warmup_s=warm,
    )


def render(res) -> str:
    head = [
        "policy",
        "mean budget",
        "peak conc.",
        "mean conc.",
        "mean conc. pool-bound (steps)",
        "pool-bound conc. / full's",
        "target 0.9/budget",
        "pages after prefill",
        "after pruning",
        "steps",
        "preempt.",
        "new tok",
        "tok/s",
        "req/s",
        "wall s",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        out.append(
            "| "
            + " | ".join(
                [
                    r["policy"],
                    f"{100 * r['mean_budget']:.1f}%",
                    str(r["peak_concurrent"]),
                    f"{r['mean_concurrent']:.2f}",
                    f"{r['mean_concurrent_pool_bound'] or 0:.2f} ({r['pool_bound_steps']})",
                    f"{r['conc_ratio']:.2f}x",
                    f"{r['conc_target']:.2f}x {'met' if r['conc_target_met'] else 'MISSED'}",
                    str(r["pages_after_prefill"]),
                    str(r["pages_after_pruning"]),
                    str(r["steps"]),
                    str(r["preemptions"]),
                    str(r["new_tokens"]),
                    f"{r['tok_s']:.1f}",
                    f"{r['req_s']:.3f}",
                    f"{r['wall_s']:.0f}",
                ]
            )
            + " |"
        )
    for h in res["hf"]:
        out.append(
            f"| {h['policy']} | 100% | | | | | | | | | "
            f"| {h['new_tokens']} | {h['tok_s']:.1f} | {h['req_s']:.3f} | {h['wall_s']:.0f} |"
        )
    return "\n".join(out)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model", help="real checkpoint (dir / hub id / bundled name; default: bundled SmolLM2)"
    )
    src.add_argument("--shape", choices=["qwen2.5-7b", "tiny"], help="random weights of this shape instead")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--min-tokens", type=int, default=500)
    p.add_argument("--max-tokens", type=int, default=4000)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--pool-tokens", type=int, default=48000, help="KV pool size in full-cache tokens per row")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-seqs", type=int, default=64)
    p.add_argument(
        "--budgets", type=floats, help="forced budgets (streaming) instead of the real policies; 1 = full"
    )
    p.add_argument("--hf", choices=["eager", "static-compile"], help="also run transformers static batching")
    p.add_argument("--hf-batch", type=int, default=16)
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
    return a


def setup(a):
    """The engine on a --pool-tokens pool (that many full-cache tokens per (layer, KV head) row: the
    pool, not --max-seqs, is the limit) and the workload, checked to fit. Returns (engine, label,
    pool GiB, prompts, kinds). bench/load/serve.py builds its engine and workload here too."""
    from weights.config import load_config
    from weights.resolve import resolve

    if a.shape:
        import tempfile

        c = load_config(write_shape_dir(SHAPES[a.shape], Path(tempfile.mkdtemp()) / "cfg"))
    else:
        c = load_config(resolve(a.model))
    cuda = (a.device or "").startswith("cuda") or (a.device is None and torch.cuda.is_available())
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if cuda else torch.float32)
    pages = seq_pages(a.pool_tokens, c.n_layers, c.n_kv_heads, a.page_size)
    kv_gib = pages * page_bytes(a.page_size, c.head_dim, dtype) / 2**30
    src = argparse.Namespace(
        model=a.model, shape=a.shape, device=a.device, dtype=a.dtype, compile=a.compile, seed=a.seed
    )
    long = getattr(a, "long", 0)  # bench/load/serve.py's mix of a few long prompts
    longest = round(LONG_FACTOR[1] * (a.min_tokens + a.max_tokens) / 2) if long else 0
    eng, name = build_engine(
        src,
        max_length=max(a.max_tokens, longest) + a.new_tokens,
        kv_memory=kv_gib,
        page_size=a.page_size,
        max_seqs=a.max_seqs,
    )
    if a.shape:
        eng.eos = set()  # random weights: every request makes its max_tokens
    prompts, kinds = workload(eng, a.requests, a.min_tokens, a.max_tokens, a.seed, not a.shape, long)
    try:
        eng.check_fits(prompts, a.new_tokens)
    except UserError as e:
        raise UserError(f"{e} (here: raise --pool-tokens, or lower --max-tokens / --new-tokens)") from None
    return eng, name, kv_gib, prompts, kinds


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
    log(
        f"[throughput] {name}: {len(prompts)} requests, {sum(map(len, prompts))} prompt tokens "
        f"({min(map(len, prompts))}-{max(map(len, prompts))}), pool {eng.kv.n_pages} pages ({kv_gib:.2f} GiB)"
    )
    rows = []
    for p in policies_for(a):
        log(f"[throughput] {label(p)} ...")
        r = run_policy(eng, prompts, p, a.new_tokens)
        rows.append(r)
        log(
            f"[throughput]   budget {100 * r['mean_budget']:.1f}%, "
            f"mean concurrency {r['mean_concurrent']:.2f}, {r['tok_s']:.1f} tok/s, {r['wall_s']:.0f} s"
        )
    full = next((r for r in rows if r["policy"] == "full"), rows[0])
    for r in rows:  # concurrency while requests wait for pages (the pool is the limit)
        if r["mean_concurrent_pool_bound"] and full["mean_concurrent_pool_bound"]:
            r["conc_ratio"] = r["mean_concurrent_pool_bound"] / full["mean_concurrent_pool_bound"]
        else:  # never pool-bound (everything fit): all steps
            r["conc_ratio"] = r["mean_concurrent"] / full["mean_concurrent"]
        r["conc_target"] = 0.9 / r["mean_budget"]
        r["conc_target_met"] = r["conc_ratio"] >= r["conc_target"] or r is full
        r["tok_s_ratio"] = r["tok_s"] / full["tok_s"]
    hf = [run_hf(eng, prompts, a.hf, a.hf_batch, a.new_tokens)] if a.hf else []
    res = dict(
        **run_meta(eng, name, commit, "bench.throughput", argv, kv_gib),
        prompt_tokens=[len(p) for p in prompts],
        kinds=kinds,
        rows=rows,
        hf=hf,
    )
    text = render(res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    if a.results_md:
        append_results(
            Path(a.results_md),
            (
                f"## Throughput: {name} ({res['date']})\n\n"
                f"- device: {res['device']}, dtype {res['dtype']}; commit `{res['commit']}`\n"
                f"- command: `{res['command']}`\n"
                f"- workload: {len(prompts)} requests, "
                f"prompts {min(res['prompt_tokens'])}-{max(res['prompt_tokens'])} tokens "
                f"(mean {sum(res['prompt_tokens']) / len(prompts):.0f}), {a.new_tokens} new tokens each; "
                f"pool {eng.kv.n_pages} pages of {eng.page_size} tokens ({kv_gib:.2f} GiB), "
                f"max {a.max_seqs} sequences\n\n" + text + "\n"
            ),
        )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
