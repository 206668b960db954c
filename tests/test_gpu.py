"""CUDA only (skipped cleanly without it): the compiled bf16 decode path (torch.compile,
mode="reduce-overhead": CUDA graphs) against eager on a tiny random model, ReFreeKV's kept counts
compiled vs eager, no recompiles across generations, and bench/speed.py end to end on the GPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import refreekv
from engine.generate import Generator, Sampling

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pair(tiny_ckpts):
    path = str(tiny_ckpts["qwen2", False])
    eager = Generator(path, device="cuda", dtype="bfloat16", compile=False)
    comp = Generator(path, device="cuda", dtype="bfloat16", compile=True)
    assert comp.compiled and not eager.compiled and comp.span_bucket > 1
    eager.eos = comp.eos = set()
    return eager, comp


def _prefill(g, ids, cap):
    from engine.kv import RaggedKV

    c = g.config  # the RoPE tables already cover the whole context (Generator builds them once)
    kv = RaggedKV(c.n_layers, 1, c.n_kv_heads, cap, c.head_dim, g.dtype, g.device)
    tokens = torch.tensor([ids], device=g.device)
    logits, _ = g.model.prefill(tokens, torch.tensor([len(ids)], device=g.device), kv, probe_rows=0)
    return logits, kv


@torch.no_grad()
def test_compiled_bf16_decode_matches_eager(pair):
    """Teacher-forced: both paths get the same tokens, so every step's logits must agree within bf16
    tolerance, and their greedy choice must agree unless the eager top two are a near tie."""
    eager, comp = pair
    ids = torch.randint(3, 256, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    steps, cap = 24, 37 + 24 + 1
    le, kv_e = _prefill(eager, ids, cap)
    lc, kv_c = _prefill(comp, ids, cap)
    torch.testing.assert_close(lc, le)  # prefill is eager in both: identical
    tok, live, agree = le.argmax(-1), len(ids), 0
    for step in range(steps):
        live += 1
        span_c = min(cap, -(-live // comp.span_bucket) * comp.span_bucket)
        a = eager.decode(tok, kv_e, live)
        b = comp.decode(tok, kv_c, [span_c] * comp.config.n_layers).clone()  # CUDA-graph output: copy before the next replay
        scale = a.abs().max().item()
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0.0, atol=0.05 * scale + 0.05, msg=lambda m: f"step {step}: {m}")
        ta, tb = a.argmax(-1), b.argmax(-1)
        if torch.equal(ta, tb):
            agree += 1
        else:
            top2 = a[0].topk(2).values
            assert (top2[0] - top2[1]).item() < 0.05 * scale + 0.05, f"step {step}: greedy differs without a near tie"
        tok = ta
    assert agree >= steps - 2
    assert torch.equal(kv_e.lengths, kv_c.lengths) and torch.equal(kv_e.next_pos, kv_c.next_pos)


def test_compiled_generate_first_tokens_and_refreekv_kept_counts(pair):
    eager, comp = pair
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (45, 20)]
    policy = refreekv.make("refreekv", threshold=0.2, protected=(0,))
    s = Sampling(max_new_tokens=16)
    got, ref = comp.generate(prompts, policy, s), eager.generate(prompts, policy, s)
    for x, y in zip(got, ref):
        assert x.stats["kept_per_head"] == y.stats["kept_per_head"]
        assert x.stats["kept_per_layer"] == y.stats["kept_per_layer"] and x.stats["budget"] == y.stats["budget"]
        assert x.tokens[:4] == y.tokens[:4]
    assert any(r.stats["budget"] < 1 for r in ref)  # the cut actually pruned something


def test_no_recompiles_across_generations_on_cuda(pair):
    """A fresh RaggedKV per generate (new addresses of mark_static_address'd buffers) and new prompt
    lengths must not recompile the decode graph (CUDA graphs may re-record; dynamo must not)."""
    from torch._dynamo.utils import counters

    _, comp = pair
    g = torch.Generator().manual_seed(2)
    s = Sampling(max_new_tokens=12)
    comp.generate([torch.randint(3, 256, (30,), generator=g).tolist()], refreekv.make("full"), s)  # warm
    counters.clear()
    for n in (33, 50):
        comp.generate([torch.randint(3, 256, (n,), generator=g).tolist()], refreekv.make("full"), s)
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
    assert not counters["recompiles"]
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_speed_bench_tiny_on_cuda(tmp_path):
    """bench/speed.py on the GPU: compiled decode, transformers eager and static + compile."""
    out = tmp_path / "speed.json"
    p = subprocess.run([sys.executable, "-m", "bench.speed", "--tiny", "--device", "cuda", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, p.stderr[-6000:]
    res = json.loads(out.read_text())
    assert res["errors"] == [] and res["meta"]["compiled"] is True and res["meta"]["dtype"] == "bfloat16"
    assert {h["mode"] for h in res["hf"]} == {"eager", "static-compile"}
    assert res["meta"]["parity_max_abs_logit_diff"] < 0.5  # bf16, same weights
    for r in res["speed"] + res["scaling"]["rows"] + res["batch"]:
        assert r["graphs_compiled_measured"] == 0, r  # the measured run replays what the warm-up compiled
        assert r["decode_ms_median"] > 0 and r["peak_mem_bytes"] > 0
    assert all(r["cudagraph_skips"] == 0 for r in res["speed"]), [r["cudagraph_skips"] for r in res["speed"]]
    assert res["floor"]["copy_GBps"] > 100
