"""config.json parsing, checkpoint resolution (local / hub cache) and clear errors on bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from engine.model import load_model
from engine.rope import rope_inv_freq
from weights.config import load_config, parse_config
from weights.errors import UserError

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 96,
    "vocab_size": 100,
}


def test_hub_style_llama31_config():
    c = parse_config(
        {
            **BASE,
            "rope_theta": 500000.0,
            "eos_token_id": [128001, 128008, 128009],
            "bos_token_id": 128000,
            "max_position_embeddings": 131072,
            "tie_word_embeddings": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        }
    )
    assert (c.family, c.rope_theta, c.eos_ids, c.bos_id, c.tie_embeddings, c.head_dim) == (
        "llama",
        5e5,
        [128001, 128008, 128009],
        128000,
        True,
        16,
    )
    assert c.rope_scaling["factor"] == 8.0
    plain = parse_config({**BASE, "rope_theta": 500000.0})
    assert (rope_inv_freq(c) <= rope_inv_freq(plain)).all() and not torch.equal(
        rope_inv_freq(c), rope_inv_freq(plain)
    )


def test_transformers5_rope_parameters_and_family_quirks():
    c = parse_config({**BASE, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}})
    assert c.rope_theta == 1e6 and c.rope_scaling is None
    q = parse_config(
        {**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 131072, "use_sliding_window": False}
    )
    assert q.sliding_window is None and q.qkv_bias  # Qwen2.5 carries a window it does not use
    # transformers' rule: layers from max_window_layers on
    q = parse_config(
        {
            **BASE,
            "architectures": ["Qwen2ForCausalLM"],
            "sliding_window": 4096,
            "use_sliding_window": True,
            "max_window_layers": 1,
        }
    )
    assert q.sliding_window == 4096 and q.layer_windows == [None] + [4096] * (BASE["num_hidden_layers"] - 1)
    q = parse_config(
        {**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096, "use_sliding_window": True}
    )
    # default max_window_layers 28: no layer here
    assert q.sliding_window is None and not any(q.layer_windows)
    # Llama ignores it, as transformers does
    assert (
        parse_config({**BASE, "architectures": ["LlamaForCausalLM"], "sliding_window": 8}).layer_windows
        == [None] * BASE["num_hidden_layers"]
    )
    with pytest.raises(UserError, match="layer_types must list"):
        parse_config(
            {
                **BASE,
                "architectures": ["Qwen2ForCausalLM"],
                "sliding_window": 8,
                "use_sliding_window": True,
                "layer_types": ["full_attention"],
            }
        )
    m = parse_config(
        {**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 4096, "head_dim": 128}
    )
    # Mistral v0.1 window, Nemo's head_dim
    assert m.sliding_window == 4096 and m.head_dim == 128 and not m.qkv_bias


def test_unsupported_architecture_is_named():
    with pytest.raises(
        UserError,
        match=r"unsupported architecture GPT2LMHeadModel.*"
        r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
    ):
        parse_config({**BASE, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UserError, match="unsupported rope_scaling type 'longrope'"):
        parse_config({**BASE, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}})
    with pytest.raises(UserError, match="lacks required field 'hidden_size'"):
        parse_config({k: v for k, v in BASE.items() if k != "hidden_size"})


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json in"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_config(tmp_path)


@pytest.fixture
def sharded_copy(tiny_ckpts, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpts["qwen2", True], d)
    return d


def test_index_names_missing_shard(sharded_copy):
    shard = sorted(sharded_copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(UserError, match=f"names shard {shard.name} which is missing"):
        load_model(sharded_copy)


def test_truncated_shard(sharded_copy):
    shard = sorted(sharded_copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UserError, match=f"{shard.name}: corrupt or truncated safetensors file"):
        load_model(sharded_copy)


def test_wrong_shape_and_missing_tensor(tiny_ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpts["llama", False], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(
        UserError, match=r"tensor model\.layers\.\d+\.mlp\.\w+_proj\.weight has shape \(\d+, \d+\), expected"
    ):
        load_model(d)
    (d / "config.json").write_text(json.dumps(cfg))
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(
        UserError, match=r"lacks 1 tensor\(s\), e\.g\. model\.layers\.1\.self_attn\.k_proj\.weight"
    ):
        load_model(d)


def test_cli_bad_inputs_are_one_line_errors(tiny_ckpts, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "architectures": ["FalconForCausalLM"]}))
    cases = [
        (["--model", str(tmp_path), "--prompt", "hi"], "unsupported architecture FalconForCausalLM"),
        (["--model", str(tmp_path / "nope"), "--prompt", "hi"], "no such model directory"),
        (
            ["--model", str(tiny_ckpts["llama", False]), "--prompt", "hi", "--temperature", "-1"],
            "--temperature must be in [0, 100.0]",
        ),
        (["--model", str(tiny_ckpts["llama", False]), "--prompt", "   "], "empty prompt"),
        (
            [
                "--model",
                str(tiny_ckpts["llama", False]),
                "--prompt",
                "x" * 300,
                "--max-length",
                "200",
                "--max-new-tokens",
                "10",
            ],
            "prompt has 300 tokens but the context is 200 tokens",
        ),
    ]
    for args, msg in cases:
        r = run_cli(*args)
        assert r.returncode != 0 and msg in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def write_hub_cache(cache: Path, repo_id: str, src: Path):
    """huggingface_hub's own cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)


