"""The step-driven core: requests come and go while the engine runs.

    rid = core.add_request(prompt_ids, policy, sampling)   # queued; checked now, never later
    updates = core.step()                                  # one iteration of continuous batching
    core.abort(rid)                                        # its pages go back to the pool at once

Every driver is a loop around `step()`: `Engine.generate` (add all, step until idle; the CLI and
the benches), `engine/serve.py` (one thread owns the core; HTTP handlers only talk to queues) and
`engine/run_batch.py`. Nothing else touches the pool or the scheduler.

One step queues the next decode step of the running batch before it reads the previous step's
tokens back (the device never waits for the host; a sequence whose last token turns out to be EOS
costs one wasted row), then accepts those tokens (streaming, stop strings, EOS, limits), finishes
sequences (their pages go back at once), admits and prefills waiting requests whose prompts fit,
prunes them with their own policies, and hands out the pages the next step needs, preempting the
newest sequence when there are none. Sequences keep slots [0, n) of the pool in order; the tokens
of the next step are gathered into that order on the device.

Sampling is per request and vectorised over the batch (engine/sampling.py): a seeded request's
draws depend on its seed, its own logits and its token index only, never on its neighbours.
"""

import random
import time
from dataclasses import dataclass, field

import torch

import refreekv
from engine import prune
from engine.admit import prefill_prune
from engine.attention import pow2
from engine.sampling import Detok, Sampling, find_stop, sample_rows, stop_prefix
from engine.scheduler import Scheduler, Sequence
from weights.errors import UserError


@dataclass
class Result:
    tokens: list[int]
    text: str
    stats: dict
    finish_reason: str = "length"  # "stop" (EOS or a stop string), "length", "abort" or "error"
    # per token (an ending EOS included): (token, logprob, {token: logprob} of the top)
    logprobs: list | None = None
    # per prompt token: (token, logprob, top) (logprob, top None for the first)
    prompt_logprobs: list | None = None
    error: str | None = None


@dataclass
class Update:
    """What one step did to one sequence: tokens accepted and/or its end."""

    key: object  # the request id, or (id, fork) for a request with several policies
    full: str = ""  # the sequence's text as this step left it (a reference to it, never a copy)
    shown: int = 0  # how much of it may be shown (a possible stop string's prefix waits until it resolves)
    tokens: list[int] = field(default_factory=list)  # tokens accepted this step
    logprobs: list = field(default_factory=list)  # theirs, when the request asked for them
    prompt_logprobs: list | None = None  # with the sequence's first update, when asked for
    result: Result | None = None  # set once the sequence is done

    @property
    def text(self) -> str:
        """All text shown so far."""
        return self.full[: self.shown]

    def delta(self, since: int) -> str:
        """The text shown after the first `since` characters: a stream's next piece, in time
        proportional to the piece (not to the output)."""
        return self.full[since : self.shown]


