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


def name_map(c: ModelConfig) -> dict[str, tuple[str, slice | None]]:
    """HF tensor name -> (our parameter, row slice in a fused weight). Llama, Mistral and
    Qwen2 share HF's names; Qwen2 adds q/k/v biases, Llama's attention_bias q/k/v/o biases and
    its mlp_bias gate/up/down biases."""
    qd, kd, f = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.ffn_dim
    m = {"model.embed_tokens.weight": ("embed.weight", None), "model.norm.weight": ("norm.weight", None)}
    if not c.tie_embeddings:
        m["lm_head.weight"] = ("lm_head.weight", None)
    for i in range(c.n_layers):
        hf, us = f"model.layers.{i}.", f"layers.{i}."
        parts = {"q_proj": slice(0, qd), "k_proj": slice(qd, qd + kd), "v_proj": slice(qd + kd, qd + 2 * kd)}
        for proj, rows in parts.items():
            m[f"{hf}self_attn.{proj}.weight"] = (f"{us}attn.wqkv.weight", rows)
            if c.qkv_bias:
                m[f"{hf}self_attn.{proj}.bias"] = (f"{us}attn.wqkv.bias", rows)
        m[f"{hf}self_attn.o_proj.weight"] = (f"{us}attn.wo.weight", None)
        if c.o_bias:
            m[f"{hf}self_attn.o_proj.bias"] = (f"{us}attn.wo.bias", None)
        for kind in ("weight", "bias") if c.mlp_bias else ("weight",):
            m[f"{hf}mlp.gate_proj.{kind}"] = (f"{us}mlp.w13.{kind}", slice(0, f))
            m[f"{hf}mlp.up_proj.{kind}"] = (f"{us}mlp.w13.{kind}", slice(f, 2 * f))
            m[f"{hf}mlp.down_proj.{kind}"] = (f"{us}mlp.w2.{kind}", None)
        m[f"{hf}input_layernorm.weight"] = (f"{us}attn_norm.weight", None)
        m[f"{hf}post_attention_layernorm.weight"] = (f"{us}mlp_norm.weight", None)
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
        raise UserError(f"no *.safetensors weights in {model_dir} (only safetensors checkpoints are supported)")
    return files


def load_model(model_dir, device="cpu", dtype=torch.float32):
    """Build our Transformer for an HF checkpoint directory and load its weights."""
    from engine.model import Transformer

    model_dir = Path(model_dir)
    c = load_config(model_dir)
    with torch.device("meta"):
        model = Transformer(c).to(dtype)
    model = model.to_empty(device=device)
    if c.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    params = dict(model.named_parameters())
    from tqdm import tqdm  # a dependency of huggingface-hub

    table, seen = name_map(c), set()
    files = shard_files(model_dir)
    size = sum(p.stat().st_size for p in files)
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"loading {model_dir.name}", file=sys.stderr, leave=False,
               disable=None if size > 2**30 else True)  # a bar for large checkpoints, on a terminal
    for path in files:
        bar.update(path.stat().st_size)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key not in table:
                        if known_extra(key, c):
                            continue
                        raise UserError(f"{path.name}: tensor {key} is not part of a {c.family} model as its config.json "
                                        "describes it (the engine would ignore it and compute something else)")
                    name, rows = table[key]
                    dst = params[name].data if rows is None else params[name].data[rows]
                    t = f.get_tensor(key)
                    if t.shape != dst.shape:
                        raise UserError(f"{path.name}: tensor {key} has shape {tuple(t.shape)}, expected {tuple(dst.shape)} from config.json")
                    dst.copy_(t)
                    seen.add(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise UserError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None
    bar.close()
    missing = [k for k in table if k not in seen]
    if missing:
        raise UserError(f"checkpoint in {model_dir} lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    return model.eval(), c
