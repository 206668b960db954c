"""bench/quality/cli.py end to end on a tiny random checkpoint (byte tokenizer, no chat template), its
fidelity scoring against a direct computation, and its scoring and task helpers."""

import json
from pathlib import Path

import pytest
import torch

from bench.quality import cli as quality
from bench.quality import metrics as quality_metrics
from bench.quality import tasks as quality_tasks

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers import write_tiny

    return write_tiny("llama", tmp_path_factory.mktemp("qb") / "tiny")


def test_pipeline_writes_tables_json_plots(tiny, tmp_path):
    results_md = ROOT / "bench" / "RESULTS.md"
    before = results_md.read_bytes() if results_md.exists() else None
    md, out = tmp_path / "RESULTS.md", tmp_path / "out"
    argv = [
        "--model",
        str(tiny),
        "--families",
        "code,arithmetic",
        "--n",
        "2",
        "--batch",
        "2",
        "--prompt-tokens",
        "80",
        "--fidelity-tokens",
        "6",
        "--max-new-tokens",
        "6",
        "--policies",
        "full,refreekv,streaming,snapkv,no-such",
        "--budgets",
        "0.5,0.2",
        "--sweep",
        "0.001,0.01,0.1",
        "--variant",
        'refreekv {"rows": 2}',
        "--out",
        str(out),
        "--results-md",
        str(md),
        "--quiet",
    ]
    assert quality.main(argv) == 0
    assert quality.main(argv) == 0  # a second run appends a section, never rewrites

    res = json.loads((out / "quality-tiny-code-arithmetic.json").read_text())
    assert res["config"]["families"] == ["code", "arithmetic"]
    assert any("no-such" in x for x in res["notes"]) and any("chat template" in x for x in res["notes"])
    labels = [p["label"] for p in res["policies"]]
    assert labels[0] == "full" and "refreekv T=0.01" in labels and "refreekv T=0.1" in labels
    assert "streaming 50%" in labels and "snapkv 20%" in labels and "refreekv rows=2" in labels
    for fam in ("code", "arithmetic"):
        r = res["results"][fam]
        assert r["full"]["budget"] == 1.0 and r["full"]["n"] == 2 and r["full"]["evicted"] == 0
        assert 0 < r["streaming 20%"]["evicted"] < 1
        assert abs(r["streaming 50%"]["budget"] - 0.5) < 0.02 and abs(r["snapkv 20%"]["budget"] - 0.2) < 0.03
        for label in labels:
            assert 0 <= r[label]["score"] <= 100 and 0 < r[label]["budget"] <= 1
            assert len(r[label]["kept_per_layer"]) == 3
        # monotone in T: a larger threshold never keeps more
        assert (
            r["refreekv T=0.001"]["budget"] >= r["refreekv T=0.01"]["budget"] >= r["refreekv T=0.1"]["budget"]
        )
        assert len(res["samples"][fam]) == 2
    assert res["results"]["code"]["full"]["score"] == 100 and res["results"]["code"]["full"]["kl"] == 0
    for s in res["samples"]["arithmetic"]:
        assert s["answer"].lstrip("-").isdigit()
        assert s["by_policy"]["full"]["agree"] == 100

    text = md.read_text()
    assert text.startswith("# Benchmark results") and text.count("# Benchmark results") == 1
    assert text.count("## Quality: tiny") == 2
    assert "| code (top-1 agree %) |" in text and "| arithmetic (accuracy %) |" in text
    assert "T=0.001" in text and "streaming 20%" in text and "--results-md" in text
    for p in res["plots"]:
        data = Path(p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert len(res["plots"]) == 2
    assert (results_md.read_bytes() if results_md.exists() else None) == before


def test_fidelity_scores_equal_a_direct_computation(tiny):
    """The bench's teacher-forced scores (fan-out, logits hook) equal top-1 / KL / NLL computed
    directly from each policy's logits captured in a run of its own."""
    import math

    import refreekv
    from bench.quality.metrics import Fidelity
    from engine.engine import Engine
    from engine.sampling import Sampling

    eng = Engine(str(tiny), device="cpu")
    g = torch.Generator().manual_seed(1)
    ctx, tgt = (
        torch.randint(0, 256, (2, 50), generator=g).tolist(),
        torch.randint(0, 256, (2, 10), generator=g).tolist(),
    )
    policies = [
        refreekv.make("full"),
        refreekv.make("streaming", budget=0.3),
        refreekv.make("refreekv", threshold=0.3),
    ]
    score = Fidelity(tgt, full_j=0)
    eng.generate(ctx, policies, Sampling(max_new_tokens=10), forced=tgt, on_logits=score)
    lps = []
    for p in policies:
        got = {}
        eng.generate(
            ctx,
            p,
            Sampling(max_new_tokens=10),
            forced=tgt,
            on_logits=lambda keys, steps, lg: got.update(
                {(k, s): r.double().log_softmax(-1) for k, s, r in zip(keys, steps, lg)}
            ),
        )
        lps.append(got)
    for i in range(2):
        for j in range(3):
            nll = sum(-lps[j][i, t][tgt[i][t]].item() for t in range(10)) / 10
            kl = (
                sum((lps[0][i, t].exp() * (lps[0][i, t] - lps[j][i, t])).sum().item() for t in range(10)) / 10
            )
            top1 = sum(float(lps[0][i, t].argmax() == lps[j][i, t].argmax()) for t in range(10)) / 10
            m = score.result(i, j)
            assert math.isclose(m["nll"], nll, abs_tol=1e-4) and math.isclose(m["kl"], kl, abs_tol=1e-4)
            assert m["top1"] == top1
    assert any(score.result(i, 1)["kl"] > 1e-3 for i in range(2))  # the budget policy really differs


def test_scoring_helpers():
    assert quality_metrics.lcs(list("abcbdab"), list("bdcaba")) == 4
    assert quality_metrics.rouge_l("the cat sat", "the cat sat") == 1.0
    assert quality_metrics.rouge_l("", "") == 1.0 and quality_metrics.rouge_l("a", "") == 0.0
    assert (
        abs(
            quality_metrics.rouge_l("the cat sat on the mat", "the cat on a mat")
            - 2 * 0.8 * (4 / 6) / (0.8 + 4 / 6)
        )
        < 1e-9
    )
    assert quality_metrics.last_int("3 + 4 = 7. The answer is 1,234.") == "1234"
    assert quality_metrics.last_int("no digits") is None
    for seed in range(50):  # generated word problems: the worked steps end at the answer
        import random

        q, steps, ans, _ = quality_tasks.word_problem(random.Random(seed))
        assert quality_metrics.last_int(steps[-1]) == str(ans) and ans >= 0
