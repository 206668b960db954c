"""The decode projections at small batch on a GPU: cuBLAS (F.linear, what the compiled decode step
calls by default), F.linear compiled with max-autotune (Inductor's Triton templates), and
engine/kernels/gemv.py's Triton split-K GEMV over a sweep of its tile sizes, on the Qwen2.5-7B shapes,
bf16 (--dtype), CUDA-graph replays.

    python -m bench.gemv --json out.json

Each case is first checked against a float64 F.linear (relative error). GB/s counts each weight
byte read once; the copy bandwidth (bytes read + written by a 1 GiB device copy) is the ceiling.
The last table is the sum over one decoder layer's four projections times 28 layers plus the LM
head, i.e. the weight-streaming part of one decode step, per implementation: which to make the
default (engine/kernels/gemv.py's BLOCK_N, BLOCK_K, TARGET_PROGRAMS) is read off it.
"""

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

from bench.common import copy_bandwidth
from bench.speed.attention import bench
from engine.kernels import gemv as gm

DIM, LAYERS = 3584, 28
SHAPES = {
    "qkv": (4608, DIM),
    "o": (DIM, DIM),
    "gate_up": (2 * 18944, DIM),
    "down": (DIM, 18944),
    "lm_head": (152064, DIM),
}
PER_STEP = {"qkv": LAYERS, "o": LAYERS, "gate_up": LAYERS, "down": LAYERS, "lm_head": 1}
CONFIGS = [
    (bn, bk, t)
    for bn, bk, t in itertools.product((32, 64, 128), (64, 128, 256), (132, 264, 528))
    if bn * bk <= 16384
]


def rel_err(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.gemv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json")
    p.add_argument("--rows", default="1,4,16", help="decode batch sizes (rows of x), each <= 16")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--no-autotune", action="store_true", help="skip the max-autotune compile (minutes)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench.gemv needs CUDA", file=sys.stderr)
        return 2
    rows_list = [int(r) for r in a.rows.split(",")]
    if any(not 1 <= r <= gm.ROWS for r in rows_list):
        print(f"error: --rows must be between 1 and {gm.ROWS}", file=sys.stderr)
        return 2
    dt = getattr(torch, a.dtype)
    copy = copy_bandwidth("cuda", 1024) / 1e9  # GB/s, read + write
    gen = torch.Generator(device="cuda").manual_seed(0)
    # one program per shape and row count (15 by default): none falls back to eager
    torch._dynamo.config.recompile_limit = 64
    tuned = (
        None if a.no_autotune else torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
    )
    out = []
    for (name, (N, K)), M in itertools.product(SHAPES.items(), rows_list):
        w = (torch.randn(N, K, device="cuda", generator=gen) * 0.02).to(dt)
        x = torch.randn(M, K, device="cuda", generator=gen).to(dt)
        ref = F.linear(x.double(), w.double())
        gbps = lambda ms: N * K * w.element_size() / ms / 1e6  # noqa: E731
        row = dict(shape=name, N=N, K=K, rows=M, cublas_err=rel_err(F.linear(x, w), ref))
        row["cublas_ms"] = bench(lambda: F.linear(x, w))
        if tuned is not None:
            row["autotune_err"] = rel_err(tuned(x, w), ref)
            row["autotune_ms"] = bench(lambda: tuned(x, w))
        best = None
        for bn, bk, t in CONFIGS:
            err = rel_err(gm.gemv(x, w, None, bn, bk, t), ref)
            if not err < 1e-2:
                raise SystemExit(
                    f"error: gemv {name} rows {M} tiles {bn}x{bk} target {t}: relative error {err:.2e}"
                )
            ms = bench(lambda: gm.gemv(x, w, None, bn, bk, t))
            row[f"gemv_{bn}x{bk}_t{t}_ms"] = ms
            if best is None or ms < best[0]:
                best = (ms, f"{bn}x{bk} t{t}", err)
        row["gemv_default_ms"] = row[f"gemv_{gm.BLOCK_N}x{gm.BLOCK_K}_t{gm.TARGET_PROGRAMS}_ms"]
        row["gemv_best_ms"], row["gemv_best"], row["gemv_best_err"] = best
        for k in ("cublas", "autotune", "gemv_default", "gemv_best"):
            if f"{k}_ms" in row:
                row[f"{k}_GBps"] = gbps(row[f"{k}_ms"])
        out.append(row)
        print(
            f"{name} rows {M}: cuBLAS {row['cublas_GBps']:.0f} GB/s, "
            f"gemv best {row['gemv_best_GBps']:.0f} GB/s ({row['gemv_best']})",
            file=sys.stderr,
            flush=True,
        )

    # one decode step's weight streaming: per implementation, and per config across shapes
    steps = {}
    for M in rows_list:
        rs = [r for r in out if r["rows"] == M]
        tot = lambda key: sum(PER_STEP[r["shape"]] * r[key] for r in rs)  # noqa: E731
        cfg_tot = {f"{bn}x{bk} t{t}": tot(f"gemv_{bn}x{bk}_t{t}_ms") for bn, bk, t in CONFIGS}
        best_cfg = min(cfg_tot, key=cfg_tot.get)
        steps[M] = dict(
            cublas_ms=tot("cublas_ms"),
            autotune_ms=tot("autotune_ms") if tuned else None,
            gemv_default_ms=tot("gemv_default_ms"),
            gemv_one_config=best_cfg,
            gemv_one_config_ms=cfg_tot[best_cfg],
            gemv_per_shape_best_ms=tot("gemv_best_ms"),
        )
    wbytes = sum(PER_STEP[s] * N * K * dt.itemsize for s, (N, K) in SHAPES.items())
    res = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        copy_GBps=copy,
        rows=out,
        step={str(k): v for k, v in steps.items()},
        step_weight_bytes=wbytes,
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(f"{res['device']}, copy bandwidth {copy:.0f} GB/s (read + write); GB/s per projection:")
    print("| shape | rows | cuBLAS | max-autotune | gemv default | gemv best (tiles, target) |")
    print("|---|---|---|---|---|---|")
    for r in out:
        at = f"{r['autotune_GBps']:.0f}" if "autotune_GBps" in r else "-"
        print(
            f"| {r['shape']} {r['N']}x{r['K']} | {r['rows']} | {r['cublas_GBps']:.0f} | {at} | "
            f"{r['gemv_default_GBps']:.0f} | {r['gemv_best_GBps']:.0f} ({r['gemv_best']}) |"
        )
    floor = wbytes / copy / 1e6  # ms: weights read once at the copy's rate (issue 11's floor)
    print(
        f"\nOne decode step's projections ({wbytes / 1e9:.2f} GB of weights; "
        f"floor {floor:.2f} ms at the copy rate):"
    )
    print(
        "| rows | cuBLAS ms | max-autotune ms | gemv default ms "
        "| gemv best single config | gemv best per shape ms |"
    )
    print("|---|---|---|---|---|---|")
    for M, s in steps.items():
        at = f"{s['autotune_ms']:.3f}" if s["autotune_ms"] is not None else "-"
        print(
            f"| {M} | {s['cublas_ms']:.3f} | {at} | {s['gemv_default_ms']:.3f} "
            f"| {s['gemv_one_config_ms']:.3f} ({s['gemv_one_config']}) | {s['gemv_per_shape_best_ms']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
