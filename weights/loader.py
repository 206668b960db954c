"""Stream HF safetensors (single file or sharded) straight into our Transformer's parameters.

The model is built on the meta device, materialised once in the target dtype, and each
checkpoint tensor is copied into its slot (q/k/v and gate/up land in slices of fused
weights), so host memory never holds a second full copy of the weights."""

import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from weights.config import ModelConfig, load_config
from weights.errors import UserError


def name_map(
    c: ModelConfig, rank: int = 0, world: int = 1
) -> dict[str, tuple[str, slice | None, tuple | None]]:
    """HF tensor name -> (our parameter, row slice in a fused weight, the part of the checkpoint
    tensor this rank reads: None = all of it). Llama, Mistral and Qwen2 share HF's names; Qwen2 adds
    q/k/v biases, Llama's attention_bias q/k/v/o biases and its mlp_bias gate/up/down biases.

    Tensor parallel over `world` ranks (weights/shard.py): q/k/v and gate/up are split by output
    rows (query heads, KV heads, ffn units), o_proj and down_proj by input columns, and their
    biases are read by rank 0 alone (the others hold zeros: the all-reduce adds them once); the LM
    head by vocabulary rows when the ranks divide the vocabulary; embeddings and norms whole."""
    from weights.shard import kv_heads, shard_config

    lc = shard_config(c, rank, world)
    D = c.head_dim
    qd, kd, f = lc.n_heads * D, lc.n_kv_heads * D, lc.ffn_dim
    q0, kv0, f0 = rank * lc.n_heads * D, kv_heads(c, rank, world)[0] * D, rank * f
    whole = world == 1
    m = {
        "model.embed_tokens.weight": ("embed.weight", None, None),
        "model.norm.weight": ("norm.weight", None, None),
    }
    if not c.tie_embeddings:
        v = lc.head_rows
        m["lm_head.weight"] = ("lm_head.weight", None, None if not v else (slice(rank * v, (rank + 1) * v),))
    for i in range(c.n_layers):
        hf, us = f"model.layers.{i}.", f"layers.{i}."
        parts = {
            "q_proj": (slice(0, qd), slice(q0, q0 + qd)),
            "k_proj": (slice(qd, qd + kd), slice(kv0, kv0 + kd)),
            "v_proj": (slice(qd + kd, qd + 2 * kd), slice(kv0, kv0 + kd)),
        }
        for proj, (rows, src) in parts.items():
            m[f"{hf}self_attn.{proj}.weight"] = (f"{us}attn.wqkv.weight", rows, None if whole else (src,))
            if c.qkv_bias:
                m[f"{hf}self_attn.{proj}.bias"] = (f"{us}attn.wqkv.bias", rows, None if whole else (src,))
        m[f"{hf}self_attn.o_proj.weight"] = (
            f"{us}attn.wo.weight",
            None,
            None if whole else (slice(None), slice(q0, q0 + qd)),
        )
        if c.o_bias:
            m[f"{hf}self_attn.o_proj.bias"] = (f"{us}attn.wo.bias", None, None if rank == 0 else "zero")
        for kind in ("weight", "bias") if c.mlp_bias else ("weight",):
            src = None if whole else (slice(f0, f0 + f),)
            m[f"{hf}mlp.gate_proj.{kind}"] = (f"{us}mlp.w13.{kind}", slice(0, f), src)
            m[f"{hf}mlp.up_proj.{kind}"] = (f"{us}mlp.w13.{kind}", slice(f, 2 * f), src)
        m[f"{hf}mlp.down_proj.weight"] = (
            f"{us}mlp.w2.weight",
            None,
            None if whole else (slice(None), slice(f0, f0 + f)),
        )
        if c.mlp_bias:
            m[f"{hf}mlp.down_proj.bias"] = (f"{us}mlp.w2.bias", None, None if rank == 0 else "zero")
        m[f"{hf}input_layernorm.weight"] = (f"{us}attn_norm.weight", None, None)
        m[f"{hf}post_attention_layernorm.weight"] = (f"{us}mlp_norm.weight", None, None)
    return m


