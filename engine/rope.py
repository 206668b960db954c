"""Rotary position embeddings: the tables (Llama 3.1 frequency scaling, linear, YaRN with its
attention factor), rotating queries and keys, and undoing it (the probe's pre-RoPE keys, the query
moments). Shared by the model and by pruning, which rotates at any position (future ones too)."""

import math

import torch

from weights.config import ModelConfig


def rotate(x, cos, sin):
    """HF rotate-half RoPE in fp32; cos/sin broadcast against x [..., D]."""
    xf = x.float()  # no copy in fp32
    x1, x2 = xf.chunk(2, dim=-1)
    out = xf * cos + torch.cat((-x2, x1), dim=-1) * sin
    return out if out.dtype == x.dtype else out.to(x.dtype)


def rope_inv_freq(c: ModelConfig):
    """Rotary inverse frequencies (fp32), with Llama 3.1 frequency scaling when configured."""
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
    s = c.rope_scaling
    if s and s["rope_type"] == "linear":
        return (inv / s["factor"]).float()
    if s and s["rope_type"] == "yarn":  # NTK-by-parts: interpolate the low frequencies, keep the high ones
        d, base, orig = c.head_dim, c.rope_theta, s["original_max_position_embeddings"]

        # the dimension whose wavelength fits `rotations` turns in the original context
        def dim_of(rotations):
            return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = dim_of(s["beta_fast"]), dim_of(s["beta_slow"])
        if s["truncate"]:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        return (inv / s["factor"] * ramp + inv * (1 - ramp)).float()
    if s:
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, mid, scaled)
    return inv.float()


def rope_tables(c: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin) [n, D] at positions [n], YaRN's attention factor included (it scales both)."""
    freqs = positions.float()[:, None] * rope_inv_freq(c).to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    att = rope_attention_factor(c)
    return emb.cos() * att, emb.sin() * att


def unrotate(x, cos, sin, att):
    """x rotated back to before RoPE (cos/sin the tables that rotated it, att = their factor: R(-p) R(p)
    = att^2), in fp32."""
    return rotate(x.float(), cos, -sin) / att**2


def rope_attention_factor(c: ModelConfig) -> float:
    """What cos/sin are multiplied by: YaRN's attention temperature, else 1."""
    s = c.rope_scaling
    if not s or s["rope_type"] != "yarn":
        return 1.0
    if "attention_factor" in s:
        return s["attention_factor"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(s["factor"], s["mscale"]) / mscale(s["factor"], s["mscale_all_dim"])
    return mscale(s["factor"])
