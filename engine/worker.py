"""The engine thread behind the server: the only code that touches the engine once it serves.

It drains a queue of new requests and aborts between steps, steps the core while anything runs
and blocks on the queue when idle; each request's updates go to the sink its HTTP handler gave
(called on this thread). Under tensor parallelism rank 0's worker shares what it applied with
the other ranks before every step, and `follow` is their loop. `prometheus` renders its figures.
"""

import itertools
import queue
import sys
import threading
import traceback
import uuid

from engine.openai_api import ApiError
from weights.errors import UserError

MAX_QUEUED = 1024  # sequences in the server at once (queued, waiting or running); the server's --max-queued


def internal_error(what: str, detail: str) -> ApiError:
    """A 500 whose body names an id, not the cause: the cause goes to the server's log under it."""
    eid = f"err-{uuid.uuid4().hex[:12]}"
    print(f"[{eid}] {what}: {detail}", file=sys.stderr, flush=True)
    return ApiError(f"{what} (error id {eid}: the server's log has the details)", status=500)


class Worker:
    """The engine thread: the only code that touches the engine once the server runs."""

    def __init__(self, eng, max_queued: int = MAX_QUEUED):
        self.eng, self.core = eng, eng.core
        self.inbox: queue.Queue = queue.Queue()
        self.sinks: dict = {}  # request id -> callable(update or ApiError), called on the engine thread
        self._ids = itertools.count(1)
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.stopping = False
        self.failures = 0  # steps that raised (every request then in flight failed with 500)
        # sequences reserved by HTTP handlers and not yet over: the bound behind 429
        self.max_queued, self.outstanding = max_queued, 0
        self._lock = threading.Lock()
        # what this iteration applied to the core (tensor parallel: shared with every rank)
        self.ops: list = []
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
        """Queue a job's choices (reserve() them first); sink(update or ApiError) runs on the
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
                    err = ApiError("the server is shutting down", status=503, kind="server_shutdown")
                    self._drop(rid)(err)
                self.ops.append(("stop",))
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
            err = internal_error("the engine failed", "".join(traceback.format_exception(e)))
            for rid in list(self.sinks):
                self._drop(rid)(err)
            self.core.reset()
            self.ops.append(("reset",))
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
            self.ops.append(("abort", rid))

    def _add(self, pairs, sink):
        for n, (rid, c) in enumerate(pairs):
            try:
                self.core.add_request(c.prompt, c.policy, c.sampling, rid=rid)
            except UserError as e:  # checked in the handler already: only what changed since
                for r, _ in pairs[:n]:
                    self._abort(r)
                    self._drop(r)
                self._release(len(pairs) - n)  # the ones never added
                sink(ApiError(str(e)))
                return
            self.ops.append(("add", rid, c.prompt, c.policy, c.sampling))
            self.sinks[rid] = sink

    def _metrics(self) -> dict:
        core, kv = self.core, self.core.kv
        t = core.totals
        return dict(
            running=core.running,
            waiting=core.waiting,
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


METRICS = [  # name, type, help, snapshot key
    ("refreekv_requests_running", "gauge", "Sequences in the running batch", "running"),
    ("refreekv_requests_waiting", "gauge", "Sequences waiting for admission", "waiting"),
    ("refreekv_kv_pages_used", "gauge", "KV pool pages in use", "pages_used"),
    ("refreekv_kv_pages_free", "gauge", "KV pool pages free", "pages_free"),
    ("refreekv_kv_pages_total", "gauge", "KV pool pages", "pages_total"),
    ("refreekv_preemptions_total", "counter", "Sequences preempted (pages ran out)", "preemptions"),
    ("refreekv_generation_tokens_total", "counter", "Tokens generated by finished sequences", "new_tokens"),
    ("refreekv_requests_total", "counter", "Sequences added", "requests"),
    (
        "refreekv_kv_budget_mean",
        "gauge",
        "Mean KV budget after pruning (kept / prompt) over admitted sequences",
        "budget_mean",
    ),
    ("refreekv_engine_steps_total", "counter", "Engine steps", "steps"),
    ("refreekv_engine_failures_total", "counter", "Engine steps that raised", "failures"),
]


def follow(eng):
    """A tensor-parallel rank other than 0: apply what rank 0's worker applied, step as it steps."""
    import torch.distributed as dist

    core = eng.core
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=eng.tp.cpu_group)
        for op in box[0]:
            if op[0] == "add":
                core.add_request(op[2], op[3], op[4], rid=op[1])
            elif op[0] == "abort":
                core.abort(op[1])
            elif op[0] == "reset":
                core.reset()
            else:
                return
        if core.busy():
            try:
                core.step()
            except Exception:  # noqa: BLE001 - rank 0 failed the same step and resets everyone
                core.reset()


def prometheus(snap: dict) -> str:
    lines = []
    for name, kind, help_, key in METRICS:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {snap[key]}"]
    return "\n".join(lines) + "\n"
