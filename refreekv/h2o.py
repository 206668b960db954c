"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle"): keep the most recent prompt tokens plus
the "heavy hitters", the keys with the most accumulated attention, per KV head.

Accumulation: H2O sums each key's attention over all queries. The probe only holds the last
`window` prompt queries (default 8), so here the score of a key is its attention summed over
those rows (a plain sum, as H2O does; rows before a short prompt's start are zero) and over the
query heads of the KV head's group (GQA). A larger window is closer to the original at a probe
cost of L * B * H * window * N * 4 bytes.

Budget (see budget_tokens): k tokens per (layer, sequence, KV head). The recent window is the
last `recent` tokens (default: half the budget, ceil(k / 2), following H2O's equal heavy/recent
split; an int caps at k), always kept; the other k - recent slots go to the per-KV-head top
scores among the older tokens (ties: the more recent key). Every layer is pruned unless listed
in `protected` (default none).
"""

from refreekv import (
    Policy,
    Probe,
    budget_tokens,
    check_budget,
    check_count,
    check_layers,
    check_rows,
    kv_head_scores,
    protect,
    register,
    top_k_mask,
)


@register("h2o")
class H2O(Policy):
    def __init__(
        self, budget: float = 0.5, window: int = 8, recent: int | None = None, protected: tuple[int, ...] = ()
    ):
        self.budget, self.probe_rows = check_budget(budget), check_rows("window", window)
        self.recent = None if recent is None else check_count("recent", recent, 0)
        self.protected = check_layers(protected)

    def plan(self, probe: Probe):
        k = budget_tokens(self.budget, probe.lens)  # [B]
        r = k - k // 2 if self.recent is None else k.clamp(max=self.recent)
        start = (probe.lens - r)[None, :, None, None]  # first recent slot
        pos = probe.positions
        real = probe.real[None, :, None]  # [1, B, 1, N]
        scores = kv_head_scores(probe.attn, probe.n_kv_heads)  # [L, B, Hkv, N]
        heavy = top_k_mask(scores, real & (pos < start), (k - r)[None, :, None])
        return protect(heavy | (real & (pos >= start)), probe, self.protected)
