"""The engine thread behind the server: the only code that touches the engine once it serves.

It drains a queue of new requests and aborts between steps, steps the core while anything runs
and blocks on the queue when idle; each request's updates go to the sink its HTTP handler gave
(called on this thread). What it cannot serve it reports as a neutral Failure, which the HTTP
side turns into an error response. Under tensor parallelism rank 0's worker shares the operations
it applied with the other ranks before every step, and `follow` is their loop.
"""

import itertools
import queue
import threading
import traceback
from dataclasses import dataclass

from weights.errors import UserError

MAX_QUEUED = 1024  # sequences in the server at once (queued, waiting or running); the server's --max-queued


@dataclass
class Failure:
    """A request the engine thread could not serve: kind "invalid" (it no longer passes the engine's
    checks), "shutdown", or "engine" (a step failed; `detail` holds the traceback)."""

    kind: str
    message: str
    detail: str = ""


# the operations rank 0 applied before a step, in order (tensor parallel: every rank applies them)
@dataclass
class Add:
    rid: int
    prompt: list
    policy: object
    sampling: object


@dataclass
class Abort:
    rid: int


@dataclass
class Reset:
    pass


@dataclass
class Stop:
    pass


class Worker:
    """The engine thread: the only code that touches the engine once the server runs."""

    def __init__(self, eng, max_queued: int = MAX_QUEUED):
        self.eng, self.core = eng, eng.core
        self.inbox: queue.Queue = queue.Queue()
        self.sinks: dict = {}  # request id -> callable(Update or Failure), called on the engine thread
        self._ids = itertools.count(1)
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.stopping = False
        self.failures = 0  # steps that raised (every request then in flight failed with 500)
        # sequences reserved by HTTP handlers and not yet over: the bound behind 429
        self.max_queued, self.outstanding = max_queued, 0
        self._lock = threading.Lock()
        # what this iteration applied to the core (tensor parallel: shared with every rank)
        self.ops: list = []  # Add / Abort / Reset / Stop
        self.snapshot = self._metrics()

    def start(self):
        import torch

        self.threads = (
            torch.get_num_threads()
        )  # OpenMP's count is per thread: the engine thread takes the caller's
        self.thread.start()

    def reserve(self, k: int) -> bool:
        """Room for k more sequences (any thread)? If so they are counted until each ends."""
        with self._lock:
            if self.outstanding + k > self.max_queued:
                return False
            self.outstanding += k
            return True

    def _release(self, k: int = 1):
        with self._lock:
            self.outstanding -= k

    def submit(self, choices, sink) -> list[int]:
        """Queue a job's choices (reserve() them first); sink(Update or Failure) runs on the
        engine thread."""
        rids = [next(self._ids) for _ in choices]
        self.inbox.put(("add", list(zip(rids, choices)), sink))
        return rids

    def abort(self, rids):
        self.inbox.put(("abort", list(rids), None))

    def call(self, fn):
        """fn() on the engine thread, before anything queued after it; its result (or its error).
        The compile warm-up goes through here: torch.compile's CUDA graph trees are per thread, so
        graphs recorded on any other thread would be recorded again (in a second memory pool) here."""
        box: queue.Queue = queue.Queue(1)
        self.inbox.put(("call", fn, box.put))
        if not self.thread.is_alive():
            self.start()
        ok, value = box.get()
        if not ok:
            raise value
        return value

    def stop(self, timeout: float = 30.0):
        self.inbox.put(("stop", None, None))
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def _run(self):
        import torch

        torch.set_num_threads(self.threads)
        while True:
            items = []
            try:
                items.append(self.inbox.get(timeout=0.5) if not self.core.busy() else self.inbox.get_nowait())
                while True:
                    items.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            for kind, arg, sink in items:
                if kind == "stop":
                    self.stopping = True
                elif kind == "abort":
                    for rid in arg:
                        self._drop(rid)
                        self._abort(rid)
                elif kind == "call":
                    try:
                        sink((True, arg()))
                    except BaseException as e:  # noqa: BLE001 - the caller re-raises it
                        sink((False, e))
                else:
                    self._add(arg, sink)
            if self.stopping:  # whatever is still in flight is cancelled
                for rid in list(self.sinks):
                    self._abort(rid)
                    self._drop(rid)(Failure("shutdown", "the server is shutting down"))
                self.ops.append(Stop())
                self._share()
                self.snapshot = self._metrics()
                return
            self._share()
            if self.core.busy():
                self._step()
            self.snapshot = self._metrics()

    def _drop(self, rid):
        """A request is over for the server: its sink goes and its reservation with it."""
        sink = self.sinks.pop(rid, None)
        if sink is not None:
            self._release()
        return sink

    def _step(self):
        try:
            updates = self.core.step()
        except Exception as e:  # noqa: BLE001 - one failing step must not take the server down
            # no request's own failure gets here (policies, admission: engine/core.py): a device or
            # engine error fails the batch in flight, is logged, and the server goes on
            self.failures += 1
            err = Failure("engine", "the engine failed", "".join(traceback.format_exception(e)))
            for rid in list(self.sinks):
                self._drop(rid)(err)
            self.core.reset()
            self.ops.append(Reset())
            return
        for u in updates:
            sink = self.sinks.get(u.key)
            if sink is not None:
                if u.result is not None:
                    self._drop(u.key)
                sink(u)

    def _share(self):
        """Tensor parallel: every rank applies what rank 0 applied, in its order, before the same
        step (a heartbeat when there is nothing: the other ranks wait on it)."""
        if self.eng.tp.on:
            import torch.distributed as dist

            dist.broadcast_object_list([self.ops], src=0, group=self.eng.tp.cpu_group)
        self.ops = []

    def _abort(self, rid):
        if self.core.abort(rid):
            self.ops.append(Abort(rid))

    def _add(self, pairs, sink):
        for n, (rid, c) in enumerate(pairs):
            try:
                self.core.add_request(c.prompt, c.policy, c.sampling, rid=rid)
            except UserError as e:  # checked in the handler already: only what changed since
                for r, _ in pairs[:n]:
                    self._abort(r)
                    self._drop(r)
                self._release(len(pairs) - n)  # the ones never added
                sink(Failure("invalid", str(e)))
                return
            self.ops.append(Add(rid, c.prompt, c.policy, c.sampling))
            self.sinks[rid] = sink

    def _metrics(self) -> dict:
        core, kv = self.core, self.core.kv
        t = core.totals
        cache = kv.cache
        return dict(
            cache_pages=cache.cached_pages if cache else 0,
            cache_hit_tokens=cache.hit_tokens if cache else 0,
            cache_query_tokens=cache.query_tokens if cache else 0,
            cache_evictions=cache.evictions if cache else 0,
            running=core.running,
            waiting=core.waiting,
            prefill_pending=core.prefill_pending,
            pages_used=kv.used,
            pages_free=kv.n_free,
            pages_total=kv.n_pages,
            preemptions=core.sched.preemptions,
            new_tokens=t["new_tokens"],
            requests=t["requests"],
            budget_mean=t["budget_sum"] / t["budgets"] if t["budgets"] else 1.0,
            steps=core.steps,
            failures=self.failures,
            outstanding=self.outstanding,
        )


def follow(eng):
    """A tensor-parallel rank other than 0: apply what rank 0's worker applied, step as it steps."""
    import torch.distributed as dist

    core = eng.core
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=eng.tp.cpu_group)
        for op in box[0]:
            if isinstance(op, Add):
                core.add_request(op.prompt, op.policy, op.sampling, rid=op.rid)
            elif isinstance(op, Abort):
                core.abort(op.rid)
            elif isinstance(op, Reset):
                core.reset()
            else:
                return
        if core.busy():
            try:
                core.step()
            except Exception:  # noqa: BLE001 - rank 0 failed the same step and resets everyone
                core.reset()
