"""The field's benchmarks through the engine: RULER (generated here), LongBench v1 and GSM8K, any task
x model x list of policies, scored with the official metrics, reported in the shape of the ReFreeKV
paper's Table 2.

    python -m bench.standard --suite ruler --lengths 1024,2048 --n 10 --out bench/results/ruler-smollm2.jsonl
    python -m bench.standard --suite longbench --tasks hotpotqa,trec --data-dir DIR --out lb.jsonl
    python -m bench.standard --suite gsm8k --data-dir DIR --n 100 --out gsm8k.jsonl
    python -m bench.standard --report bench/results/ruler-smollm2.jsonl --results-md bench/RESULTS.md

Fan-out: each prompt is prefilled once and pruned by every policy (Engine.generate with a list of
policies); greedy decoding, each task's own output length and stop strings. Every (sample, policy)
becomes one JSONL row (prediction, per-sample score, KV budget, prompt tokens); a rerun skips the
samples already in --out (resumable). --server URL sends the same prompts to a running
`engine.serve` instead, one request per policy through the `kv` field (no shared prefill).

Prompts: RULER's input through the checkpoint's chat template (the task in the user turn, RULER's
answer prefix after the assistant header, as RULER's chat templates place it) or raw with --raw;
LongBench as its pred.py builds them (raw for trec, triviaqa, samsum, lcc, repobench-p); GSM8K with
the ReFreeKV authors' system message and prompt.

Report: per task the full cache's score, each policy's score, mean budget and score relative to
full; the threshold-free verdict per policy: within 1% of full (score >= 0.99 x full's) on every
task, yes or no.
"""

import argparse
import json
import sys
from pathlib import Path

import refreekv
from bench.common import log, policy_label
from engine.sampling import Sampling
from weights.errors import UserError

WITHIN = 0.99  # the threshold-free claim: each task within 1% of the full cache


DEFAULT_POLICIES = "full,refreekv,refreekv:metric=mass," + ",".join(
    f"{n}:{b}" for n in ("streaming", "h2o", "snapkv") for b in (0.5, 0.2)
)


def parse_policies(spec: str) -> list:
    """`NAME[:BUDGET | :KNOB=VALUE[/KNOB=VALUE...]]`, comma-separated (values read as JSON where
    they parse: `adakv:0.2`, `snapkv:budget=0.5/pooling="avg"`, `twilight:p=0.99`) -> policies."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, knobs = item.partition(":")
        kw = {}
        for part in filter(None, knobs.split("/")):
            key, eq, value = part.partition("=")
            if not eq:
                key, value = "budget", part
            try:
                kw[key] = json.loads(value)
            except json.JSONDecodeError:
                kw[key] = value
        out.append(refreekv.make(name, **kw))  # UserError in the user's words on a bad name or knob
    if not out:
        raise UserError("--policies names no policy")
    return out


def knob_values(p) -> dict:
    """Every knob of a policy's constructor -> (its value, its default); a query window (window,
    rows) is the policy's probe_rows."""
    import inspect

    out = {}
    for name, param in inspect.signature(type(p).__init__).parameters.items():
        if name == "self" or param.default is inspect.Parameter.empty:
            continue
        value = getattr(p, name, None)
        if value is None and name in ("window", "rows"):
            value = p.probe_rows
        out[name] = (param.default if value is None else value, param.default)
    return out


def label(p) -> str:
    """policy_label plus every knob set away from its default (a string knob by its value: "snapkv
    20% avg"; others as name=value), so that two variants of one method never share a label."""
    tags = []
    for name, (value, default) in knob_values(p).items():
        if isinstance(default, (list, tuple)):
            value, default = tuple(value), tuple(default)
        if name not in ("budget", "threshold") and value != default:
            tags.append(str(value) if isinstance(value, str) else f"{name}={value}")
    for knob in ("interval", "on_pressure"):  # the decode-time knobs make() adds
        if getattr(p, knob, 0) and p.decodes:
            tags.append(f"{knob}={getattr(p, knob)}")
    return " ".join([policy_label(p)] + tags)


