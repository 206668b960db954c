"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks"):
keep the first `sinks` prompt tokens (attention sinks) and the most recent ones, so that each
sequence keeps exactly budget_tokens(budget, n) prompt tokens per layer and KV head. Needs no
attention at all (probe_rows = 0).

The sinks are counted inside the budget: a budget of k tokens keeps [0, min(sinks, k)) and the
last k - min(sinks, k) tokens (so a budget below `sinks` keeps only the first k tokens). Every
layer is pruned unless listed in `protected` (default none, as in the paper's baseline).

During decoding (`interval=N`) it is the rolling window: every row is cut back to its first
`sinks` slots and its last k - sinks, k = decode_budget(budget, seen) (a share of the tokens seen,
or a fixed count).
"""

from refreekv import (
    DecodeProbe,
    Policy,
    Probe,
    budget_tokens,
    check_budget,
    check_count,
    check_layers,
    decode_budget,
    protect,
    register,
)


@register("streaming")
class StreamingLLM(Policy):
    probe_rows = 0

    def __init__(self, budget: float = 0.5, sinks: int = 4, protected: tuple[int, ...] = ()):
        self.budget, self.sinks = check_budget(budget), check_count("sinks", sinks, 0)
        self.protected = check_layers(protected)

    def plan(self, probe: Probe):
        k = budget_tokens(self.budget, probe.lens)  # [B]
        s = k.clamp(max=self.sinks)
        pos = probe.positions
        keep = ((pos < s[:, None]) | (pos >= (probe.lens - (k - s))[:, None])) & probe.real  # [B, N]
        keep = keep[None, :, None].expand(probe.n_layers, -1, probe.n_kv_heads, -1).clone()
        return protect(keep, probe, self.protected)

    def replan(self, probe: DecodeProbe):
        k = decode_budget(self.budget, probe)[None, :, None, None]  # [1, B, 1, 1]
        s = k.clamp(max=self.sinks)
        j = probe.slots
        recent = j >= probe.lens[..., None] - (k - s)
        keep = ((j < s) | recent) & probe.real
        return protect(keep, probe, self.protected)
