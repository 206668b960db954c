"""engine/kernels/gemv.py: the Triton GEMV of the decode projections (run on the CPU under
TRITON_INTERPRET=1, which conftest sets without CUDA) against float64 F.linear, for drawn shapes
that are not multiples of the tiles, K split several ways, with and without bias; and the engine's
decode through it gives the tokens of the F.linear path."""

import pytest
import torch
import torch.nn.functional as F
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import refreekv
from engine.kernels import gemv as gm

pytestmark = pytest.mark.skipif(gm.triton is None, reason="triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=examples(25), deadline=None)
@given(
    st.integers(1, gm.ROWS),
    st.integers(1, 150),
    st.integers(1, 300),
    st.booleans(),
    st.sampled_from([16, 32]),
    st.sampled_from([16, 32]),
    st.sampled_from([1, 8, 64]),
    st.integers(0, 2**31 - 1),
)
def test_gemv_equals_linear(M, N, K, bias, block_n, block_k, target, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, 1, K + 3, generator=g)[..., 3:]  # a strided view, as a slice of the residual stream
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    y = gm.gemv(x.to(DEV), w.to(DEV), None if b is None else b.to(DEV), block_n, block_k, target).cpu()
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == (M, 1, N) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, atol=1e-4 * K**0.5, rtol=1e-5)


def test_splits_cover_k_and_fill_the_grid():
    # a 7B down projection (N 3584, K 18944): 56 column tiles, K split until ~TARGET programs
    s = gm.splits_for(3584, 18944)
    assert 56 * s >= gm.TARGET_PROGRAMS and 18944 // s >= 4 * gm.BLOCK_K
    assert gm.splits_for(37888, 3584) == 1  # gate/up: 592 tiles already fill an H100
    assert gm.splits_for(100, 64) == 1  # K shorter than four tiles is never split


def test_more_rows_than_the_kernel_serves_go_to_linear():
    x, w = torch.randn(gm.ROWS + 1, 40), torch.randn(24, 40)
    torch.testing.assert_close(gm.gemv(x, w), F.linear(x, w))


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="CPU interpreter path (triton picks compiled or interpreted at "
    "import); on CUDA test_compiled_cuda_decode_through_the_kernel covers it",
)
def test_engine_decode_through_the_kernel_gives_the_linear_tokens(tiny_ckpts, monkeypatch):
    """qwen2 (q/k/v biases): every decode projection and the LM head go through the kernel, and
    the greedy tokens equal the F.linear engine's (fp32)."""
    from engine.engine import Engine
    from engine.sampling import Sampling

    path = str(tiny_ckpts["qwen2", False])
    prompts = [[5, 9, 33, 2, 71, 8, 14], [100, 3, 7]]
    ref = Engine(path, device="cpu", kv_memory=0.01, page_size=4)
    ref.eos = set()
    want = [r.tokens for r in ref.generate(prompts, refreekv.make("full"), Sampling(max_new_tokens=6))]

    monkeypatch.setenv("REFREEKV_GEMV", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    eng = Engine(path, device="cpu", kv_memory=0.01, page_size=4)
    assert eng.model.gemv is gm.gemv
    calls = []
    eng.model.gemv = lambda x, w, b: calls.append(w.shape) or gm.gemv(x, w, b)
    eng.eos = set()
    got = [r.tokens for r in eng.generate(prompts, refreekv.make("full"), Sampling(max_new_tokens=6))]
    assert got == want
    c = eng.config
    per_step = 4 * c.n_layers + 1  # qkv, o, gate/up, down per layer, and the LM head
    assert len(calls) == 5 * per_step  # 5 decode steps after the prefill's token, none at prefill
    assert (c.vocab_size, c.dim) in calls


def test_choice(monkeypatch):
    monkeypatch.delenv("REFREEKV_GEMV", raising=False)
    assert not gm.use_gemv("cuda")
    monkeypatch.setenv("REFREEKV_GEMV", "triton")
    assert gm.use_gemv("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not gm.use_gemv("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N,K", [(4608, 3584), (3584, 18944)])
@pytest.mark.parametrize("M", [1, 5, 16])
def test_gemv_bf16_at_7b_shapes(N, K, M):
    g = torch.Generator(device="cuda").manual_seed(M)
    w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).bfloat16()
    x, b = (
        torch.randn(M, K, device="cuda", generator=g).bfloat16(),
        torch.randn(N, device="cuda", generator=g).bfloat16(),
    )
    ref = F.linear(x.double(), w.double(), b.double())
    y = gm.gemv(x, w, b)
    assert y.dtype == torch.bfloat16 and ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_cuda_decode_through_the_kernel(tiny_ckpts, monkeypatch):
    """The kernel inside the compiled CUDA-graph decode step: the F.linear engine's tokens (fp32),
    batch buckets 1..8 recorded once, no recompiles on a second round of new prompts."""
    from engine.engine import Engine
    from engine.sampling import Sampling

    path = str(tiny_ckpts["llama", False])
    g = torch.Generator().manual_seed(3)
    rounds = [
        [torch.randint(3, 256, (n,), generator=g).tolist() for n in lens]
        for lens in ((9, 30, 17), (40, 5, 22))
    ]
    ref = Engine(path, device="cuda", dtype="float32", compile=False, kv_memory=0.05, page_size=4)
    ref.eos = set()
    monkeypatch.setenv("REFREEKV_GEMV", "triton")
    eng = Engine(path, device="cuda", dtype="float32", compile=True, kv_memory=0.05, page_size=4)
    assert eng.model.gemv is gm.gemv
    eng.eos = set()
    s = Sampling(max_new_tokens=12)
    for i, prompts in enumerate(rounds):
        if i == 1:
            torch._dynamo.utils.counters.clear()
        want = [r.tokens for r in ref.generate(prompts, refreekv.make("full"), s)]
        assert [r.tokens for r in eng.generate(prompts, refreekv.make("full"), s)] == want
    assert not torch._dynamo.utils.counters["stats"].get("unique_graphs"), dict(
        torch._dynamo.utils.counters["stats"]
    )
