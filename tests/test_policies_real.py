"""Every KV policy end to end from the CLI on the bundled real model and a long real prompt."""

import json

import pytest
from conftest import real_text
from helpers import run_cli

import refreekv
from engine.sampling import Sampling

ARGS = {  # through the CLI: its flags for a policy's knob
    "full": [],
    "snapkv": ["--budget", "512"],
    "streaming": ["--budget", "1.0"],
}
KNOBS = {  # through the engine, the prompt prefilled once for all of them (fan-out)
    "refreekv": {},
    "streaming": dict(budget=0.3),
    "h2o": dict(budget=0.3),
    "refreekv-h2o": dict(threshold=0.01),
    "refreekv-topp": dict(rows=8),
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
    assert set(ARGS) | set(KNOBS) <= set(refreekv.available())


@pytest.mark.slow
def test_each_method_runs_on_a_long_real_prompt(smollm_gen, long_prompt, tmp_path):
    cli_runs = {kv: cli(long_prompt, tmp_path, kv, *args) for kv, args in ARGS.items()}
    eng = smollm_gen
    ids = eng.encode(long_prompt.read_text(), chat=True)
    policies = [refreekv.make(kv, **kw) for kv, kw in KNOBS.items()]
    fanned = eng.generate([ids], policies, Sampling(max_new_tokens=16))[0]
    stats = {kv: st for kv, (_, st) in cli_runs.items()}
    stats.update({f"{kv} (engine)": r.stats for kv, r in zip(KNOBS, fanned)})
    n = stats["full"]["prompt_tokens"]
    assert n >= 2000  # a few thousand tokens of real text
    for kv, st in stats.items():
        assert st["prompt_tokens"] == n and len(st["kept_per_layer"]) == 30 and st["new_tokens"] > 0, kv
    assert all(text.strip() for text, _ in cli_runs.values()) and all(r.text.strip() for r in fanned)
    assert stats["full"]["budget"] == 1.0
    assert stats["streaming (engine)"]["kept_per_layer"] == [-(-3 * n // 10)] * 30
    assert stats["snapkv"]["kept_per_layer"] == [512] * 30
    thresholded = ("refreekv (engine)", "refreekv-h2o (engine)", "refreekv-topp (engine)")
    assert all(0 < stats[kv]["budget"] < 1 for kv in thresholded)
    # streaming at budget 1.0 keeps everything and reproduces full exactly
    assert cli_runs["streaming"][0] == cli_runs["full"][0]
    assert stats["streaming"]["kept_per_layer"] == stats["full"]["kept_per_layer"]
