"""ReFreeKV's attention-ranking ablation ("refreekv-h2o"): the ReFreeKV cut with candidates
ranked by accumulated attention instead of by position.

Everything but the order is ReFreeKV's (refreekv.py): threshold T, sinks m (excluded from the
metric), protected layers, the gap metric on the last `rows` prompt query rows (row_scores), one
cut per (layer, sequence) shared by all heads. The candidates m..n-1 are put in eviction order
lowest accumulated attention first; accumulated attention = attention summed over the last
`window` prompt query rows (default 8, as h2o.py) and over all query heads (layer-level ranking;
ties: the older key is evicted first, so uniform attention reduces to ReFreeKV's order). The
cut j* (deepest j with gap[j] <= T, in that order) evicts the j* lowest-ranked candidates; the
layer keeps the sinks and the rest.

The authors' code ranks per query head with one shared cut depth; this ablation ranks per layer
so its plans stay one set per layer like ReFreeKV's.
"""

import math

import torch

from refreekv import (
    Policy,
    Probe,
    check_count,
    check_flag,
    check_layers,
    check_rows,
    check_threshold,
    register,
)
from refreekv.refreekv import cut_positions, row_scores


def eviction_order(rank: torch.Tensor, lens: torch.Tensor, sinks: int) -> torch.Tensor:
    """rank [L, B, N] -> order [L, B, N]: slot indices with the sinks first (in position order),
    then the candidates by ascending rank (ties: older first), then padding."""
    N = rank.shape[-1]
    pos = torch.arange(N, device=rank.device)
    key = torch.where(pos < sinks, -math.inf, rank.double())
    key = torch.where(pos < lens[:, None], key, math.inf)
    return torch.sort(key, dim=-1, stable=True).indices


@register("refreekv-h2o")
class ReFreeKVH2O(Policy):
    def __init__(
        self,
        threshold: float = 0.01,
        sinks: int = 4,
        rows: int = 1,
        window: int = 8,
        protected: tuple[int, ...] = (0, 1),
        include_sinks: bool = False,
    ):
        self.threshold, self.sinks = check_threshold(threshold), check_count("sinks", sinks, 0)
        self.rows, self.window = check_rows("rows", rows), check_rows("window", window)
        self.probe_rows = max(self.rows, self.window)
        self.protected, self.include_sinks = (
            check_layers(protected),
            check_flag("include_sinks", include_sinks),
        )

    def plan(self, probe: Probe):
        attn, lens = probe.attn, probe.lens
        a = row_scores(attn[..., -self.rows :, :], lens)  # [L, B, H, N] metric
        order = eviction_order(attn[..., -self.window :, :].sum((2, 3)), lens, self.sinks)  # [L, B, N]
        a_ranked = a.gather(-1, order[:, :, None].expand_as(a))  # candidates in eviction order
        # [L, B], ranked slots
        p = cut_positions(a_ranked, lens, self.threshold, self.sinks, self.include_sinks)
        for layer in self.protected:
            if layer < probe.n_layers:
                p[layer] = 0
        slot = probe.positions
        keep_ranked = ((slot < self.sinks) | (slot >= p[..., None])) & probe.real  # sinks + highest-ranked
        keep = torch.zeros_like(keep_ranked).scatter_(-1, order, keep_ranked)
        return probe.per_kv_head(keep)
