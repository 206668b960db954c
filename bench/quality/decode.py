"""Long outputs: does pruning during decoding keep them within 1% of the full cache, at what
budget, against fixed budgets at the same memory? And what does it buy a fixed pool?

    python -m bench.decode --model smollm2-135m-instruct --n 2 --cont-tokens 1024 --results-md R.md
    python -m bench.decode --model smollm2-135m-instruct --workload --requests 16 --results-md R.md

Fidelity (default). Three kinds of task, --n of each, every one a prompt and a long continuation
teacher-forced through every policy at once (Engine.generate with a list of policies, forced
tokens, the logits hook): `text` and `code`, a window of --prompt-tokens real tokens (Python's
documentation topics, CPython's standard-library sources: nobody here wrote them) and the next
--cont-tokens real tokens; `long`, a chat prompt asking for a long answer whose continuation is
the full cache's own greedy output (generated first, up to --cont-tokens; EOS may end it sooner).
Over the continuation: top-1 agreement with the full cache (%) and KL(full || policy), the peak
pages each sequence held, its budget at the end (tokens its rows hold / tokens seen) and re-plans.

Policies: `full`; `refreekv` (the paper's L2 form) pruning the prompt only; `refreekv` L2 and mass
re-planning every --interval generated tokens (threshold-free, no budget); then, in a second pass,
`streaming` (rolling window) and `snapkv` (SnapKV-D) re-planning at the same interval with fixed
budgets equal to each ReFreeKV form's mean end budget (the same memory).

Workload (--workload): --requests requests through a pool of --pool-tokens full-cache tokens per
row, each a real window of [--min-tokens, --max-tokens] prompt tokens and --cont-tokens forced
continuation tokens (every policy decodes the same tokens, so the figures differ by memory only):
peak and mean concurrency, preemptions, decode steps, tok/s, pages, with and without pruning
during decoding (and with on_pressure).
"""

import argparse
import datetime
import json
import random
import shlex
import sys
from pathlib import Path

import refreekv
from bench.common import ROOT, append_results, device_name, git_commit, log, model_source
from bench.quality.metrics import Fidelity
from bench.quality.tasks import Material, fidelity_tasks
from engine.engine import Engine
from engine.sampling import Sampling

LONG_ASKS = [
    "Write a long, detailed essay on the history of the printing press and its effects on Europe.",
    "Write a complete Python module that implements a binary search tree with insert, delete, search "
    "and in-order traversal, with docstrings and a short test at the end.",
    "Explain in detail, step by step, how a compiler turns source code into machine code.",
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Write a detailed tutorial on using Python's asyncio, with several code examples.",
    "Describe, at length, how the human immune system fights a viral infection.",
]


def label(p) -> str:
    name = p.name
    if p.name == "refreekv":
        name += " mass" if p.metric == "mass" else " L2"
    if getattr(p, "budget", None) is not None:
        name += f" {100 * p.budget:.0f}%" if p.budget <= 1 else f" {p.budget:g} tok"
    if p.interval:
        name += f" /{p.interval}"
    else:
        name += " (prefill only)" if p.name != "full" else ""
    return name + (" +pressure" if p.on_pressure else "")


def seq_figures(r) -> dict:
    st = r.stats
    seen = st.get("final_seen") or (st["prompt_tokens"] + len(r.tokens) - 1)
    kept = st.get("final_kept")
    if kept is None:  # no re-plan: the prompt's survivors and every generated token
        kept = st["budget"] * st["prompt_tokens"] + seen - st["prompt_tokens"]
    return dict(
        end_budget=kept / seen,
        peak_pages=st.get("peak_pages", 0),
        replans=st.get("replans", 0),
        prompt_budget=st["budget"],
    )


def long_tasks(eng, n, cont) -> list[tuple[list[int], list[int], dict]]:
    """Chat prompts asking for long outputs, each with the full cache's greedy answer."""
    prompts = [eng.encode(LONG_ASKS[i % len(LONG_ASKS)]) for i in range(n)]
    out = eng.generate(prompts, refreekv.make("full"), Sampling(max_new_tokens=cont))
    return [(p, r.tokens, {"ask": i % len(LONG_ASKS)}) for i, (p, r) in enumerate(zip(prompts, out))]