def test_hub_id_resolves_from_offline_cache(tiny_ckpts, tmp_path):
    write_hub_cache(tmp_path / "hub", "Qwen/Qwen2.5-7B", tiny_ckpts["qwen2", True])
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}
    r = run_cli("--model", "Qwen/Qwen2.5-7B", "--prompt", "hello", "--max-new-tokens", "4", "--raw", env=env)
    assert r.returncode == 0, r.stderr
    assert "[0123456789abcdef0123456789abcdef01234567]" in r.stderr and "KV budget" in r.stderr


def test_hub_id_not_cached_says_how_to_get_it(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HOME": str(tmp_path / "home")}
    r = run_cli("--model", "Qwen/Qwen2.5-7B", "--prompt", "hello", env=env)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: model Qwen/Qwen2.5-7B is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
        "on a connected machine run `hf download Qwen/Qwen2.5-7B` (and copy the cache to $HF_HOME), "
        "or pass a local directory"
    )


def test_more_bad_inputs_are_one_line_errors(tiny_ckpts, tmp_path, capsys):
    """Sampling, device, dtype, policy knobs, a directory without weights: exit 2 and one `error:` line."""
    from engine.generate import main

    tiny = str(tiny_ckpts["llama", False])
    shutil.copy(tiny_ckpts["llama", False] / "config.json", tmp_path / "config.json")
    shutil.copy(tiny_ckpts["llama", False] / "tokenizer.json", tmp_path / "tokenizer.json")
    cases = [
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-k", "-1"], "--top-k must be a whole number >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be a whole number >= 1"),
        (["--dtype", "float8"], "--dtype must be float32, bfloat16 or float16"),
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
        (["--system", "be brief"], "--system needs the chat template"),
        (["--kv-args", "[1]"], "--kv-args must be a JSON object"),
        (["--kv-args", "{"], "--kv-args is not valid JSON"),
        (["--kv-args", '{"protected": [-1]}'], "protected layers must be layer indices >= 0"),
        (["--kv", "snapkv", "--threshold", "0.1"], "KV policy 'snapkv' has no knob 'threshold'"),
        (
            ["--kv", "streaming", "--budget", "2.5"],
            "a budget > 1 is a token count and must be a whole number",
        ),
        (["--kv", "nope"], "unknown KV policy 'nope'"),
        (["--model", str(tmp_path)], f"no *.safetensors weights in {tmp_path}"),
        (["--kv-args", '{"include_sinks": "false"}'], "include_sinks must be true or false, got 'false'"),
        (["--kv-args", '{"protected": "01"}'], "protected must be a list of layer indices, got '01'"),
        (["--stats-json", str(tmp_path)], "is a directory: name a file"),
        (["--seed", str(2**70)], "--seed must be in [-2^63, 2^64)"),
    ]
    for args, msg in cases:
        argv = ["--model", tiny, "--prompt", "hi", "--max-new-tokens", "2", *args]
        assert main(argv) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err, (args, err)