def known_extra(key: str, c: ModelConfig) -> bool:
    """Tensors some checkpoints carry that the model does not need: rotary caches (recomputed from
    the config) and, for tied embeddings, a duplicate lm_head."""
    return key.endswith("rotary_emb.inv_freq") or (c.tie_embeddings and key == "lm_head.weight")


def shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, UnicodeDecodeError) as e:
            raise UserError(f"{index} is malformed: {e!r}") from None
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise UserError(f"{index} names shard {missing[0]} which is missing from {model_dir}")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(
            f"no *.safetensors weights in {model_dir} (only safetensors checkpoints are supported)"
        )
    return files


def load_model(model_dir, device="cpu", dtype=torch.float32, rank: int = 0, world: int = 1, build=None):
    """build(config) -> the model (engine/model.py's Transformer: engine.model.load_model passes it)
    for an HF checkpoint directory, with its weights loaded; with world > 1, rank `rank`'s shard
    only, read slice by slice (model.bytes_read counts what was read)."""
    from weights.shard import shard_config

    if build is None:
        raise TypeError("load_model needs build(config) -> model (engine.model.load_model passes it)")
    model_dir = Path(model_dir)
    c = load_config(model_dir)
    lc = shard_config(c, rank, world)
    with torch.device("meta"):
        model = build(lc).to(dtype)
        # becomes a view of the embedding below: allocate nothing for it
        if c.tie_embeddings and lc.head_rows:
            model.lm_head.weight = torch.nn.Parameter(torch.empty(0, c.dim, dtype=dtype), requires_grad=False)
    model = model.to_empty(device=device)
    if c.tie_embeddings and not lc.head_rows:
        model.lm_head.weight = model.embed.weight
    table = name_map(c, rank, world)
    seen, read = _read(model_dir, dict(model.named_parameters()), table, c, rank)
    missing = [k for k in table if k not in seen]
    if missing:
        raise UserError(f"checkpoint in {model_dir} lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    if c.tie_embeddings and lc.head_rows:  # this rank's rows of the head: a view of the embedding, no copy
        v = lc.head_rows
        model.lm_head.weight = torch.nn.Parameter(
            model.embed.weight.data[rank * v : (rank + 1) * v], requires_grad=False
        )
    model.bytes_read = read
    return model.eval(), c


def _read(model_dir: Path, params: dict, table: dict, c: ModelConfig, rank: int) -> tuple[set, int]:
    """Every checkpoint tensor into its parameter (or this rank's slice of it), tensor by tensor:
    (the keys read, the bytes read). A bar for large checkpoints, on a terminal."""
    from tqdm import tqdm  # a dependency of huggingface-hub

    seen, read = set(), 0
    files = shard_files(model_dir)
    size = sum(p.stat().st_size for p in files)
    bar = tqdm(
        total=size,
        unit="B",
        unit_scale=True,
        desc=f"loading {model_dir.name}",
        file=sys.stderr,
        leave=False,
        disable=None if size > 2**30 and rank == 0 else True,
    )
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    n = _copy(f, key, path, params, table, c)
                    if n is not None:
                        seen.add(key)
                        read += n
                        bar.update(n)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise UserError(
                f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})"
            ) from None
    bar.close()
    return seen, read


def _copy(f, key: str, path: Path, params: dict, table: dict, c: ModelConfig) -> int | None:
    """One tensor into its place; the bytes read (None: a known tensor the engine does not use)."""
    if key not in table:
        if known_extra(key, c):
            return None
        raise UserError(
            f"{path.name}: tensor {key} is not part of a {c.family} model as its config.json "
            "describes it (the engine would ignore it and compute something else)"
        )
    name, rows, src = table[key]
    dst = params[name].data if rows is None else params[name].data[rows]
    if src == "zero":  # a row-parallel bias: added once, by rank 0
        dst.zero_()
        return 0
    t = f.get_tensor(key) if src is None else f.get_slice(key)[src]
    if t.shape != dst.shape:
        want = "" if src is None else f" (this rank's part of {tuple(f.get_slice(key).get_shape())})"
        raise UserError(
            f"{path.name}: tensor {key} has shape {tuple(t.shape)}{want}, expected "
            f"{tuple(dst.shape)} from config.json"
        )
    dst.copy_(t)
    return t.numel() * t.element_size()
