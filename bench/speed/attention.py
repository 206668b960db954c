"""Decode attention over the paged pool on a GPU: the Triton kernel against the PyTorch reference
(gather + masked SDPA) and against SDPA over a dense cache, Qwen2.5-7B heads (28 query / 4 KV,
head_dim 128), bf16, CUDA-graph replays.

    python -m bench.attention --json out.json

Rows: batch 1 at 512 / 8k / 32k live tokens; batch 16 x 4,096 at 100 / 50 / 25% budget (each
row keeps that share, the dense cache still holds 4,096); page sizes at batch 16 x 4k. GB/s counts
the live K and V bytes read once; the copy bandwidth (bytes read + written by a 1 GiB device copy)
is the ceiling. Each case is first checked against a float64 reference (relative error).
"""

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from bench.common import copy_bandwidth
from engine.kernels.attention import paged_decode_torch, paged_decode_triton

H, HKV, D = 28, 4, 128


def bench(fn) -> float:
    """Median ms of CUDA-graph replays of fn."""
    import triton

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=50, rep=300, return_mode="median")


def case(B, live, cap, ps, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    P = -(-cap // ps)
    pages = B * HKV * P
    table = (torch.randperm(pages, device="cuda", generator=gen) + 1).view(B, HKV, P).int()  # scattered pages
    k = torch.randn(pages + 1, ps, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(pages + 1, ps, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    pos = torch.zeros(pages + 1, ps, dtype=torch.int32, device="cuda")
    lengths = torch.full((B, HKV), live, dtype=torch.int32, device="cuda")
    q = torch.randn(B, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    return q, k, v, pos, table, lengths, lengths.amax(1).long()


def run(label, B, live, cap, ps, copy_gbps):
    args = case(B, live, cap, ps)
    q, k, v, pos, table, lengths, qpos = args
    ref = paged_decode_torch(*[t.double() if t.is_floating_point() else t for t in args])
    got = paged_decode_triton(*args).double()
    err = ((got - ref).norm() / ref.norm()).item()
    kv_bytes = B * HKV * live * D * 2 * 2
    t_kernel = bench(lambda: paged_decode_triton(*args))
    span = -(-live // ps)
    t_ref = bench(lambda: paged_decode_torch(*args, span=span))
    # a dense cache of the full capacity
    dk = torch.randn(B, HKV, cap, D, device="cuda", dtype=torch.bfloat16)
    dv = torch.randn_like(dk)
    t_sdpa = bench(lambda: F.scaled_dot_product_attention(q[:, :, None], dk, dv, enable_gqa=True))
    gbps = kv_bytes / t_kernel / 1e6
    return dict(
        case=label,
        batch=B,
        live=live,
        capacity=cap,
        page_size=ps,
        rel_err=err,
        kernel_ms=t_kernel,
        reference_ms=t_ref,
        dense_sdpa_ms=t_sdpa,
        kernel_GBps=gbps,
        pct_copy=100 * gbps / copy_gbps,
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.attention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench.attention needs CUDA", file=sys.stderr)
        return 2
    copy = copy_bandwidth("cuda", 1024) / 1e9  # GB/s, read + write
    rows = [run(f"B1 {n}", 1, n, n, 16, copy) for n in (512, 8192, 32768)]
    rows += [run(f"B16 4k {int(100 * f)}%", 16, int(4096 * f), 4096, 16, copy) for f in (1.0, 0.5, 0.25)]
    rows += [run(f"B16 4k ps{ps}", 16, 4096, 4096, ps, copy) for ps in (8, 32, 64)]
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_GBps=copy, rows=rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(f"{res['device']}, copy bandwidth {copy:.0f} GB/s (read + write)")
    print("| case | rel err | kernel ms | GB/s | % copy | reference ms | dense SDPA ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['rel_err']:.1e} | {r['kernel_ms']:.4f} | {r['kernel_GBps']:.0f} "
            f"| {r['pct_copy']:.0f} | {r['reference_ms']:.4f} | {r['dense_sdpa_ms']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
