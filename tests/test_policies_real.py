"""Every KV policy end to end from the CLI on the bundled real model and a long real prompt."""

import json

import pytest
from conftest import real_text
from helpers import run_cli

import refreekv

ARGS = {
    "full": [],
    "refreekv": [],
    "streaming": ["--budget", "0.3"],
    "h2o": ["--budget", "0.3"],
    "snapkv": ["--budget", "512"],
    "refreekv-h2o": ["--threshold", "0.01"],
    "refreekv-topp": ["--kv-args", '{"rows": 8}'],
}


@pytest.fixture(scope="module")
def long_prompt(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompt") / "doc.txt"
    p.write_text(real_text(11000, "bltin-code-objects") + "\n\nIn one sentence, what is this text about?")
    return p


def cli(prompt, tmp, kv, *extra):
    out = tmp / f"{kv}.json"
    r = run_cli(
        "--chat",
        "--prompt-file",
        str(prompt),
        "--kv",
        kv,
        "--max-new-tokens",
        "16",
        "--stats-json",
        str(out),
        *extra,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout, json.loads(out.read_text())


def test_registry_lists_every_method():
    assert set(ARGS) <= set(refreekv.available())


@pytest.mark.slow
def test_each_method_runs_on_a_long_real_prompt(smollm, long_prompt, tmp_path):
    results = {kv: cli(long_prompt, tmp_path, kv, *args) for kv, args in ARGS.items()}
    n = results["full"][1]["prompt_tokens"]
    assert n >= 2000  # a few thousand tokens of real text
    for kv, (text, st) in results.items():
        assert st["prompt_tokens"] == n and len(st["kept_per_layer"]) == 30 and st["new_tokens"] > 0, kv
        assert text.strip(), kv
    assert results["full"][1]["budget"] == 1.0
    assert results["streaming"][1]["kept_per_layer"] == [-(-3 * n // 10)] * 30
    assert results["snapkv"][1]["kept_per_layer"] == [512] * 30
    assert all(0 < results[kv][1]["budget"] < 1 for kv in ("refreekv", "refreekv-h2o", "refreekv-topp"))
    # streaming at budget 1.0 keeps everything and reproduces full exactly
    text, st = cli(long_prompt, tmp_path, "streaming", "--budget", "1.0")
    assert text == results["full"][0] and st["kept_per_layer"] == results["full"][1]["kept_per_layer"]
