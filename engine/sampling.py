"""Choosing tokens: the per-request sampling settings, the sync-free vectorised sampler, and
`choose` (forced tokens, sampling, log-probabilities for a batch of sequences). Turning tokens
into text, stop strings included, is engine/tokenizer.py's."""

import math
from dataclasses import dataclass, field

import torch

from weights.errors import UserError


@dataclass
class Sampling:
    """Per request. Field names are the API's; the CLI's flags are the same with dashes."""

    max_new_tokens: int = 256  # 0 only with prompt_logprobs: score the prompt, generate nothing
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # per generated token: its log-probability and the top-N ones (0: none)
    prompt_logprobs: int | None = None  # the same for every prompt token (echo scoring)

    def check(self):
        least = 0 if self.prompt_logprobs is not None else 1
        _whole("max_new_tokens", self.max_new_tokens, least)
        if not (_real(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise UserError(f"temperature must be in [0, {MAX_TEMPERATURE}], got {_short(self.temperature)}")
        _whole("top_k", self.top_k, 0)
        if self.top_k > MAX_TOP_K:
            raise UserError(f"top_k must be at most {MAX_TOP_K}, got {_short(self.top_k)}")
        if not (_real(self.top_p) and 0 < self.top_p <= 1):
            raise UserError(f"top_p must be in (0, 1], got {_short(self.top_p)}")
        if not isinstance(self.stop, list) or any(not isinstance(s, str) for s in self.stop):
            raise UserError("stop must be a list of strings")
        if any(not s for s in self.stop):
            raise UserError("stop must not be empty")
        if len(self.stop) > MAX_STOPS:
            raise UserError(f"stop holds {len(self.stop)} strings; at most {MAX_STOPS}")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            longest = max(map(len, self.stop))
            raise UserError(f"stop strings must be at most {MAX_STOP_CHARS} characters, got one of {longest}")
        if self.seed is not None:
            _whole("seed", self.seed, -(2**63))
            if self.seed >= 2**64:  # what torch's manual_seed takes
                raise UserError(f"seed must be in [-2^63, 2^64), got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _whole(name, getattr(self, name), 0)
                if getattr(self, name) > MAX_LOGPROBS:
                    raise UserError(f"{name} must be at most {MAX_LOGPROBS}, got {getattr(self, name)}")


MAX_LOGPROBS = 20  # top log-probabilities per token (OpenAI's limit)
MAX_TEMPERATURE = 100.0  # far past where sampling is uniform; OpenAI's range is [0, 2]
MAX_TOP_K = 2**31 - 1
MAX_STOPS = 16  # stop strings per request (OpenAI's limit is 4)
MAX_STOP_CHARS = 256  # per stop string: the held-back tail and the scan are bounded by it


def _real(v) -> bool:
    """A finite int or float (not a bool) that converts to a float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int of hundreds of digits
        return False


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _whole(name, v, least):
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise UserError(f"{name} must be a whole number >= {least}, got {_short(v)}")


def sample_rows(logits, params, keys, filtered: bool = True):
    """Each row's token from logits [B, V] under its own settings, with no host sync.

    params [B, 3] float64: temperature (0: greedy), top_k (0: off), top_p (1: off), applied in
    transformers' order (temperature, then top-k keeping ties with the k-th, then top-p: a token
    goes once the mass before it reaches top_p). keys [B, 3] int64: the seed's low and high 32
    bits and the index of the token being drawn. A row's draw is a pure function of its key and
    its logits (counter-based noise, engine/sampling.py: exp_noise), so a seeded request gives the
    same tokens whatever else is in the batch. `filtered=False` skips the top-k / top-p sort (no
    row uses them)."""
    temp, top_k, top_p = params[:, 0:1], params[:, 1:2], params[:, 2:3]
    x = logits.float() / temp.clamp(min=1e-6).to(torch.float32)
    if filtered:
        srt, idx = x.sort(-1, descending=True)
        V = x.shape[-1]
        k = torch.where(top_k > 0, top_k, V).clamp(max=V).long()
        kth = srt.gather(-1, k - 1)
        srt = srt.masked_fill(srt < kth, float("-inf"))
        probs = srt.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p.to(probs.dtype)
        x = torch.empty_like(x).scatter_(-1, idx, srt.masked_fill(drop, float("-inf")))
    # exponential race (as gpt-fast): argmax p / E with E ~ Exp(1) draws from p
    pick = (x.softmax(-1) / exp_noise(keys, x.shape[-1])).argmax(-1)
    return torch.where(temp[:, 0] > 0, pick, logits.argmax(-1))


M32 = 0xFFFFFFFF


def _mix(x):
    """A 32-bit integer hash (two multiply-xorshift rounds) on int64 values in [0, 2^32): every
    product stays below 2^59, so int64 arithmetic is exact on every device."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    return (x >> 16) ^ x


def exp_noise(keys, V: int):
    """Exp(1) noise [B, V]: entry (b, v) a hash of (seed, token index, v), 53 bits of uniform."""
    base = _mix(_mix(_mix(keys[:, 0:1]) ^ keys[:, 1:2]) ^ (keys[:, 2:3] & M32))  # [B, 1]
    v = torch.arange(V, device=keys.device)
    h1 = _mix(_mix(base ^ v))
    h2 = _mix(h1 ^ 0x9E3779B9)
    u = ((h1 >> 6).double() * 2.0**27 + (h2 >> 5).double() + 0.5) / 2.0**53  # (0, 1)
    return (-torch.log(u)).float()


def choose(runner, logits, seqs, live) -> torch.Tensor:
    """The next token of each sequence from logits [n, V]: forced where it has one left, else
    sampled with its own settings (greedy when no row samples); its log-probability and the top
    ones when it asked for them (the raw model distribution), on their way to the host. live[i]:
    sequence i is fed this step (a draining row's logits are padding). runner: engine/runner.py."""
    ss = [seq.sampling for seq in seqs]
    if any(sp.temperature > 0 for sp in ss):
        params = torch.tensor([[sp.temperature, sp.top_k, sp.top_p] for sp in ss], dtype=torch.float64)
        keys = torch.tensor(
            [[seq.seed & M32, seq.seed >> 32, seq.n_chosen] for seq in seqs], dtype=torch.long
        )
        if runner.cuda:
            params, keys = (t.pin_memory().to(logits.device, non_blocking=True) for t in (params, keys))
        filtered = any(sp.temperature > 0 and (sp.top_k or sp.top_p < 1) for sp in ss)
        tok = sample_rows(logits, params, keys, filtered)
    else:
        tok = logits.argmax(-1)
    forced = [
        (i, seq.forced[seq.n_chosen])
        for i, seq in enumerate(seqs)
        if live[i] and seq.n_chosen < len(seq.forced)
    ]
    if forced:
        at, val = zip(*forced)
        tok = tok.index_put((runner.dev_long(list(at)),), runner.dev_long(list(val)))
    if runner.tp.on:
        tok = runner.tp.broadcast(tok)  # rank 0's tokens everywhere
    want = [i for i, seq in enumerate(seqs) if live[i] and seq.logprobs is not None]
    if want:
        k = max(seqs[i].sampling.logprobs for i in want)
        lp = logits[runner.dev_long(want)].float().log_softmax(-1)
        top = lp.topk(k, -1) if k else None
        chosen = lp.gather(-1, tok[runner.dev_long(want)][:, None])
        vals = chosen if top is None else torch.cat([chosen, top.values], -1)
        ids = None if top is None else top.indices
        vals, ids = (None if t is None else runner.to_host(t) for t in (vals, ids))
        for r, i in enumerate(want):
            seqs[i].lp.append((vals, ids, r))
    for seq, lv in zip(seqs, live):
        seq.n_chosen += lv
    return tok
