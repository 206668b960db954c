"""What chunked prefill costs: prefill throughput at several token budgets per step, against whole
prompts, and the fixed cost of one forward (what a mixed decode + chunk batch would save a step).

    python -m bench.chunks --model smollm2-135m-instruct --prompt 2048 --budgets 0,64,128,256,512

Through the engine's public API: for each budget (Engine.max_batched_tokens; 0 = the prompt
whole), `generate` one prompt with one new token, the best of --reps runs after a warm-up; prefill
tokens/s = prompt tokens / wall, and the forwards it took (its stats' prefill_chunks). A chunk forward of c
tokens costs about a + b c: the fit over the chunked rows gives a, which a step with a decode
batch and a chunk in one forward would pay once instead of twice; beside it the decode step at
batch 1 (the median step of --decode-tokens generated tokens).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import refreekv
from bench.common import SHAPES, append_results, build_engine, git_commit, log, random_prompts, run_meta
from engine.sampling import Sampling


def timed(eng, prompt, budget: int, reps: int) -> dict:
    eng.max_batched_tokens = budget
    best = None
    for _ in range(reps + 1):  # the first is a warm-up
        (res,) = eng.generate([prompt], refreekv.make("full"), Sampling(max_new_tokens=1))
        st = eng.stats
        if best is None or st["wall_s"] < best["wall_s"]:
            best = dict(wall_s=st["wall_s"], first=res.tokens[0], forwards=res.stats["prefill_chunks"])
    tokens, forwards = len(prompt), best["forwards"]
    return dict(
        budget=budget,
        prefill_tok_s=tokens / best["wall_s"],
        wall_s=best["wall_s"],
        forwards=forwards,
        ms_per_forward=1e3 * best["wall_s"] / forwards,
        chunk=tokens / forwards,
        first=best["first"],
    )


def fit(rows) -> tuple[float, float] | None:
    """Least squares ms = a + b * chunk over the chunked rows (None with fewer than two)."""
    pts = [(r["chunk"], r["ms_per_forward"]) for r in rows if r["budget"]]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return my - b * mx, b


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m bench.chunks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="real checkpoint (default: the bundled smollm2-135m-instruct)")
    src.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead")
    p.add_argument("--prompt", type=int, default=2048, help="tokens of the prompt")
    p.add_argument("--budgets", default="0,64,128,256,512", help="max_batched_tokens values (0: whole)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--results-md", help="append the table to this markdown file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    budgets = [int(x) for x in a.budgets.split(",")]
    commit = git_commit()
    src = argparse.Namespace(
        model=a.model, shape=a.shape, device=a.device, dtype=a.dtype, compile=False, seed=0
    )
    eng, name = build_engine(
        src,
        max_seqs=1,
        kv_memory=2.0,
        max_length=a.prompt + a.decode_tokens + 16,
        max_prefill_tokens=a.prompt,
    )
    eng.eos = set()
    (prompt,) = random_prompts(eng, 1, a.prompt, 0)
    log(f"[chunks] {name}: {a.prompt} tokens, budgets {budgets}")
    rows = [timed(eng, prompt, b, a.reps) for b in budgets]
    eng.max_batched_tokens = 0
    eng.generate([prompt], refreekv.make("full"), Sampling(max_new_tokens=a.decode_tokens))
    decode_ms = statistics.median(eng.stats["step_ms"][2:])
    whole = next((r for r in rows if r["budget"] == 0), None)
    line = fit(rows)
    out = [
        "| max batched tokens | forwards | ms per forward | prefill tok/s | vs the whole prompt "
        "| first token |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = "" if whole is None else ("same" if r["first"] == whole["first"] else "DIFFERS")
        rel = "" if whole is None else f"{r['prefill_tok_s'] / whole['prefill_tok_s']:.2f}x"
        out.append(
            f"| {r['budget'] or 'whole prompt'} | {r['forwards']} | {r['ms_per_forward']:.0f} | "
            f"{r['prefill_tok_s']:.0f} | {rel} | {same} |"
        )
    text = "\n".join(out)
    if line:
        text += (
            f"\n\nOne chunk forward of c tokens: {line[0]:.1f} ms + {line[1]:.2f} ms x c (least squares "
            f"over the chunked rows); a decode step at batch 1: {decode_ms:.1f} ms."
        )
    print(text)
    if a.json:
        found = dict(model=name, rows=rows, fit=line, decode_ms=decode_ms)
        Path(a.json).write_text(json.dumps(found, indent=1))
    if a.results_md:
        meta = run_meta(eng, name, commit, "bench.chunks", argv, 2.0)
        append_results(
            Path(a.results_md),
            f"### Chunked prefill's cost: {name}, a prompt of {a.prompt} tokens ({meta['date']})\n\n"
            f"- device: {meta['device']}, dtype {meta['dtype']}; commit `{commit}`\n"
            f"- command: `{meta['command']}`\n\n" + text + "\n",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
