"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

The last `window` prompt queries (the observation window, default 8) vote: a key's score is its
attention summed over the window rows and over the query heads of the KV head's group (GQA),
max-pooled along the keys (kernel 7, stride 1, same padding) so neighbours of an important key
survive with it. Pooling runs over the non-window keys only (window and padding slots count as
-inf), as in the original, which pools attn[..., :-window].

Budget (see budget_tokens): k tokens per (layer, sequence, KV head): the window itself (the last
min(window, n) tokens) is always kept, and the remaining k - window slots go to the top pooled
scores among the older tokens, per KV head (ties: the more recent key). A budget smaller than
the window keeps only the last k tokens. Every layer is pruned unless listed in `protected`
(default none).

During decoding (`interval=N`: SnapKV-D, the R-KV-style re-plan) the window is the last `window`
decode queries and each row keeps k = decode_budget(budget, seen) slots: its last `window` and the
top pooled scores among the older ones (prompt survivors and generated tokens alike).
"""

import math

import torch
import torch.nn.functional as F

from refreekv import (
    MAX_KERNEL,
    DecodeProbe,
    Policy,
    Probe,
    budget_tokens,
    check_budget,
    check_count,
    check_layers,
    check_rows,
    decode_budget,
    kv_head_scores,
    protect,
    register,
    top_k_mask,
)


@register("snapkv")
class SnapKV(Policy):
    def __init__(
        self, budget: float = 0.5, window: int = 8, kernel: int = 7, protected: tuple[int, ...] = ()
    ):
        self.kernel = check_count("kernel", kernel, 1, MAX_KERNEL)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd number (same padding), got {kernel}")
        self.budget, self.probe_rows = check_budget(budget), check_rows("window", window)
        self.protected = check_layers(protected)

    def plan(self, probe: Probe):
        k = budget_tokens(self.budget, probe.lens)  # [B]
        win = probe.lens.clamp(max=self.probe_rows)  # window slots of each sequence
        kw = torch.minimum(win, k)  # window slots kept (all of them unless k < window)
        pos = probe.positions
        real = probe.real[None, :, None]  # [1, B, 1, N]
        older = real & (pos < (probe.lens - win)[None, :, None, None])
        heavy = self.heavy(probe, older, (k - kw)[None, :, None])
        return protect(
            heavy | (real & (pos >= (probe.lens - kw)[None, :, None, None])), probe, self.protected
        )

    def heavy(self, probe, older: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """The n top slots among `older` (broadcast to [L, B, Hkv, N]) by the window's attention
        (summed over its rows and each KV head's query heads), max-pooled along the slots."""
        scores = kv_head_scores(probe.attn, probe.n_kv_heads).masked_fill(~older, -math.inf)
        L, B, Hkv, N = scores.shape
        pooled = F.max_pool1d(scores.reshape(-1, 1, N), self.kernel, stride=1, padding=self.kernel // 2)
        return top_k_mask(pooled.view(L, B, Hkv, N), older, n)

    def replan(self, probe: DecodeProbe):
        k = decode_budget(self.budget, probe)[None, :, None]  # [1, B, 1]
        win = probe.lens.clamp(max=self.probe_rows)  # [L, B, Hkv]
        kw = torch.minimum(win, k)
        j = probe.slots
        real = probe.real
        older = real & (j < (probe.lens - win)[..., None])
        heavy = self.heavy(probe, older, k - kw)
        keep = heavy | (real & (j >= (probe.lens - kw)[..., None]))
        return protect(keep, probe, self.protected)
