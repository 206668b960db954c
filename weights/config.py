"""ModelConfig: every knob of the supported families, read from an HF config.json."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from weights.errors import UserError

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


@dataclass
class ModelConfig:
    family: str  # llama | mistral | qwen2
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # {"rope_type": "llama3" | "yarn" | "linear", ...}, completed by _rope_scaling
    rope_scaling: dict | None = None
    sliding_window: int | None = None  # the window of the windowed layers; None: full attention everywhere
    layer_windows: list = field(default_factory=list)  # per layer: its window, or None (full attention)
    qkv_bias: bool = False
    o_bias: bool = False  # Llama's attention_bias puts a bias on o_proj too (Qwen2's q/k/v bias does not)
    mlp_bias: bool = False  # Llama's mlp_bias: gate, up and down projections
    tie_embeddings: bool = False
    head_rows: int | None = None  # tensor parallel: the LM head rows (vocabulary) this rank holds; None: all
    max_positions: int = 4096
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.layer_windows:
            self.layer_windows = [self.sliding_window] * self.n_layers

    @property
    def context_limit(self) -> int:
        """The longest sequence the positions support: max_position_embeddings, or what the RoPE scaling
        extends it to (YaRN: factor x the original length; linear: factor x max_position_embeddings;
        llama3 configs already state the extended length), as vLLM derives it."""
        s = self.rope_scaling
        if s and s["rope_type"] == "yarn":
            return max(self.max_positions, int(s["factor"] * s["original_max_position_embeddings"]))
        if s and s["rope_type"] == "linear":
            return int(self.max_positions * s["factor"])
        return self.max_positions

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads


def _ids(v) -> list[int]:
    return [] if v is None else [int(x) for x in (v if isinstance(v, list) else [v])]


def parse_config(cfg: dict, where: str = "config.json") -> ModelConfig:
    if not isinstance(cfg, dict):
        raise UserError(f"{where} must hold a JSON object, not {type(cfg).__name__}")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        raise UserError(f"{where}: architectures must be a list of class names")
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        got = ", ".join(archs) or f"model_type={cfg.get('model_type')!r}"
        raise UserError(f"unsupported architecture {got} in {where}; supported: {', '.join(SUPPORTED)}")
    family = SUPPORTED[arch]
    try:
        for k in (
            "hidden_size",
            "num_attention_heads",
            "num_hidden_layers",
            "intermediate_size",
            "vocab_size",
        ):
            if int(cfg[k]) < 1:
                raise UserError(f"{where}: {k} must be >= 1, got {cfg[k]!r}")
        dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        if n_kv < 1 or int(cfg.get("head_dim") or 1) < 1:
            raise UserError(f"{where}: num_key_value_heads and head_dim must be >= 1")
        head_dim = int(cfg.get("head_dim") or dim // n_heads)
        # transformers 5 writes rope_parameters = {"rope_theta": .., "rope_type": ..}
        rp = cfg.get("rope_parameters") or {}
        theta = float(cfg.get("rope_theta") or rp.get("rope_theta") or 10000.0)
        scaling = cfg.get("rope_scaling") or rp  # _rope_scaling reads the kind from rope_type or type
        scaling = _rope_scaling(cfg, scaling, where)
        n_layers = int(cfg["num_hidden_layers"])
        window, layers = _windows(family, cfg, n_layers, where)
        c = ModelConfig(
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            ffn_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            sliding_window=window,
            layer_windows=layers,
            qkv_bias=family == "qwen2" or (family == "llama" and bool(cfg.get("attention_bias"))),
            o_bias=family == "llama" and bool(cfg.get("attention_bias")),
            mlp_bias=family == "llama" and bool(cfg.get("mlp_bias")),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_positions=int(cfg.get("max_position_embeddings", 4096)),
            bos_id=_ids(cfg.get("bos_token_id"))[0] if _ids(cfg.get("bos_token_id")) else None,
            eos_ids=_ids(cfg.get("eos_token_id")),
        )
    except KeyError as e:
        raise UserError(f"{where} lacks required field {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{where} has a malformed field: {e}") from None
    if c.n_heads % c.n_kv_heads:
        raise UserError(
            f"{where}: num_attention_heads {c.n_heads} "
            f"is not a multiple of num_key_value_heads {c.n_kv_heads}"
        )
    return c


ROPE_KINDS = ("llama3", "yarn", "linear")


def _number(where: str, k: str, v, default=None) -> float:
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise UserError(f"{where}: rope_scaling {k} must be a positive number, got {v!r}")
    return float(v)


def _rope_scaling(cfg: dict, scaling, where: str) -> dict | None:
    """The RoPE scaling, checked here (before any weight is read; the table is built after loading)
    and completed as transformers completes it: {"rope_type", "factor", ...} or None."""
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise UserError(f"{where}: rope_scaling must be an object, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return None
    if kind not in ROPE_KINDS:
        raise UserError(
            f"unsupported rope_scaling type {kind!r} in {where}; supported: {', '.join(ROPE_KINDS)}"
        )
    if (
        not isinstance(scaling.get("factor"), (int, float))
        or isinstance(scaling.get("factor"), bool)
        or scaling["factor"] <= 0
    ):
        raise UserError(
            f"{where}: {kind} rope_scaling needs a positive number factor, got {scaling.get('factor')!r}"
        )
    out = dict(rope_type=kind, factor=float(scaling["factor"]))
    if kind == "linear":
        return out
    # the pretraining length: a top-level field wins (as transformers reads it), else max_position_embeddings
    orig = cfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
    out["original_max_position_embeddings"] = _number(
        where, "original_max_position_embeddings", orig, cfg.get("max_position_embeddings", 4096)
    )
    if kind == "llama3":
        out["low_freq_factor"] = _number(where, "low_freq_factor", scaling.get("low_freq_factor"), 1.0)
        out["high_freq_factor"] = _number(where, "high_freq_factor", scaling.get("high_freq_factor"), 4.0)
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise UserError(f"{where}: rope_scaling high_freq_factor must exceed low_freq_factor")
        return out
    for k, d in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        out[k] = _number(where, k, scaling.get(k) or None, d)  # transformers: `or` (0 means the default)
    for k in ("attention_factor", "mscale", "mscale_all_dim"):
        if scaling.get(k) is not None:
            out[k] = _number(where, k, scaling[k])
    out["truncate"] = bool(scaling.get("truncate", True))
    return out


def _windows(family: str, cfg: dict, n_layers: int, where: str) -> tuple[int | None, list]:
    """Which layers attend through a sliding window, as transformers reads the config: Llama never
    (it ignores sliding_window), Mistral every layer, Qwen2 only with use_sliding_window, on the
    layers its layer_types name "sliding_attention" (by default those from max_window_layers on)."""
    # transformers' Mistral and Qwen2 default when the key is absent (null: none)
    w = cfg.get("sliding_window", 4096)
    if family == "llama" or not w:
        return None, [None] * n_layers
    w = int(w)
    if w < 1:
        raise UserError(f"{where}: sliding_window must be >= 1, got {w}")
    if family == "mistral":
        return w, [w] * n_layers
    if not cfg.get("use_sliding_window", False):  # Qwen2.5 configs carry a window they do not use
        return None, [None] * n_layers
    types = cfg.get("layer_types")
    if types is None:
        first = int(cfg.get("max_window_layers", 28))  # transformers' Qwen2Config default
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if (
        not isinstance(types, list)
        or len(types) != n_layers
        or set(types) - {"full_attention", "sliding_attention"}
    ):
        raise UserError(
            f"{where}: layer_types must list 'full_attention' or 'sliding_attention' for each of the "
            f"{n_layers} layers"
        )
    layers = [w if t == "sliding_attention" else None for t in types]
    return (w if any(layers) else None), layers


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"no config.json in {model_dir}: not a Hugging Face checkpoint directory")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    c = parse_config(cfg, str(path))
    gen = Path(model_dir) / "generation_config.json"  # Llama 3 instruct lists its extra EOS ids here
    if gen.is_file():
        try:
            extra = _ids(json.loads(gen.read_text()).get("eos_token_id"))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError):
            raise UserError(f"{gen}: eos_token_id must be a token id or a list of them") from None
        c.eos_ids += [i for i in extra if i not in c.eos_ids]
    return c
