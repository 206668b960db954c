"""Quality benchmark: ReFreeKV (threshold T) against full cache and fixed-budget pruning.

    python -m bench.quality --model smollm2-135m-instruct --n 8 --prompt-tokens 1024
    python -m bench.quality --model ./Qwen2.5-7B-Instruct --device cuda --n 50 --prompt-tokens 4096

Task families (all generated from --seed; material is real text and code nobody here wrote):
  text        fidelity: a long prompt cut from Python's documentation (pydoc_data.topics), then the
              next --fidelity-tokens real tokens teacher-forced through the pruned cache.
              Score: top-1 agreement with the full cache (%); also KL(full || pruned), perplexity.
  code        the same on CPython standard-library source files (inspect.getsourcefile).
  arithmetic  generated multi-step word problems with known integer answers, few-shot chain-of-thought
              (worked examples of the same problem kind fill the prompt, GSM8K-style), greedy; the last
              integer of the output is the answer. Score: accuracy (%).
  summary     summarise / explain / answer over a real document (docs or code). Score: ROUGE-L F1
              (word tokens) of the greedy output against the full-cache output (full = 100).

There is no passkey "retrieval" family any more: RULER's needle-in-a-haystack tasks (generated
offline by bench/standard/ruler.py, run by bench/standard/cli.py with RULER's own templates and
metrics) measure the same thing, a passkey / magic number at a depth of a long real text, better
and comparably with the field.

Every generative family also reports agreement with the full-cache output (ROUGE-L F1 and the share
of outputs identical to it), and every cell carries the mean KV budget the policy kept (prompt
tokens kept / prompt tokens, averaged over layers, as the engine's stats).

Policies: full; refreekv at --threshold; every other registered policy named in --policies at each
of --budgets; ReFreeKV again at every --sweep threshold. A policy that is not registered is
skipped with a note. Everything runs through the engine's public API: each prompt is prefilled
once and fanned out to every policy (Engine.generate with a list of policies: the probe is
captured with the widest window any policy asks for, each policy's kept tokens are copied into
pages of its own), fidelity families teacher-force the real continuation (forced tokens, scored
from the engine's logits hook), and generative families decode greedily with continuous batching.

Files: bench/quality/tasks.py (material and tasks), bench/quality/metrics.py (scoring),
bench/quality/report.py (markdown and plots), this file (policies, the runner, the CLI).

Outputs: a section appended to --results-md (default bench/RESULTS.md), a JSON file and two PNG
plots in --out (default bench/results/).
"""

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import refreekv
from bench.common import ROOT, append_results, device_name, git_commit, model_source
from bench.quality.metrics import Fidelity, _mean, last_int, rouge_l, summarise
from bench.quality.report import hms, markdown, plots
from bench.quality.tasks import FAMILIES, FIDELITY, Material, make_tasks
from engine.sampling import Sampling
from weights.errors import UserError

THRESHOLD_POLICIES = ("refreekv", "refreekv-h2o")


@dataclass
class Spec:
    label: str
    name: str
    kwargs: dict
    kind: str  # full | threshold | budget | sweep
    value: float | None = None  # T or budget


def fmt_budget(b: float) -> str:
    return f"{b * 100:g}%" if b <= 1 else f"{int(b)} tok"


def policy_specs(names, budgets, threshold, sweep, variants=()) -> tuple[list[Spec], list[str]]:
    avail = refreekv.available()
    specs, notes = [], []
    for name in names:
        if name not in avail:
            notes.append(f"skipped {name}: not a registered KV policy (registered: {', '.join(avail)})")
            continue
        if name == "full":
            specs.append(Spec("full", name, {}, "full"))
        elif name in THRESHOLD_POLICIES:
            specs.append(
                Spec(f"{name} T={threshold:g}", name, {"threshold": threshold}, "threshold", threshold)
            )
        else:
            for b in budgets:
                specs.append(Spec(f"{name} {fmt_budget(b)}", name, {"budget": b}, "budget", b))
    if "refreekv" in avail and "refreekv" in names:
        for t in sweep:
            if t != threshold:
                specs.append(Spec(f"refreekv T={t:g}", "refreekv", {"threshold": t}, "sweep", t))
    for name, kw in variants:
        if name not in avail:
            notes.append(f"skipped variant {name}: not a registered KV policy")
            continue
        label = name + " " + " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in kw.items())
        specs.append(Spec(label.strip(), name, dict(kw), "variant", kw.get("threshold", kw.get("budget"))))
    if not any(s.name == "full" for s in specs):
        specs.insert(0, Spec("full", "full", {}, "full"))  # the reference every score needs
    specs.sort(key=lambda s: s.name != "full")
    return specs, notes


