"""bench/quality.py end to end on a tiny random checkpoint (byte tokenizer, no chat template), plus
the pieces it builds on: its shared-prefill decode equals Generator.generate, its teacher forcing
equals one full-sequence prefill, and its scoring helpers."""
import json
from pathlib import Path

import pytest
import torch

from bench import quality

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers import write_tiny

    return write_tiny("llama", tmp_path_factory.mktemp("qb") / "tiny")


def test_pipeline_writes_tables_json_plots(tiny, tmp_path):
    results_md = ROOT / "bench" / "RESULTS.md"
    before = results_md.read_bytes() if results_md.exists() else None
    md, out = tmp_path / "RESULTS.md", tmp_path / "out"
    argv = ["--model", str(tiny), "--families", "code,arithmetic", "--n", "2", "--batch", "2", "--prompt-tokens", "80",
            "--fidelity-tokens", "6", "--max-new-tokens", "6", "--policies", "full,refreekv,streaming,snapkv,no-such",
            "--budgets", "0.5,0.2", "--sweep", "0.001,0.01,0.1", "--variant", 'refreekv {"rows": 2}', "--out", str(out), "--results-md", str(md), "--quiet"]
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
        assert r["refreekv T=0.001"]["budget"] >= r["refreekv T=0.01"]["budget"] >= r["refreekv T=0.1"]["budget"]
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


def _gen(tiny):
    from engine.generate import Generator

    return Generator(str(tiny), device="cpu")


@pytest.mark.parametrize("name,kw", [("refreekv", {"threshold": 0.05}), ("snapkv", {"budget": 0.3}),
                                     ("streaming", {"budget": 0.4}), ("full", {})])
def test_shared_prefill_greedy_equals_generator(tiny, name, kw):
    """One prefill with a wide probe, cloned per policy, decodes exactly as Generator.generate."""
    import refreekv
    from engine.generate import Sampling

    if name not in refreekv.available():
        pytest.skip(f"{name} not registered")
    g = _gen(tiny)
    torch.manual_seed(0)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (70, 41, 90)]
    pol = refreekv.make(name, **kw)
    want = g.generate(prompts, pol, Sampling(max_new_tokens=12))
    pf = quality.prefill(g, prompts, probe_rows=8, new_tokens=12)
    for _ in range(2):  # the shared prefill stays intact for the next policy
        kv, frac, _ = quality.pruned(g, pf, pol)
        got = quality.greedy(g, kv, pf.logits, 12, [])
        assert got == [r.tokens for r in want]
        for b, r in enumerate(want):
            assert abs(sum(frac[b]) / len(frac[b]) - r.stats["budget"]) < 0.02


def test_teacher_forcing_matches_one_prefill(tiny):
    """Full cache: decode-step log-probs over the real continuation equal a prefill of the whole text."""
    import refreekv

    g = _gen(tiny)
    torch.manual_seed(1)
    ctx, tgt = torch.randint(0, 256, (2, 50)), torch.randint(0, 256, (2, 10))
    pf = quality.prefill(g, ctx.tolist(), probe_rows=1, new_tokens=10)
    kv, _, _ = quality.pruned(g, pf, refreekv.make("full"))
    m, lp = quality.teacher_forced(g, kv, pf.logits, tgt, None)
    whole = quality.prefill(g, torch.cat([ctx, tgt], 1).tolist(), probe_rows=0, new_tokens=1)
    from engine.kv import RaggedKV
    c = g.config
    kv2 = RaggedKV(c.n_layers, 2, c.n_kv_heads, 61, c.head_dim, g.dtype, "cpu")
    logits, _ = g.model.prefill(torch.cat([ctx, tgt], 1), torch.tensor([60, 60]), kv2, probe_rows=0, all_logits=True)
    ref = torch.log_softmax(logits[:, 49:59], -1)
    assert torch.allclose(lp, ref, atol=1e-4)
    nll = -ref.gather(-1, tgt[..., None])[..., 0].mean(-1)
    assert torch.allclose(torch.tensor(m["nll"], dtype=torch.float32), nll, atol=1e-4)
    del whole
    # a pruned cache scored against that reference: agreement and KL are in range, KL(full||full) = 0
    m2, _ = quality.teacher_forced(g, quality.pruned(g, pf, refreekv.make("full"))[0], pf.logits, tgt, lp)
    assert m2["top1"] == [1.0, 1.0] and max(m2["kl"]) < 1e-6


def test_scoring_helpers():
    assert quality.lcs(list("abcbdab"), list("bdcaba")) == 4
    assert quality.rouge_l("the cat sat", "the cat sat") == 1.0
    assert quality.rouge_l("", "") == 1.0 and quality.rouge_l("a", "") == 0.0
    assert abs(quality.rouge_l("the cat sat on the mat", "the cat on a mat") - 2 * 0.8 * (4 / 6) / (0.8 + 4 / 6)) < 1e-9
    assert quality.last_int("3 + 4 = 7. The answer is 1,234.") == "1234"
    assert quality.last_int("no digits") is None
    for seed in range(50):  # generated word problems: the worked steps end at the answer
        import random

        q, steps, ans, _ = quality.word_problem(random.Random(seed))
        assert quality.last_int(steps[-1]) == str(ans) and ans >= 0


def test_insert_at_depth():
    hay = " ".join(f"Sentence number {i}." for i in range(100))
    for d in quality.DEPTHS:
        s = quality.insert_at(hay, d, "NEEDLE 12345.")
        assert abs(s.index("NEEDLE") / len(s) - d) < 0.05 and s.count("NEEDLE") == 1
