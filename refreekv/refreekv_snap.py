"""Threshold-free pruning by the mass of SnapKV's pooled window scores, the cut shared across a
layer's KV heads as AdaKV shares a budget ("refreekv-snap"; not in the paper: a form tried for
issue 28's point 4).

Per (layer, sequence, KV head), SnapKV's score of each older key (SnapKV's `scores`: the last
`window` prompt queries' attention summed over the window and the group, max-pooled along the keys
with `kernel`), normalised to a distribution per head: p_h[j] = pooled_h[j] / sum_j pooled_h[j].
Within a layer the heads' older keys are then evicted together, lowest p first (ties: the lower
head, then the older key), while the evicted mass stays <= T * Hkv (T of every head's mass, on
average): a head whose window attention is concentrated gives up its long tail, a head that
spreads it keeps what it spreads over (AdaKV's allocation, with the layer's budget set by the
mass instead of a knob). The first `sinks` tokens and the window itself (the last `window`
prompt tokens) always stay. No budget; T = 0 keeps everything; layers in `protected` (default 0
and 1, as `refreekv`) are never pruned.
"""

import torch

from refreekv import (
    Policy,
    Probe,
    check_choice,
    check_count,
    check_layers,
    check_rows,
    check_threshold,
    protect,
    register,
    top_p_sets,
)
from refreekv.snapkv import SnapKV


@register("refreekv-snap")
class ReFreeKVSnap(Policy):
    def __init__(
        self,
        threshold: float = 0.01,
        window: int = 8,
        kernel: int = 7,
        sinks: int = 4,
        share: str = "layer",
        protected: tuple[int, ...] = (0, 1),
    ):
        self.threshold, self.sinks = check_threshold(threshold), check_count("sinks", sinks, 0)
        self.probe_rows = check_rows("window", window)
        self.snap = SnapKV(budget=1.0, window=window, kernel=kernel)  # its scores: the pooled votes
        self.kernel = self.snap.kernel
        self.share = check_choice("share", share, ("layer", "kv"))
        self.protected = check_layers(protected)

    def plan(self, probe: Probe):
        s = self.snap.scores(probe).double()  # [L, B, Hkv, N]: +inf window, -inf past the prompt
        L, B, Hkv, N = s.shape
        older = torch.isfinite(s) & (probe.positions >= self.sinks)
        mass = torch.where(older, s, 0.0)
        share = mass / mass.sum(-1, keepdim=True).clamp(min=1e-300)  # each head's distribution
        # a layer's heads side by side: one row of Hkv x N slots, the threshold T of Hkv heads' mass
        heads = Hkv if self.share == "layer" else 1
        flat = share.reshape(L, B, Hkv // heads, heads * N)
        gone = top_p_sets(flat, older.reshape(flat.shape), self.threshold)
        keep = probe.real[None, :, None] & ~gone.view(L, B, Hkv, N)
        return protect(keep, probe, self.protected)