def tasks_for(eng, a) -> list[dict]:
    m = Material(eng)
    rng = random.Random(f"decode:{a.seed}")
    out = []
    for fam in ("text", "code"):
        for t in fidelity_tasks(m, fam, rng, a.n, a.prompt_tokens, a.cont_tokens):
            out.append(dict(kind=fam, ids=t.ids, target=t.target, meta=t.meta))
    for ids, target, meta in long_tasks(eng, a.n, a.cont_tokens):
        out.append(dict(kind="long", ids=ids, target=target, meta=meta))
    return out


def fan_out(eng, tasks, policies) -> list[list[dict]]:
    """Every task teacher-forced through every policy (policies[0] must be full): per task, per
    policy, top-1 agreement, KL and the sequence's figures."""
    rows = []
    for t in tasks:  # one task at a time: its forks decode together (as many sequences as policies)
        score = Fidelity([t["target"]], 0)
        res = eng.generate(
            [t["ids"]],
            policies,
            Sampling(max_new_tokens=len(t["target"])),
            forced=[t["target"]],
            on_logits=score,
        )[0]
        per = []
        for j, r in enumerate(res):
            m = score.result(0, j)
            per.append(dict(top1=100 * m["top1"], kl=m["kl"], **seq_figures(r)))
        rows.append(per)
        log(f"[decode] {t['kind']}: " + ", ".join(f"{p['top1']:.1f}%" for p in per))
    return rows


def fidelity(eng, a) -> dict:
    tasks = tasks_for(eng, a)
    log(f"[decode] {len(tasks)} tasks, continuations of {[len(t['target']) for t in tasks]} tokens")
    first = [
        refreekv.make("full"),
        refreekv.make("refreekv"),
        refreekv.make("refreekv", interval=a.interval),
        refreekv.make("refreekv", metric="mass", interval=a.interval),
    ]
    rows = fan_out(eng, tasks, first)
    matched = []
    for j in (2, 3):  # each threshold-free form's mean end budget, for the fixed budgets
        b = sum(r[j]["end_budget"] for r in rows) / len(rows)
        matched.append(round(b, 3))
    second = [refreekv.make("full")]
    for b in matched:
        second.append(refreekv.make("streaming", budget=b, interval=a.interval))
        second.append(refreekv.make("snapkv", budget=b, interval=a.interval))
    rows2 = fan_out(eng, tasks, second)
    policies = [label(p) for p in first] + [label(p) for p in second[1:]]
    per_task = [r + r2[1:] for r, r2 in zip(rows, rows2)]
    return dict(
        tasks=[{k: t[k] for k in ("kind", "meta")} | {"cont": len(t["target"])} for t in tasks],
        policies=policies,
        matched_budgets=matched,
        rows=per_task,
    )


