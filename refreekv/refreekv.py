"""ReFreeKV (arXiv 2502.16886): threshold-free pruning, one cut per layer and sequence.

For each pruned layer: a = attention of the last prompt query (k = 1) over the prompt keys,
per query head. Candidates are the non-sink positions m..n-1, evicted oldest first. With
S[p] = mean_h sqrt(sum_{t >= p} a[h, t]^2) over candidates and base = S[m], the cut is the
deepest candidate p with (base - S[p]) / base <= T; the layer keeps sinks [0, m) and the
suffix [p, n). This is the authors' code form (sinks excluded from the metric), which
produced the published budgets. `include_sinks=True` is the paper-text form (Eq. 3 / Alg. 1):
the sinks' attention counts in both the base and every retained norm.

`metric="mass"` (not in the paper; see bench/RESULTS.md, "What would fix it") measures the gap
as evicted attention mass instead of L2 norm: gap[p] = mean_h sum_{m <= t < p} a[h, t] /
mean_h sum a[h, candidates (+ sinks with include_sinks)]. With sinks included and k = 1 that is
the share of the last query's softmax that eviction removes, which bounds the change of that
query's attention output (<= 2 gap max|v|). On small models the L2 gap lets a diffuse 25% of
the attention go at T = 1%; the mass gap does not.

During decoding (`interval=N`; not in the paper, whose code prunes at prefill only) the same rule
runs on each layer's whole row, prompt survivors and generated tokens: a = the last `rows` decode
queries' attention over the row's slots, the first `sinks` slots stay, the other slots are evicted
oldest first while the gap stays <= T. No budget: how much goes is the input's own business.
A layer's rows hold the same tokens in every KV head (its cuts are per layer), so slot j is one
position across the layer.
"""

import torch

from refreekv import (
    DecodeProbe,
    Policy,
    Probe,
    check_count,
    check_flag,
    check_layers,
    check_rows,
    check_threshold,
    register,
)


