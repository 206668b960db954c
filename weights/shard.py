"""Which part of the model a tensor-parallel rank holds (the Megatron / gpt-fast split).

Rank r of N holds query heads [r H/N, (r + 1) H/N), ffn units [r F/N, (r + 1) F/N) and, when N
divides the vocabulary, LM head rows [r V/N, (r + 1) V/N) (the embedding stays whole). KV heads
are split the same way when N divides them; with more ranks than KV heads (N > Hkv, N a multiple
of Hkv) each KV head is replicated on the N / Hkv ranks whose query heads read it, as vLLM and
SGLang do: rank r holds the one KV head its query heads map to.
"""

from dataclasses import replace

from weights.config import ModelConfig
from weights.errors import UserError


def check(c: ModelConfig, world: int):
    if world < 1:
        raise UserError(f"--tp must be >= 1, got {world}")
    if c.n_heads % world:
        raise UserError(f"--tp {world} does not divide the model's {c.n_heads} query heads")
    if c.ffn_dim % world:
        raise UserError(f"--tp {world} does not divide the model's ffn width {c.ffn_dim}")
    if c.n_kv_heads % world and world % c.n_kv_heads:
        raise UserError(
            f"--tp {world} neither divides the model's {c.n_kv_heads} KV heads nor is a multiple of them"
        )


def kv_heads(c: ModelConfig, rank: int, world: int) -> tuple[int, int]:
    """(first global KV head, count) held by `rank`."""
    if c.n_kv_heads >= world:
        n = c.n_kv_heads // world
        return rank * n, n
    return rank * (c.n_heads // world) // (
        c.n_heads // c.n_kv_heads
    ), 1  # the KV head of this rank's query heads


def head_rows(c: ModelConfig, world: int) -> int | None:
    """LM head rows per rank: split over the vocabulary when the ranks divide it (each rank reads 1/N
    of the head per token, then one all-gather of the logits: bench/speed/tp_head.py measured it faster
    at batch 1), else None: whole on every rank."""
    return c.vocab_size // world if world > 1 and c.vocab_size % world == 0 else None


def shard_config(c: ModelConfig, rank: int, world: int) -> ModelConfig:
    """The config of the model a rank runs: its query heads, KV heads, ffn units and LM head rows."""
    if world == 1:
        return c
    check(c, world)
    return replace(
        c,
        n_heads=c.n_heads // world,
        n_kv_heads=kv_heads(c, rank, world)[1],
        ffn_dim=c.ffn_dim // world,
        head_rows=head_rows(c, world),
    )