def test_hub_unreachable_says_how_to_get_it(tmp_path):
    env = {
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_CACHE": str(tmp_path / "empty"),
        "HF_HOME": str(tmp_path / "home"),
    }
    r = run_cli("--model", "Qwen/Qwen2.5-7B", "--prompt", "hello", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "Qwen/Qwen2.5-7B is not in the local Hugging Face cache and the hub cannot be reached" in r.stderr


def test_hub_download_fetches_only_the_indexed_shards(tmp_path, monkeypatch):
    """Mistral repos hold consolidated.safetensors beside the HF shards: only the index's shards are
    fetched."""
    import huggingface_hub

    from weights import resolve

    calls = []

    def fake(repo_id, allow_patterns):
        calls.append(list(allow_patterns))
        if len(calls) == 1 and repo_id.startswith("mistralai/"):
            (tmp_path / "model.safetensors.index.json").write_text(
                json.dumps(
                    {
                        "weight_map": {
                            "a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors",
                            "c": "model-00001-of-00002.safetensors",
                        }
                    }
                )
            )
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve.resolve("mistralai/Mistral-7B-Instruct-v0.3") == tmp_path
    assert (
        not any("*" in p for p in calls[0])
        and "config.json" in calls[0]
        and "model.safetensors.index.json" in calls[0]
    )
    assert calls[1] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (tmp_path / "model.safetensors.index.json").unlink()
    calls.clear()
    resolve.resolve("org/unsharded")  # no index: the single-file checkpoint only
    assert calls[1] == ["model.safetensors"]


@pytest.mark.parametrize(
    "edit,msg",
    [
        (lambda c: [c], "must hold a JSON object, not list"),
        (lambda c: {**c, "num_attention_heads": 0}, "num_attention_heads must be >= 1"),
        (lambda c: {**c, "rope_scaling": "llama3"}, "rope_scaling must be an object"),
        (
            lambda c: {**c, "rope_scaling": {"rope_type": "llama3", "original_max_position_embeddings": 32}},
            "llama3 rope_scaling needs a positive number factor, got None",
        ),
        (
            lambda c: {
                **c,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": "8",
                    "original_max_position_embeddings": 32,
                },
            },
            "needs a positive number factor, got '8'",
        ),
        (
            lambda c: {
                **c,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "original_max_position_embeddings": "32",
                },
            },
            "original_max_position_embeddings must be a positive number, got '32'",
        ),
        (
            lambda c: {**c, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
            "unsupported rope_scaling type 'dynamic'",
        ),
        (lambda c: {**c, "architectures": "LlamaForCausalLM"}, "architectures must be a list"),
    ],
)
def test_malformed_config_is_one_error_before_loading(tiny_ckpts, tmp_path, capsys, edit, msg):
    """Each once a traceback (some only after the weights were loaded): now one line, exit 2."""
    from engine.generate import main

    src = tiny_ckpts["llama", False]
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(edit(json.loads((src / "config.json").read_text()))))
    assert main(["--model", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and msg in err and "\n" not in err, err


@pytest.mark.parametrize("gen", ['{"eos_token_id": "x"}', "[1, 2]"])
def test_malformed_generation_config_is_one_error(tiny_ckpts, tmp_path, gen):
    src = tiny_ckpts["llama", False]
    shutil.copy(src / "config.json", tmp_path / "config.json")
    (tmp_path / "generation_config.json").write_text(gen)
    with pytest.raises(UserError, match="eos_token_id must be a token id or a list of them"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "scaling,max_pos",
    [
        # Qwen2.5's long context
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072),
        (
            {
                "type": "yarn",
                "factor": 2.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 16,
                "mscale": 0.7,
                "mscale_all_dim": 1.0,
            },
            8192,
        ),
        ({"rope_type": "yarn", "factor": 8.0, "attention_factor": 1.3, "truncate": False}, 32768),
        ({"rope_type": "linear", "factor": 2.0}, 8192),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            131072,
        ),
    ],
)
def test_rope_scaling_equals_transformers(scaling, max_pos):
    """Inverse frequencies and the cos/sin factor against transformers' own RoPE initialisers on
    7B-sized heads."""
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine.rope import rope_attention_factor

    shape = dict(
        hidden_size=3584,
        num_attention_heads=28,
        num_key_value_heads=4,
        num_hidden_layers=2,
        intermediate_size=96,
        vocab_size=100,
        rope_theta=1e6,
        max_position_embeddings=max_pos,
    )
    hf = tf.Qwen2Config(**shape, rope_scaling=dict(scaling))
    want_inv, want_att = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf, "cpu")
    c = parse_config({"architectures": ["Qwen2ForCausalLM"], **shape, "rope_scaling": scaling})
    torch.testing.assert_close(rope_inv_freq(c), want_inv.float(), rtol=1e-6, atol=0)
    assert rope_attention_factor(c) == pytest.approx(want_att, rel=1e-12)


def test_rope_kind_named_by_type_and_the_context_it_reaches(tiny_ckpts):
    """rope_parameters naming its kind with "type" (transformers fills rope_type from it); YaRN and
    linear scaling extend the usable context as vLLM derives it; past it, one error."""
    from engine.engine import Engine

    shape = {**BASE, "architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 32768}
    c = parse_config(
        {
            **shape,
            "rope_parameters": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
                "rope_theta": 1e6,
            },
        }
    )
    assert c.rope_scaling["rope_type"] == "yarn" and c.rope_theta == 1e6 and c.context_limit == 131072
    assert (
        parse_config({**shape, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}).context_limit == 65536
    )
    assert parse_config(shape).context_limit == 32768
    path = tiny_ckpts["llama-linear", False]  # max_position_embeddings 512, linear factor 2
    assert Engine(str(path), device="cpu", max_length=1024, load=False).context == 1024
    # the stated length unless asked for more
    assert Engine(str(path), device="cpu", load=False).context == 512
    with pytest.raises(UserError, match="^max_length 1025 exceeds the model's 1024 positions"):
        Engine(str(path), device="cpu", max_length=1025, load=False)


def test_an_absent_sliding_window_is_transformers_default():
    import transformers as tf

    for arch, extra in (
        ("MistralForCausalLM", {}),
        ("Qwen2ForCausalLM", {"use_sliding_window": True, "max_window_layers": 0}),
    ):
        cfg = {**BASE, "architectures": [arch], **extra}
        hf = (tf.MistralConfig if arch.startswith("Mistral") else tf.Qwen2Config)(
            **{k: v for k, v in cfg.items() if k != "architectures"}
        )
        c = parse_config(cfg)
        assert (
            c.sliding_window == hf.sliding_window == 4096
            and c.layer_windows == [4096] * BASE["num_hidden_layers"]
        )
        assert parse_config({**cfg, "sliding_window": None}).sliding_window is None  # stated null: no window
