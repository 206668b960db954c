"""CPU decode through the paged pool vs the dense store it replaced (tests/dense_reference.py: the
engine's store before pages, one [layers, batch, kv_heads, capacity, head_dim] buffer), on the
bundled real models, in one process.

    OMP_NUM_THREADS=1 python -m bench.store --threads 1 --results-md bench/RESULTS.md

Rows per model, prompt length and batch: the median model.decode step with each store (the dense
one reads each layer up to the longest row, the paged one gathers up to the longest row's pages),
and the engine's own decode step (Engine.generate: scheduler, page hand-out, sampling and
detokenising included; the median of its launch-to-launch intervals, so that a prefill admitted
mid-run does not count as decode) as tokens/s per sequence. Greedy tokens of the two stores are
compared.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import refreekv
from bench.common import append_results, git_commit, log
from engine.engine import Engine
from engine.sampling import Sampling

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from dense_reference import DenseKV  # noqa: E402


@torch.no_grad()
def steps_dense(eng, prompts, steps):
    m, c = eng.model, eng.config
    B, n = len(prompts), len(prompts[0])
    kv = DenseKV(c.n_layers, B, c.n_kv_heads, n + steps + 1, c.head_dim, eng.dtype)
    logits, _ = m.prefill(torch.tensor(prompts), torch.full((B,), n), kv, torch.arange(B), probe_rows=0)
    tok, times, out = logits.argmax(-1), [], []
    for t in range(steps):
        t0 = time.perf_counter()
        tok = m.decode(tok, kv, span=n + t + 1).argmax(-1)
        times.append(time.perf_counter() - t0)
        out.append(tok)
    return times, torch.stack(out, 1).tolist()


@torch.no_grad()
def steps_paged(eng, prompts, steps):
    from engine.kv import PagedKV

    m, c, ps = eng.model, eng.config, eng.page_size
    B, n = len(prompts), len(prompts[0])
    kv = PagedKV(
        c.n_layers,
        c.n_kv_heads,
        c.head_dim,
        B * c.n_layers * c.n_kv_heads * -(-(n + steps + 1) // ps),
        ps,
        max_seqs=B,
        max_len=n + steps + 1,
        dtype=eng.dtype,
    )
    for b in range(B):
        kv.assign(b, n)
    logits, _ = m.prefill(torch.tensor(prompts), torch.full((B,), n), kv, torch.arange(B), probe_rows=0)
    kv.set_live([True] * B)
    tok, times, out = logits.argmax(-1), [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        kv.grow([True] * B)  # the engine's page hand-out, part of a step
        tok = m.decode(tok, kv, span=int(kv.h_pages[:, :B].max())).argmax(-1)
        times.append(time.perf_counter() - t0)
        out.append(tok)
    return times, torch.stack(out, 1).tolist()


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    p.add_argument("--prompt-lens", default="512,2048")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int)
    p.add_argument("--results-md")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    # real prose nobody here wrote (Python's documentation topics)
    from bench.quality.tasks import doc_corpus

    rows = []
    for name in a.models.split(","):
        eng = Engine(name, device="cpu", max_seqs=max(map(int, a.batches.split(","))))
        eng.eos = set()
        ids = eng.tokenizer.encode(doc_corpus()[:60000])
        for n in map(int, a.prompt_lens.split(",")):
            for B in map(int, a.batches.split(",")):
                prompts = [ids[b * 97 : b * 97 + n] for b in range(B)]
                td, tokd = steps_dense(eng, prompts, a.steps)
                tp, tokp = steps_paged(eng, prompts, a.steps)
                eng.generate(prompts, refreekv.make("full"), Sampling(max_new_tokens=4))  # warm
                eng.generate(prompts, refreekv.make("full"), Sampling(max_new_tokens=a.steps + 1))
                d, pg = statistics.median(td) * 1e3, statistics.median(tp) * 1e3
                # prefill batches interleave: the median step
                rate = 1e3 / statistics.median(eng.stats["step_ms"])
                rows.append(
                    [
                        name,
                        n,
                        B,
                        f"{d:.1f}",
                        f"{pg:.1f}",
                        f"{pg / d:.2f}",
                        f"{1e3 / d:.1f}",
                        f"{rate:.1f}",
                        f"{rate / (1e3 / d):.2f}",
                        "yes" if tokd == tokp else "NO",
                    ]
                )
                log(f"[store] {rows[-1]}")
    head = [
        "model",
        "prompt",
        "batch",
        "dense step ms",
        "paged step ms",
        "paged / dense",
        "dense tok/s per seq",
        "engine tok/s per seq",
        "engine / dense",
        "same tokens",
    ]
    text = "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        + ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    )
    if a.results_md:
        import datetime
        import platform
        import shlex

        append_results(
            Path(a.results_md),
            (
                "## CPU decode: paged pool vs dense store "
                f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC})\n\n"
                f"- device: cpu ({platform.machine()}, {torch.get_num_threads()} threads), fp32; "
                f"commit `{git_commit()}`\n"
                "- command: `python -m bench.store "
                f"{shlex.join(argv if argv is not None else sys.argv[1:])}`\n\n" + text + "\n"
            ),
        )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
