"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling"): SnapKV's scores inside each layer, with layer budgets in a pyramid: the
lowest layer keeps the most, each layer above keeps the same number fewer, and the layers together
keep what SnapKV at the same budget keeps (L x k per sequence, up to rounding).

Per sequence of n prompt tokens with k = budget_tokens(budget, n) and w = min(window, k) window
tokens (always kept), layer l of L keeps (`shape`):
- "factory" (default: the paper's code, KVCache-Factory's PyramidKVCluster, integer arithmetic):
  s = k - w selected tokens on average; lo = s // beta, hi = 2 s - lo; if hi >= n - w then
  hi = n - w and lo = 2 s - hi; step = (hi - lo) // (L - 1); layer l selects hi - l * step (every
  layer s when n < 2 s, its uniform branch), plus the window.
- "kvpress" (NVIDIA kvpress 0.5's PyramidKVPress, floats, the window inside the layer budget):
  lo = k / beta, hi = 2 k - lo; if hi >= n - w then hi = n - w and lo = 2 k - hi; unless
  n >= hi >= lo >= w (then every layer keeps k), layer l keeps round(hi - l (hi - lo) / (L - 1)).
Each layer's count is clamped to [w, n]. On short prompts the factory's integer step can round
to 0 (hi - lo < L - 1): every layer then keeps w + hi, up to twice SnapKV's selected tokens (the
CLI's budget line shows it); "kvpress" keeps the average at k. Layers in `protected` keep
everything. No pruning during decoding: the paper defines the pyramid for the prompt only.
"""

import torch

from refreekv import budget_tokens, check_choice, check_count, protect, register, rows_of, top_k_mask
from refreekv.snapkv import SnapKV


def pyramid(k: int, n: int, w: int, L: int, beta: int, shape: str) -> list[int]:
    """Tokens each of the L layers keeps of a prompt of n tokens (window w included)."""
    if k >= n:
        return [n] * L
    if shape == "factory":
        s = k - w
        lo = s // beta
        hi = 2 * s - lo
        if hi >= n - w:
            hi = n - w
            lo = 2 * s - hi
        step = (hi - lo) // (L - 1) if L > 1 else 0
        sel = [s] * L if n < 2 * s else [hi - layer * step for layer in range(L)]
        return [min(max(w + x, w), n) for x in sel]
    lo = k / beta
    hi = 2 * k - lo
    if hi >= n - w:
        hi = n - w
        lo = 2 * k - hi
    if not (n >= hi >= lo >= w) or L == 1:
        return [k] * L
    step = (hi - lo) / (L - 1)
    return [min(max(round(hi - layer * step), w), n) for layer in range(L)]


@register("pyramidkv")
class PyramidKV(SnapKV):
    def __init__(
        self,
        budget: float = 0.5,
        window: int = 8,
        kernel: int = 7,
        pooling: str = "max",
        beta: int = 20,
        shape: str = "factory",
        protected: tuple[int, ...] = (),
    ):
        super().__init__(budget, window, kernel, pooling, protected)
        self.beta = check_count("beta", beta, 1)
        self.shape = check_choice("shape", shape, ("factory", "kvpress"))

    def layer_budgets(self, probe) -> torch.Tensor:
        """[L, B, 1] tokens each layer of each sequence keeps."""
        ks = budget_tokens(self.budget, probe.lens).tolist()
        ns = probe.lens.tolist()
        cols = [
            pyramid(k, n, min(self.probe_rows, k), probe.n_layers, self.beta, self.shape)
            for k, n in zip(ks, ns)
        ]
        return torch.tensor(cols, device=probe.lens.device).T[..., None]

    def plan(self, probe):
        keep = top_k_mask(self.scores(probe), rows_of(probe)[2], self.layer_budgets(probe))
        return protect(keep, probe, self.protected)

    replan = None  # the pyramid is the prompt's alone (SnapKV's re-plan is not inherited)
