"""AdaKV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation"):
a layer's budget is shared across its KV heads by score, not split evenly: the heads whose
attention is concentrated give tokens to the heads whose attention is spread. It wraps any scorer
(`scorer`: "snapkv", the paper's Ada-SnapKV, by default, with `window`, `kernel`, `pooling`;
"tova", scored per KV head; "knorm"), whose scores(probe)
gives [L, B, Hkv, N] (+inf on slots it always keeps, -inf past a row). In a per-head ragged pool
each head's pages follow its own count, so the allocation frees real memory.

Per (layer, sequence), with k = budget_tokens(budget, n) tokens per head on average (the layer
keeps k x Hkv in all) and f_h = min(k, the head's always-kept slots), b_h = k - f_h (`safeguard`):
- "adakv" (default: the paper's code, as in KVCache-Factory's AdaKVCluster): the top sum_h b_h
  scores over every head's other slots together give head h c_h of them; head h then keeps
  f_h + round(c_h (1 - alpha) + floor(b_h alpha)) tokens, its top ones (alpha = 0.2: every head
  keeps at least a fifth of an even share; the total is L x k x Hkv up to the rounding).
- "kvpress" (NVIDIA kvpress 0.5's AdaKVPress, alpha_safeguard): each head's top floor(k alpha)
  are kept first, then the top k x Hkv of the layer's slots over every head (exact total).
Ties: the later slot within a head; across heads, the lower head first. Layers in `protected` keep
everything. During decoding (`interval=N`, where the scorer re-plans) the same allocation runs over
the rows' live slots with k = decode_budget(budget, seen).
"""

import math

import torch

from refreekv import (
    POLICIES,
    Policy,
    check_choice,
    check_share,
    protect,
    register,
    row_budget,
    rows_of,
    top_k_mask,
)

SCORERS = ("snapkv", "tova", "knorm")


def flat_top(scores: torch.Tensor, eligible: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The n [L|1, B] top eligible slots of each (layer, sequence) over all its heads at once:
    scores, eligible [L, B, Hkv, N] -> keep [L, B, Hkv, N]."""
    L, B, H, N = scores.shape
    # heads in reverse order, slots in order: top_k_mask prefers the later entry on ties, which
    # is then the lower head, and within a head the later slot
    flat = scores.flip(2).flatten(2)  # [L, B, Hkv * N]
    keep = top_k_mask(flat, eligible.expand(scores.shape).flip(2).flatten(2), n)
    return keep.view(L, B, H, N).flip(2)


@register("adakv")
class AdaKV(Policy):
    def __init__(
        self,
        budget: float = 0.5,
        scorer: str = "snapkv",
        alpha: float = 0.2,
        safeguard: str = "adakv",
        window: int = 8,
        kernel: int = 7,
        pooling: str = "max",
        protected: tuple[int, ...] = (),
    ):
        check_choice("scorer", scorer, SCORERS)
        self.safeguard = check_choice("safeguard", safeguard, ("adakv", "kvpress"))
        self.alpha = check_share("alpha", alpha, "each head's even budget")
        # TOVA per KV head: a score its layer's heads share leaves nothing to move between them
        knobs = {
            "snapkv": dict(window=window, kernel=kernel, pooling=pooling),
            "tova": {"heads": "kv"},
            "knorm": {},
        }
        knobs = knobs[scorer]
        self.inner = POLICIES[scorer](budget=budget, protected=protected, **knobs)  # ValueError on bad knobs
        self.budget, self.protected = self.inner.budget, self.inner.protected
        self.probe_rows = self.inner.probe_rows
        self.scorer = scorer
        # the knobs as given (the window and pooling mean something to the snapkv scorer only)
        self.window, self.kernel, self.pooling = window, kernel, pooling

    def plan(self, probe):
        s = self.inner.scores(probe)  # [L, B, Hkv, N]
        real = rows_of(probe)[2]
        k = row_budget(self.budget, probe)  # [1, B, 1]
        if self.safeguard == "kvpress":
            safe = top_k_mask(s, real, torch.floor(k * self.alpha).long())
            s = torch.where(safe, math.inf, s)
            keep = flat_top(s, real, k[..., 0] * probe.n_kv_heads)
        else:
            fixed = torch.minimum((s == math.inf).sum(-1), k)  # [L, B, Hkv]
            base = k - fixed
            chosen = flat_top(s, real & torch.isfinite(s), base.sum(-1))
            share = chosen.sum(-1) * (1 - self.alpha) + torch.floor(base * self.alpha)
            keep = top_k_mask(s, real, fixed + torch.round(share).long())
        return protect(keep, probe, self.protected)

    replan = plan  # every scorer above re-plans