def fidelity_table(res) -> str:
    kinds = sorted({t["kind"] for t in res["tasks"]})
    head = ["policy", "end budget", "peak pages / seq", "re-plans / seq", "KL"]
    head += [f"top-1 {k} (n={sum(t['kind'] == k for t in res['tasks'])})" for k in kinds]
    head += ["top-1 all", "within 1%"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j, name in enumerate(res["policies"]):
        col = [r[j] for r in res["rows"]]
        mean = lambda key, rows=col: sum(x[key] for x in rows) / len(rows)
        cells = [
            name,
            f"{100 * mean('end_budget'):.1f}%",
            f"{mean('peak_pages'):.0f}",
            f"{mean('replans'):.1f}",
            f"{mean('kl'):.4f}",
        ]
        for k in kinds:
            sub = [x for x, t in zip(col, res["tasks"]) if t["kind"] == k]
            cells.append(f"{mean('top1', sub):.2f}")
        top = mean("top1")
        cells += [f"{top:.2f}", "yes" if top >= 99 else "no"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def workload(eng, a) -> dict:
    m = Material(eng)
    rng = random.Random(f"decode-workload:{a.seed}")
    prompts, forced = [], []
    for i in range(a.requests):
        n = rng.randint(a.min_tokens, a.max_tokens)
        fam = "text" if i % 2 == 0 else "code"
        t = fidelity_tasks(m, fam, rng, 1, n, a.cont_tokens)[0]
        prompts.append(t.ids)
        forced.append(t.target)
    pols = [
        refreekv.make("full"),
        refreekv.make("refreekv"),
        refreekv.make("refreekv", interval=a.interval),
        refreekv.make("refreekv", metric="mass", interval=a.interval),
        refreekv.make("refreekv", interval=a.interval, on_pressure=True),
        refreekv.make("refreekv", on_pressure=True),
    ]
    rows = []
    for p in pols:
        res = eng.generate(prompts, p, Sampling(max_new_tokens=a.cont_tokens), forced=forced)
        st = eng.stats
        figs = [seq_figures(r) for r in res]
        rows.append(
            dict(
                policy=label(p),
                end_budget=sum(f["end_budget"] for f in figs) / len(figs),
                peak_pages_seq=sum(f["peak_pages"] for f in figs) / len(figs),
                replans=sum(f["replans"] for f in figs),
                pressure_replans=sum(r.stats.get("replans_pressure", 0) for r in res),
                **{
                    k: st[k]
                    for k in (
                        "peak_concurrent",
                        "mean_concurrent",
                        "preemptions",
                        "steps",
                        "new_tokens",
                        "tok_s",
                        "wall_s",
                        "peak_pages",
                        "pool_pages",
                    )
                },
            )
        )
        r = rows[-1]
        log(f"[decode] workload {r['policy']}: {r['steps']} steps, {r['preemptions']} preemptions")
    return dict(rows=rows)


def workload_table(res) -> str:
    head = [
        "policy",
        "end budget",
        "peak pages / seq",
        "re-plans (pressure)",
        "peak conc.",
        "mean conc.",
        "preemptions",
        "decode steps",
        "tok/s",
        "wall s",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        cells = [
            r["policy"],
            f"{100 * r['end_budget']:.1f}%",
            f"{r['peak_pages_seq']:.0f}",
            f"{r['replans']} ({r['pressure_replans']})",
            str(r["peak_concurrent"]),
            f"{r['mean_concurrent']:.2f}",
            str(r["preemptions"]),
            str(r["steps"]),
            f"{r['tok_s']:.1f}",
            f"{r['wall_s']:.0f}",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench.decode",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model")
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--n", type=int, default=2, help="tasks of each kind (fidelity)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--cont-tokens", type=int, default=1024)
    p.add_argument("--interval", type=int, default=128, help="re-plan every N generated tokens")
    p.add_argument("--workload", action="store_true", help="the fixed-pool workload instead of fidelity")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--min-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--pool-tokens", type=int, default=4000, help="workload pool: full-cache tokens per row")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-seqs", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here (default bench/results/decode-<model>.json)")
    p.add_argument("--results-md", help="append the table to this markdown file")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    kw = dict(device=a.device, dtype=a.dtype, page_size=a.page_size, max_seqs=a.max_seqs)
    eng = Engine(a.model, load=False, **kw)
    if a.workload:
        from engine.kv import page_bytes

        c = eng.config
        pages = -(-a.pool_tokens // a.page_size) * c.n_layers * c.n_kv_heads
        eng = Engine(a.model, kv_memory=pages * page_bytes(a.page_size, c.head_dim, eng.dtype) / 2**30, **kw)
    else:
        eng.load()
    res = workload(eng, a) if a.workload else fidelity(eng, a)
    model = model_source(a.model)
    slug = model.split()[-1].split("/")[-1]
    res["config"] = dict(vars(a), model=model)
    table = workload_table(res) if a.workload else fidelity_table(res)
    print(table)
    out = (
        Path(a.json)
        if a.json
        else ROOT / "bench" / "results" / f"decode-{'workload-' if a.workload else ''}{slug}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    if a.results_md:
        what = "a fixed pool under long outputs" if a.workload else "long-output fidelity"
        head = (
            f"## Pruning during decoding, {what}: {model} ({datetime.date.today()})\n\n"
            f"- device: {device_name(eng)}; commit `{git_commit()}`\n"
            f"- command: `python -m bench.decode {shlex.join(argv)}`\n"
        )
        append_results(Path(a.results_md), head + "\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
