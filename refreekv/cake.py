"""CAKE (Qin et al., ICLR 2025, "CAKE: Cascading and Adaptive KV Cache Eviction with Layer
Preferences"), the ReFreeKV paper's Table 2 comparison: layer budgets from how each layer's
attention spreads (spatial dispersion) and shifts (temporal shift), and an eviction indicator
that adds the shift to the mean attention.

Per sequence of n prompt tokens, k = budget_tokens(budget, n) tokens per layer on average, the
last `window` prompt queries' attention A [H, w, n] of each layer (as the authors' code):
- preference P_l = D_l^(1 / tau1) * V_l^(1 / tau2), D_l = -sum A log(A + 1e-10) and V_l = sum of
  Var over the w rows (unbiased) of A, both over every head, row and non-window key;
- the layers share (k - w) x L selected tokens in proportion to P_l, each truncated to a whole
  number, capped at n - w, the excess and the rounding spread over the uncapped layers in layer
  order (the authors' adjust_budgets), so the total is exact;
- within a layer, each KV head keeps its window and its top selected keys by
  mean_rows(A) + gamma * Var_rows(A), average-pooled along the non-window keys (kernel 5, zero
  padding, divisor 5) and averaged over the KV head's query heads.
Defaults are the authors' (window 32, gamma 200, tau1 = tau2 = 1: their default where their
per-model table has no entry). A budget k <= window keeps the last k tokens. The authors' code
skips compression while n <= k + window; here every prompt longer than k is cut. Their cascading
mode computes the same final budgets layer by layer (it bounds memory during prefill, which our
probe does not need: the budgets here are those of the non-cascading mode). Layers in `protected`
keep everything. No pruning during decoding here yet (the paper's decode-time layer-wise eviction
is not built).
"""

import math

import torch
import torch.nn.functional as F

from refreekv import (
    Policy,
    budget_tokens,
    check_budget,
    check_layers,
    check_rows,
    protect,
    register,
    top_k_mask,
)


def adjust_budgets(budgets: list[float], total: int, cap: int) -> list[int]:
    """Whole-number layer budgets summing to `total`, none above `cap` (the authors' rule)."""
    out = [int(b) for b in budgets]
    excess = sum(max(b - cap, 0) for b in out)
    out = [min(b, cap) for b in out]
    if excess > 0:
        room = [i for i, b in enumerate(out) if b < cap]
        if room:
            each, rest = divmod(excess, len(room))
            for j, i in enumerate(room):
                out[i] += each + (j < rest)
    diff = total - sum(out)
    if diff:
        room = [i for i, b in enumerate(out) if (b < cap if diff > 0 else b > 1)]
        if room:
            each, rest = divmod(abs(diff), len(room))
            sign = 1 if diff > 0 else -1
            for j, i in enumerate(room):
                out[i] += sign * (each + (j < rest))
    return out


@register("cake")
class CAKE(Policy):
    def __init__(
        self,
        budget: float = 0.5,
        window: int = 32,
        gamma: float = 200.0,
        tau1: float = 1.0,
        tau2: float = 1.0,
        protected: tuple[int, ...] = (),
    ):
        self.budget, self.probe_rows = check_budget(budget), check_rows("window", window)
        self.gamma, self.tau1, self.tau2 = (
            _positive(n, v) for n, v in (("gamma", gamma), ("tau1", tau1), ("tau2", tau2))
        )
        self.protected = check_layers(protected)

    def plan(self, probe):
        L, B, N = probe.n_layers, probe.lens.shape[0], probe.width
        keep = torch.zeros(L, B, probe.n_kv_heads, N, dtype=torch.bool, device=probe.lens.device)
        ks = budget_tokens(self.budget, probe.lens).tolist()
        for b, (k, n) in enumerate(zip(ks, probe.lens.tolist())):
            keep[:, b, :, :n] = self._one(probe.attn[:, b, :, :, :n].double(), k, n, probe.n_kv_heads)
        return protect(keep, probe, self.protected)

    def _one(self, attn: torch.Tensor, k: int, n: int, n_kv: int) -> torch.Tensor:
        """attn [L, H, rows, n] of one sequence -> keep [L, Hkv, n]."""
        L = attn.shape[0]
        w = self.probe_rows
        if k >= n or k <= w:  # all of it, or the last k tokens alone
            return (torch.arange(n, device=attn.device) >= n - k).expand(L, n_kv, n)
        a = attn[:, :, -w:]  # [L, H, w, n]: every row real (n > k > w)
        old = a[..., : n - w]
        disp = -(old * torch.log(old + 1e-10)).sum((1, 2, 3))  # [L]
        var = old.var(dim=2).sum((1, 2))  # [L]
        pref = (disp ** (1 / self.tau1) * var ** (1 / self.tau2)).tolist()
        total = (k - w) * L
        whole = sum(pref)
        shares = [p / whole * total for p in pref] if whole > 0 else [total / L] * L
        sel = adjust_budgets(shares, total, n - w)
        score = a.mean(2) + self.gamma * a.var(dim=2)  # [L, H, n]
        score = F.avg_pool1d(score[..., : n - w].reshape(-1, 1, n - w), 5, stride=1, padding=2)
        score = score.view(L, n_kv, -1, n - w).mean(2)  # [L, Hkv, n - w]
        older = torch.ones_like(score, dtype=torch.bool)
        chosen = top_k_mask(score, older, torch.tensor(sel, device=attn.device)[:, None])
        window = torch.ones(L, n_kv, w, dtype=torch.bool, device=attn.device)
        return torch.cat((chosen, window), -1)


def _positive(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return v
