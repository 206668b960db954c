"""Tensor parallelism through torch.distributed (NCCL on GPUs, gloo on CPUs), as gpt-fast's tp.py.

    torchrun --nproc-per-node 2 -m engine.generate --model ... --prompt ...
    python -m engine.generate --tp 2 --model ... --prompt ...          # spawns the ranks itself

Each rank loads its shard of the weights (weights/shard.py) and holds the KV pages of its own KV
heads and its rows of the LM head; the output and down projections end with one all-reduce each,
the split LM head with one all-gather of the logits. Everything the host decides
is decided identically on every rank: tokens are broadcast from rank 0, page shortages and free
pages are all-reduced (on a CPU group, so no decision waits for the GPU stream), and the pruning
probe is gathered so that every policy sees all heads and plans exactly as on one process.
"""

import datetime
import os

import torch
import torch.distributed as dist

from weights.errors import UserError

TIMEOUT_S = int(os.environ.get("REFREEKV_TP_TIMEOUT", "300"))  # a rank that hangs ends the others after this


class TP:
    """This process's place in the tensor-parallel group (rank 0 of 1 when there is none)."""

    def __init__(self, rank: int = 0, world: int = 1, cpu_group=None, on: bool = False):
        self.rank, self.world, self.cpu_group = rank, world, cpu_group
        self.on = on  # in a process group (torchrun, --tp): collectives run, also with a single rank

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (functional collective: traceable by torch.compile)."""
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(x, "sum", dist.group.WORLD)

    def host_max(self, v: int) -> int:
        t = torch.tensor([v], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(t)

    def host_min(self, v: int) -> int:
        return -self.host_max(-v)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's copy of t on every rank (chosen tokens: ranks never diverge)."""
        dist.broadcast(t, 0)
        return t

    def gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's t concatenated along dim, in rank order: the probe's query heads, the split LM
        head's logits (functional collective: traceable by torch.compile)."""
        import torch.distributed._functional_collectives as funcol

        # the new name, where torch has it
        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
        return gather(t.contiguous(), dim % t.dim(), dist.group.WORLD)

    def errors(self, msg: str | None) -> list[str]:
        """Every rank's error message (None where it had none), on every rank."""
        out = [None] * self.world
        dist.all_gather_object(out, msg, group=self.cpu_group)
        return [f"rank {r}: {m}" for r, m in enumerate(out) if m is not None]


def init(tp: int | None, device: str | None) -> TP:
    """Join the group torchrun (or --tp) started; no group: a single process."""
    if "WORLD_SIZE" not in os.environ:
        if tp is not None and tp > 1:
            raise UserError(
                f"--tp {tp} needs {tp} ranks: run it through torchrun --nproc-per-node {tp}, or let "
                "engine.generate spawn them"
            )
        return TP()
    world = int(os.environ["WORLD_SIZE"])
    if tp is not None and tp != world:
        raise UserError(f"--tp {tp} but {world} ranks were started (WORLD_SIZE)")
    if not dist.is_initialized():
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if cuda:
            here, n = int(os.environ.get("LOCAL_WORLD_SIZE", world)), torch.cuda.device_count()
            if here > n:  # checked on every rank before any waits for the others: all exit, rank 0 says why
                raise UserError(
                    f"{here} ranks on this machine need a GPU each, but it has {n}: start at most {n}, "
                    "or pass --device cpu"
                )
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    cpu = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return TP(dist.get_rank(), dist.get_world_size(), cpu, on=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, **extra) -> dict:
    """The environment of rank `rank` of `world` on this machine (what torchrun would set)."""
    return dict(
        os.environ,
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **extra,
    )


def spawn(argv: list[str], n: int, module: str = "engine.generate") -> int:
    """Run `python -m module argv` as n ranks on this machine (gloo/NCCL over localhost). SIGINT and
    SIGTERM go to rank 0, which ends the others in its own way (a server stops its followers)."""
    import subprocess
    import sys

    port = free_port()
    procs = []
    for r in range(n):
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", module, *argv],
                env=rank_env(r, n, port),
                stdout=None if r == 0 else subprocess.DEVNULL,
                stderr=None if r == 0 else subprocess.DEVNULL,
            )
        )
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _: procs[0].send_signal(s))
    codes = [p.wait() for p in procs]
    return codes[0] or max(codes)
