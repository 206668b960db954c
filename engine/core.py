"""The step-driven core: requests come and go while the engine runs.

    rid = core.add_request(prompt_ids, policy, sampling)   # queued; checked now, never later
    updates = core.step()                                  # one iteration of continuous batching
    core.abort(rid)                                        # its pages go back to the pool at once

Every driver is a loop around `step()`: `Engine.generate` (add all, step until idle; the CLI and
the benches), `engine/serve/` (one thread owns the core; HTTP handlers only talk to queues) and
`engine/serve/run_batch.py`. Nothing else touches the pool or the scheduler.

One step queues the next decode step of the running batch before it reads the previous step's
tokens back (the device never waits for the host; a sequence whose last token turns out to be EOS
costs one wasted row), then accepts those tokens (streaming, stop strings, EOS, limits), finishes
sequences (their pages go back at once), prefills what the token budget leaves after the decode
rows (chunked prefill: the rest of a long prompt, then the next waiting ones whose prompts fit, the
last perhaps in part; without a budget whole prompts), prunes each prompt that is whole with its
sequences' own policies, and hands out the pages the next step needs, preempting the newest
sequence when there are none. Running sequences keep slots [0, n) of the pool in order (a prompt
being prefilled holds slots at the top); the tokens of the next step are gathered into that order
on the device. With a token budget on an eager model a step is one forward (a mixed step): its
prefill work is scheduled first and the decode rows run in the chunks' forward, so the weights are
read once per step; pruning the prompts it completed still comes after the accepted tokens.

Sampling is per request and vectorised over the batch (engine/sampling.py): a seeded request's
draws depend on its seed, its own logits and its token index only, never on its neighbours.
"""

import random
import time

import torch

import refreekv
from engine import admission, pruning
from engine.sampling import Sampling, choose
from engine.scheduler import Scheduler
from engine.sequence import Result, Sequence, Update
from engine.tokenizer import Detok, find_stop, stop_prefix
from weights.errors import UserError


