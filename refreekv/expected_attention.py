"""Expected Attention (Devoto et al., 2025, "Expected Attention: KV Cache Compression by
Estimating Attention from Future Queries Distribution"): a key matters as much as the attention
the queries still to come are expected to give it. The prompt's queries (before RoPE, per query
head, the first `n_sink` left out) give a mean mu and a covariance S; the RoPE rotation of the
next `n_future_positions` positions, averaged into one matrix R, moves them to where the future
queries will sit (mu' = R mu, S' = R S R^T); for a Gaussian query, E[exp(q.k / sqrt(d))] is
exp(mu'.k / sqrt(d) + k^T S' k / (2 d)). Per query head that is softmaxed over the keys after
the sinks, averaged over the KV head's group, and (use_vnorm) multiplied by each value's L2 norm:
score = (expected attention + epsilon) * ||v||. Each (layer, KV head) row keeps its top
budget_tokens(budget, n) scores; the first `n_sink` tokens are always kept (counted inside the
budget). It reads no attention rows (probe_rows = 0): the keys and values come from the pool and
the query moments from the prefill (query_stats = True), one layer at a time.

Conventions beside NVIDIA kvpress 0.5's ExpectedAttentionPress (read to learn, not copied): the
same defaults (n_future_positions 512, n_sink 4, covariance and value norms on, epsilon 0), the
same statistics (population covariance over the queries after the sinks, softmax over the keys
after the sinks, sinks kept by a score above every other), the same averaged rotation (the mean of
cos I + sin P over the future positions). kvpress keeps int(n * (1 - compression_ratio)) per KV
head, ours ceil(budget * n). Layers in `protected` keep everything (default none, as kvpress).

During decoding (`interval=N`) the statistics are those of the last decode queries the engine
keeps (up to its decode_window, no sinks left out), the future positions start at the tokens seen,
and each row keeps decode_budget(budget, seen) slots (kvpress's DecodingPress, over a window of
recent queries, does the same); the engine keeps the last decode_window tokens of every row.
"""

import math

import torch

from refreekv import (
    DecodeProbe,
    Policy,
    check_budget,
    check_count,
    check_flag,
    check_layers,
    protect,
    register,
    row_budget,
    rows_of,
    top_k_mask,
)

MAX_FUTURE = 2**20


def check_epsilon(value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value >= 0):
        raise ValueError(f"epsilon must be a number >= 0, got {value!r}")
    return float(value)


@register("expected-attention")
class ExpectedAttention(Policy):
    probe_rows = 0  # keys, values and query moments: no attention rows
    query_stats = True

    def __init__(
        self,
        budget: float = 0.5,
        n_future_positions: int = 512,
        n_sink: int = 4,
        use_covariance: bool = True,
        use_vnorm: bool = True,
        epsilon: float = 0.0,
        protected: tuple[int, ...] = (),
    ):
        self.budget = check_budget(budget)
        self.n_future_positions = check_count("n_future_positions", n_future_positions, 1, MAX_FUTURE)
        self.n_sink = check_count("n_sink", n_sink, 0, 8)  # the prefill keeps the first 8 queries apart
        self.use_covariance = check_flag("use_covariance", use_covariance)
        self.use_vnorm = check_flag("use_vnorm", use_vnorm)
        self.epsilon = check_epsilon(epsilon)
        self.protected = check_layers(protected)

    def future_rotation(self, probe) -> torch.Tensor:
        """[B, D, D]: the RoPE rotation averaged over each row's next n_future_positions positions,
        mean over p of (diag(cos_p) + diag(sin_p) P), P x = rotate_half(x) = cat(-x2, x1)."""
        start = probe.seen if isinstance(probe, DecodeProbe) else probe.lens
        ahead = torch.arange(self.n_future_positions, device=start.device)
        cos, sin = probe.rope((start[:, None] + ahead).flatten())
        B, D = start.shape[0], cos.shape[-1]
        cos, sin = (t.view(B, -1, D).mean(1) for t in (cos, sin))  # [B, D]
        half = D // 2
        turn = torch.zeros(D, D, device=cos.device)
        turn[:half, half:] = -torch.eye(half, device=cos.device)
        turn[half:, :half] = torch.eye(half, device=cos.device)
        return torch.diag_embed(cos) + sin[..., None] * turn

    def scores(self, probe) -> torch.Tensor:
        """[L, B, Hkv, N]: +inf on each row's first n_sink slots, the expected attention (x the
        value norm) on the others, -inf past the row (a Probe or a DecodeProbe)."""
        _, j, real = rows_of(probe)
        decoding = isinstance(probe, DecodeProbe)
        sink = 0 if decoding else self.n_sink
        rot = self.future_rotation(probe)[:, None]  # [B, 1, D, D]
        out = []
        for layer in range(probe.n_layers):
            mean, cov = probe.query_stats(layer, skip=sink)  # [B, H, D], [B, H, D, D]
            keys = probe.keys(layer)  # [B, Hkv, N, D] post-RoPE, as the queries will meet them
            B, Hkv, N, D = keys.shape
            group = mean.shape[1] // Hkv
            mean = (rot @ mean[..., None])[..., 0].view(B, Hkv, group, D)
            logits = mean @ keys.transpose(-1, -2) / math.sqrt(D)  # [B, Hkv, G, N]
            if self.use_covariance:
                cov = (rot @ cov @ rot.transpose(-1, -2)).view(B, Hkv, group, D, D)
                spread = ((keys[:, :, None] @ cov) * keys[:, :, None]).sum(-1)  # k^T S k
                logits = logits + spread / D / 2
            row = real[layer] if decoding else real[0]  # [B, Hkv or 1, N]
            scored = row & (j >= sink)
            s = torch.softmax(logits.masked_fill(~scored[:, :, None], -math.inf), -1).nan_to_num(0.0)
            s = s.mean(2)  # [B, Hkv, N]: the group's average
            if self.use_vnorm:
                s = (s + self.epsilon) * probe.values(layer).norm(dim=-1)
            s = torch.where(scored, s, -math.inf)
            out.append(torch.where(row & (j < sink), math.inf, s))
        return torch.stack(out)

    def plan(self, probe):
        keep = top_k_mask(self.scores(probe), rows_of(probe)[2], row_budget(self.budget, probe))
        return protect(keep, probe, self.protected)

    replan = plan
