"""weights.gguf: GGUF -> HF conversion.

Fast tests use tiny GGUFs written here with `gguf.GGUFWriter`. The `slow` ones convert the two real
bundled models (shared/MODELS.md) once per session (into a pytest tmp dir, or into $REFREEKV_CACHE
when set so reruns skip the conversion) and compare against transformers' own GGUF loader.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import SPECIALS, write_tiny_gguf
from safetensors import safe_open
from tokenizers import Tokenizer

from weights import bundled as wb
from weights.bundled import BUNDLED, bundled_files, ensure_bundled
from weights.errors import UserError
from weights.gguf import convert_gguf

SMOL = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"

# ----------------------------------------------------------------------------------------------
# tiny synthetic GGUFs
# ----------------------------------------------------------------------------------------------


def _load(dirpath: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(dirpath / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ----------------------------------------------------------------------------------------------
# fast: conversion of synthetic models
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", False)])
def test_tiny_roundtrip(tmp_path, arch, tied):
    src = tmp_path / "m.gguf"
    expected = write_tiny_gguf(src, arch, tied=tied, pre="smollm" if arch == "llama" else "qwen2")
    out = convert_gguf(src, tmp_path / "out")
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    got = _load(out)
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == torch.float32
        assert tuple(got[k].shape) == v.shape, k
        assert torch.equal(got[k], torch.from_numpy(v)), k  # includes the llama q/k un-permutation

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"]
    assert cfg["model_type"] == arch
    assert cfg["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in got) is (not tied)
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (32, 4, 2)
    assert (cfg["head_dim"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (8, 64, 2)
    assert cfg["rope_theta"] == 10000.0 and "rope_parameters" not in cfg
    assert cfg["rms_norm_eps"] == 1e-5  # float32 metadata written as the decimal it was meant as
    assert cfg["vocab_size"] == len(SPECIALS) + 256 + 5
    assert cfg["torch_dtype"] == "float32"
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["attention_bias"] is (arch == "qwen2")
    if arch == "qwen2":
        assert cfg["use_sliding_window"] is False
    gen = json.loads((out / "generation_config.json").read_text())
    eos = [2, 0] if arch == "qwen2" else 2  # Qwen2 also stops on its pad/<|endoftext|> id
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, eos, 0)
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert tcfg["chat_template"].startswith("{% for m in messages %}")
    assert not list(tmp_path.glob(".out*")), "temp dir left behind"


def test_tiny_tokenizer(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf")
    tok = Tokenizer.from_file(str(convert_gguf(tmp_path / "m.gguf", tmp_path / "out") / "tokenizer.json"))
    vocab = tok.get_vocab()
    # merges apply: " the" -> one token
    assert tok.encode(" the").ids == [vocab["Ġthe"]]
    # smollm pre-tokenizer: digits split individually, so the "1 2" merge never fires
    assert tok.encode("12").ids == [vocab["1"], vocab["2"]]
    # control tokens are special and matched whole; user-defined ones matched whole but not special
    text = "<|im_start|>user\n<tool_call>the<|im_end|>"
    ids = tok.encode(text).ids
    assert ids[0] == 1 and ids[-1] == 2 and vocab["<tool_call>"] in ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\n<tool_call>the"
    s = "héllo wörld ✓ 日本"
    assert tok.decode(tok.encode(s).ids) == s  # byte-level: anything round-trips


def test_tiny_qwen2_tokenizer_normalizes_nfc(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", "qwen2", tied=False, pre="qwen2")
    tok = Tokenizer.from_file(str(convert_gguf(tmp_path / "m.gguf", tmp_path / "out") / "tokenizer.json"))
    assert tok.encode("e\u0301").ids == tok.encode("\u00e9").ids
    assert tok.encode("12").ids == [tok.get_vocab()["1"], tok.get_vocab()["2"]]  # \p{N} one at a time


def test_convert_replaces_existing_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    write_tiny_gguf(tmp_path / "m.gguf")
    convert_gguf(tmp_path / "m.gguf", out)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------------------------------------
# fast: errors
# ----------------------------------------------------------------------------------------------


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(UserError, match=r"not a GGUF file .*x\.gguf"):
        convert_gguf(p, tmp_path / "out")
    with pytest.raises(UserError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", ["header", "data"])
def test_truncated_gguf(tmp_path, keep):
    p = tmp_path / "m.gguf"
    write_tiny_gguf(p)
    data = p.read_bytes()
    cut = 200 if keep == "header" else len(data) - 100  # inside the metadata / inside the last tensor
    p.write_bytes(data[:cut])
    with pytest.raises(UserError, match=r"truncated"):
        convert_gguf(p, tmp_path / "out")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.gguf"]


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match=r"unsupported architecture 'mamba'.*llama, qwen2") as e:
        convert_gguf(p, tmp_path / "out")
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_undequantizable_quant_type(tmp_path):
    p = tmp_path / "m.gguf"
    write_tiny_gguf(p, bad_quant_tensor="blk.1.ffn_up.weight")
    # premise: gguf itself really cannot dequantize Q8_1
    with pytest.raises(NotImplementedError):
        gguf.quants.dequantize(np.zeros((1, 40), np.uint8), gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(
        UserError, match=r"blk\.1\.ffn_up\.weight has quant type Q8_1, which gguf cannot dequantize"
    ) as e:
        convert_gguf(p, tmp_path / "out")
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.gguf"]  # nothing half-written


def test_unsupported_tokenizer_pre(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", pre="some-new-pre")
    with pytest.raises(UserError, match="pre-tokenizer 'some-new-pre'"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# slow: the two real models vs transformers' GGUF loader
# ----------------------------------------------------------------------------------------------

_GGUF_NAME = {SMOL: "smollm2.gguf", QWEN: "qwen2.5-coder.gguf"}


def _need(name):
    if any(importlib.util.find_spec(pkg) is None for pkg, _ in BUNDLED[name]["files"]):
        pytest.skip(f"{name} not installed: {BUNDLED[name]['pip']}")


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    env = os.environ.get("REFREEKV_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("refreekv-cache")


@pytest.fixture(scope="session")
def converted(cache_root):
    """name -> converted dir (via ensure_bundled, once per session)."""
    done = {}

    def get(name):
        _need(name)
        if name not in done:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("REFREEKV_CACHE", str(cache_root))
                done[name] = ensure_bundled(name)
        return done[name]

    return get


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory):
    """A dir holding each real model as one GGUF file, for transformers (Qwen re-concatenated)."""
    d = tmp_path_factory.mktemp("gguf")
    made = set()

    def get(name):
        _need(name)
        if name not in made:
            files = bundled_files(name)
            if len(files) == 1:
                (d / _GGUF_NAME[name]).symlink_to(files[0])
            else:
                wb.write_bundled_gguf(name, d / _GGUF_NAME[name])
            made.add(name)
        return d, _GGUF_NAME[name]

    return get


MODELS_MD = {  # the published facts of the two bundled checkpoints (their model cards and GGUF metadata)
    SMOL: dict(
        model_type="llama",
        num_hidden_layers=30,
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        intermediate_size=1536,
        rope_theta=1e5,
        tie_word_embeddings=True,
        vocab_size=49152,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
    ),
    QWEN: dict(
        model_type="qwen2",
        num_hidden_layers=24,
        hidden_size=896,
        num_attention_heads=14,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=4864,
        rope_theta=1e6,
        tie_word_embeddings=False,
        vocab_size=151936,
        max_position_embeddings=32768,
        eos_token_id=151645,
        use_sliding_window=False,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", [SMOL, QWEN])
def test_real_config_matches_models_md(converted, name):
    out = converted(name)
    cfg = json.loads((out / "config.json").read_text())
    for k, v in MODELS_MD[name].items():
        assert cfg[k] == v, k
    assert cfg["architectures"] == [
        {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg["model_type"]]
    ]
    assert cfg["torch_dtype"] == "float32" and "rope_parameters" not in cfg
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["eos_token"] == "<|im_end|>"
    assert tcfg["pad_token"] == {SMOL: "<|im_end|>", QWEN: "<|endoftext|>"}[name]
    assert "<|im_start|>" in tcfg["chat_template"]
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == cfg["vocab_size"]
    if name == QWEN:
        assert tok.token_to_id("[PAD151935]") == 151935  # filler entries keep their ids
        assert tok.token_to_id("<|endoftext|>") == 151643


@pytest.mark.slow
@pytest.mark.parametrize("name", [SMOL, QWEN])
def test_real_weights_match_transformers(converted, gguf_dir, name):
    from transformers import AutoModelForCausalLM

    out = converted(name)
    d, fname = gguf_dir(name)
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=fname, dtype=torch.float32)
    ref_sd = ref.state_dict()
    cfg = json.loads((out / "config.json").read_text())
    max_diff = 0.0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        expected = set(ref_sd) - ({"lm_head.weight"} if cfg["tie_word_embeddings"] else set())
        assert keys == expected
        for k in sorted(keys):
            ours = f.get_tensor(k)
            assert ours.dtype == torch.float32 and ours.shape == ref_sd[k].shape, k
            max_diff = max(max_diff, (ours - ref_sd[k]).abs().max().item())
        if cfg["tie_word_embeddings"]:
            assert torch.equal(ref_sd["lm_head.weight"], f.get_tensor("model.embed_tokens.weight"))
    print(f"\n{name}: {len(keys)} tensors, max |ours - transformers| = {max_diff:g}")
    assert max_diff <= 1e-6

    # our config.json is one transformers loads into the same model: same logits
    ids = torch.tensor([[1, 504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30]])
    with torch.no_grad():
        ref_logits = ref(ids).logits
    del ref, ref_sd
    gc.collect()
    mine = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        my_logits = mine(ids).logits
    del mine
    gc.collect()
    assert torch.allclose(my_logits, ref_logits, atol=1e-4, rtol=1e-4), (my_logits - ref_logits).abs().max()


TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 3.14, isn't it?",
    "12345",
    " 12345 and 2024-11-22 at 09:30",
    'def reverse_string(s):\n    """Reverse s."""\n    return s[::-1]\n\n\tif x:\n\t\tpass\n',
    "café naïve 日本語 🚀 Ünïcödé — “quotes”",
    (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "  leading spaces\r\n\r\ntrailing   ",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", [SMOL, QWEN])
def test_real_tokenizer_matches_transformers(converted, gguf_dir, name):
    from transformers import AutoTokenizer

    out = converted(name)
    d, fname = gguf_dir(name)
    ref = AutoTokenizer.from_pretrained(d, gguf_file=fname)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ids == ref.encode(text), text  # neither adds a BOS
        assert ours.decode(ids, skip_special_tokens=False) == text
    # the chat-template text: <|im_start|>/<|im_end|> are single special ids
    ids = ours.encode(TEXTS[5]).ids
    start, end = ours.token_to_id("<|im_start|>"), ours.token_to_id("<|im_end|>")
    assert ids.count(start) == 3 and ids.count(end) == 2
    assert end == json.loads((out / "config.json").read_text())["eos_token_id"]
    assert "<|im_start|>" not in ours.decode(ids, skip_special_tokens=True)
    # and transformers loads our tokenizer dir, with our special-token strings
    mine = AutoTokenizer.from_pretrained(out)
    assert mine.eos_token == "<|im_end|>" and mine.encode(TEXTS[0]) == ours.encode(TEXTS[0]).ids
    chat = mine.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    # Where we deliberately differ from transformers' GGUF tokenizer, which ignores `tokenizer.ggml.pre`
    # "smollm" (plain GPT-2 split) and leaves out Qwen2's NFC normalizer. We follow llama.cpp and the
    # models' own tokenizer.json instead.
    if name == SMOL:  # numerics stand alone, so " ½" is "Ġ" + "Â½", not "ĠÂ" + "½"
        assert [ours.id_to_token(i) for i in ours.encode(" ½").ids] == ["Ġ", "Â½"]
        assert ref.convert_ids_to_tokens(ref.encode(" ½")) == ["ĠÂ", "½"]
    else:  # NFC: a decomposed é encodes like the composed one
        assert ours.encode("cafe\u0301").ids == ours.encode("caf\u00e9").ids == ref.encode("caf\u00e9")


@pytest.mark.slow
def test_ensure_bundled_uses_cache(converted, cache_root, monkeypatch):
    out = converted(SMOL)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("REFREEKV_CACHE", str(cache_root))
    monkeypatch.setattr(wb, "convert_gguf", lambda *a: pytest.fail("reconverted a complete cache"))
    assert ensure_bundled(SMOL) == out == cache_root / SMOL
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(cache_root.glob(".*")), "temp files left in the cache dir"
