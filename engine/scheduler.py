"""Continuous batching over the paged pool: who runs, who is prefilled, who waits, who makes room.

A request is a *group*: one prompt prefilled once and pruned by one or more policies, each
result a Sequence of its own (fan-out: "prefill once, try several policies"). Running sequences
occupy pool slots [0, n) in order (running[i].slot == i), so a decode step is one batch.

- schedule: the prefill work of one step, a list of (Prefill, tokens). With a token budget
  (`max_batched_tokens`, chunked prefill) a step's decode rows come first and prefill chunks fill
  the rest, the prompt due earliest first (its arrival on the prefill clock plus the tokens it has
  left: a short prompt overtakes a long one being prefilled, which a whole prefill cannot allow, and
  no prompt waits forever); with a StepBudget the step's tokens are what keeps it within a bound on
  its cost (engine/budget.py). Without one, whole prompts are admitted in order of arrival while the
  prefill's work (batch x its longest prompt when padded, the prompts' tokens when packed) stays
  within max_prefill_tokens. Either way the forward's attention probe stays within its bound, the
  sequences within max_seqs, and a group is admitted only when the free pages hold its prompt whole
  (pages for all of it are reserved at once, so a half-prefilled prompt never waits for pages) plus
  one page per row of every sequence (the next step's growth), and so does every group before it
  (in order of due when chunked, of arrival when whole).
- A group being prefilled holds slots from the top of the pool, apart from the running batch;
  `start` moves its sequences to the end of the running batch once they are pruned.
- finish: a sequence that stops frees all its pages at once; the last running sequence moves
  into its slot.
- preempt: when a decode step finds no free page, the most recently admitted running sequence
  gives back every page and goes back to the head of the queue. It keeps the tokens it produced
  and replays them as forced tokens when it is admitted again (greedy recomputation gives the same
  cache; nothing already streamed is streamed twice). A prompt being prefilled is never preempted.
"""

from collections import deque

import torch

from engine.kv import PagedKV
from engine.sequence import Prefill, Sequence


