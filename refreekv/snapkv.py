"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

The last `window` prompt queries (the observation window, default 8) vote: a key's score is its
attention summed over the window rows and over the query heads of the KV head's group (GQA),
pooled along the keys (kernel 7, stride 1, same padding) so neighbours of an important key
survive with it. Pooling runs over the non-window keys only, as in the original, which pools
attn[..., :-window].

`pooling` picks the family whose published numbers a reader reproduces:
- "max" (default): max-pooling, the window and padding slots counting as -inf. KVCache-Factory's
  run scripts (run_longbench.py, run_ruler.py, run_needle_in_haystack.py) pass maxpool.
- "avg": average pooling with the window and padding slots counting as 0 and the divisor always
  the kernel (F.avg_pool1d's default). SnapKV's reference code and NVIDIA kvpress use it (kvpress
  0.5: kernel 5, window 64, scores averaged over the window rows and the group's query heads: the
  same order as our sums). With "avg", ours and kvpress's SnapKVPress rank keys alike.

Budget (see budget_tokens): k tokens per (layer, sequence, KV head): the window itself (the last
min(window, n) tokens) is always kept, and the remaining k - window slots go to the top pooled
scores among the older tokens, per KV head (ties: the more recent key). A budget smaller than
the window keeps only the last k tokens. Every layer is pruned unless listed in `protected`
(default none). kvpress counts k = int(n * (1 - compression_ratio)) (floor), ours
ceil(budget * n): at budget = 1 - compression_ratio the two differ by at most one token per row.

During decoding (`interval=N`: SnapKV-D, the R-KV-style re-plan) the window is the last `window`
decode queries and each row keeps k = decode_budget(budget, seen) slots: its last `window` and the
top pooled scores among the older ones (prompt survivors and generated tokens alike).

`scores(probe)` ([L, B, Hkv, N]: +inf on the window, the pooled score on older slots, -inf past
a row) is what wrappers such as AdaKV and PyramidKV allocate over.
"""

import math

import torch

from refreekv import (
    POOLINGS,
    Policy,
    check_budget,
    check_choice,
    check_kernel,
    check_layers,
    check_rows,
    kv_head_scores,
    pool_slots,
    protect,
    register,
    row_budget,
    rows_of,
    top_k_mask,
)


@register("snapkv")
class SnapKV(Policy):
    def __init__(
        self,
        budget: float = 0.5,
        window: int = 8,
        kernel: int = 7,
        pooling: str = "max",
        protected: tuple[int, ...] = (),
    ):
        self.kernel = check_kernel(kernel)
        self.budget, self.probe_rows = check_budget(budget), check_rows("window", window)
        self.pooling = check_choice("pooling", pooling, POOLINGS)
        self.protected = check_layers(protected)

    def scores(self, probe) -> torch.Tensor:
        """[L, B, Hkv, N]: +inf on each row's last `window` slots, the pooled window attention on
        the older ones, -inf past the row (a Probe or a DecodeProbe)."""
        lens, j, real = rows_of(probe)
        win = lens.clamp(max=self.probe_rows)
        older = real & (j < (lens - win)[..., None])
        votes = kv_head_scores(probe.attn, probe.n_kv_heads)  # [L, B, Hkv, N]
        pooled = pool_slots(votes, older, self.kernel, self.pooling)
        s = torch.where(older, pooled, -math.inf)
        return torch.where(real & ~older, math.inf, s)

    def plan(self, probe):
        keep = top_k_mask(self.scores(probe), rows_of(probe)[2], row_budget(self.budget, probe))
        return protect(keep, probe, self.protected)

    replan = plan
