"""Greedy tokens of the compiled engine against the eager one, on real text, batch 1 and batched.

    OMP_NUM_THREADS=1 python -m bench.speed.same_tokens [--model DIR] [--new 64]

Each prompt is generated greedily by both engines (one prompt alone, then all at once). Printed:
per prompt and batch, how many tokens agree before the first difference, and where they differ
the largest gap between the two engines' logits at that step and the eager top-2 margin there
(a near-tie that CPU float order may move). Exit 1 when a difference is not a near-tie
(margin above --tie).
"""

import argparse
import sys

import torch

import refreekv
from bench.common import model_source
from engine.engine import Engine
from engine.sampling import Sampling

PROMPTS = (
    "The history of the printing press begins in",
    "def fibonacci(n):\n    ",
    "Write a short letter to a friend about the rain in autumn.",
    "Water boils at sea level at a temperature of",
)


def run(eng, prompts, new):
    """(tokens per prompt, logits per prompt and step) of a greedy generate."""
    logits = [dict() for _ in prompts]

    def keep(keys, steps, rows):
        for key, step, row in zip(keys, steps, rows):
            logits[key][step] = row.float().clone()

    res = eng.generate(prompts, refreekv.make("full"), Sampling(max_new_tokens=new), on_logits=keep)
    return [r.tokens for r in res], logits


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.speed.same_tokens", description=__doc__)
    p.add_argument("--model", help="checkpoint (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--tie", type=float, default=1e-3, help="top-2 logit margin counted a near-tie")
    a = p.parse_args(argv)
    eager = Engine(a.model, "cpu", "float32", max_seqs=8)
    compiled = Engine(a.model, "cpu", "float32", max_seqs=8, compile=True)
    for eng in (eager, compiled):
        eng.eos = set()
    print(f"compile warm-up {compiled.warmup(refreekv.make('full')):.1f} s", file=sys.stderr)
    prompts = [eager.tokenizer.encode(t) for t in PROMPTS]
    print(f"{model_source(a.model)}, {torch.get_num_threads()} thread(s), {a.new} greedy tokens\n")
    head = "max logit gap before | gap at the first difference | eager top-2 margin there"
    print(f"| batch | prompt | same tokens | {head} |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    bad = 0
    for batch in ([[x] for x in prompts], [prompts]):
        for group in batch:
            (ref, ref_logits), (got, got_logits) = run(eager, group, a.new), run(compiled, group, a.new)
            for i, (x, y) in enumerate(zip(ref, got)):
                same = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), len(x))
                gap = margin = "-"
                before = max((ref_logits[i][j] - got_logits[i][j]).abs().max().item() for j in range(same))
                if same < len(x):
                    r, g = ref_logits[i][same], got_logits[i][same]
                    top = r.topk(2).values
                    gap, margin = f"{(r - g).abs().max():.2e}", f"{top[0] - top[1]:.2e}"
                    bad += float(top[0] - top[1]) > a.tie
                k = PROMPTS[prompts.index(group[i])][:32].replace("\n", " ")
                print(f"| {len(group)} | {k!r} | {same} / {len(x)} | {before:.2e} | {gap} | {margin} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