class Progress:
    """One stderr line: a carriage-return bar on a terminal, plain lines in a log file."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.done, self.t0, self.quiet = total, 0, time.perf_counter(), quiet
        self.tty = sys.stderr.isatty()

    def show(self, what: str, advance: int = 0):
        self.done += advance
        if self.quiet:
            return
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done) if self.done else float("nan")
        w = 24
        fill = int(w * self.done / max(1, self.total))
        line = (
            f"[quality] [{'#' * fill}{'.' * (w - fill)}] {self.done}/{self.total} {hms(el)} elapsed"
            f"{'' if math.isnan(eta) else ', ETA ' + hms(eta)} | {what}"
        )
        if self.tty:
            sys.stderr.write("\r" + line[:160].ljust(160))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.tty and not self.quiet:
            sys.stderr.write("\n")


def run_family(eng, family, tasks, specs, policies, a, prog) -> list[dict]:
    """Every policy on every task of one family (one fan-out per batch of prompts); one record per task."""
    fid = family in FIDELITY
    max_new = a.fidelity_tokens if fid else a.max_new_tokens
    stop = ["\nQuestion:"] if family == "arithmetic" else []
    full_j = [s.kind for s in specs].index("full")
    records = []
    nb = math.ceil(len(tasks) / a.batch)
    for bi in range(nb):
        batch = tasks[bi * a.batch : (bi + 1) * a.batch]
        where = f"{family} batch {bi + 1}/{nb}"
        prog.show(f"{where}: {len(batch)} x ~{max(len(t.ids) for t in batch)} tok x {len(specs)} policies")
        t0 = time.perf_counter()
        prompts = [t.ids for t in batch]
        if fid:
            score = Fidelity([t.target for t in batch], full_j)
            out = eng.generate(
                prompts,
                policies,
                Sampling(max_new_tokens=max_new),
                forced=[t.target for t in batch],
                on_logits=score,
                probe_rows=1,
            )
        else:
            out = eng.generate(prompts, policies, Sampling(max_new_tokens=max_new, stop=stop), probe_rows=1)
        secs = (time.perf_counter() - t0) / (len(batch) * len(specs))
        recs = [
            {"meta": t.meta, "prompt_tokens": len(t.ids), "answer": t.answer, "by_policy": {}} for t in batch
        ]
        for b, r in enumerate(recs):
            for j, spec in enumerate(specs):
                st = out[b][j].stats
                frac = [sum(h) / len(h) / st["prompt_tokens"] for h in st["kept_per_head"]]
                d = {
                    "budget": st["budget"],
                    "kept_per_layer": frac,
                    "evicted_per_layer": st["evicted_per_layer"],
                    "seconds": secs,
                }
                if fid:
                    m = score.result(b, j)
                    d.update(score=100 * m["top1"], **m)
                else:
                    d.update(output=out[b][j].text, new_tokens=len(out[b][j].tokens))
                r["by_policy"][spec.label] = d
        prog.show(f"{where} done", advance=len(specs))
        if not fid:
            for r in recs:
                ref = r["by_policy"]["full"]["output"]
                for label, d in r["by_policy"].items():
                    d["agree"] = 100 * rouge_l(d["output"], ref)
                    d["same"] = float(d["output"] == ref)
                    if family == "arithmetic":
                        d["pred"] = last_int(d["output"])
                        d["correct"] = float(d["pred"] == r["answer"])
                    d["score"] = 100 * d["correct"] if "correct" in d else d["agree"]
        records.extend(recs)
    return records


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see --help)")


def _floats(s):
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated numbers, got {s!r}") from None


def parse_args(argv=None):
    p = _Parser(
        prog="python -m bench.quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", help="checkpoint dir, hub id or bundled name (default: bundled SmolLM2-135M-Instruct)"
    )
    p.add_argument("--device")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--max-length", type=int, help="context limit (prompt + new tokens)")
    p.add_argument(
        "--families", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}"
    )
    p.add_argument("--n", type=int, default=6, help="samples per family")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="approximate prompt length in tokens")
    p.add_argument("--max-new-tokens", type=int, default=96, help="greedy tokens for arithmetic and summary")
    p.add_argument(
        "--fidelity-tokens", type=int, default=128, help="teacher-forced real tokens for text and code"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=6,
        help="prompts per batch (each prompt is prefilled once for all policies)",
    )
    p.add_argument("--kv-memory", type=float, help="the engine's KV pool in GiB (default: the engine's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", default="full,refreekv,streaming,h2o,snapkv")
    p.add_argument("--budgets", default="0.5,0.2", help="fixed budgets: fractions <= 1 or token counts > 1")
    p.add_argument("--threshold", type=float, default=0.01, help="ReFreeKV's T in the main table")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'NAME JSON'",
        help="an extra policy column with its own knobs, e.g. 'refreekv {\"rows\": 8}' (repeatable)",
    )
    p.add_argument(
        "--sweep", default="0.001,0.01,0.1", help="ReFreeKV thresholds for the sweep ('' for none)"
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for JSON and PNGs")
    p.add_argument(
        "--results-md",
        default=str(ROOT / "bench" / "RESULTS.md"),
        help="markdown file to append to ('' for none)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's own; 1 is much faster on a "
        "machine whose cores are shared with other jobs: OpenMP barriers stall on a busy core)",
    )
    p.add_argument(
        "--tag", help="suffix for the output file names (they are quality-MODEL[-FAMILIES][-TAG].*)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument(
        "--replot", metavar="JSON", help="only redraw the PNGs of an earlier run's JSON into --out"
    )
    a = p.parse_args(argv)
    a.families = [f.strip() for f in a.families.split(",") if f.strip()]
    bad = [f for f in a.families if f not in FAMILIES]
    if bad or not a.families:
        raise UserError(f"unknown task families {bad}; choose from {', '.join(FAMILIES)}")
    if a.threads is not None and a.threads < 1:
        raise UserError("--threads must be >= 1")
    for k in ("n", "prompt_tokens", "max_new_tokens", "fidelity_tokens", "batch"):
        if getattr(a, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1")
    a.budgets, a.sweep = _floats(a.budgets), _floats(a.sweep)
    a.policies = [x.strip() for x in a.policies.split(",") if x.strip()]
    variants = []
    for v in a.variant:
        name, _, js = v.strip().partition(" ")
        try:
            kw = json.loads(js or "{}")
        except json.JSONDecodeError as e:
            raise UserError(f"--variant {v!r}: not 'NAME JSON' ({e})") from None
        if not isinstance(kw, dict):
            raise UserError(f"--variant {v!r}: the knobs must be a JSON object")
        variants.append((name, kw))
    a.variant = variants
    return a


def run(a, argv) -> dict:
    from engine.engine import Engine

    t_start = time.perf_counter()
    commit = git_commit()  # at the start: the code this run imported
    if a.threads:
        torch.set_num_threads(a.threads)
    specs, notes = policy_specs(a.policies, a.budgets, a.threshold, a.sweep, a.variant)
    policies = [refreekv.make(s.name, **s.kwargs) for s in specs]
    # a batch's whole fan-out runs at once when the pool holds it (otherwise the engine queues it)
    g = Engine(
        a.model, a.device, a.dtype, a.max_length, kv_memory=a.kv_memory, max_seqs=a.batch * len(policies)
    )
    chat = g.tokenizer.chat_template is not None
    if not chat:
        notes.append("the checkpoint has no chat template: prompts are fed raw")
    longest_new = max(a.fidelity_tokens, a.max_new_tokens)
    room = g.context - longest_new - 48
    if a.prompt_tokens > room:
        if room < 32:
            raise UserError(f"context {g.context} too short for {longest_new} new tokens")
        notes.append(f"--prompt-tokens {a.prompt_tokens} lowered to {room} to fit the context of {g.context}")
        a.prompt_tokens = room
    m = Material(g)
    tasks = {f: make_tasks(g, f, a.n, a.seed, a.prompt_tokens, a.fidelity_tokens, m) for f in a.families}
    for f, ts in tasks.items():
        for t in ts:
            g.fit(t.ids, a.fidelity_tokens if f in FIDELITY else a.max_new_tokens)
    units = sum(math.ceil(len(ts) / a.batch) for ts in tasks.values()) * len(specs)
    prog = Progress(units, a.quiet)
    print(
        f"[quality] {g.path.name} on {g.device} ({str(g.dtype).removeprefix('torch.')}): "
        f"{len(specs)} policies x {len(a.families)} families x {a.n} samples",
        file=sys.stderr,
    )
    for x in notes:
        print(f"[quality] note: {x}", file=sys.stderr)
    records, results = {}, {}
    with torch.inference_mode():
        for f in a.families:
            records[f] = run_family(g, f, tasks[f], specs, policies, a, prog)
            results[f] = summarise(f, records[f], specs)
    prog.close()
    slug = (
        re.sub(r"[^A-Za-z0-9._-]+", "_", (a.model or "smollm2-135m-instruct").rstrip("/").split("/")[-1])
        or "model"
    )
    stem = (
        slug
        + ("" if a.families == list(FAMILIES) else "-" + "-".join(a.families))
        + (f"-{a.tag}" if a.tag else "")
    )
    res = {
        "model": slug,
        "model_path": model_source(a.model),
        "device": device_name(g),
        "dtype": str(g.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "commit": commit,
        "command": "python -m bench.quality " + shlex.join(argv),
        "chat": chat,
        "notes": notes,
        "config": {
            k: getattr(a, k)
            for k in (
                "families",
                "n",
                "prompt_tokens",
                "max_new_tokens",
                "fidelity_tokens",
                "batch",
                "seed",
                "policies",
                "budgets",
                "threshold",
                "sweep",
                "threads",
                "variant",
                "tag",
            )
        },
        "policies": [
            dict(label=s.label, name=s.name, kind=s.kind, value=s.value, kwargs=s.kwargs) for s in specs
        ],
        "prompt_tokens": {f: _mean([len(t.ids) for t in tasks[f]]) for f in a.families},
        "runtime_s": time.perf_counter() - t_start,
        "results": results,
        "samples": records,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res["plots"] = [
        os.path.relpath(p, ROOT) if Path(p).resolve().is_relative_to(ROOT) else p
        for p in plots(res, out, stem)
    ]
    jpath = out / f"quality-{stem}.json"
    jpath.write_text(json.dumps(_round(res), indent=1))
    md = markdown(res)
    if a.results_md:
        append_results(Path(a.results_md), md)
    print(md)
    print(
        f"[quality] wrote {jpath}" + (f" and appended to {a.results_md}" if a.results_md else ""),
        file=sys.stderr,
    )
    return res


def _round(x, digits=5):
    """Floats to `digits` significant digits, so result files stay small and diffable."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    return x


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        a = parse_args(argv)
        if a.replot:
            res = json.loads(Path(a.replot).read_text())
            Path(a.out).mkdir(parents=True, exist_ok=True)
            print("\n".join(plots(res, Path(a.out), Path(a.replot).stem.removeprefix("quality-"))))
            return 0
        run(a, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
