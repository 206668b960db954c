"""Threshold-free pruning by the union of each window query's top-p set ("refreekv-union"; not in
the paper: a form tried for issue 28's point 4).

ReFreeKV's promise is one universal T and no budget. Ranked by the last query alone
(`refreekv-topp`), the mass cut keeps 35-55% and loses what the last query does not look at:
bench/RESULTS.md's failures are the tasks whose evidence is spread over the context. Here every
one of the last `window` prompt queries votes on its own: per (layer, sequence, KV head) and per
window query r, s_r[j] = r's attention on key j summed over the KV head's query heads; r's top-p
set is what is left after evicting keys lowest first (ties: the older key) while the evicted
mass stays <= T * sum_j s_r[j]. A key survives if any window query keeps it, or if it is one of
the first `sinks` tokens or in the window itself (the last `window` prompt tokens). No budget:
the kept share follows how many keys each window query needs to hold 1 - T of its attention.
T = 0 keeps everything; layers in `protected` (default 0 and 1, as `refreekv`) are never pruned.
"""

import torch

from refreekv import (
    Policy,
    Probe,
    check_count,
    check_kernel,
    check_layers,
    check_rows,
    check_threshold,
    pool_slots,
    protect,
    register,
    top_p_sets,
)


@register("refreekv-union")
class ReFreeKVUnion(Policy):
    def __init__(
        self,
        threshold: float = 0.01,
        window: int = 8,
        kernel: int = 7,
        sinks: int = 4,
        protected: tuple[int, ...] = (0, 1),
    ):
        self.threshold, self.sinks = check_threshold(threshold), check_count("sinks", sinks, 0)
        self.probe_rows = check_rows("window", window)
        self.kernel = check_kernel(kernel)
        self.protected = check_layers(protected)

    def plan(self, probe: Probe):
        L, B, H, w, N = probe.attn.shape
        pos, lens = probe.positions, probe.lens[:, None]  # [N], [B, 1]
        real = probe.real[None, :, None, None]  # [1, B, 1, 1, N]
        votes = probe.attn.double().unflatten(2, (probe.n_kv_heads, -1)).sum(3)  # [L, B, Hkv, w, N]
        votes = torch.where(real, votes, 0.0)  # padding is no one's mass
        kept = (pos < self.sinks) | (pos >= lens - w)  # sinks and the window: [B, N]
        cand = real & ~kept[None, :, None, None]
        if self.kernel > 1:  # a key's neighbours vote with it (SnapKV's max-pooling)
            votes = torch.where(cand, pool_slots(votes, cand, self.kernel, "max"), votes)
        rows = lens - w + torch.arange(w, device=pos.device)  # [B, w] each window row's position
        live = (rows >= 0)[None, :, None, :, None]  # rows before a short prompt's start: no vote
        gone = top_p_sets(votes, cand.expand_as(votes), self.threshold) | ~live
        keep = (~gone).any(3) & cand[:, :, :, 0] | (real[:, :, :, 0] & kept[None, :, None])
        return protect(keep.expand(L, B, probe.n_kv_heads, N).clone(), probe, self.protected)
