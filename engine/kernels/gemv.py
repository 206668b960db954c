"""Decode projections at small batch: y = x W^T + b for x [M, K] with M <= ROWS, in Triton.

At batch 1 a decode step is a stream of matrix-vector products: every weight byte is read once
per token, so the step is bound by memory bandwidth, and cuBLAS's GEMV kernels (what
`torch.compile` calls for `F.linear`) leave part of it unused on the 7B shapes (issue 11: 127-131
tok/s of a 213 tok/s floor on an H100). This kernel reads W in [BLOCK_N, BLOCK_K] tiles, every
row of x (up to ROWS, padded to a 16-row block for the tensor cores) multiplied against each tile
as it arrives, and splits K over programs where N alone gives too few (split-K): the partial sums
(fp32, one per split) are added by a second small sum, not by atomics, so the result does not
depend on the order programs finish (same tokens run to run).

Opt-in while it is unmeasured on a GPU: REFREEKV_GEMV=triton uses it in the decode step on CUDA
(and on the CPU under TRITON_INTERPRET=1, for tests). `bench/speed/gemv.py` times it against cuBLAS on
the Qwen2.5-7B projections and sweeps the tile sizes below.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ROWS = 16  # the most rows (sequences in the decode batch) it serves; more go to F.linear
BLOCK_N, BLOCK_K = 64, 128
TARGET_PROGRAMS = 264  # about two per SM of an H100: split K until the grid has that many programs


if triton is not None:

    @triton.jit
    def _gemv(
        X,
        W,
        P,
        M,
        N,
        K,
        k_per_split,
        stride_x,
        stride_w,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """One (tile of BLOCK_N outputs, split of K):
        P[split, m, n] = sum over the split's k of x[m, k] w[n, k]."""
        pn, split = tl.program_id(0), tl.program_id(1)
        n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        nm, mm = n < N, m < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        lo = split * k_per_split
        hi = tl.minimum(K, lo + k_per_split)
        kk = tl.arange(0, BLOCK_K)
        for k0 in range(lo, hi, BLOCK_K):
            k = k0 + kk
            km = k < hi
            w = tl.load(
                W + n[:, None].to(tl.int64) * stride_w + k[None, :], mask=nm[:, None] & km[None, :], other=0.0
            )
            x = tl.load(X + m[:, None] * stride_x + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        out = (split * M + m[:, None]).to(tl.int64) * N + n[None, :]
        tl.store(P + out, acc, mask=mm[:, None] & nm[None, :])


def splits_for(
    N: int, K: int, block_n: int = BLOCK_N, block_k: int = BLOCK_K, target: int = TARGET_PROGRAMS
) -> int:
    """How many ways K is split: enough programs to fill the GPU, each split at least 4 K-tiles."""
    tiles = -(-N // block_n)
    return max(1, min(-(-target // tiles), K // (4 * block_k)))


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_n: int = BLOCK_N,
    block_k: int = BLOCK_K,
    target: int = TARGET_PROGRAMS,
) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] with at most ROWS rows, weight [N, K] contiguous."""
    *lead, K = x.shape
    N = weight.shape[0]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if M > ROWS:  # one 16-row block per program: more rows would be left out
        return torch.nn.functional.linear(x, weight, bias)
    s = splits_for(N, K, block_n, block_k, target)
    per = -(-K // (s * block_k)) * block_k  # K per split, whole tiles
    s = -(-K // per)
    part = torch.empty(s, M, N, dtype=torch.float32, device=x.device)
    _gemv[(-(-N // block_n), s)](
        x2,
        weight,
        part,
        M,
        N,
        K,
        per,
        x2.stride(0),
        weight.stride(0),
        BLOCK_M=ROWS,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32,
    )
    y = part.sum(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*lead, N)


def use_gemv(device) -> bool:
    """REFREEKV_GEMV=triton: the kernel for the decode projections (CUDA, or the CPU under
    TRITON_INTERPRET=1 for tests); otherwise F.linear (cuBLAS)."""
    if triton is None or os.environ.get("REFREEKV_GEMV", "") != "triton":
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
