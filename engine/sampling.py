"""Choosing tokens and turning them into text: sampling settings, the sync-free sampler,
incremental detokenisation and stop strings."""
from dataclasses import dataclass, field

import torch

from weights.errors import UserError


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def check(self):
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise UserError("--stop must not be empty")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what torch's manual_seed takes
            raise UserError(f"--seed must be in [-2^63, 2^64), got {self.seed}")


def sample(logits, s: Sampling, gen: torch.Generator | None):
    """logits [B, V] -> tokens [B]."""
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        srt, idx = logits.sort(-1, descending=True)
        probs = srt.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p: a token goes once the mass before it
        # does (transformers' rule, boundary included)
        drop = probs.cumsum(-1) - probs >= s.top_p
        logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    # exponential race (as gpt-fast): argmax p / E with E ~ Exp(1) draws from p, with no host sync
    q = torch.empty_like(logits).exponential_(1, generator=gen)
    return (logits.softmax(-1) / q).argmax(-1)


class Detok:
    """Incremental detokenisation: each new token re-decodes only a short window of recent ids
    (the text of ids[prefix:] minus that of ids[prefix:read]), never the whole output, and text
    only grows once its bytes form whole characters (no trailing U+FFFD)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.text = tokenizer, [], ""
        self.prefix = self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        done = self.tok.decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(done) and not now.endswith("\ufffd"):
            self.text += now[len(done):]
            self.prefix, self.read = self.read, len(self.ids)
        return self.text


def find_stop(text: str, stops: list[str], since: int = 0) -> int:
    """Index of the first stop string in text (searching from where text was at `since` chars,
    minus what a stop could straddle), or -1."""
    hits = [i for st in stops if (i := text.find(st, max(0, since - len(st) + 1))) >= 0]
    return min(hits, default=-1)


def stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that could still grow into a stop string (held back from streaming)."""
    return next((k for k in range(min(len(text), max(map(len, stops), default=1) - 1), 0, -1)
                 if any(st.startswith(text[-k:]) for st in stops)), 0)
