"""KV pruning policies. One file per method; each registers itself with @register.

A policy sees a Probe (each layer's attention of the last `probe_rows` prompt queries over
every prompt key, captured during prefill) and returns a keep mask [L, B, Hkv, N]: which
prompt slots of each (layer, sequence, KV head) row survive into decode. The engine
compacts the paged KV pool with it (the emptied pages go back to the pool); everything else about
generation is unchanged.

A policy that also defines `replan(DecodeProbe)` prunes during decoding: every `interval`
generated tokens (and, with `on_pressure`, when the pool runs short, before anyone is preempted)
it sees the attention of the last decode queries over each row's live tokens (prompt survivors
and generated ones) and returns which of them stay. `make(name, interval=128)` turns it on.
Every module in this package is imported on first use, so a new method is one new file."""

import importlib
import math
import pkgutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from weights.errors import UserError


class _Rows:
    """Lazy per-layer access to the probed rows' keys and values as they sit in the KV pool (mixed
    into Probe and DecodeProbe). Each call reads one layer from the pool: nothing is cached, so a
    method that walks the layers holds one layer at a time (a 7B at 32k tokens: 64 MiB of fp32
    keys per layer and batch row, never all layers at once). A policy that calls neither costs
    nothing: the pool is read only here."""

    def keys(self, layer: int, rope: bool = True) -> torch.Tensor:
        """[B, Hkv, N, D] fp32 keys of one layer's rows, slot j of a row being its j-th token (its
        position: `positions` / `pos`); 0 past each row's length. rope=True: as stored (post-RoPE,
        what the attention reads); rope=False: rotated back to the projection's output (pre-RoPE,
        what methods that score keys across positions, like Expected Attention, start from)."""
        return self._read(layer, "k", rope)

    def values(self, layer: int) -> torch.Tensor:
        """[B, Hkv, N, D] fp32 values of one layer's rows; 0 past each row's length."""
        return self._read(layer, "v", True)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's rotary tables at any positions [n] (future ones included): (cos, sin), each
        [n, D], as the model rotates a vector x at position p: x * cos[p] + rotate_half(x) * sin[p]
        (rotate_half(x) = cat(-x2, x1); YaRN's attention factor is in both)."""
        if self.reader is None:
            raise RuntimeError("this probe has no model behind it (built by hand): rope unavailable")
        return self.reader.rope(positions)

    def query_stats(self, layer: int, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [B, H, D] and covariance [B, H, D, D] (divided by the count, as kvpress does) of one
        layer's queries before RoPE, per query head: at prefill every prompt query from position
        `skip` on (skip <= MOMENT_HEAD = 8: Expected Attention leaves the first, sink, queries
        out), while decoding the last decode queries the engine keeps (up to decode_window; skip
        must be 0). Only for a policy with query_stats = True: the prefill then sums the moments,
        [L, B, H, D, D] fp32 per batch whatever the prompts' lengths; nothing is kept after."""
        if self.moments is None:
            raise RuntimeError("query_stats needs a policy with query_stats = True (and a model behind it)")
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer must be in [0, {self.n_layers}), got {layer}")
        s1, s2, head = (m[layer] for m in self.moments[:3])
        counts = self.moments[3]  # [B] queries summed per row
        if not 0 <= skip <= head.shape[2]:
            raise ValueError(f"skip must be in [0, {head.shape[2]}] here, got {skip}")
        real = torch.arange(skip, device=head.device) < counts[:, None]  # [B, skip]
        first = head[:, :, :skip] * real[:, None, :, None]  # [B, H, skip, D]
        count = (counts - real.sum(1)).clamp(min=1).to(s1.dtype)[:, None, None]  # [B, 1, 1]
        mean = (s1 - first.sum(2)) / count
        second = (s2 - first.transpose(-1, -2) @ first) / count[..., None]
        return mean, second - mean[..., :, None] * mean[..., None, :]

    def _read(self, layer: int, what: str, rope: bool) -> torch.Tensor:
        if self.reader is None:
            raise RuntimeError(
                "this probe has no KV pool behind it (built by hand): keys / values unavailable"
            )
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer must be in [0, {self.n_layers}), got {layer}")
        return self.reader(layer, what, rope)


@dataclass
class Probe(_Rows):
    attn: torch.Tensor | None  # [L, B, H, w, N] fp32 softmax rows of the last w real queries (rows before
    #                            the prompt start are 0); None when the policy asked for probe_rows = 0
    lens: torch.Tensor  # [B] prompt lengths; key slots >= lens[b] are padding
    n_layers: int
    n_kv_heads: int
    width: int  # N, the padded prompt length
    reader: object = None  # reader(layer, "k" | "v", rope) -> [B, Hkv, N, D] fp32: see keys(), values()
    moments: tuple | None = None  # query moments (engine/model.py query_moments) + counts [B], for a
    #                               policy with query_stats = True: see query_stats()

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


@dataclass
class DecodeProbe(_Rows):
    """A decode-time re-plan's view of B running sequences: every (layer, sequence, KV head) row as
    it stands, slot j of a row being its j-th live token in position order (the survivors of the
    prompt and of earlier re-plans, then the generated tokens)."""

    attn: torch.Tensor | None  # [L, B, H, w, N] fp32 softmax rows of the last w decode queries (the
    #                            newest last) over each row's slots, causal (a query never sees a key
    #                            generated after it) and within the layer's sliding window; all-zero
    #                            rows where a sequence has decoded fewer than w tokens. None: rows = 0
    lens: torch.Tensor  # [L, B, Hkv] live slots of each row; slots >= lens are padding
    pos: torch.Tensor  # [L, B, Hkv, N] absolute position of each slot (-1 on padding)
    seen: torch.Tensor  # [B] tokens each sequence has seen (prompt + generated; its next position)
    prompt: torch.Tensor  # [B] prompt lengths
    queries: torch.Tensor  # [B] real query rows of attn (the last queries[b] of the w)
    n_kv_heads: int
    reader: object = None  # as Probe.reader: each row's live slots in slot order (positions: pos)
    moments: tuple | None = None  # as Probe.moments, of the last decode queries (query_stats())

    @property
    def n_layers(self) -> int:
        return self.lens.shape[0]

    @property
    def width(self) -> int:
        return self.pos.shape[-1]

    @property
    def slots(self) -> torch.Tensor:  # [N] slot index within a row
        return torch.arange(self.width, device=self.lens.device)

    @property
    def real(self) -> torch.Tensor:  # [L, B, Hkv, N] True where a slot holds a live token
        return self.slots < self.lens[..., None]


class Policy:
    name = "?"
    probe_rows = 1  # how many of the last prompt queries the policy needs (0: no probe at all)
    query_stats = False  # True: the prefill sums the query moments the Probe's query_stats() reads
    # decode-time pruning (policies that define replan): re-plan every `interval` generated tokens
    # (0: never), and when the pool runs short before preempting anyone (on_pressure)
    interval = 0
    on_pressure = False

    def plan(self, probe: Probe) -> torch.Tensor:
        """Return keep [L, B, Hkv, N] (bool). Must be False on padding slots (>= lens[b])."""
        raise NotImplementedError

    # def replan(self, probe: DecodeProbe) -> torch.Tensor: keep [L, B, Hkv, N] (bool), False past
    # each row's length. Defined by the policies that prune during decoding; the engine adds the last
    # `decode_window` tokens of every row whatever it returns.

    @property
    def decodes(self) -> bool:
        """Prunes during decoding: defines replan and has a trigger."""
        return prunes_decoding(type(self)) and bool(self.interval or self.on_pressure)


def prunes_decoding(cls) -> bool:
    """The policy class defines replan (a subclass may set it to None: it prunes the prompt only)."""
    return getattr(cls, "replan", None) is not None


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


DECODE_KNOBS = ("interval", "on_pressure")  # every policy that defines replan takes these


def knobs(name: str) -> list[str]:
    """The keyword arguments a registered policy takes."""
    import inspect

    _discover()
    cls = POLICIES[name]
    params = inspect.signature(cls.__init__).parameters.values()
    own = [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return own + list(DECODE_KNOBS) if prunes_decoding(cls) else own


def make(name: str, **kwargs) -> Policy:
    _discover()
    if name not in POLICIES:
        raise UserError(f"unknown KV policy {name!r}; available: {', '.join(sorted(POLICIES))}")
    takes = knobs(name)
    bad = [k for k in kwargs if k not in takes]
    if bad:
        decodes = prunes_decoding(POLICIES[name])
        extra = " (it does not prune during decoding)" if bad[0] in DECODE_KNOBS and not decodes else ""
        raise UserError(
            f"KV policy {name!r} has no knob {bad[0]!r}{extra}; it takes: {', '.join(takes) or 'nothing'}"
        )
    decode = {k: kwargs.pop(k) for k in DECODE_KNOBS if k in kwargs}
    try:
        pol = POLICIES[name](**kwargs)
        if "interval" in decode:
            pol.interval = check_count("interval", decode["interval"], 0)
        if "on_pressure" in decode:
            pol.on_pressure = check_flag("on_pressure", decode["on_pressure"])
        return pol
    except (TypeError, ValueError, OverflowError) as e:
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
    if b > 1 and (b != int(b) or b > MAX_TOKENS):
        raise ValueError(
            f"a budget > 1 is a token count and must be a whole number <= {MAX_TOKENS}, got {budget!r}"
        )
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


def decode_budget(budget: float, probe: "DecodeProbe") -> torch.Tensor:
    """A fixed budget during decoding: tokens each sequence keeps per row, [B] int64. budget <= 1: a
    share of the tokens the sequence has seen, ceil(budget * seen) (so the row tracks the same
    fraction as it grows); budget > 1: that many tokens (a cap, R-KV style). Never more than a row
    holds (the caller clamps per row)."""
    return budget_tokens(budget, probe.seen)


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


def rows_of(probe):
    """(lens, slot index [N], real) of a Probe (lens [1, B, 1], real [1, B, 1, N]: the prompt's
    slots) or a DecodeProbe (lens [L, B, Hkv], real [L, B, Hkv, N]: each row's live slots), shaped
    to broadcast against a plan [L, B, Hkv, N]: one method body serves plan and replan."""
    if isinstance(probe, DecodeProbe):
        return probe.lens, probe.slots, probe.real
    return probe.lens[None, :, None], probe.positions, probe.real[None, :, None]


def row_budget(budget: float, probe) -> torch.Tensor:
    """Tokens each row keeps, [1, B, 1]: budget_tokens of the prompt at prefill, decode_budget of
    the tokens seen while decoding (a row never keeps more than it holds: top_k_mask stops there)."""
    if isinstance(probe, DecodeProbe):
        return decode_budget(budget, probe)[None, :, None]
    return budget_tokens(budget, probe.lens)[None, :, None]


POOLINGS = ("max", "avg")


def pool_slots(scores: torch.Tensor, eligible: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """Scores [..., N] pooled along the slots over the eligible ones only (stride 1, same padding):
    "max" treats the others as -inf, "avg" as 0 and always divides by the kernel (F.avg_pool1d's
    count_include_pad, as SnapKV's and kvpress's code pool a slice that ends before the window)."""
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if pooling == "max":
        flat = flat.masked_fill(~eligible.expand(shape).reshape(flat.shape), -math.inf)
        out = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        flat = flat.masked_fill(~eligible.expand(shape).reshape(flat.shape), 0.0)
        out = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    return out.view(shape)


def top_p_sets(scores: torch.Tensor, cand: torch.Tensor, threshold: float) -> torch.Tensor:
    """scores [..., N] (>= 0), cand [..., N] the evictable slots -> [..., N] True where a slot is
    evicted: candidates lowest first (ties: the earlier slot), while the evicted mass stays <=
    threshold x the row's total (every slot's score counted). threshold 0 evicts nothing."""
    total = scores.sum(-1, keepdim=True)
    order = torch.sort(torch.where(cand, scores, math.inf), dim=-1, stable=True).indices
    mass = torch.where(cand, scores, 0.0).gather(-1, order).cumsum(-1)
    gone = (mass <= threshold * total) & cand.gather(-1, order) & (threshold > 0)
    return torch.zeros_like(gone).scatter_(-1, order, gone)


def check_kernel(kernel) -> int:
    """A pooling kernel: odd (same padding), in [1, MAX_KERNEL]."""
    k = check_count("kernel", kernel, 1, MAX_KERNEL)
    if k % 2 == 0:
        raise ValueError(f"kernel must be an odd number (same padding), got {kernel}")
    return k


def check_choice(name: str, value, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


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
    if any(not 0 <= x < 2**16 for x in layers) or len(layers) > 2**16:
        raise ValueError(f"protected layers must be layer indices >= 0, got {list(protected)[:8]}")
    return layers


def check_flag(name: str, v) -> bool:
    if not isinstance(v, bool):  # bool("false") is True
        raise ValueError(f"{name} must be true or false, got {v!r}")
    return v


def check_share(name: str, value, of: str = "the attention") -> float:
    """A share in [0, 1] (of the attention, unless `of` says what): past 1 it means nothing more
    than 1. ValueError naming it otherwise (NaN and inf included)."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not (math.isfinite(t) and 0 <= t <= 1):
        raise ValueError(f"{name} must be in [0, 1] (a share of {of}), got {value!r}")
    return t


def check_threshold(threshold) -> float:
    return check_share("threshold", threshold)


MAX_TOKENS = 2**31 - 1  # a token count no context reaches (sinks, recent, budgets, intervals)
MAX_PROBE_ROWS = 64  # prompt / decode queries a policy may read (SnapKV's paper uses 32, kvpress 64)
MAX_KERNEL = 63  # SnapKV's pooling kernel


def check_count(name: str, value, least: int, most: int = MAX_TOKENS) -> int:
    """A whole number in [least, most]: an int, or a float with an integral value (JSON has no
    ints of its own); anything else (bools, strings, inf, nan, 1e300) is a ValueError naming it."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        whole, value = True, int(value)
    if not whole or not least <= value <= most:
        raise ValueError(f"{name} must be a whole number in [{least}, {most}], got {value!r}")
    return value


def check_rows(name: str, value) -> int:
    """How many queries a policy's probe reads: in [1, MAX_PROBE_ROWS] (the probe is
    [layers, batch, heads, rows, prompt] in fp32, so this bounds its memory)."""
    return check_count(name, value, 1, MAX_PROBE_ROWS)


def protect(keep: torch.Tensor, probe, layers: tuple[int, ...]) -> torch.Tensor:
    """Keep every real token of the given layers (indices past the model are ignored); probe is a
    Probe (real [B, N]) or a DecodeProbe (real [L, B, Hkv, N])."""
    real = probe.real
    for layer in layers:
        if layer < probe.n_layers:
            keep[layer] = real[layer] if real.dim() == 4 else real[:, None]
    return keep


def available() -> list[str]:
    _discover()
    return sorted(POLICIES)