class Core:
    """runner: the model, pool and steps below (engine/runner.py); tokenizer: for the text;
    check(prompt, policies, sampling, forced): the engine's check of a request (Engine.check_request);
    probe_fits(rows, longest, batch, stats): whether an admitted batch's prefill probe fits its bound;
    eos: the token ids that end a sequence; max_batched_tokens: the tokens one step processes, decode
    rows and prefill chunks together (0: prompts are prefilled whole, within max_prefill_tokens)."""

    def __init__(
        self,
        runner,
        tokenizer,
        check,
        max_seqs: int,
        max_prefill_tokens: int,
        probe_fits,
        eos,
        max_batched_tokens: int = 0,
    ):
        self.runner, self.kv, self.tokenizer, self.check, self.eos = runner, runner.kv, tokenizer, check, eos
        tp = runner.tp
        free = (lambda: tp.host_min(runner.kv.available)) if tp.on else None
        self.sched = Scheduler(runner.kv, max_seqs, max_prefill_tokens, free, max_batched_tokens)
        self.sched.padded = not runner.packed
        self.sched.probe_fits = probe_fits
        self.on_logits = None  # research hook: on_logits(keys, steps, logits [n, V])
        # progress(layers_done, layers, prompt tokens, of them prefilled before, this forward's tokens)
        # after each layer of an eager prefill forward
        self.prefill_progress = None
        self._next_id = 0
        self._groups: dict[int, list[Sequence]] = {}  # live requests by id
        self.cur_seqs: list[Sequence] = []  # the running batch whose chosen tokens are `cur`
        self.cur = None
        self.cur_host = torch.empty(0, dtype=torch.long)
        self.ready = None
        self.updates: dict[int, Update] = {}
        self.steps = 0  # decode steps so far
        self.prefilled = 0  # prompt tokens the current step prefills
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
        fan = isinstance(policy, (list, tuple))  # a list, even of one: keys (rid, j)
        policies = list(policy) if fan else [policy]
        if not policies:
            raise UserError("no KV policy given")
        for p in policies:
            if not isinstance(p, refreekv.Policy):
                raise UserError(
                    f"policy must be a refreekv.Policy (e.g. refreekv.make({p!r})), got {type(p).__name__}"
                    if isinstance(p, str)
                    else f"policy must be a refreekv.Policy, got {type(p).__name__}"
                )
        self.check(prompt, policies, sampling, forced)
        if rid is None:
            rid = self._next_id
        if rid in self._groups:
            raise ValueError(f"request id {rid} is in use")
        self._next_id = max(self._next_id, rid + 1)
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        group = []
        for j, pol in enumerate(policies):
            seq = Sequence(rid, j, list(prompt), pol, list(forced or []))
            seq.sampling, seq.seed = sampling, seed % 2**64
            seq.key = (rid, j) if fan else rid
            seq.detok, seq.text, seq.shown, seq.lp = Detok(self.tokenizer), "", 0, []
            seq.logprobs = [] if sampling.logprobs is not None else None
            group.append(seq)
        self._groups[rid] = group
        self.sched.add(group)
        self.totals["requests"] += 1
        return rid

    def abort(self, rid: int) -> bool:
        """Drop a request now, wherever it is: a waiting one leaves the queue, a running one gives
        every page back. Its sequences end with finish reason "abort". False if it is not live."""
        group = self._groups.get(rid)
        if group is None:
            return False
        self.sched.drop(group)  # waiting, or being prefilled: its slots and pages go back here
        running = any(seq.slot >= 0 for seq in group)
        for seq in group:
            if seq.done:  # a fork that already finished keeps its result
                continue
            if seq.slot >= 0:
                self._final_stats(seq)
                self.sched.finish(seq)
            seq.reason = "abort"
            self._end(seq)
        if running and self.cur_seqs:  # slots moved: the next step's inputs follow their sequences
            if self.ready is not None:
                self.ready.synchronize()
            at = {id(seq): i for i, seq in enumerate(self.cur_seqs)}
            order = [at[id(seq)] for seq in self.sched.running]
            self.cur_seqs = list(self.sched.running)
            self.cur_host = self.cur_host[order]
            self.cur = self.cur[self.runner.dev_long(order)] if order else None
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
        """Sequences admitted by no one yet, or whose prompt is being prefilled."""
        return sum(len(g) for g in self.sched.waiting) + sum(len(pf.group) for pf in self.sched.prefilling)

    @property
    def prefill_pending(self) -> int:
        """Prompt tokens still to prefill (waiting requests and the rest of those being prefilled)."""
        return self.sched.pending_tokens

    def reset(self):
        """Forget every request and give every page back (after an error or an interrupt)."""
        self.kv.reset()
        self.sched.waiting.clear()
        self.sched.prefilling.clear()
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
        if self.runner.cuda:
            with torch.cuda.device(self.runner.dev):
                self._step()
        else:
            self._step()
        out, self.updates = list(self.updates.values()), {}
        return out

    def _step(self):
        sched = self.sched
        cur_seqs = self.cur_seqs
        t0 = time.perf_counter()
        self.prefilled = 0  # prompt tokens this step's forward took (_forward)
        rows = len(cur_seqs) if any(seq.live for seq in cur_seqs) else 0  # this step's decode batch
        # chunked and eager: the running batch decodes in the chunks' forward (one read of the weights)
        mixed = rows > 0 and sched.max_batched_tokens > 0 and self.runner.mixed
        fwd = self._forward(sched.schedule(rows, len(cur_seqs)), self.cur) if mixed else None
        new = self._decode(cur_seqs, fwd)  # queued before the last step's tokens are read back
        if cur_seqs:  # the tokens that step was fed: emit, stop, finish
            if self.ready is not None:
                self.ready.synchronize()
            for seq, t in zip(cur_seqs, self.cur_host.tolist()):
                if not seq.done and seq.slot >= 0 and self.accept(seq, t):
                    self.finish(seq)
        due = pruning.due(sched.running)  # decode-time re-plans (of the rows the step just queued)
        if due:
            self._replan(due)
        # where each running sequence's next input is: `new` (the step just queued), then `firsts`
        index = {id(seq): i for i, seq in enumerate(cur_seqs)} if new is not None else {}
        firsts = self._admit(fwd, index, rows) if mixed else self._prefill(index, rows, len(cur_seqs))
        self._grow()
        self._next_inputs([t for t in (new, firsts) if t is not None], index)
        if sched.budget is not None:  # what this step cost: the next steps' token budgets
            sched.budget.observe(rows, self.prefilled, time.perf_counter() - t0)

    def _decode(self, cur_seqs, fwd=None):
        """Queue the next decode step of the running batch (unless a mixed forward decoded it:
        fwd.decoded); its chosen tokens (None: nothing to feed)."""
        live = [seq.live for seq in cur_seqs]  # all chosen: it only drains
        if not any(live):
            return None
        w, n = self.w, len(cur_seqs)
        w["launches"].append(time.perf_counter())
        decoded = None if fwd is None else fwd.decoded
        logits = self.runner.decode(self.cur) if decoded is None else decoded
        new = self.choose(logits, cur_seqs, live)
        self.steps += 1
        w["steps"] += 1
        w["live_sum"] += n
        if self.sched.waiting and n < self.sched.max_seqs:  # requests wait for pages: the pool is the limit
            w["pool_bound_steps"] += 1
            w["pool_bound_sum"] += n
        return new

    def _replan(self, seqs, pressure: bool = False) -> int:
        freed, failed = pruning.replan(self.runner, seqs, pressure)
        for seq in failed:
            if seq.slot >= 0:
                self.finish(seq)
        return freed

    def _prefill(self, index: dict, rows: int, streams: int):
        """This step's prefill work (whole prompts or chunks, within the token budget left by its
        decode rows; its streams: scheduler.schedule); the first tokens of the prompts it completed,
        pruned (None: none), at rows `rows` on of the next step's inputs."""
        sched = self.sched
        work = sched.schedule(rows, streams)
        if not work:
            if not sched.running and not sched.prefilling and sched.waiting:  # add_request rules this out
                raise RuntimeError("scheduler stalled with an empty pool")
            return None
        return self._admit(self._forward(work), index, rows)

    def _forward(self, work, decode=None):
        """The prefill forward of a step's work (decoding the running batch too with `decode`); None
        when there is none or it raised (its groups then end with "error"; the running rows are as
        they were, and decode alone; or, when it failed after decoding them, their logits stand)."""
        if not work:
            return None
        self.prefilled += sum(t for _, t in work)
        fwd = None
        try:
            fwd = admission.forward(self.runner, work, self.probe_rows, self.prefill_progress, decode)
            error = fwd.error  # a mixed forward that decoded, then failed its prompts
        except Exception as e:  # noqa: BLE001 - out of memory in the probe, a kernel, ...
            error = e
        if error is not None:
            if self.runner.tp.on:  # the ranks must stay in step: the driver resets them all
                raise error
            self._fail_admission([pf.group for pf, _ in work], error)
        return fwd

    def _admit(self, fwd, index: dict, offset: int):
        """Prune the prompts the forward completed and start their sequences at rows offset on of
        the next step's inputs; their first tokens (None: none)."""
        if fwd is None or fwd.error is not None:
            return None
        sched = self.sched
        try:
            out = admission.complete(self.runner, fwd, self.probe_rows, sched.prefilled)
        except Exception as e:  # noqa: BLE001 - out of memory in a plan, a policy's bug, ...
            if self.runner.tp.on:
                raise
            self._fail_admission([pf.group for pf, _ in fwd.work], e)
            return None
        if out is None:  # chunks only: no prompt is whole yet
            return None
        logits, admitted, peak, budgets = out
        self.w["peak_pages"] = max(self.w["peak_pages"], peak)
        self.totals["budget_sum"] += sum(budgets)
        self.totals["budgets"] += len(budgets)
        firsts = self.choose(logits, admitted, [True] * len(admitted))
        sched.start(admitted)
        for i, seq in enumerate(admitted):
            pruning.start(seq)
            index[id(seq)] = offset + i
        for seq in admitted:
            # prompt scoring only, or its plan failed
            if seq.sampling.max_new_tokens == 0 or seq.reason == "error":
                self.finish(seq)
        return firsts

    def _grow(self):
        """Pages for the next step; under pressure the policies that may give pages back do, and
        only then is the newest sequence preempted."""
        sched, kv, tp = self.sched, self.kv, self.runner.tp
        while True:
            live = [seq.live for seq in sched.running]
            short = kv.shortage(live)
            if tp.on:  # every rank preempts when any rank is short (ranks hold different heads)
                short = tp.host_max(short)
            if short == 0:
                kv.grow(live)
                break
            pressed = pruning.pressure_candidates(sched.running, kv.W)
            if pressed:  # pruning first, recomputation last
                freed = self._replan(pressed, pressure=True)
                if tp.on:
                    freed = tp.host_max(freed)
                if freed > 0 or any(seq.slot < 0 for seq in pressed):
                    continue
            seq = sched.preempt()
            seq.lp = []  # chosen but never accepted: they are chosen again on replay
        kv.set_live(live)  # every step: slots change hands as sequences finish, move and arrive
        w, n = self.w, len(sched.running)
        w["peak_seqs"] = max(w["peak_seqs"], n)
        w["peak_pages"] = max(w["peak_pages"], kv.used)
        if n:
            for seq, pages in zip(sched.running, kv.h_pages[:, :n].sum((0, 2)).tolist()):
                seq.peak_pages = max(seq.peak_pages, pages)

    def _next_inputs(self, pool: list, index: dict):
        """Gather the next step's input tokens into the running order and start reading them back."""
        runner = self.runner
        order = [index[id(seq)] for seq in self.sched.running]
        if not order:
            self.cur_seqs, self.cur = [], None
            return
        allc = pool[0] if len(pool) == 1 else torch.cat(pool)
        self.cur = allc if order == list(range(allc.shape[0])) else allc[runner.dev_long(order)]
        self.cur_seqs = list(self.sched.running)
        self.cur_host = torch.empty(len(self.cur_seqs), dtype=torch.long, pin_memory=runner.cuda)
        self.cur_host.copy_(self.cur, non_blocking=runner.cuda)
        if runner.cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()

    def _fail_admission(self, batch, error: Exception):
        """Groups whose prefill or pruning raised: their requests end with reason "error" and give
        their slots and pages back; the running sequences were not touched (prefill writes only
        the admitted slots' pages) and go on."""
        kind = type(error).__name__
        for group in batch:
            self.sched.drop(group)  # still being prefilled: out, with its slots, pages and held pages
            for seq in group:
                if seq.slot >= 0:  # prefilled, failed in pruning
                    self.kv.release(seq.slot)
                    seq.slot = -1
                seq.reason = "error"
                seq.error = f"admission failed: {kind}: {error}"
                self._end(seq)

    # --------------------------------------------------------------------------- tokens
    def choose(self, logits, seqs, live) -> torch.Tensor:
        """Tokens from logits [n, V] for seqs (engine/sampling.py: choose), after the research hook."""
        rows = [i for i, lv in enumerate(live) if lv]  # draining rows' logits are padding
        if self.on_logits is not None and rows:
            self.on_logits(
                [seqs[i].key for i in rows],
                [seqs[i].n_chosen for i in rows],
                logits if len(rows) == len(seqs) else logits[self.runner.dev_long(rows)],
            )
        return choose(self.runner, logits, seqs, live)

    def accept(self, seq: Sequence, tok: int) -> bool:
        """A token read back for seq; returns True when seq is done."""
        sp, i = seq.sampling, seq.n_accepted
        seq.n_accepted += 1
        lp = seq.lp.pop(0) if seq.lp else None
        if i < len(seq.out):  # replayed after a preemption: produced, streamed and checked before
            return False
        forced = i < len(seq.forced)  # forced tokens are taken as given: no EOS or stop-string check
        if seq.logprobs is not None and lp is not None:  # EOS too: a scorer counts every token it was sent
            vals, ids, r = lp
            k = sp.logprobs
            tops = (
                {int(t): v for t, v in zip(ids[r, :k].tolist(), vals[r, 1 : k + 1].tolist())}
                if ids is not None
                else {}
            )
            entry = (tok, vals[r, 0].item(), tops)
            seq.logprobs.append(entry)
            self._update(seq).logprobs.append(entry)
        if not forced and tok in self.eos:
            seq.shown = len(seq.text)  # the end: text held back as a possible stop's prefix goes out
            seq.reason = "stop"
            seq.stats["eos"] = True
            self._update(seq)
            return True
        seq.out.append(tok)
        before = len(seq.text)
        text = seq.detok.push(tok)
        done = len(seq.out) >= sp.max_new_tokens
        cut = -1 if forced or not sp.stop else find_stop(text, sp.stop, before)
        if cut >= 0:
            text, done = text[:cut], True
            seq.reason = "stop"
        seq.text = text
        shown = text if done else text[: len(text) - stop_prefix(text, sp.stop)]  # a stop's prefix waits
        seq.shown = max(seq.shown, len(shown)) if not done else len(text)
        self._update(seq).tokens.append(tok)
        return done

    def _update(self, seq) -> Update:
        u = self.updates.get(id(seq))
        if u is None:
            u = self.updates[id(seq)] = Update(seq.key)
            if seq.prompt_logprobs is not None and not seq.prompt_sent:
                u.prompt_logprobs = seq.prompt_logprobs
                seq.prompt_sent = True
        u.full, u.shown = seq.text, seq.shown
        return u

    def finish(self, seq: Sequence):
        if seq.slot >= 0:
            self._final_stats(seq)
        self.sched.finish(seq)
        self._end(seq)

    def _final_stats(self, seq: Sequence):
        """What its rows hold at the end (after every re-plan; tensor parallel: this rank's rows and
        pages) and the most pages it held (the whole prompt before pruning included)."""
        kv = self.kv
        seq.stats["final_kept"] = round(kv.h_len[:, seq.slot].double().mean().item(), 2)
        seq.stats["final_seen"] = seq.seen
        peak = max(seq.peak_pages, kv.owned(seq.slot), seq.stats.get("pages_after_prefill", 0))
        seq.stats["peak_pages"] = peak

    def _end(self, seq: Sequence):
        """A sequence is over (done, aborted or failed): its result goes out with this step."""
        seq.done = True
        t0 = seq.stats.pop("_t0", None)
        t = time.perf_counter() - t0 if t0 is not None else 0.0
        seq.stats.update(
            new_tokens=len(seq.out),
            decode_tok_s=(len(seq.out) - 1) / t if len(seq.out) > 1 and t > 0 else 0.0,
            finished_at_step=self.steps,
            finish_reason=seq.reason,
        )
        self.totals["new_tokens"] += len(seq.out)
        if seq.reason != "abort":
            seq.shown = len(seq.text)
        u = self._update(seq)
        u.result = Result(
            seq.out, seq.text, dict(seq.stats), seq.reason, seq.logprobs, seq.prompt_logprobs, seq.error
        )
        grp = self._groups.get(seq.idx)
        if grp is not None and all(x.done for x in grp):
            del self._groups[seq.idx]
