"""bench/load/throughput.py end to end on CPU with the tiny random shape: a workload larger than the
pool, a forced 25% budget against full, and transformers static batching of the same workload."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_workload_through_a_small_pool(tmp_path):
    out = tmp_path / "t.json"
    n, new = 10, 6
    args = [
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--requests",
        str(n),
        "--min-tokens",
        "40",
        "--max-tokens",
        "120",
        "--new-tokens",
        str(new),
        "--pool-tokens",
        "260",
        "--max-seqs",
        "8",
        "--budgets",
        "1,0.25",
        "--hf",
        "eager",
        "--hf-batch",
        "4",
        "--json",
        str(out),
    ]
    p = subprocess.run(
        [sys.executable, "-m", "bench.throughput", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(out.read_text())
    full, cut = res["rows"]
    assert (full["policy"], cut["policy"]) == ("full", "streaming 25%")
    assert full["mean_budget"] == 1 and abs(cut["mean_budget"] - 0.25) < 0.02
    lens = res["prompt_tokens"]
    assert len(lens) == n and all(40 <= x <= 120 for x in lens)
    for r in (full, cut):
        assert r["new_tokens"] == n * new and r["requests"] == n  # random weights: no EOS, every token made
        assert r["peak_pages"] <= r["pool_pages"] == res["pool_pages"]
    # the pool, not --max-seqs, is the limit
    assert full["admission_waits"] > 0 and full["peak_concurrent"] < n
    assert cut["pages_after_pruning"] < 0.4 * cut["pages_after_prefill"]
    assert full["pages_after_pruning"] == full["pages_after_prefill"]
    assert cut["peak_concurrent"] > full["peak_concurrent"]  # pruned pages went to other requests
    assert cut["steps"] < full["steps"]
    (hf,) = res["hf"]
    # filler rows of the last static batch not counted
    assert hf["requests"] == n and hf["new_tokens"] == n * new
    assert "| full |" in p.stdout and "transformers eager, batches of 4" in p.stdout
