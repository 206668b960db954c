"""Packed vs padded prefill: one long prompt admitted with many short ones.

    python -m bench.prefill --model smollm2-135m-instruct --long 2048 --short 32 --n-short 50

Padded prefill (the compiled path's static shapes) runs a batch right-padded to its longest prompt:
one long prompt with fifty short ones costs 51 x long rows of projections and MLP. Packed prefill
(eager, the CPU default) runs the prompts end to end: long + 50 x short rows, attention per prompt.
Both are timed on the same batch through the engine's public API (generate with one new token,
the admitted batch's prefill_s), after one warm-up each, with the scheduler's prefill budget
lifted so that the whole batch is admitted at once; the first tokens must agree.
"""

import argparse
import datetime
import platform
import shlex
import sys
from pathlib import Path

import torch

import refreekv
from bench.common import SHAPES, append_results, build_engine, git_commit, log
from engine.sampling import Sampling


def timed(eng, prompts, packed: bool, reps: int) -> tuple[float, list[int]]:
    eng.runner.packed = packed
    eng.core.sched.padded = not packed
    s = Sampling(max_new_tokens=1)
    best, first = float("inf"), None
    for _ in range(reps + 1):  # the first is a warm-up
        res = eng.generate(prompts, refreekv.make("full"), s)
        assert len({r.stats["batch"] for r in res}) == 1, "the batch was split"
        best = min(best, res[0].stats["prefill_s"])
        first = [r.tokens[0] for r in res]
    return best, first


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="real checkpoint (default: the bundled smollm2-135m-instruct)")
    src.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead")
    p.add_argument("--long", type=int, default=2048, help="tokens of the long prompt")
    p.add_argument("--short", type=int, default=32, help="tokens of each short prompt")
    p.add_argument("--n-short", type=int, default=50)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--results-md", help="append the table to this markdown file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    n = a.n_short + 1
    if not (a.model or a.shape):
        a.model = "smollm2-135m-instruct"
    # eager: both layouts run through the same (uncompiled) model; compiled prefill is padded only
    src = argparse.Namespace(model=a.model, shape=a.shape, device=a.device, dtype=None, compile=False, seed=0)
    eng, name = build_engine(src, max_seqs=n, kv_memory=2.0, max_prefill_tokens=10**9, max_batched_tokens=0)
    g = torch.Generator().manual_seed(0)
    V = min(eng.config.vocab_size, 32000)
    prompts = [torch.randint(100, V, (a.long,), generator=g).tolist()]
    prompts += [torch.randint(100, V, (a.short,), generator=g).tolist() for _ in range(a.n_short)]
    log(f"{name}: 1 x {a.long} + {a.n_short} x {a.short} tokens on {a.device}")
    padded, tok_pad = timed(eng, prompts, False, a.reps)
    packed, tok_pack = timed(eng, prompts, True, a.reps)
    agree = sum(x == y for x, y in zip(tok_pad, tok_pack))
    rows_pad = n * a.long
    rows_pack = a.long + a.n_short * a.short
    table = (
        "| prefill | rows (tokens) run | time s | first tokens equal |\n| --- | --- | --- | --- |\n"
        f"| padded | {rows_pad} | {padded:.2f} | |\n"
        f"| packed | {rows_pack} | {packed:.2f} | {agree}/{n} |\n"
        f"\npacked is {padded / packed:.1f}x faster ({rows_pad / rows_pack:.1f}x fewer rows)\n"
    )
    print(table)
    if a.results_md:
        dev = (
            torch.cuda.get_device_name()
            if a.device.startswith("cuda")
            else f"CPU ({platform.processor() or 'x86'}, {torch.get_num_threads()} threads)"
        )
        head = (
            f"### Packed vs padded prefill: {name}, 1 x {a.long} + {a.n_short} x {a.short} tokens\n\n"
            f"{dev}, {datetime.date.today()}, commit {git_commit()}, "
            f"`python -m bench.prefill {shlex.join(sys.argv[1:] if argv is None else argv)}`\n\n"
        )
        append_results(Path(a.results_md), head + table)


if __name__ == "__main__":
    main()
