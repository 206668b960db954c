"""The LM head at batch 1 under tensor parallelism: replicated (every rank multiplies by the whole
[vocab, dim] matrix, as engine/tp.py does) or split over the vocabulary (each rank 1/N of the rows,
then one all-gather of the logits), measured on this machine's CPUs with gloo.

    python -m bench.tp_head [--ranks 2] [--vocab 151936] [--dim 896]

Each rank runs with one thread (the ranks share the machine's cores, as they share nothing on
GPUs). Median of --steps steps after warm-up; the split's logits are checked against the whole
product. What it measures is the trade on this machine: the split reads 1/N of the head's bytes
and adds one all-gather of [1, vocab] floats per step.
"""

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank, world, port, vocab, dim, steps, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(vocab, dim, generator=g) * 0.02  # the same matrix on every rank
    x = torch.randn(1, dim, generator=g)
    part = vocab // world
    mine = w[rank * part : (rank + 1) * part].clone()

    def whole():
        return x @ w.T

    def split():
        y = x @ mine.T
        parts = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(parts, y)
        return torch.cat(parts, 1)

    err = (split() - whole()).abs().max().item()
    res = {}
    for name, fn in (("replicated", whole), ("split", split), ("replicated", whole), ("split", split)):
        ts = []
        for i in range(steps + 5):
            dist.barrier()
            t = time.perf_counter()
            fn()
            dist.barrier()  # the step ends when every rank has its logits
            if i >= 5:
                ts.append(time.perf_counter() - t)
        res.setdefault(name, []).append(statistics.median(ts) * 1e3)
    if rank == 0:
        out.put(dict(err=err, **res))
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.tp_head",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--vocab", type=int, default=151936, help="default: Qwen2.5's")
    p.add_argument("--dim", type=int, default=896, help="default: Qwen2.5-0.5B's")
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args(argv)
    if a.ranks < 2 or a.vocab % a.ranks:
        print("error: --ranks must be >= 2 and divide --vocab", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(
        _rank, args=(a.ranks, port, a.vocab, a.dim, a.steps, q), nprocs=a.ranks, start_method="spawn"
    )
    r = q.get()
    head_mb = a.vocab * a.dim * 4 / 1e6
    print(
        f"LM head {a.vocab} x {a.dim} fp32 ({head_mb:.0f} MB), {a.ranks} gloo ranks of 1 thread on "
        f"{os.cpu_count()} cores, batch 1; split vs whole max |diff| {r['err']:.1e}"
    )
    print("| LM head | ms / step (two rounds, median each) | bytes read / rank |")
    print("|---|---|---|")
    print(f"| replicated | {r['replicated'][0]:.2f}, {r['replicated'][1]:.2f} | {head_mb:.0f} MB |")
    print(
        f"| split over the vocabulary + all-gather | {r['split'][0]:.2f}, {r['split'][1]:.2f} "
        f"| {head_mb / a.ranks:.0f} MB |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
