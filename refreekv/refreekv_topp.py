"""Threshold-only pruning by attention mass, per KV head ("refreekv-topp"; not in the paper).

ReFreeKV's promise (one universal T, no budget) with the two changes bench/RESULTS.md points to:
the gap is evicted attention *mass* (ReFreeKV's metric="mass"), and keys are evicted in order of
their own attention, per KV head, instead of oldest-first per layer.

Per (layer, sequence, KV head): s[j] = probe attention of the last `rows` prompt queries (the
mean over the rows that see key j, as ReFreeKV's row_scores, up to one whole-number scale: see
head_mass), summed over the query heads of the group, in float64. The candidates (not a sink, not
the last prompt token) are evicted lowest score first (ties: the older key) for as long as the
evicted mass stays <= T * sum_j s[j] (sinks included in the total): the kept set is the smallest
"top-p" set of the head's attention with p = 1 - T. T = 0 keeps everything; layers in
`protected` are never pruned.

Measured (bench/RESULTS.md, SmolLM2 / Qwen2.5-Coder-0.5B): at T = 1% it keeps 35-55% and loses
like a fixed budget of that size; kept as the attention-ranking ablation with a mass gap.
"""

import math

import torch

from refreekv import (
    Policy,
    Probe,
    check_count,
    check_layers,
    check_rows,
    check_threshold,
    protect,
    register,
    top_p_sets,
)


def head_mass(attn: torch.Tensor, lens: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """[L, B, H, w, N] -> [L, B, Hkv, N] float64: each key's attention summed over the probe rows that
    see it and over the query heads of its KV head, times lcm(1..w) / (rows that see it). That is the
    mean over seeing rows (as row_scores) scaled by one whole number, so the ranking and every
    mass ratio are the same, but attention that is exact in float64 (dyadic probes in tests) stays
    exact in any summation order: ties resolve identically everywhere."""
    w, N = attn.shape[-2], attn.shape[-1]
    rows = lens[:, None] - w + torch.arange(w, device=lens.device)  # [B, w] absolute query positions
    # [B, N]
    sees = ((rows[:, :, None] >= torch.arange(N, device=lens.device)) & (rows >= 0)[:, :, None]).sum(1)
    scale = math.lcm(*range(1, w + 1)) // sees.clamp(min=1)  # whole numbers
    s = attn.double().sum(-2).unflatten(2, (n_kv_heads, -1)).sum(3)  # [L, B, Hkv, N]
    return s * scale[None, :, None, :].double()


@register("refreekv-topp")
class ReFreeKVTopP(Policy):
    def __init__(
        self, threshold: float = 0.01, sinks: int = 4, rows: int = 1, protected: tuple[int, ...] = (0, 1)
    ):
        self.threshold, self.sinks = check_threshold(threshold), check_count("sinks", sinks, 0)
        self.probe_rows = check_rows("rows", rows)
        self.protected = check_layers(protected)

    def plan(self, probe: Probe):
        s = head_mass(probe.attn[..., -self.probe_rows :, :], probe.lens, probe.n_kv_heads)  # [L, B, Hkv, N]
        pos, lens = probe.positions, probe.lens[:, None]
        real = probe.real[None, :, None]
        cand = real & (pos >= self.sinks) & (pos < lens - 1)[None, :, None]
        # lowest first, older first, while the evicted mass stays <= T of the row's (sinks included)
        evict = top_p_sets(torch.where(real, s, 0.0), cand.expand_as(s), self.threshold)
        return protect(real & ~evict, probe, self.protected)