class Core:
    def __init__(self, eng):
        self.eng = eng
        self.kv = eng.kv
        free = (lambda: eng.tp.host_min(eng.kv.n_free)) if eng.tp.on else None
        self.sched = Scheduler(eng.kv, eng.max_seqs, eng.max_prefill_tokens, free)
        self.sched.padded = not eng.packed_prefill
        self.sched.probe_fits = lambda rows, n, batch: eng.probe_bytes(rows, n, batch) <= eng.max_probe_bytes
        self.on_logits = None  # research hook: on_logits(keys, steps, logits [n, V])
        self.prefill_progress = None  # progress(layers_done, layers, prompt_tokens) during an eager prefill
        self._next_id = 0
        self._groups: dict[int, list[Sequence]] = {}  # live requests by id
        self.cur_seqs: list[Sequence] = []  # the running batch whose chosen tokens are `cur`
        self.cur = None
        self.cur_host = torch.empty(0, dtype=torch.long)
        self.ready = None
        self.updates: dict[int, Update] = {}
        self.steps = 0  # decode steps so far
        self.totals = dict(requests=0, new_tokens=0, budget_sum=0.0, budgets=0)  # since start (for /metrics)
        self.reset_workload()

    # --------------------------------------------------------------------------- requests
    def add_request(
        self,
        prompt: list[int],
        policy,
        sampling: Sampling,
        forced: list[int] | None = None,
        rid: int | None = None,
    ) -> int:
        """Queue a prompt (token ids) with its policy (or a list: one sequence per policy, each pruned
        by its own) and its sampling. Everything that could make it fail later is checked here:
        a UserError names what is wrong and nothing is queued."""
        eng = self.eng
        policies = list(policy) if isinstance(policy, (list, tuple)) else [policy]
        if not policies:
            raise UserError("no KV policy given")
        for p in policies:
            if not isinstance(p, refreekv.Policy):
                raise UserError(
                    f"policy must be a refreekv.Policy (e.g. refreekv.make({p!r})), got {type(p).__name__}"
                    if isinstance(p, str)
                    else f"policy must be a refreekv.Policy, got {type(p).__name__}"
                )
        V = eng.config.vocab_size
        if not prompt:
            raise UserError("the prompt is empty")
        for what, ids in (("the prompt", prompt), ("the forced tokens", forced or [])):
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V for t in ids):
                raise UserError(f"{what} holds a token id outside the vocabulary [0, {V})")
        eng.check_request(len(prompt), policies, sampling)
        if rid is None:
            rid = self._next_id
        if rid in self._groups:
            raise ValueError(f"request id {rid} is in use")
        self._next_id = max(self._next_id, rid + 1)
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        grp = []
        for j, pol in enumerate(policies):
            q = Sequence(rid, j, list(prompt), pol, list(forced or []))
            q.sampling, q.seed = sampling, seed % 2**64
            q.key = (rid, j) if len(policies) > 1 else rid
            q.detok, q.text, q.shown, q.lp = Detok(eng.tokenizer), "", 0, []
            q.logprobs = [] if sampling.logprobs is not None else None
            q.prompt_logprobs = None
            q.reason = "length"
            grp.append(q)
        self._groups[rid] = grp
        self.sched.add(grp)
        self.totals["requests"] += 1
        return rid

    def abort(self, rid: int) -> bool:
        """Drop a request now, wherever it is: a waiting one leaves the queue, a running one gives
        every page back. Its sequences end with finish reason "abort". False if it is not live."""
        grp = self._groups.get(rid)
        if grp is None:
            return False
        self.sched.drop(grp)
        running = any(q.slot >= 0 for q in grp)
        for q in grp:
            if q.done:  # a fork that already finished keeps its result
                continue
            if q.slot >= 0:
                self._final_stats(q)
                self.sched.finish(q)
            q.reason = "abort"
            self._end(q)
        if running and self.cur_seqs:  # slots moved: the next step's inputs follow their sequences
            if self.ready is not None:
                self.ready.synchronize()
            at = {id(q): i for i, q in enumerate(self.cur_seqs)}
            order = [at[id(q)] for q in self.sched.running]
            self.cur_seqs = list(self.sched.running)
            self.cur_host = self.cur_host[order]
            self.cur = self.cur[self.eng.dev_long(order)] if order else None
        return True

    @property
    def probe_rows(self) -> int:
        """At least this many probe rows for every admission (>= 1 adds evicted attention mass to
        the stats); the scheduler sizes each prefill batch's probe with it."""
        return self.sched.probe_rows

    @probe_rows.setter
    def probe_rows(self, rows: int):
        self.sched.probe_rows = rows

    def group(self, rid: int) -> list:
        """A live request's sequences (engine/scheduler.py's Sequence: tokens, stats so far)."""
        return self._groups[rid]

    def busy(self) -> bool:
        return self.sched.busy()

    @property
    def running(self) -> int:
        return len(self.sched.running)

    @property
    def waiting(self) -> int:
        return sum(len(g) for g in self.sched.waiting)

    def reset(self):
        """Forget every request and give every page back (after an error or an interrupt)."""
        self.kv.reset()
        self.sched.waiting.clear()
        self.sched.running.clear()
        self._groups.clear()
        self.updates = {}  # what the failed step had gathered goes with it
        self.cur_seqs, self.cur, self.ready = [], None, None

    def reset_workload(self):
        self.w = dict(
            t0=time.perf_counter(),
            steps=0,
            live_sum=0,
            peak_seqs=0,
            peak_pages=0,
            launches=[],
            pool_bound_steps=0,
            pool_bound_sum=0,
            preemptions0=self.sched.preemptions,
            waits0=self.sched.waits,
        )

    # ------------------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> list[Update]:
        """One iteration: queue a decode step, read the last one back, finish, admit, grow.
        Returns what happened to each sequence that produced tokens or ended."""
        if self.eng.cuda:
            with torch.cuda.device(self.eng.dev):
                self._step()
        else:
            self._step()
        out, self.updates = list(self.updates.values()), {}
        return out

    def _step(self):
        eng, sched, kv, w = self.eng, self.sched, self.kv, self.w
        cur_seqs = self.cur_seqs
        new = None
        live = [q.live for q in cur_seqs]  # all chosen: it only drains
        if any(live):  # queue the next step before reading the last one back
            n = len(cur_seqs)
            nb = pow2(n) if eng.cuda and eng.compiled else n
            cur = self.cur
            toks = cur if nb == n else torch.cat([cur, cur.new_zeros(nb - n)])
            # the PyTorch attention reads `span` pages; under CUDA graphs a changing host value would
            # re-record per span, so there it reads the whole table (a debugging path on GPUs)
            span = None if kv.triton or (eng.cuda and eng.compiled) else max(1, int(kv.h_pages[:, :n].max()))
            w["launches"].append(time.perf_counter())
            logits = eng._decode(eng.model, toks, kv, span)[:n]
            new = self.choose(logits, cur_seqs, live)
            self.steps += 1
            w["steps"] += 1
            w["live_sum"] += n
            if sched.waiting and n < sched.max_seqs:  # requests wait for pages: the pool is the limit
                w["pool_bound_steps"] += 1
                w["pool_bound_sum"] += n
        if cur_seqs:  # the tokens that step was fed: emit, stop, finish
            if self.ready is not None:
                self.ready.synchronize()
            for q, t in zip(cur_seqs, self.cur_host.tolist()):
                if not q.done and q.slot >= 0 and self.accept(q, t):
                    self.finish(q)
        due = prune.due(sched.running)  # decode-time re-plans (the rows as the step just queued leaves them)
        if due:
            prune.replan(self, due)
        # where each running sequence's next input is: `new` (the step just queued), then `firsts`
        index = {id(q): i for i, q in enumerate(cur_seqs)} if new is not None else {}
        batch = sched.admit()
        firsts = None
        if batch:
            try:
                firsts, admitted = prefill_prune(self, batch)
            except Exception as e:  # noqa: BLE001 - out of memory in the probe, a kernel, ...
                if eng.tp.on:  # the ranks must stay in step: the driver resets them all
                    raise
                self._fail_admission(batch, e)
                admitted = []
            sched.start(admitted)
            for q in admitted:
                prune.start(q)
            for i, q in enumerate(admitted):
                index[id(q)] = (0 if new is None else len(cur_seqs)) + i
            for q in admitted:
                # prompt scoring only, or its plan failed
                if q.sampling.max_new_tokens == 0 or q.reason == "error":
                    self.finish(q)
        elif not sched.running and sched.waiting:
            # add_request's check_request rules this out
            raise RuntimeError("scheduler stalled with an empty pool")
        while True:  # pages for the next step; the newest sequence makes room when there are none
            live = [q.live for q in sched.running]
            short = kv.shortage(live)
            if eng.tp.on:  # every rank preempts when any rank is short (ranks hold different heads)
                short = eng.tp.host_max(short)
            if short == 0:
                kv.grow(live)
                break
            pressed = prune.pressure_candidates(sched.running, kv.W)
            if pressed:  # pruning first, recomputation last
                freed = prune.replan(self, pressed, pressure=True)
                if eng.tp.on:
                    freed = eng.tp.host_max(freed)
                if freed > 0 or any(q.slot < 0 for q in pressed):
                    continue
            q = sched.preempt()
            q.lp = []  # chosen but never accepted: they are chosen again on replay
        kv.set_live(live)  # every step: slots change hands as sequences finish, move and arrive
        w["peak_seqs"] = max(w["peak_seqs"], len(sched.running))
        w["peak_pages"] = max(w["peak_pages"], kv.used)
        n = len(sched.running)
        if n:
            for q, pages in zip(sched.running, kv.h_pages[:, :n].sum((0, 2)).tolist()):
                q.peak_pages = max(q.peak_pages, pages)
        pool = [t for t in (new, firsts) if t is not None]
        order = [index[id(q)] for q in sched.running]
        if not order:
            self.cur_seqs, self.cur = [], None
            return
        allc = pool[0] if len(pool) == 1 else torch.cat(pool)
        self.cur = allc if order == list(range(allc.shape[0])) else allc[eng.dev_long(order)]
        self.cur_seqs = list(sched.running)
        self.cur_host = torch.empty(len(self.cur_seqs), dtype=torch.long, pin_memory=eng.cuda)
        self.cur_host.copy_(self.cur, non_blocking=eng.cuda)
        if eng.cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()

    def _fail_admission(self, batch, error: Exception):
        """An admitted batch whose prefill or pruning raised: its requests end with reason "error"
        and give their pages back; the running sequences were not touched (prefill writes only
        the admitted slots' pages) and go on."""
        kind = type(error).__name__
        for grp in reversed(batch):  # the admitted slots are the last ones: release from the end
            for q in reversed(grp):
                if q.slot >= 0:
                    self.kv.release(q.slot)
                    q.slot = -1
                q.reason = "error"
                q.error = f"admission failed: {kind}: {error}"
                self._end(q)

    # --------------------------------------------------------------------------- tokens
    def choose(self, logits, seqs, live) -> torch.Tensor:
        """Tokens from logits [n, V] for seqs: forced where a sequence has one left, else sampled
        with each sequence's own settings."""
        eng = self.eng
        rows = [i for i, lv in enumerate(live) if lv]  # draining rows' logits are padding
        if self.on_logits is not None and rows:
            self.on_logits(
                [seqs[i].key for i in rows],
                [seqs[i].n_chosen for i in rows],
                logits if len(rows) == len(seqs) else logits[eng.dev_long(rows)],
            )
        ss = [q.sampling for q in seqs]
        if any(s.temperature > 0 for s in ss):
            dev = logits.device
            params = torch.tensor([[s.temperature, s.top_k, s.top_p] for s in ss], dtype=torch.float64)
            keys = torch.tensor(
                [[q.seed & 0xFFFFFFFF, q.seed >> 32, q.n_chosen] for q in seqs], dtype=torch.long
            )
            params, keys = (
                t.pin_memory().to(dev, non_blocking=True) if eng.cuda else t for t in (params, keys)
            )
            filtered = any(s.temperature > 0 and (s.top_k or s.top_p < 1) for s in ss)
            tok = sample_rows(logits, params, keys, filtered)
        else:
            tok = logits.argmax(-1)
        forced = [
            (i, q.forced[q.n_chosen]) for i, q in enumerate(seqs) if live[i] and q.n_chosen < len(q.forced)
        ]
        if forced:
            at, val = zip(*forced)
            tok = tok.index_put((eng.dev_long(list(at)),), eng.dev_long(list(val)))
        tp = eng.tp
        if tp.on:
            tok = tp.broadcast(tok)  # rank 0's tokens everywhere
        want = [i for i, q in enumerate(seqs) if live[i] and q.logprobs is not None]
        if want:  # the chosen token's log-probability and the top ones, under the raw model distribution
            k = max(seqs[i].sampling.logprobs for i in want)
            lp = logits[eng.dev_long(want)].float().log_softmax(-1)
            top = lp.topk(k, -1) if k else None
            chosen = lp.gather(-1, tok[eng.dev_long(want)][:, None])
            vals = chosen if top is None else torch.cat([chosen, top.values], -1)
            ids = None if top is None else top.indices
            vals, ids = (None if t is None else _to_host(t, eng.cuda) for t in (vals, ids))
            for r, i in enumerate(want):
                seqs[i].lp.append((vals, ids, r))
        for q, lv in zip(seqs, live):
            q.n_chosen += lv
        return tok

    def accept(self, q: Sequence, tok: int) -> bool:
        """A token read back for q; returns True when q is done."""
        s, i = q.sampling, q.n_seen
        q.n_seen += 1
        lp = q.lp.pop(0) if q.lp else None
        if i < len(q.out):  # replayed after a preemption: produced, streamed and checked before
            return False
        forced = i < len(q.forced)  # forced tokens are taken as given: no EOS or stop-string check
        if q.logprobs is not None and lp is not None:  # EOS too: a scorer counts every token it was sent
            vals, ids, r = lp
            k = s.logprobs
            tops = (
                {int(t): v for t, v in zip(ids[r, :k].tolist(), vals[r, 1 : k + 1].tolist())}
                if ids is not None
                else {}
            )
            entry = (tok, vals[r, 0].item(), tops)
            q.logprobs.append(entry)
            self._update(q).logprobs.append(entry)
        if not forced and tok in self.eng.eos:
            q.shown = len(q.text)  # the end: text held back as a possible stop's prefix goes out
            q.reason = "stop"
            q.stats["eos"] = True
            self._update(q)
            return True
        q.out.append(tok)
        before = len(q.text)
        text = q.detok.push(tok)
        done = len(q.out) >= s.max_new_tokens
        cut = -1 if forced or not s.stop else find_stop(text, s.stop, before)
        if cut >= 0:
            text, done = text[:cut], True
            q.reason = "stop"
        q.text = text
        shown = text if done else text[: len(text) - stop_prefix(text, s.stop)]  # a stop's prefix waits
        q.shown = max(q.shown, len(shown)) if not done else len(text)
        self._update(q).tokens.append(tok)
        return done

    def _update(self, q) -> Update:
        u = self.updates.get(id(q))
        if u is None:
            u = self.updates[id(q)] = Update(q.key)
            if q.prompt_logprobs is not None and not q.prompt_sent:
                u.prompt_logprobs = q.prompt_logprobs
                q.prompt_sent = True
        u.full, u.shown = q.text, q.shown
        return u

    def finish(self, q: Sequence):
        if q.slot >= 0:
            self._final_stats(q)
        self.sched.finish(q)
        self._end(q)

    def _final_stats(self, q: Sequence):
        """What its rows hold at the end (after every re-plan; tensor parallel: this rank's rows and
        pages) and the most pages it held (the whole prompt before pruning included)."""
        kv = self.kv
        q.stats["final_kept"] = round(kv.h_len[:, q.slot].double().mean().item(), 2)
        q.stats["final_seen"] = q.seen
        peak = max(q.peak_pages, kv.owned(q.slot), q.stats.get("pages_after_prefill", 0))
        q.stats["peak_pages"] = peak

    def _end(self, q: Sequence):
        """A sequence is over (done, aborted or failed): its result goes out with this step."""
        q.done = True
        t0 = q.stats.pop("_t0", None)
        t = time.perf_counter() - t0 if t0 is not None else 0.0
        q.stats.update(
            new_tokens=len(q.out),
            decode_tok_s=(len(q.out) - 1) / t if len(q.out) > 1 and t > 0 else 0.0,
            finished_at_step=self.steps,
            finish_reason=q.reason,
        )
        self.totals["new_tokens"] += len(q.out)
        if q.reason != "abort":
            q.shown = len(q.text)
        u = self._update(q)
        u.result = Result(
            q.out, q.text, dict(q.stats), q.reason, q.logprobs, q.prompt_logprobs, getattr(q, "error", None)
        )
        grp = self._groups.get(q.idx)
        if grp is not None and all(x.done for x in grp):
            del self._groups[q.idx]

    # ------------------------------------------------------------------------- admission
    def workload(self, groups) -> dict:
        """The figures of a workload (one generate call) since reset_workload()."""
        eng, kv, w, sched = self.eng, self.kv, self.w, self.sched
        wall = time.perf_counter() - w["t0"]
        peak = torch.cuda.max_memory_allocated(eng.dev) if eng.cuda else _rss()
        seqs = [q for grp in groups for q in grp]
        new_tokens = sum(len(q.out) for q in seqs)
        steps = w["steps"]
        pb = w["pool_bound_steps"]
        return dict(
            requests=len(groups),
            sequences=len(seqs),
            policies=sorted({q.policy.name for q in seqs}),
            new_tokens=new_tokens,
            steps=steps,
            wall_s=wall,
            tok_s=new_tokens / wall if wall else 0.0,
            req_s=len(groups) / wall if wall else 0.0,
            pool_pages=kv.n_pages,
            page_size=kv.ps,
            peak_pages=w["peak_pages"],
            peak_concurrent=w["peak_seqs"],
            mean_concurrent=w["live_sum"] / steps if steps else 0.0,
            pool_bound_steps=pb,  # steps while requests waited for pages
            mean_concurrent_pool_bound=w["pool_bound_sum"] / pb if pb else None,
            preemptions=sched.preemptions - w["preemptions0"],
            admission_waits=sched.waits - w["waits0"],
            # each sequence's pages at its last admission (a preempted one is counted once)
            pages_after_prefill=sum(q.stats.get("pages_after_prefill", 0) for q in seqs),
            pages_after_pruning=sum(q.stats.get("pages_after_pruning", 0) for q in seqs),
            peak_memory_bytes=peak,
            # launch-to-launch intervals: the host waits on step t-1 before launching t+1, so in
            # steady state each interval is one device step (prefills show up as outliers)
            step_ms=[1e3 * (b - a) for a, b in zip(w["launches"], w["launches"][1:])],
        )


def _to_host(t: torch.Tensor, cuda: bool) -> torch.Tensor:
    """A device tensor's values on the host, without waiting on CUDA (read after the step's event)."""
    if not cuda:
        return t
    h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    h.copy_(t, non_blocking=True)
    return h


def _rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
