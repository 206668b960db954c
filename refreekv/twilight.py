"""Twilight's rule as an eviction policy (Lin et al., 2025, "Twilight: Adaptive Attention Sparsity
with Hierarchical Top-p Pruning"), the ReFreeKV paper's Table 3 comparison.

Twilight keeps, per head, the smallest set of keys whose estimated attention reaches p of the
head's total (top-p instead of a fixed top-k). As eviction at the prefill -> decode transition:
per (layer, sequence, KV head), the last `rows` prompt queries' attention summed over the KV
head's query heads, keys dropped lowest first while the dropped mass stays <= (1 - p) of the
total. That is exactly `refreekv-topp` with threshold = 1 - p, no sinks and no protected layers
(Twilight has neither), so this file is that rule under its own name: p = 0.99 is ReFreeKV's
universal T = 1%. Twilight itself selects per query head and per decode step for sparse attention
(it frees nothing); here the head is the KV head (a group shares its pages) and the selection
frees the pages at once. The last prompt token is always kept.
"""

from refreekv import check_share, register
from refreekv.refreekv_topp import ReFreeKVTopP


@register("twilight")
class Twilight(ReFreeKVTopP):
    def __init__(self, p: float = 0.99, rows: int = 1, protected: tuple[int, ...] = ()):
        p = check_share("p", p)
        super().__init__(threshold=1 - p, sinks=0, rows=rows, protected=protected)
        self.p = p
