"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): keep the tokens the newest query
attends to most. A key's score is the last query's attention averaged over the layer's query
heads, so every KV head of a layer keeps the same tokens (`heads="layer"`, the paper's choice and
NVIDIA kvpress 0.5's TOVAPress); `heads="kv"` scores each KV head by its own group of query heads
instead. The last token is always kept (kvpress pads its score above every other). Each row keeps
k = budget_tokens(budget, n) tokens (kvpress: int(n * (1 - compression_ratio))); ties: the more
recent key. Layers in `protected` keep everything (default none).

TOVA is defined during decoding: once the cache is full, every step drops the token the current
query attends to least. `interval=1` with budget > 1 (a cap of that many tokens) is that rule;
a longer interval drops the lowest-scored tokens in one re-plan, scored by the newest query.
"""

import math

import torch

from refreekv import (
    Policy,
    check_budget,
    check_choice,
    check_layers,
    protect,
    register,
    row_budget,
    rows_of,
    top_k_mask,
)


@register("tova")
class TOVA(Policy):
    probe_rows = 1  # the last query

    def __init__(self, budget: float = 0.5, heads: str = "layer", protected: tuple[int, ...] = ()):
        self.budget = check_budget(budget)
        self.heads = check_choice("heads", heads, ("layer", "kv"))
        self.protected = check_layers(protected)

    def scores(self, probe) -> torch.Tensor:
        """[L, B, Hkv, N]: the last query's attention (over all query heads, or each KV head's
        group), +inf on each row's last slot, -inf past it."""
        lens, j, real = rows_of(probe)
        last = probe.attn[:, :, :, -1]  # [L, B, H, N]
        if self.heads == "layer":
            s = last.mean(2, keepdim=True)  # [L, B, 1, N]: shared by every KV head
        else:
            s = last.unflatten(2, (probe.n_kv_heads, -1)).mean(3)  # [L, B, Hkv, N]
        s = s.expand(-1, -1, probe.n_kv_heads, -1)
        s = torch.where(j == (lens - 1)[..., None], math.inf, s)
        return torch.where(real, s, -math.inf)

    def plan(self, probe):
        keep = top_k_mask(self.scores(probe), rows_of(probe)[2], row_budget(self.budget, probe))
        return protect(keep, probe, self.protected)

    replan = plan