# ------------------------------------------------------------------------------- samples
def ruler_items(eng, a) -> list[dict]:
    from bench.standard import ruler

    tasks = ruler.TASKS if a.tasks in (None, "all") else a.tasks.split(",")
    items = []
    for length in a.lengths:
        for task in tasks:
            for i, s in enumerate(ruler.generate(task, eng.tokenizer, length, a.n, a.seed)):
                ids = chat_ids(eng, s.input, prefix_of(task, s.input), a.raw)
                items.append(
                    dict(
                        suite="ruler",
                        task=task,
                        length=length,
                        idx=i,
                        ids=ids,
                        max_new=s.max_new,
                        stop=[],
                        gold=s.outputs,
                    )
                )
    return items


def prefix_of(task: str, text: str) -> int:
    """Where RULER's answer prefix starts in a sample's input (it ends the input)."""
    from bench.standard import ruler

    family = ruler.CONFIGS[task][0]
    literal = ruler.TEMPLATES[family][1].split("{")[0]
    at = text.rfind(literal)
    if at < 0:
        raise ValueError(f"RULER {task}: answer prefix {literal!r} not found")
    return at


def chat_ids(eng, text: str, split: int | None, raw: bool, system: str | None = None) -> list[int]:
    """text[:split] as the user turn and text[split:] after the assistant header (chat template), or
    the text as is (raw, or a checkpoint without a template)."""
    tok = eng.tokenizer
    if raw or tok.chat_template is None:
        return tok.encode(text)
    head = text if split is None else text[:split]
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": head}]
    rendered = tok.apply_messages(msgs) + ("" if split is None else text[split:].lstrip(" "))
    return tok.encode(rendered, special=False)


def longbench_items(eng, a) -> list[dict]:
    from bench.standard import longbench

    tasks = longbench.TASKS if a.tasks in (None, "all") else a.tasks.split(",")
    room = eng.context
    items = []
    for task in tasks:
        for i, rec in enumerate(longbench.load(task, a.data_dir, a.n)):
            s = longbench.build(task, rec, eng.tokenizer, room - longbench.dataset2maxlen[task])
            ids = chat_ids(eng, s.prompt, None, a.raw or not s.chat)
            items.append(
                dict(
                    suite="longbench",
                    task=task,
                    length=s.length,
                    idx=i,
                    ids=ids,
                    max_new=s.max_new,
                    stop=s.stop,
                    gold=s.answers,
                    all_classes=s.all_classes,
                )
            )
    return items


def gsm8k_items(eng, a) -> list[dict]:
    from bench.standard import gsm8k

    items = []
    data = None if a.data_dir is None else Path(a.data_dir) / "test.jsonl"
    for i, rec in enumerate(gsm8k.load(data, a.n)):
        s = gsm8k.build(rec)
        ids = chat_ids(eng, s.prompt, None, a.raw, s.system)
        items.append(
            dict(
                suite="gsm8k", task="gsm8k", length=0, idx=i, ids=ids, max_new=s.max_new, stop=[], gold=s.gold
            )
        )
    return items


def sample_score(item: dict, prediction: str) -> float:
    if item["suite"] == "ruler":
        from bench.standard import ruler

        return ruler.score(item["task"], [prediction], [item["gold"]])
    if item["suite"] == "longbench":
        from bench.standard.metrics import sample_score as lb

        return 100 * lb(item["task"], prediction, item["gold"], item.get("all_classes"))
    from bench.standard import gsm8k

    return 100.0 * gsm8k.is_correct(prediction, item["gold"])


# ---------------------------------------------------------------------------------- runs
def key(item) -> tuple:
    return (item["suite"], item["task"], item["length"], item["idx"])


