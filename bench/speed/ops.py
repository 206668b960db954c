"""Where a decode token's time goes, ours beside transformers eager on the same weights, one process.

    OMP_NUM_THREADS=1 python -m bench.speed.ops --prompt 512 --new 41 [--model DIR] [--batch B] [--compile]

Each engine runs a greedy generate of --new tokens and one of 1 token (the prefill alone), under
torch.profiler and again without it, alternating ours and theirs for --rounds rounds; a token's share
is the difference of the two runs over --new - 1 tokens (prefill cancels). The quietest round (least
wall time) is kept. Printed, side by side (markdown): per decode token and for the 1-token run, the
wall time (unprofiled), profiled operator time, and the operators by self CPU time with their calls.
"""

import argparse
import time
from collections import defaultdict

import torch

import refreekv
from bench.common import model_source, random_prompts
from bench.speed import hf as hfb
from engine.engine import Engine
from engine.sampling import Sampling


def _ours(eng, prompts, new):
    return lambda: eng.generate(prompts, refreekv.make("full"), Sampling(max_new_tokens=new))


def _theirs(hf, prompts, new):
    ids = torch.tensor(prompts)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    return lambda: hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)


def _ops(fn) -> dict:
    """{op: [self CPU us, calls]} of one call of fn."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    out = defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages():
        out[e.key][0] += e.self_cpu_time_total
        out[e.key][1] += e.count
    return out


def _wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def per_token(long, short, new) -> dict:
    """What one decode token costs: ({op: (ms, calls)}, wall ms) from the long and the short run."""
    k = new - 1
    ops = {}
    for name in set(long[0]) | set(short[0]):
        a, b = long[0].get(name, (0.0, 0)), short[0].get(name, (0.0, 0))
        ops[name] = ((a[0] - b[0]) / 1e3 / k, (a[1] - b[1]) / k)
    return ops, (long[1] - short[1]) * 1e3 / k


def measure(runs: dict, new: int, rounds: int) -> tuple[dict, dict]:
    """runs: {label: (long fn, short fn)} -> ({label: (ops per decode token, wall ms per token)},
    {label: (ops of the 1-token run, its wall ms)}), each the quietest of `rounds`."""
    decode, prefill = {}, {}
    for _ in range(rounds):
        for label, (long_fn, short_fn) in runs.items():
            long_fn(), short_fn()  # warm
            short = (_ops(short_fn), _wall(short_fn))
            got = per_token((_ops(long_fn), _wall(long_fn)), short, new)
            if label not in decode or got[1] < decode[label][1]:
                decode[label] = got
            ms = ({n: (us / 1e3, c) for n, (us, c) in short[0].items()}, short[1] * 1e3)
            if label not in prefill or ms[1] < prefill[label][1]:
                prefill[label] = ms
    return decode, prefill


def table(best: dict, top: int, what: str) -> str:
    labels = list(best)
    lines = [
        f"| {what} | " + " | ".join(labels) + " |",
        "| --- |" + " ---: |" * len(labels),
        "| wall time (unprofiled) | " + " | ".join(f"{best[x][1]:.1f} ms" for x in labels) + " |",
    ]
    total = {x: sum(ms for ms, _ in best[x][0].values()) for x in labels}
    cells = " | ".join(f"{total[x]:.1f} ms" for x in labels)
    lines.append(f"| profiled operator time (self) | {cells} |")
    calls = {x: sum(c for _, c in best[x][0].values() if c > 0) for x in labels}
    lines.append("| operator calls | " + " | ".join(f"{calls[x]:.0f}" for x in labels) + " |")
    heaviest = lambda n: -max(best[x][0].get(n, (0, 0))[0] for x in labels)
    names = sorted({n for x in labels for n in best[x][0]}, key=heaviest)[:top]
    for n in names:
        cells = []
        for x in labels:
            ms, c = best[x][0].get(n, (0.0, 0))
            cells.append(f"{ms:.2f} ms ({c:.0f})" if c else "-")
        lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.speed.ops", description=__doc__)
    p.add_argument("--model", help="checkpoint (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=41)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--compile", action="store_true", help="ours compiled (beside ours eager)")
    p.add_argument("--no-hf", action="store_true")
    a = p.parse_args(argv)
    # the whole batch in one unchunked prefill (the scheduler reads these when the engine is built)
    whole = dict(max_prefill_tokens=max(4096, a.batch * a.prompt), max_batched_tokens=0)
    eng = Engine(a.model, "cpu", "float32", max_seqs=max(8, a.batch), **whole)
    eng.eos = set()
    prompts = random_prompts(eng, a.batch, a.prompt, 0)
    runs = {"ours eager": (_ours(eng, prompts, a.new), _ours(eng, prompts, 1))}
    if a.compile:
        ceng = Engine(a.model, "cpu", "float32", max_seqs=max(8, a.batch), compile=True, **whole)
        ceng.eos = set()
        t0 = time.perf_counter()
        ceng.warmup(refreekv.make("full"))
        print(f"compile warm-up {time.perf_counter() - t0:.1f} s")
        runs["ours compiled"] = (_ours(ceng, prompts, a.new), _ours(ceng, prompts, 1))
    if not a.no_hf:
        hf = hfb.views(eng)
        runs["transformers eager"] = (_theirs(hf, prompts, a.new), _theirs(hf, prompts, 1))
    decode, prefill = measure(runs, a.new, a.rounds)
    print(
        f"\n{model_source(a.model)}, batch {a.batch}, prompt {a.prompt}, "
        f"{torch.get_num_threads()} thread(s), quietest of {a.rounds} rounds\n"
    )
    print(table(decode, a.top, f"per decode token (the {a.new}- minus the 1-token run)"))
    print()
    print(table(prefill, a.top, "the 1-token run (prefill)"))


if __name__ == "__main__":
    main()
