"""bench/speed/cli.py end to end on CPU with the tiny shape (every section through Engine.generate,
transformers eager on the same weights), plus its formulas checked against the published 7B anchor."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import common
from bench.speed import cli as speed

ROOT = Path(__file__).resolve().parent.parent

OURS_ROW = {
    "engine",
    "policy",
    "batch",
    "prompt",
    "new_tokens",
    "prefill_ms",
    "prefill_flops",
    "prefill_tflops",
    "prefill_tflops_exact",
    "prune_ms",
    "decode_ms_median",
    "decode_ms_mean",
    "decode_tok_s",
    "wall_s",
    "kv_budget",
    "pages_after_prefill",
    "pages_after_pruning",
    "peak_concurrent",
    "peak_mem_bytes",
    "peak_mem_gib",
    "warmup_s",
    "compile_warmup_s",
    "compiled",
    "graphs_compiled_warmup",
    "graphs_compiled_measured",
    "cudagraph_skips",
}
HF_ROW = {
    "engine",
    "mode",
    "batch",
    "prompt",
    "new_tokens",
    "prefill_ms",
    "prefill_flops",
    "prefill_tflops",
    "prefill_tflops_exact",
    "decode_ms_median",
    "decode_tok_s",
    "decode_tok_s_anchor",
    "total_s",
    "peak_mem_bytes",
    "peak_mem_gib",
    "warmup_s",
    "kv_budget",
    "parity_max_abs_logit_diff",
    "tokens_agree_prefix",
    "graphs_compiled_warmup",
    "graphs_compiled_measured",
    "cudagraph_skips",
}
FLOOR = {
    "copy_GBps",
    "weight_bytes_per_token",
    "floor_ms",
    "floor_tok_s",
    "gptfast_model_bytes",
    "params",
    "ref_prompt",
    "ref_policy",
    "ours_decode_ms",
    "ours_tok_s",
    "ours_pct_of_floor",
    "bandwidth_efficiency_pct",
    "achieved_GBps",
    "achieved_GBps_e2e",
}
META = {
    "date",
    "device",
    "device_name",
    "torch",
    "cuda",
    "transformers",
    "commit",
    "command",
    "model",
    "dtype",
    "compiled",
    "page_size",
    "pool_pages",
    "params",
    "sections",
    "config",
    "hf_weights",
    "parity_max_abs_logit_diff",
    "decode_projections",
    "attention",
}


def run_bench(args, tmp_path, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny matmuls: threads only add contention on a shared box
    return subprocess.run(
        [sys.executable, "-m", "bench.speed", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_tiny_end_to_end_cpu(tmp_path):
    out, md = tmp_path / "speed.json", tmp_path / "RESULTS.md"
    md.write_text("# results\n\nsomeone else's section\n")
    repo_md = ROOT / "bench" / "RESULTS.md"
    before = repo_md.read_bytes() if repo_md.exists() else None
    args = ["--tiny", "--device", "cpu", "--json", str(out), "--results-md", str(md), "--commit", "abc1234"]
    p = run_bench(args, tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["errors"] == []

    m = res["meta"]
    assert META <= set(m), META - set(m)
    assert m["commit"] == "abc1234" and m["device"] == "cpu" and m["compiled"] is False
    assert m["decode_projections"] == "F.linear" and m["attention"] == "torch"
    assert m["command"] == "python -m bench.speed " + " ".join(args)
    assert 0.8e6 < m["params"] < 2e6  # ~1M-parameter Qwen2 shape
    assert m["parity_max_abs_logit_diff"] < 1e-3  # transformers reads our very weights

    new = speed.DEFAULTS["tiny"]["new_tokens"]
    lens = speed.DEFAULTS["tiny"]["prompt_lens"]
    assert [(r["policy"], r["prompt"]) for r in res["speed"]] == [
        (p, n) for n in lens for p in ("full", "refreekv T=0.01")
    ]
    for r in res["speed"]:
        assert OURS_ROW <= set(r), OURS_ROW - set(r)
        assert "_tokens" not in r
        assert r["batch"] == 1 and r["new_tokens"] == new
        assert r["prefill_ms"] > 0 and r["decode_ms_median"] > 0 and r["decode_tok_s"] > 0
        assert 0 < r["kv_budget"] <= 1 and r["peak_mem_bytes"] > 0
        assert r["pages_after_pruning"] <= r["pages_after_prefill"]
    assert all(r["kv_budget"] == 1 for r in res["speed"] if r["policy"] == "full")

    bs = speed.DEFAULTS["tiny"]["batches"]
    bn = speed.DEFAULTS["tiny"]["batch_prompt"]
    # no compile on CPU
    assert [(h["mode"], h["batch"], h["prompt"]) for h in res["hf"]] == [("eager", 1, n) for n in lens] + [
        ("eager", B, bn) for B in bs
    ]
    for h in res["hf"]:
        assert HF_ROW <= set(h), HF_ROW - set(h)
        assert h["new_tokens"] == new and h["decode_tok_s"] > 0 and h["decode_tok_s_anchor"] > 0
        assert h["tokens_agree_prefix"] == new  # fp32, same weights: the same greedy tokens as our full KV
    assert {(q["batch"], q["prompt"], q["ours"]) for q in res["ratios"]} >= {(1, n, "full") for n in lens}

    f = res["floor"]
    assert FLOOR <= set(f), FLOOR - set(f)
    assert f["ref_policy"] == "full" and f["ref_prompt"] == min(lens) and f["ours_decode_ms"] > 0

    s = res["scaling"]
    assert [r["prompt"] for r in s["rows"]] == speed.DEFAULTS["tiny"]["scaling_lens"]
    assert all(r["policy"] == "full" and OURS_ROW <= set(r) for r in s["rows"])

    got = [(r["batch"], r["policy"]) for r in res["batch"]]
    assert got == [(B, p) for B in bs for p in ("full", "streaming 50%", "streaming 25%")]
    for r in res["batch"]:
        assert OURS_ROW <= set(r) and r["prompt"] == bn and r["peak_concurrent"] == r["batch"]
        want = {"full": 1.0, "streaming 50%": 0.5, "streaming 25%": 0.25}[r["policy"]]
        assert r["kv_budget"] == pytest.approx(want, abs=1 / bn)
        assert r["pages_after_pruning"] < r["pages_after_prefill"] or want == 1.0

    pr = res["profile"]  # where a batch-1 step's CPU time goes: the profiler's own ops, ranked
    assert pr["prompt"] == min(lens) and pr["per_step_ms"] > 0 and 0 < len(pr["top"]) <= 15
    assert [t["ms"] for t in pr["top"]] == sorted((t["ms"] for t in pr["top"]), reverse=True)
    assert 0 < sum(t["share"] for t in pr["top"]) <= 1 + 1e-9 and any(
        "aten::" in t["name"] for t in pr["top"]
    )

    # stdout ends with the tables; the markdown file got one dated section appended, nothing rewritten
    assert (
        p.stdout.lstrip().startswith("**Ours, batch 1**")
        and "**Batched decode**" in p.stdout
        and "**Profile**" in p.stdout
    )
    text = md.read_text()
    assert text.startswith("# results\n\nsomeone else's section\n") and text.count("## Speed") == 1
    assert "python -m bench.speed --tiny" in text and "abc1234" in text and "| full | 1 | 24 |" in text
    assert (repo_md.read_bytes() if repo_md.exists() else None) == before


def test_sections_and_sizes_are_selectable(tmp_path):
    out = tmp_path / "s.json"
    p = run_bench(
        [
            "--tiny",
            "--device",
            "cpu",
            "--sections",
            "floor",
            "--prompt-lens",
            "20",
            "--new-tokens",
            "4",
            "--json",
            str(out),
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["speed"] == [] and res["hf"] == [] and res["batch"] == [] and res["scaling"] == {}
    assert res["floor"]["ref_prompt"] == 20 and res["floor"]["ours_decode_ms"] > 0  # its own reference run
    bad = run_bench(["--tiny", "--sections", "speed,nope"], tmp_path)
    assert bad.returncode == 2 and "choose from" in bad.stderr


def test_formulas_match_the_7b_anchor():
    """On the Qwen2.5-7B shape (built on the meta device, nothing allocated): 7.62 B parameters,
    14.1 GB read per token, and the prefill FLOP formula reproduces the anchor's 464 TFLOP/s."""
    from engine.model import Transformer
    from weights.config import parse_config

    c = parse_config(common.QWEN7B)
    with torch.device("meta"):
        m = Transformer(c).to(torch.bfloat16)
    assert sum(p.numel() for p in m.parameters()) == 7_615_616_512
    no_embed, body, head = common.param_counts(m)
    assert no_embed == 7_615_616_512 - 152064 * 3584 and head == 152064 * 3584 and body == no_embed - head
    wb = common.weight_bytes_per_token(m)
    assert wb == 2 * no_embed + 2 * 3584 and 14.1e9 < wb < 14.2e9
    assert common.gptfast_model_bytes(m) == 2 * no_embed
    anchor, exact = common.prefill_flops(m, c, 1, 8192)
    assert anchor == 2 * no_embed * 8192 + 4 * 28 * 28 * 128 * 8192**2 / 2
    assert 462 < anchor / 0.279 / 1e12 < 466  # "transformers prefill of 8192 tokens 279 ms (464 TFLOP/s)"
    assert exact == anchor - 2 * head * 8191
