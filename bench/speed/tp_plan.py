"""Tensor parallelism on paper: Qwen2.5-72B and Llama-3-70B on 4 and 8 H100 80GB, from the engine's
own sharding (weights/shard.py, the model built on the meta device: nothing is allocated).

    python -m bench.tp_plan --results-md bench/RESULTS.md

Computed, per rank: weight bytes (the embedding whole on every rank, the LM head split over the
vocabulary as the engine does when the ranks divide it), KV bytes per token,
how many 32k-token sequences fit at full cache and at ReFreeKV's published average budgets (63.7%
Llama 3, 76.0% Qwen2.5; a request is admitted with its whole prompt, so one prompt's full pages
stay free), the all-reduce volume of a decode step, and the expected decode step time: the weights a
rank reads per token (all but the embedding, whose lookup reads one row) over the H100 copy
bandwidth measured here (3.01 TB/s) plus 2 x layers all-reduces and the logits' all-gather at a
latency-bound NCCL cost (8 KB-32 KB messages on NVLink: ~8 us each, the published NVLink 4
bandwidth of 450 GB/s per direction being far from the limit at these sizes).
"""

import argparse
import sys
from pathlib import Path

import torch

from weights.config import parse_config
from weights.shard import shard_config

MODELS = {
    "Qwen2.5-72B": dict(
        architectures=["Qwen2ForCausalLM"],
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=152064,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        budget=0.760,
    ),
    # Llama-3-70B's shape; its 3.1 release reads 128k tokens (3.0: 8k), so 32k-token sequences are 3.1's
    "Llama-3.1-70B": dict(
        architectures=["LlamaForCausalLM"],
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        budget=0.637,
    ),
}
HBM_GB, USABLE = 80e9, 0.9  # H100 80GB; 10% left to the CUDA context, allocator and activations
COPY_BPS = 3.01e12  # device-to-device copy measured on an H100 of this workplace (shared/MODELS.md)
ALLREDUCE_S = 8e-6  # one small NCCL all-reduce over NVLink (latency-bound)
SEQ = 32768


def rank_bytes(cfg: dict, world: int) -> tuple[int, int, int]:
    """(weight bytes of rank 0 in bf16, the bytes of them a decode step reads, KV bytes per token of
    one rank)."""
    from engine.model import Transformer

    c = shard_config(parse_config(cfg), 0, world)
    with torch.device("meta"):
        m = Transformer(c).to(torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in m.parameters())
    embed = m.embed.weight
    read = weights - (0 if c.tie_embeddings else embed.numel() * embed.element_size())
    return weights, read, c.n_layers * c.n_kv_heads * c.head_dim * 2 * 2


def rows() -> list[list[str]]:
    out = []
    for name, spec in MODELS.items():
        cfg = {k: v for k, v in spec.items() if k != "budget"}
        c = parse_config(cfg)
        for world in (4, 8):
            w, read, kv_tok = rank_bytes(cfg, world)
            free = HBM_GB * USABLE - w - 2e9  # 2 GB for a 32k-token prefill's activations on this rank
            seq = SEQ * kv_tok
            full = int(free // seq)
            pruned = int((free - seq) // (spec["budget"] * seq)) + 1  # one prompt whole while it is admitted
            ar = 2 * c.n_layers * c.dim * 2  # bytes all-reduced per decode step, per sequence
            step = read / COPY_BPS + (2 * c.n_layers + 1) * ALLREDUCE_S
            out.append(
                [
                    name,
                    str(world),
                    f"{w / 1e9:.1f}",
                    f"{kv_tok / 1024:.0f} KiB",
                    str(full),
                    f"{100 * spec['budget']:.1f}%",
                    str(pruned),
                    f"{pruned / max(full, 1):.2f}x",
                    f"{ar / 1e6:.2f} MB ({2 * c.n_layers} x {c.dim * 2 // 1024} KiB)",
                    f"{1e3 * step:.1f} ms",
                    f"{1 / step:.0f}",
                ]
            )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.tp_plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--results-md")
    a = p.parse_args(argv)
    head = [
        "model",
        "H100s",
        "weights / rank (GB)",
        "KV / token / rank",
        "32k seqs / rank, full",
        "ReFreeKV budget",
        "32k seqs / rank, ReFreeKV",
        "gain",
        "all-reduce / step / seq",
        "decode step (batch 1)",
        "tok/s (batch 1)",
    ]
    text = "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        + ["| " + " | ".join(r) + " |" for r in rows()]
    )
    if a.results_md:
        from bench.common import append_results

        append_results(
            Path(a.results_md),
            "## Tensor parallelism on paper: 70B-class models on 4 and 8 H100 80GB\n\n"
            "Computed (nothing measured on several GPUs: the device lent here has one); command "
            "`python -m bench.tp_plan`. Assumptions in its docstring: 90% of HBM usable, 2 GB of prefill "
            "activations, copy bandwidth 3.01 TB/s (measured), 8 us per small NCCL all-reduce (NVLink, "
            "latency-bound), the embedding whole on every rank, the LM head split over the vocabulary "
            "(a step reads all but the embedding).\n\n" + text + "\n",
        )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
