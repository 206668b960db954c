"""The speed bench's transformers section: their rows at our configurations (bench/speed/hf.py times them
on our very weights), how many greedy tokens agree with our full-KV run, and the ours / theirs ratios."""

from bench.common import free_cache, is_cuda, log, random_prompts
from bench.speed import hf as hfb


def section(b):
    """transformers at batch 1 on each --prompt-lens and at each --batches x --batch-prompt, each mode;
    then ours / theirs for every pair of rows of the same batch and prompt."""
    a = b.a
    modes = a.hf_modes or (list(hfb.MODES) if is_cuda(b.dev) else ["eager"])
    hf = b.attempt("transformers model", lambda: hfb.views(b.eng, a.hf_weights == "copy"))
    if hf is None:
        return
    parity = b.attempt(
        "transformers parity", lambda: hfb.parity(b.eng, hf, random_prompts(b.eng, 1, 16, 1234)[0])
    )
    b.results["meta"].update(hf_weights=a.hf_weights, parity_max_abs_logit_diff=parity)
    runs = [(1, n) for n in a.prompt_lens] + [(B, a.batch_prompt) for B in a.batches]
    for mode in modes:  # eager first: static-compile leaves compiled state behind
        for B, n in runs:
            what = f"transformers {mode} {B} x {n}"
            log(f"[bench.speed] {what} ...")

            def run():
                row = hfb.measure(
                    b.eng, hf, mode, random_prompts(b.eng, B, n, a.seed + (n if B == 1 else B)), a.new_tokens
                )
                row["parity_max_abs_logit_diff"] = parity
                ref = next(
                    (
                        r
                        for r in b.results["speed"] + b.results["batch"]
                        if r["policy"] == "full" and r["prompt"] == n and r["batch"] == B
                    ),
                    None,
                )
                row["tokens_agree_prefix"] = None
                if ref is not None:
                    x, y = ref["_tokens"][0], row["_tokens"][0].tolist()
                    row["tokens_agree_prefix"] = next(
                        (i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))
                    )
                b.results["hf"].append(row)
                log(
                    f"[bench.speed]   prefill {row['prefill_ms']:.1f} ms, "
                    f"decode {row['decode_ms_median']:.3f} ms/step = {row['decode_tok_s']:.1f} tok/s "
                    f"({row['decode_tok_s_anchor']:.1f} anchor method), warm-up {row['warmup_s']:.1f} s"
                )

            b.attempt(what, run)
        free_cache(b.dev)
    hf = None  # let its memory go before the ratios
    free_cache(b.dev)
    b.results["ratios"] = ratios(b.results["hf"], b.results["speed"] + b.results["batch"])


def ratios(hf_rows, ours) -> list[dict]:
    """Ours over theirs (>1 = ours faster) for each transformers row and each of our rows at its
    batch and prompt."""
    return [
        dict(
            batch=h["batch"],
            prompt=h["prompt"],
            hf_mode=h["mode"],
            ours=r["policy"],
            decode_speedup=r["decode_tok_s"] / h["decode_tok_s"] if h["decode_tok_s"] else None,
            prefill_speedup=h["prefill_ms"] / r["prefill_ms"] if r["prefill_ms"] else None,
        )
        for h in hf_rows
        for r in ours
        if r["prompt"] == h["prompt"] and r["batch"] == h["batch"]
    ]