class Scheduler:
    def __init__(
        self, kv: PagedKV, max_seqs: int, max_prefill_tokens: int, free=None, max_batched_tokens: int = 0
    ):
        self.kv, self.max_seqs, self.max_prefill_tokens = kv, min(max_seqs, kv.S), max_prefill_tokens
        # tokens one step processes, decode rows and prefill chunks together (0: whole prompts)
        self.max_batched_tokens = max_batched_tokens
        self.budget = None  # a StepBudget (engine/budget.py): each step's tokens within that cap, by cost
        self.free = free or (lambda: kv.available)  # tensor parallel: the least free pages of any rank
        self.padded = True  # prefill pads a batch to its longest prompt (False: packed, real tokens only)
        # probe_fits(rows, longest prompt, batch, query stats): the batch's probe stays within its
        # bound (Engine.probe_bytes and max_probe_bytes; every prompt is padded to the longest)
        self.probe_fits = lambda rows, n, batch, stats: True
        self.probe_rows = 0  # at least this many probe rows for everyone (the core's evicted-mass stats)
        self.waiting: deque[list[Sequence]] = deque()
        self.clock = 0  # prompt tokens prefilled so far (when a prompt is due: _due)
        self.prefilling: list[Prefill] = []  # admitted, prompt not yet whole in the pool (in order)
        self.running: list[Sequence] = []
        self._admitted = 0
        self.preemptions = 0
        self.waits = 0  # admission rounds where the head of the queue did not fit in the free pages

    def add(self, group: list[Sequence]):
        for seq in group:
            seq.arrival = self.clock
        self.waiting.append(group)

    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def pending_tokens(self) -> int:
        """Prompt tokens not yet prefilled (waiting requests and the rest of those being prefilled)."""
        return sum(p.left for p in self.prefilling) + sum(len(g[0].prompt) for g in self.waiting)

    def rows_of(self, group: list[Sequence]) -> int:
        """Probe rows a group's prefill needs (its policies', at least the core's)."""
        return max([self.probe_rows] + [getattr(seq.policy, "probe_rows", 0) for seq in group])

    # ------------------------------------------------------------------------------- admission
    def schedule(self, decode_rows: int = 0, streams: int = 0) -> list[tuple[Prefill, int]]:
        """This step's prefill work: (prompt being prefilled, tokens to prefill now), in order.
        decode_rows: the rows of this step's decode batch (they come out of the token budget);
        streams: the sequences whose tokens this step hands out (its decode rows, and those whose
        last token it reads back: they too wait for the step)."""
        if self.max_batched_tokens > 0:
            waiting = max(decode_rows, streams)
            tokens = self.budget.tokens(waiting) if self.budget is not None else self.max_batched_tokens
            work = self._chunks(tokens - decode_rows)
        else:
            work = self._whole()
        self.clock += sum(t for _, t in work)
        return work

    def _whole(self) -> list[tuple[Prefill, int]]:
        """Unchunked: whole prompts in order of arrival while the forward's work stays within
        max_prefill_tokens (the first always goes)."""
        cap, work = self.max_prefill_tokens, []
        for pf in self.prefilling:  # none unless the budget was switched off mid-prompt
            work.append((pf, pf.left))
        for group, blocks, cow in self._admissible(list(self.waiting)):
            left = len(group[0].prompt) - len(blocks) * self.kv.ps
            take = self._take(work, left, cap, False)
            if take < left or (work and not self._probe_fits(work, group, take)):
                break
            work.append((self._admit(group, blocks, cow), take))
        return work

    def _chunks(self, cap: int) -> list[tuple[Prefill, int]]:
        """Chunked: the prompts being prefilled and the waiting groups the pool can admit, the
        earliest due first (arrival + tokens left: _due), while the step's budget lasts. The pool
        admits waiting groups in that order too, up to the first that does not fit."""
        waiting = [(self._due(group, len(group[0].prompt)), group) for group in self.waiting]
        waiting.sort(key=lambda entry: entry[0])  # stable: ties go in order of arrival
        fits = self._admissible([group for _, group in waiting])
        queue = sorted(
            [(self._due(pf.group, pf.left), pf) for pf in self.prefilling] + waiting, key=lambda e: e[0]
        )
        work: list[tuple[Prefill, int]] = []
        for _, item in queue:
            if isinstance(item, Prefill):
                take = self._take(work, item.left, cap, True)
                if take < 1:
                    break
                work.append((item, take))
                continue
            entry = next(fits, None)  # this group: both lists are in order of due
            if entry is None:  # the pool cannot take it yet, nor any group due after it
                continue
            group, blocks, cow = entry
            take = self._take(work, len(group[0].prompt) - len(blocks) * self.kv.ps, cap, True)
            if take < 1 or (work and not self._probe_fits(work, group, take)):
                break
            work.append((self._admit(group, blocks, cow), take))
        return work

    def _due(self, group: list[Sequence], left: int) -> int:
        """When a prompt is due on the prefill clock (prompt tokens prefilled so far): its arrival
        plus the tokens it has left. Earliest due first is shortest remaining first among prompts
        that came together, so a short prompt is not stuck behind a long one being prefilled (a
        whole prefill cannot be interrupted); and a prompt is overtaken only by prompts that came
        before the clock had advanced by its length, so none waits forever."""
        return group[0].arrival + left

    def _admissible(self, groups: list):
        """Of the waiting `groups`, in that order, those the pool can admit now, up to the first that
        does not fit (which so keeps its turn): (group, the cached blocks its prompt starts with,
        pages to copy off them). A group needs its prompt whole in the free pages plus one page per
        row of every sequence (the next step's growth), within max_seqs; alone in an empty pool it
        always goes."""
        kv = self.kv
        seqs = len(self.running) + sum(len(pf.group) for pf in self.prefilling)
        row_pages = kv.L * kv.H  # one page per row: what a sequence may need for its next step
        free = self.free() if groups else 0
        pages = 0
        for group in groups:
            n, k = len(group[0].prompt), len(group)
            blocks = self._match(group)  # a cached prefix: in the pool already
            if blocks is None:
                blocks = []
            elif self._sharing_pending(group, len(blocks)):
                return  # what it shares with a prompt being prefilled is cached once that is whole
            if seqs + k > self.max_seqs:
                return
            # the prompt whole and room to copy its kept part into each fork; with the cache, room to
            # copy it off the shared pages (its full blocks: found in the cache or cached now)
            cow = kv.L * kv.H * (n // kv.ps) if kv.cache is not None else 0
            need = k * kv.seq_pages(n) + cow
            reserve = row_pages * (seqs + k)  # the next step of every sequence, this group's included
            if pages + need + reserve > free:
                if seqs:
                    self.waits += 1
                    return
                # Engine checks that a prompt fits an empty pool at its largest; without the cache
                # when the pool cannot hold the prompt twice
                blocks, cow = [], 0
            yield group, blocks, cow
            pages, seqs = pages + need, seqs + k

    def _take(self, work, left: int, cap: int, chunked: bool) -> int:
        """Tokens of a prompt with `left` to prefill that this step's forward can still take (its work
        within cap: the padded batch x longest, or the packed tokens; the first prompt of an
        unchunked step always goes whole)."""
        if not chunked and not work:
            return left
        if self.padded:
            longest = max([t for _, t in work], default=0)
            take = min(left, cap // (len(work) + 1))
            return take if (len(work) + 1) * max(longest, take) <= cap else 0
        return min(left, cap - sum(t for _, t in work))

    def _probe_fits(self, work, group, take: int) -> bool:
        """Whether the forward's probe stays within its bound with this group's chunk in it."""
        rows = max([self.rows_of(group)] + [self.rows_of(pf.group) for pf, _ in work])
        stats = any(getattr(seq.policy, "query_stats", False) for pf, _ in work for seq in pf.group)
        stats = stats or any(getattr(seq.policy, "query_stats", False) for seq in group)
        keys = max([take] + [pf.done + t for pf, t in work])  # the widest row of keys so far
        return self.probe_fits(rows, keys, len(work) + 1, stats)

    def _match(self, group: list[Sequence]) -> list | None:
        """The cached blocks a group's prompt starts with (engine/prefix.py). The probe's rows are
        queries the prefill computes, so at least that many tokens (and one) are left to prefill;
        a policy that reads every prompt query's statistics prefills the whole prompt (None: the
        group does not use the cache)."""
        cache = self.kv.cache
        if cache is None or any(seq.policy.query_stats for seq in group):
            return None
        prompt = group[0].prompt
        top = group[0].sampling.prompt_logprobs
        return cache.match(prompt, self._matchable(group), top)

    def _matchable(self, group) -> int:
        return len(group[0].prompt) - max(self.rows_of(group), 1)

    def _sharing_pending(self, group, found: int) -> bool:
        """Whether a prompt starts with more full blocks of a prompt being prefilled (whose blocks
        are cached once it is whole) than the cache gave it: then it waits for that one (the
        continuations of one multiple-choice context, sent at once, prefill it once)."""
        prompt, ps = group[0].prompt, self.kv.ps
        limit = self._matchable(group)
        for pf in self.prefilling:
            if not pf.insert:
                continue
            other = pf.prompt
            common = 0
            for a, b in zip(prompt[:limit], other):
                if a != b:
                    break
                common += 1
            if common // ps > found:
                return True
        return False

    def _admit(self, group: list[Sequence], blocks: list, cow: int) -> Prefill:
        """A group leaves the queue: its sequences take free slots from the top of the pool, its
        source's rows pages for the whole prompt (a cached prefix's referenced, the rest fresh),
        and pages for the forks' copies and for copying the kept part off shared pages (cow: 0 when
        the prompt goes without the cache) are held."""
        kv, n = self.kv, len(group[0].prompt)
        if self.waiting[0] is group:
            self.waiting.popleft()
        else:  # by identity (a group's sequences compare equal to another's with the same fields)
            self.waiting = deque(g for g in self.waiting if g is not group)
        used = set(range(len(self.running))) | {seq.slot for pf in self.prefilling for seq in pf.group}
        free_slots = [s for s in range(kv.S - 1, -1, -1) if s not in used]
        for seq, slot in zip(group, free_slots):
            seq.slot, seq.order = slot, self._admitted
            seq.n_chosen = seq.n_accepted = 0
        self._admitted += 1
        shared = torch.stack([blk.pages for blk in blocks], -1) if blocks else None  # [L, Hkv, c]
        kv.assign(group[0].slot, n, shared)
        pf = Prefill(group, held=(len(group) - 1) * kv.seq_pages(n))
        if cow:
            kv.cache.take(blocks, n)
            pf.done = pf.cached = len(blocks) * kv.ps
            pf.held += cow
            pf.insert = True
            if blocks and group[0].sampling.prompt_logprobs is not None:
                pf.logprobs = [e for blk in blocks for e in blk.logprobs]
                pf.last_h = blocks[-1].last_h
        kv.held += pf.held
        self.prefilling.append(pf)
        return pf

    def prefilled(self, pf: Prefill):
        """A prompt is whole in the pool: its forks may now take the pages held for them."""
        self.prefilling.remove(pf)
        self.kv.held -= pf.held
        pf.held = 0

    def start(self, seqs: list[Sequence]):
        """Prefilled and pruned sequences join the running batch, in order: each moves to the slot
        after the running ones (trading places with a sequence still being prefilled there)."""
        waiting = list(seqs)  # to be placed: a later one may hold the slot an earlier one goes to
        for seq in seqs:
            waiting.remove(seq)
            dst = len(self.running)
            if seq.slot != dst:
                held = [s for pf in self.prefilling for s in pf.group] + waiting
                there = [s for s in held if s.slot == dst]
                if there:
                    self.kv.swap(seq.slot, dst)
                    there[0].slot = seq.slot
                else:
                    self.kv.move(seq.slot, dst)
                seq.slot = dst
            self.running.append(seq)

    def _remove(self, seq: Sequence):
        kv, last = self.kv, self.running[-1]
        kv.release(seq.slot)
        if last is not seq:
            kv.move(last.slot, seq.slot)
            self.running[seq.slot], last.slot = last, seq.slot
        self.running.pop()
        seq.slot = -1

    def drop(self, group: list[Sequence]):
        """Take a request's sequences out of the queue, or out of prefill with their slots and
        pages (an abort or a failed prefill; running ones are finished apart)."""
        ids = {id(seq) for seq in group}
        self.waiting = deque(g for g in self.waiting if not any(id(seq) in ids for seq in g))
        for pf in [pf for pf in self.prefilling if any(id(seq) in ids for seq in pf.group)]:
            self.prefilled(pf)
            for seq in pf.group:
                if seq.slot >= 0:
                    self.kv.release(seq.slot)
                    seq.slot = -1

    def finish(self, seq: Sequence):
        seq.done = True
        self._remove(seq)

    def preempt(self) -> Sequence:
        """Free the most recently admitted running sequence; it waits at the head of the queue and
        will replay what it produced."""
        seq = max(self.running, key=lambda x: x.order)
        self._remove(seq)
        seq.forced = seq.out + seq.forced[len(seq.out) :]
        self.waiting.appendleft([seq])
        self.preemptions += 1
        return seq