def run(eng, items: list[dict], policies, out: Path, server: str | None = None, batch: int = 4):
    """Every item under every policy, appended to `out` as it finishes (items already there are skipped)."""
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["suite"], r["task"], r["length"], r["idx"], r["policy"]))
    labels = [label(p) for p in policies]
    missing = {}  # per sample, the policies it has no row of yet (a method added later runs alone)
    for it in items:
        missing[key(it)] = [p for p, lb in zip(policies, labels) if (*key(it), lb) not in done]
    todo = [it for it in items if missing[key(it)]]
    skipped = len(items) - len(todo)
    log(f"[standard] {len(items)} samples x {len(policies)} policies; {skipped} already in {out}")
    with open(out, "a", encoding="utf-8") as f:
        for k in range(0, len(todo), batch):
            group = todo[k : k + batch]
            outs = [ask(eng, [it], missing[key(it)], server)[0] for it in group]
            for it, per in zip(group, outs):
                for lb, (text, st) in zip(map(label, missing[key(it)]), per):
                    row = {
                        **{x: it[x] for x in ("suite", "task", "length", "idx")},
                        "policy": lb,
                        "prediction": text,
                        "score": sample_score(it, text),
                        "budget": st.get("budget"),
                        "prompt_tokens": len(it["ids"]),
                    }
                    f.write(json.dumps(row) + "\n")
            f.flush()
            log(f"[standard] {min(k + batch, len(todo))}/{len(todo)} samples")


def ask(eng, group, policies, server):
    """[(text, stats)] per policy for each item: one fan-out generate per (max_new, stop) batch."""
    if server is not None:
        return [[_http(server, it, p) for p in policies] for it in group]
    res = []
    for it in group:  # items differ in length and stop rules: a fan-out call each
        s = Sampling(max_new_tokens=it["max_new"], stop=it["stop"])
        out = eng.generate([it["ids"]], policies, s)[0]
        res.append([(r.text, r.stats) for r in out])
    return res


def _http(server, it, policy):
    import httpx

    kv = {"policy": policy.name, **{k: v for k, (v, _) in knob_values(policy).items()}}
    if policy.decodes:
        kv.update(interval=policy.interval, on_pressure=policy.on_pressure)
    body = {"prompt": it["ids"], "max_tokens": it["max_new"], "temperature": 0, "stop": it["stop"], "kv": kv}
    r = httpx.post(server.rstrip("/") + "/v1/completions", json=body, timeout=3600)
    if r.status_code != 200:
        raise UserError(f"--server: {r.status_code} {r.text[:200]}")
    ch = r.json()["choices"][0]
    return ch["text"], ch.get("kv") or {}


# -------------------------------------------------------------------------------- report
def report(rows: list[dict]) -> str:
    """Table 2's shape: per task (and length, for RULER) full's score, each policy's score / budget /
    relative; LongBench tasks also per LongBench-E length bucket (those rows are not in the verdict)."""
    from bench.standard.metrics import length_bucket

    groups: dict = {}
    for r in rows:
        length = r["length"] if r["suite"] == "ruler" else ""  # LongBench's `length` is the sample's own
        groups.setdefault((r["suite"], r["task"], length), {}).setdefault(r["policy"], []).append(r)
        if r["suite"] == "longbench":
            at = (r["suite"], r["task"], f"LongBench-E {length_bucket(r['length'])}")
            groups.setdefault(at, {}).setdefault(r["policy"], []).append(r)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    others = [p for p in policies if p != "full"]
    head = "| task | n | full | " + " | ".join(f"{p} (budget)" for p in others) + " |\n"
    head += "|---" * (3 + len(others)) + "|\n"
    lines, ok = [], {p: True for p in others}
    means = {p: [] for p in policies}  # per policy, (score, budget) of each task row in the verdict
    for (suite, task, length), per in sorted(groups.items()):
        full = per.get("full", [])
        f = sum(r["score"] for r in full) / len(full) if full else None
        bucket = str(length).startswith("LongBench-E")
        if f is not None and not bucket:
            means["full"].append((f, 1.0))
        cells = []
        for p in others:
            rs = per.get(p, [])
            if not rs:
                cells.append("-")
                continue
            sc = sum(r["score"] for r in rs) / len(rs)
            bud = sum(r["budget"] or 0 for r in rs) / len(rs)
            cells.append(f"{sc:.1f} ({100 * bud:.0f}%)")
            if not bucket:
                means[p].append((sc, bud))
            if f is not None and sc < WITHIN * f and not bucket:
                ok[p] = False
        name = f"{task} @{length}" if suite == "ruler" else f"{task} {length}".strip()
        n = len(full) or max(len(v) for v in per.values())
        lines.append(f"| {name} | {n} | {'-' if f is None else f'{f:.1f}'} | " + " | ".join(cells) + " |")

    def mean(p):
        m = means[p]
        if not m:
            return "-"
        sc, bud = (sum(x) / len(m) for x in zip(*m))
        return f"{sc:.1f}" if p == "full" else f"{sc:.1f} ({100 * bud:.0f}%)"

    average = f"| average of the {len(means['full'])} tasks | | {mean('full')} | " + " | ".join(
        mean(p) for p in others
    )
    verdict = (
        average
        + " |\n| within 1% of full on every task | | | "
        + " | ".join("yes" if ok[p] else "no" for p in others)
        + " |"
    )
    return head + "\n".join(lines) + "\n" + verdict + "\n"


