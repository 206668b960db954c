"""KNorm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression"): keys with a low L2 norm draw high attention, so each (layer, KV head) row keeps
its k = budget_tokens(budget, n) lowest-norm keys (ties: the more recent key). It reads no
attention (probe_rows = 0): the keys come from the pool, one layer at a time (Probe.keys).

Conventions beside NVIDIA kvpress 0.5's KnormPress (score = -key norm, per KV head, every layer
pruned, no window kept): the same rule, scored on the stored (post-RoPE) keys like kvpress (RoPE
is a rotation: the norm is the pre-RoPE one); kvpress keeps int(n * (1 - compression_ratio)), ours
ceil(budget * n). Layers in `protected` keep everything (default none, as kvpress).

During decoding (`interval=N`) each row keeps its decode_budget(budget, seen) lowest-norm live
keys; the engine keeps the last `decode_window` tokens of every row whatever the plan says.
"""

import torch

from refreekv import Policy, check_budget, check_layers, protect, register, row_budget, rows_of, top_k_mask


@register("knorm")
class KNorm(Policy):
    probe_rows = 0  # keys only

    def __init__(self, budget: float = 0.5, protected: tuple[int, ...] = ()):
        self.budget, self.protected = check_budget(budget), check_layers(protected)

    def scores(self, probe) -> torch.Tensor:
        """[L, B, Hkv, N]: minus each key's L2 norm, built layer by layer."""
        return torch.stack([-probe.keys(layer).norm(dim=-1) for layer in range(probe.n_layers)])

    def plan(self, probe):
        keep = top_k_mask(self.scores(probe), rows_of(probe)[2], row_budget(self.budget, probe))
        return protect(keep, probe, self.protected)

    replan = plan
