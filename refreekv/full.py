from refreekv import Policy, Probe, register


@register("full")
class Full(Policy):
    """No pruning: every prompt token stays (the reference every method is measured against)."""

    probe_rows = 0

    def plan(self, probe: Probe):
        return probe.per_kv_head(probe.real.expand(probe.n_layers, -1, -1))