def averages(rows: list[dict]) -> dict:
    """Per policy, (mean KV budget, mean score) over the task rows of the table (the mean of each
    (task, length)'s mean, as the table's average row; LongBench-E buckets left out)."""
    cells: dict = {}
    for r in rows:
        length = r["length"] if r["suite"] == "ruler" else ""
        cells.setdefault(r["policy"], {}).setdefault((r["suite"], r["task"], length), []).append(r)
    out = {}
    for p, per in cells.items():
        means = [
            (sum(r["budget"] or 0 for r in rs) / len(rs), sum(r["score"] for r in rs) / len(rs))
            for rs in per.values()
        ]
        out[p] = tuple(sum(x) / len(means) for x in zip(*means))
    return out


def method_of(policy: str) -> str | None:
    """ "snapkv 20% avg" -> "snapkv avg" (a fixed-budget method, one curve); None for full and the
    threshold-free policies (one point each)."""
    words = policy.split()
    if len(words) < 2 or not words[1].endswith("%"):
        return None
    return " ".join(words[:1] + words[2:])


def summary_plot(rows: list[dict], path: Path, title: str) -> None:
    """The field's one picture, as kvpress's leaderboard draws it: average score against the
    compression ratio (1 - mean KV budget), one line per fixed-budget method through its budgets and
    the full cache (ratio 0), one star per threshold-free policy, a dashed line at full's score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    avg = averages(rows)
    full = avg.get("full")
    fig, ax = plt.subplots(figsize=(9, 6))
    curves: dict = {}
    for p, (b, s) in avg.items():
        m = method_of(p)
        if m is not None:
            curves.setdefault(m, []).append((1 - b, s))
    for m, pts in sorted(curves.items()):
        pts = sorted(pts + ([(0.0, full[1])] if full else []))
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=m)
    for p, (b, s) in avg.items():
        if p != "full" and method_of(p) is None:
            ax.plot([1 - b], [s], marker="*", markersize=14, linestyle="", label=p)
    if full:
        ax.axhline(full[1], color="grey", linestyle="--", linewidth=1, label="full")
    ax.set_xlabel("compression ratio (1 - mean KV budget)")
    ax.set_ylabel("average score")
    ax.set_xlim(-0.02, 1.0)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Score vs mean KV budget, one panel per (task, length): each fixed-budget method a line through
    its budgets and full's 100%, each threshold-free policy a point (it chooses its own budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict = {}
    for r in rows:
        cell = groups.setdefault((r["task"], r["length"]), {}).setdefault(r["policy"], [])
        cell.append((r["budget"] or 0.0, r["score"]))
    keys = sorted(groups)
    cols = 4
    fig, axes = plt.subplots(-(-len(keys) // cols), cols, figsize=(4 * cols, 3 * -(-len(keys) // cols)))
    for ax, k in zip(axes.flat, keys):
        per = {
            p: (sum(b for b, _ in v) / len(v), sum(s for _, s in v) / len(v)) for p, v in groups[k].items()
        }
        full = per.get("full", (1.0, None))
        methods: dict = {}
        for p, (b, s) in per.items():
            if p != "full" and "%" in p:  # a fixed budget: "snapkv 50%"
                methods.setdefault(p.rsplit(" ", 1)[0], []).append((b, s))
        for m, pts in sorted(methods.items()):
            pts = sorted(pts + ([full] if full[1] is not None else []))
            ax.plot([100 * b for b, _ in pts], [s for _, s in pts], marker="o", label=m)
        for p, (b, s) in per.items():
            if p != "full" and "%" not in p:
                ax.plot([100 * b], [s], marker="*", markersize=12, linestyle="", label=p)
        ax.set_title(f"{k[0]} @{k[1]}", fontsize=9)
        ax.set_xlim(0, 105)
        ax.set_ylim(-5, 105)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("mean KV budget (% of the prompt)")
    fig.supylabel("score")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.standard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", choices=["ruler", "longbench", "gsm8k"])
    p.add_argument("--tasks", help="comma-separated tasks of the suite (default all)")
    p.add_argument("--lengths", default="1024,2048", help="RULER target lengths in the model's tokens")
    p.add_argument("--n", type=int, default=10, help="samples per task (per length for RULER)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-dir", help="local LongBench <task>.jsonl / GSM8K test.jsonl instead of the hub")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device")
    p.add_argument("--raw", action="store_true", help="no chat template")
    p.add_argument(
        "--kv-memory",
        type=float,
        help="GiB of KV pool (default: the engine's); a fan-out holds every policy's copy of the prompt",
    )
    p.add_argument("--server", help="a running engine.serve (http://host:port) instead of an engine here")
    p.add_argument("--out", help="JSONL of per-sample results (appended; reruns skip what is there)")
    p.add_argument("--report", help="print the table of this JSONL (and append it to --results-md)")
    p.add_argument(
        "--policies",
        default=DEFAULT_POLICIES,
        help="NAME[:BUDGET | :KNOB=VALUE/...] comma list, e.g. full,snapkv:0.2,pyramidkv:0.2,adakv:0.2,"
        "cake:0.2,tova:0.2,knorm:0.2,twilight,snapkv:budget=0.2/pooling=avg (default: %(default)s)",
    )
    p.add_argument("--results-md")
    p.add_argument(
        "--plot",
        metavar="PNG",
        help="with --report: average score vs compression ratio per method (kvpress's leaderboard) "
        "here, and score vs budget per task in PNG-tasks.png",
    )
    a = p.parse_args(argv)
    try:
        if a.report:
            rows = [json.loads(x) for x in Path(a.report).read_text().splitlines() if x.strip()]
            table = report(rows)
            print(table)
            if a.plot:  # the leaderboard's picture, and beside it one panel per task
                summary_plot(rows, Path(a.plot), Path(a.report).stem)
                plot(rows, Path(a.plot).with_name(Path(a.plot).stem + "-tasks.png"), Path(a.report).stem)
            if a.results_md:
                from bench.common import append_results

                append_results(Path(a.results_md), f"### {Path(a.report).name}\n\n{table}")
            return 0
        if not a.suite or not a.out:
            raise UserError("--suite and --out are needed (or --report FILE)")
        a.lengths = [int(x) for x in a.lengths.split(",")]
        policies = parse_policies(a.policies)  # before the model loads: a bad name fails at once
        from engine.engine import Engine

        if a.kv_memory is not None and not a.kv_memory > 0:
            raise UserError(f"--kv-memory must be a number of GiB > 0, got {a.kv_memory}")
        eng = Engine(a.model, device=a.device, max_seqs=len(policies) * 2, kv_memory=a.kv_memory)
        items = {"ruler": ruler_items, "longbench": longbench_items, "gsm8k": gsm8k_items}[a.suite](eng, a)
        run(eng, items, policies, Path(a.out), a.server)
        rows = [json.loads(x) for x in Path(a.out).read_text().splitlines() if x.strip()]
        print(report(rows))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
