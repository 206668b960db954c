"""KV pruning policies. One file per method; each registers itself with @register.

A policy sees a Probe (each layer's attention of the last `probe_rows` prompt queries over
every prompt key, captured during prefill) and returns a keep mask [L, B, Hkv, N]: which
prompt slots of each (layer, sequence, KV head) row survive into decode. The engine
compacts the ragged store with it; everything else about generation is unchanged.
Every module in this package is imported on first use, so a new method is one new file."""
import importlib
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


def make(name: str, **kwargs) -> Policy:
    _discover()
    if name not in POLICIES:
        raise UserError(f"unknown KV policy {name!r}; available: {', '.join(sorted(POLICIES))}")
    try:
        return POLICIES[name](**kwargs)
    except TypeError as e:
        raise UserError(f"bad arguments for KV policy {name!r}: {e}") from None


def available() -> list[str]:
    _discover()
    return sorted(POLICIES)
