"""KV pruning policies. One file per method; each registers itself with @register.

A policy sees a Probe (each layer's attention of the last `probe_rows` prompt queries over
every prompt key, captured during prefill) and returns a keep mask [L, B, Hkv, N]: which
prompt slots of each (layer, sequence, KV head) row survive into decode. The engine
compacts the paged KV pool with it (the emptied pages go back to the pool); everything else about
generation is unchanged.
Every module in this package is imported on first use, so a new method is one new file."""

import importlib
import math
import pkgutil
from dataclasses import dataclass

import torch

from weights.errors import UserError


@dataclass
class Probe:
    attn: torch.Tensor | None  # [L, B, H, w, N] fp32 softmax rows of the last w real queries (rows before
    #                            the prompt start are 0); None when the policy asked for probe_rows = 0
    lens: torch.Tensor  # [B] prompt lengths; key slots >= lens[b] are padding
    n_layers: int
    n_kv_heads: int
    width: int  # N, the padded prompt length

    @property
    def positions(self) -> torch.Tensor:  # [N] slot index = absolute position of each prompt key
        return torch.arange(self.width, device=self.lens.device)

    @property
    def real(self) -> torch.Tensor:  # [B, N] True where a slot holds a real prompt token
        return self.positions < self.lens[:, None]

    def per_kv_head(self, keep_lbn: torch.Tensor) -> torch.Tensor:
        """Broadcast a layer-level plan [L, B, N] to the store's rows [L, B, Hkv, N]."""
        L, B, N = keep_lbn.shape
        return keep_lbn[:, :, None].expand(L, B, self.n_kv_heads, N)


class Policy:
    name = "?"
    probe_rows = 1  # how many of the last prompt queries the policy needs (0: no probe at all)

    def plan(self, probe: Probe) -> torch.Tensor:
        """Return keep [L, B, Hkv, N] (bool). Must be False on padding slots (>= lens[b])."""
        raise NotImplementedError


POLICIES: dict[str, type[Policy]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        POLICIES[name] = cls
        return cls

    return deco


def _discover():
    for m in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{m.name}")


def knobs(name: str) -> list[str]:
    """The keyword arguments a registered policy takes."""
    import inspect

    _discover()
    params = inspect.signature(POLICIES[name].__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def make(name: str, **kwargs) -> Policy:
    _discover()
    if name not in POLICIES:
        raise UserError(f"unknown KV policy {name!r}; available: {', '.join(sorted(POLICIES))}")
    takes = knobs(name)
    bad = [k for k in kwargs if k not in takes]
    if bad:
        raise UserError(
            f"KV policy {name!r} has no knob {bad[0]!r}; it takes: {', '.join(takes) or 'nothing'}"
        )
    try:
        return POLICIES[name](**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"KV policy {name!r}: {e}") from None


# --- helpers shared by the fixed-budget methods (streaming, h2o, snapkv); see README.md ---


def check_budget(budget) -> float:
    """Validate a fixed budget: a fraction of each prompt (0 < budget <= 1) or a whole token
    count (> 1). ValueError otherwise (make() turns it into a UserError)."""
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number, got {budget!r}") from None
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"budget must be > 0 (a fraction <= 1 or a token count > 1), got {budget!r}")
    if b > 1 and b != int(b):
        raise ValueError(f"a budget > 1 is a token count and must be a whole number, got {budget!r}")
    return b


def budget_tokens(budget: float, lens: torch.Tensor) -> torch.Tensor:
    """Prompt tokens each sequence keeps per (layer, KV head): [B] int64 in [1, lens[b]].

    budget <= 1: ceil(budget * n) of the sequence's own prompt length n (1.0 keeps everything);
    budget > 1: min(budget, n) tokens. Sinks and recent windows are counted inside it."""
    n = lens.long()
    if budget <= 1:  # the 1e-6 absorbs float error in budget * n (0.3 * 10 = 3.0000000000000004)
        k = torch.ceil(n.double() * budget - 1e-6).long().clamp(min=1)
    else:
        k = torch.full_like(n, int(budget))
    return torch.minimum(k, n)


def top_k_mask(scores: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the k highest-scoring eligible slots of each row: scores, eligible [..., N], k
    broadcastable to scores.shape[:-1]. Equal scores prefer the later (more recent) slot."""
    N = scores.shape[-1]
    s = torch.where(eligible, scores, -math.inf)
    order = (N - 1) - torch.sort(
        s.flip(-1), dim=-1, descending=True, stable=True
    ).indices  # ties: later slot first
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(N, device=s.device).expand_as(order))
    return (rank < k[..., None]) & eligible


def kv_head_scores(attn: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Probe [L, B, H, w, N] -> [L, B, Hkv, N]: attention summed over the w probe rows and over
    the query heads of each KV head's group (query head h reads KV head h // (H // Hkv))."""
    return attn.unflatten(2, (n_kv_heads, -1)).sum((3, 4))


def check_layers(protected) -> tuple[int, ...]:
    # a string is iterable ("01" would read as layers 0 and 1), a bool is an int: neither is a list of layers
    try:
        layers = tuple(protected)
    except TypeError:
        layers = None
    if (
        layers is None
        or isinstance(protected, (str, bytes))
        or any(isinstance(x, bool) or not isinstance(x, int) for x in layers)
    ):
        raise ValueError(f"protected must be a list of layer indices, got {protected!r}")
    if any(x < 0 for x in layers):
        raise ValueError(f"protected layers must be >= 0, got {list(protected)}")
    return layers


def check_flag(name: str, v) -> bool:
    if not isinstance(v, bool):  # bool("false") is True
        raise ValueError(f"{name} must be true or false, got {v!r}")
    return v


def check_threshold(threshold) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
    # a share of the attention: past 1 it means nothing more than 1
    if not (math.isfinite(t) and 0 <= t <= 1):
        raise ValueError(f"threshold must be in [0, 1] (a share of the attention), got {threshold!r}")
    return t


def check_count(name: str, value, least: int) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < least:
        raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")
    return int(value)


def protect(keep: torch.Tensor, probe: Probe, layers: tuple[int, ...]) -> torch.Tensor:
    """Keep every real prompt token of the given layers (indices past the model are ignored)."""
    for layer in layers:
        if layer < probe.n_layers:
            keep[layer] = probe.real[:, None]
    return keep


def available() -> list[str]:
    _discover()
    return sorted(POLICIES)
