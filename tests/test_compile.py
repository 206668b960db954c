"""torch.compile'd prefill, pruning and decode: same tokens as eager, no recompilation once warmed up."""
import pytest
import torch

import refreekv
from engine.engine import Engine
from engine.sampling import Sampling


@pytest.fixture(scope="module")
def pair(tiny_ckpts):
    path = str(tiny_ckpts["qwen2", False])
    eager, comp = Engine(path, device="cpu"), Engine(path, device="cpu", compile=True)
    eager.eos = comp.eos = set()
    return eager, comp


def test_compiled_generation_matches_eager_and_never_recompiles(pair):
    from torch._dynamo.utils import counters

    eager, comp = pair
    g = torch.Generator().manual_seed(0)
    warm = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (30, 17)]
    s = Sampling(max_new_tokens=24)  # warm up decode with every layer's span equal (full cache) ...
    full = refreekv.make("full")
    assert [r.tokens for r in comp.generate(warm, full, s)] == [r.tokens for r in eager.generate(warm, full, s)]
    policy = refreekv.make("refreekv", threshold=0.2, protected=(0,))
    comp.generate(warm, policy, Sampling(max_new_tokens=1))  # ... prefill with a probe and ReFreeKV's pruning (no decode step)
    counters.clear()  # ... then new prompt lengths, and per-layer spans that differ (ReFreeKV prunes layers unequally)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (41, 9)]  # new lengths, longer spans
    s = Sampling(max_new_tokens=40)
    got, ref = comp.generate(prompts, policy, s), eager.generate(prompts, policy, s)
    assert [r.tokens for r in got] == [r.tokens for r in ref]
    assert [r.stats["kept_per_layer"] for r in got] == [r.stats["kept_per_layer"] for r in ref]
    assert len(set(got[0].stats["kept_per_layer"])) > 1
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
    assert not counters["recompiles"]
