"""torch.compile'd prefill, pruning and decode under continuous batching: the same tokens as eager,
and no recompilation once warmed up, across prompt lengths, budgets, batch sizes and preemptions."""

import pytest
import torch

import refreekv
from engine.engine import Engine
from engine.kv import page_bytes
from engine.sampling import Sampling


@pytest.fixture(scope="module")
def pair(tiny_ckpts):
    from weights.config import load_config

    path = str(tiny_ckpts["qwen2", False])
    c = load_config(path)
    # 40 pages per row
    gib = 40 * c.n_layers * c.n_kv_heads * page_bytes(4, c.head_dim, torch.float32) / 2**30
    eager, comp = (
        Engine(path, device="cpu", compile=x, kv_memory=gib, max_seqs=4, page_size=4) for x in (False, True)
    )
    eager.eos = comp.eos = set()
    return eager, comp


def prompts(seed, lens):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lens]


def test_compiled_generation_matches_eager_and_never_recompiles(pair):
    from torch._dynamo.utils import counters

    eager, comp = pair
    s = Sampling(max_new_tokens=24)
    full, cut = refreekv.make("full"), refreekv.make("refreekv", threshold=0.2, protected=(0,))
    snap = refreekv.make("snapkv", budget=0.4)
    # warm up each policy (its probe width): batches and prefills of 1 and of more
    for p in (full, cut, snap):
        comp.generate(prompts(0, (30,)), p, s)
        comp.generate(prompts(1, (30, 17, 22)), p, s)
    counters.clear()
    # new lengths; more than the pool holds: queueing and preemption
    work = prompts(2, (41, 9, 33, 60, 12, 27))
    # a new budget is no new program, nor are re-plans during decoding (they run outside the step)
    decoding = (
        refreekv.make("refreekv", threshold=0.2, protected=(0,), interval=5),
        refreekv.make("snapkv", budget=0.25, interval=7, on_pressure=True),
    )
    preempted = 0
    for p in (cut, refreekv.make("snapkv", budget=0.25), full, *decoding):
        got, ref = comp.generate(work, p, s), eager.generate(work, p, s)
        assert [r.tokens for r in got] == [r.tokens for r in ref]
        assert [r.stats["kept_per_head"] for r in got] == [r.stats["kept_per_head"] for r in ref]
        assert [r.stats.get("budget_trace") for r in got] == [r.stats.get("budget_trace") for r in ref]
        preempted += comp.stats["preemptions"]
        if p.interval:
            assert all(r.stats["replans"] >= (24 - 1) // p.interval for r in got)
    assert preempted > 0 and comp.stats["admission_waits"] > 0
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
    assert not counters["recompiles"]


@pytest.mark.parametrize("context", [2, 3, 4, 6])
def test_warmup_fits_a_short_context(tiny_ckpts, context):
    """The warm-up's own requests fit any context that can hold a request at all (it asked for 3
    new tokens after 2 prompt tokens, so --max-length 4 failed). Eager here: the sizes, not the compiler."""
    eng = Engine(
        str(tiny_ckpts["llama", False]), device="cpu", max_length=context, kv_memory=0.01, page_size=4
    )
    eng.compiled = True  # warm-up's requests run; the steps stay eager
    assert eng.warmup(refreekv.make("full")) >= 0
    out = eng.generate([[5] * (context - 1)], refreekv.make("full"), Sampling(max_new_tokens=1))[0]
    assert len(out.tokens) <= 1