def row_scores(attn: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """[L, B, H, k, N] -> [L, B, H, N]: mean over the k probe rows, each key column divided by
    the number of real rows that can causally see it (k = 1: the last row itself)."""
    k, N = attn.shape[-2], attn.shape[-1]
    rows = lens[:, None] - k + torch.arange(k, device=lens.device)  # [B, k] absolute query positions
    sees = (rows[:, :, None] >= torch.arange(N, device=lens.device)) & (rows >= 0)[:, :, None]  # [B, k, N]
    return attn.sum(-2) / sees.sum(1).clamp(min=1)[None, :, None, :]


def cut_positions(a, lens, threshold, sinks, include_sinks=False, metric="l2"):
    """The cut of every layer and sequence. a: [L, B, H, N] scores, lens: [B]. Layer by layer, so
    the float64 temporaries are [B, H, N] (a 7B at 32k tokens: 7 MB each, not 200 MB per layer stack).

    Returns p [L, B]: each (layer, sequence) keeps [0, min(sinks, n)) and [p, n). Float64, and
    the gap is formed without subtracting near-equal quantities, so it agrees with a direct sum
    far below any sensible T and stays > 0 however small the evicted attention. T = 0 keeps all,
    keys with exactly zero attention included."""
    return torch.cat(
        [_cut(a[l : l + 1], lens, threshold, sinks, include_sinks, metric) for l in range(a.shape[0])]
    )


def _cut(a, lens, threshold, sinks, include_sinks, metric):
    """cut_positions of a [L, B, H, N] slab, vectorised (float64)."""
    L, B, H, N = a.shape
    pos = torch.arange(N, device=a.device)
    real = pos < lens[:, None]  # [B, N]
    cand = real & (pos >= sinks)
    x = torch.where(cand[None, :, None], a.double(), 0.0)  # candidates only
    sink = 0.0  # the sinks' share of each head's total (paper-text form only)
    if include_sinks:
        s = torch.where((real & (pos < sinks))[None, :, None], a.double(), 0.0)
        sink = (s.square() if metric == "l2" else s).sum(-1, keepdim=True)
    if metric == "l2":
        x = x.square()
    # sum_{t < p} over candidates
    removed = torch.cat((torch.zeros_like(x[..., :1]), x[..., :-1].cumsum(-1)), -1)
    whole = x.sum(-1, keepdim=True) + sink
    if metric == "l2":
        base_h, S_h = whole.sqrt(), (x.flip(-1).cumsum(-1).flip(-1) + sink).sqrt()  # S[p]: t >= p
        # base_h - S_h = removed / (base_h + S_h): no cancellation, so any evicted attention > 0 gives gap > 0
        den = base_h + S_h
        drop, base = torch.where(den > 0, removed / den, 0.0).mean(2), base_h.mean(2)  # [L, B, N], [L, B, 1]
    else:
        drop, base = removed.mean(2), whole.mean(2)
    gap = torch.where(base > 0, drop / base, 0.0)
    # j = 0 (p = sinks) always qualifies since gap = 0 there. T = 0 keeps everything: a prefix of
    # keys with exactly zero attention (sliding-window probes, all mass on the sinks) has gap 0 too,
    # and is evicted only when T > 0.
    ok = ((gap <= threshold) if threshold > 0 else (pos == sinks)) & cand
    p = torch.where(ok, pos, -1).amax(-1)  # deepest qualifying candidate; -1: no candidates
    return torch.where(p < 0, lens[None].expand(L, B), p)  # n <= sinks: keep everything


@register("refreekv")
class ReFreeKV(Policy):
    def __init__(
        self,
        threshold: float = 0.01,
        sinks: int = 4,
        rows: int = 1,
        protected: tuple[int, ...] = (0, 1),
        include_sinks: bool = False,
        metric: str = "l2",
    ):
        if metric not in ("l2", "mass"):
            raise ValueError(f"metric must be 'l2' or 'mass', got {metric!r}")
        self.threshold, self.sinks = check_threshold(threshold), check_count("sinks", sinks, 0)
        self.probe_rows = check_rows("rows", rows)
        self.protected, self.include_sinks, self.metric = (
            check_layers(protected),
            check_flag("include_sinks", include_sinks),
            metric,
        )

    def plan(self, probe: Probe):
        # layer by layer
        p = torch.cat(
            [
                cut_positions(
                    row_scores(probe.attn[l : l + 1], probe.lens),
                    probe.lens,
                    self.threshold,
                    self.sinks,
                    self.include_sinks,
                    self.metric,
                )
                for l in range(probe.n_layers)
            ]
        )
        for layer in self.protected:
            if layer < probe.n_layers:
                p[layer] = 0
        pos = probe.positions
        keep = ((pos < self.sinks) | (pos >= p[..., None])) & probe.real  # [L, B, N]
        return probe.per_kv_head(keep)

    def replan(self, probe: DecodeProbe):
        a = decode_scores(probe)  # [L, B, H, N]
        lens = probe.lens[..., 0]  # [L, B]
        cuts = [
            _cut(a[l : l + 1], lens[l], self.threshold, self.sinks, self.include_sinks, self.metric)
            for l in range(probe.n_layers)
        ]
        p = torch.cat(cuts)  # [L, B]
        for layer in self.protected:
            if layer < probe.n_layers:
                p[layer] = 0
        j = probe.slots
        keep = (j < self.sinks) | (j >= p[..., None])  # [L, B, N]
        return keep[:, :, None] & probe.real


def decode_scores(probe: DecodeProbe) -> torch.Tensor:
    """[L, B, H, w, N] -> [L, B, H, N]: the mean over the real decode query rows that can see each
    slot (a row never sees a key generated after it). Counted by position, not by weight > 0 (a
    weight can underflow to 0)."""
    w = probe.attn.shape[-2]
    ar = torch.arange(w, device=probe.seen.device)
    qpos = probe.seen[:, None] - w + ar  # [B, w] each row's position
    real_row = ar >= (w - probe.queries)[:, None]  # [B, w]
    pos = probe.pos[:, :, :1, None, :]  # [L, B, 1, 1, N] (a layer's heads hold the same positions)
    sees = (pos >= 0) & (pos <= qpos[None, :, None, :, None]) & real_row[None, :, None, :, None]
    return probe.attn.sum(-2) / sees.sum(-2).clamp(min=1)


def gap_reference(a, n, sinks, include_sinks=False, metric="l2"):
    """Readable reference for tests: gap[j] (evicting candidates sinks .. sinks+j-1) of one
    (layer, sequence), a [H, >= n] scores."""
    a = a[:, :n].double()
    cand, sink = a[:, sinks:], a[:, :sinks] if include_sinks else a[:, :0]
    if metric == "mass":
        base = (cand.sum(-1) + sink.sum(-1)).mean().item()
        return [cand[:, :j].sum(-1).mean().item() / base if base > 0 else 0.0 for j in range(cand.shape[1])]
    extra = (sink**2).sum(-1)
    base = ((cand**2).sum(-1) + extra).sqrt().mean().item()
    return [
        (base - ((cand[:, j:] ** 2).sum(-1) + extra).sqrt().mean().item()) / base if base > 0 else 0.0
        for j in range(cand.shape[1])
    ]


def cut_reference(a, n, threshold, sinks, include_sinks=False, metric="l2"):
    """Per-(layer, sequence) loop reference: the kept suffix starts at sinks + the deepest j with
    gap[j] <= T."""
    if n <= sinks or threshold == 0:
        return min(n, sinks) if n > sinks else n
    gaps = gap_reference(a, n, sinks, include_sinks, metric)
    return sinks + max(j for j, g in enumerate(gaps) if g <= threshold or j == 0)
