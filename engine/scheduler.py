"""Continuous batching over the paged pool: who runs, who waits, who makes room.

A request is a *group*: one prompt prefilled once and pruned by one or more policies, each
result a Sequence of its own (fan-out: "prefill once, try several policies"). Running sequences
occupy pool slots [0, n) in order (running[i].slot == i), so a decode step is one batch.

- admit: take waiting groups in order while the running set stays within max_seqs, the prefill's
  work (batch x its longest prompt when padded, the prompts' tokens when packed) stays within
  max_prefill_tokens, its attention probe within max_probe_bytes, and
  the free pages hold every admitted prompt whole (prefill writes it all before pruning shrinks it), with
  one page per row of every sequence, running or admitted, left over so that the next step can
  grow without preempting (a sequence just admitted is otherwise the first to go).
- finish: a sequence that stops frees all its pages at once; the last running sequence moves
  into its slot.
- preempt: when a decode step finds no free page, the most recently admitted sequence gives
  back every page and goes back to the head of the queue. It keeps the tokens it produced and
  replays them as forced tokens when it is admitted again (greedy recomputation gives the same
  cache; nothing already streamed is streamed twice).
"""

from collections import deque

from engine.kv import PagedKV
from engine.sequence import Sequence


class Scheduler:
    def __init__(self, kv: PagedKV, max_seqs: int, max_prefill_tokens: int, free=None):
        self.kv, self.max_seqs, self.max_prefill_tokens = kv, min(max_seqs, kv.S), max_prefill_tokens
        self.free = free or (lambda: kv.n_free)  # tensor parallel: the least free pages of any rank
        self.padded = True  # prefill pads a batch to its longest prompt (False: packed, real tokens only)
        # probe_fits(rows, longest prompt, batch, query stats): the batch's probe stays within its
        # bound (Engine.probe_bytes and max_probe_bytes; every prompt is padded to the longest)
        self.probe_fits = lambda rows, n, batch, stats: True
        self.probe_rows = 0  # at least this many probe rows for everyone (the core's evicted-mass stats)
        self.waiting: deque[list[Sequence]] = deque()
        self.running: list[Sequence] = []
        self._admitted = 0
        self.preemptions = 0
        self.waits = 0  # admission rounds where the head of the queue did not fit in the free pages

    def add(self, group: list[Sequence]):
        self.waiting.append(group)

    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[list[Sequence]]:
        """Groups to prefill now (one batch, within the padded prefill budget); their
        sources (fork 0) get pages for the whole prompt, and every sequence a slot after the running."""
        kv, batch, longest, tokens, pages, seqs = self.kv, [], 0, 0, 0, len(self.running)
        wide, stats = self.probe_rows, False
        row_pages = kv.L * kv.H  # one page per row: what a sequence may need for its next step
        free = self.free() if self.waiting else 0
        while self.waiting:
            group = self.waiting[0]
            n, k = len(group[0].prompt), len(group)
            # padded to the longest, or packed
            work = (len(batch) + 1) * max(longest, n) if self.padded else tokens + n
            if batch and work > self.max_prefill_tokens:
                break
            rows = max([wide] + [getattr(seq.policy, "probe_rows", 0) for seq in group])
            needs = stats or any(getattr(seq.policy, "query_stats", False) for seq in group)
            if batch and not self.probe_fits(rows, max(longest, n), len(batch) + 1, needs):
                break
            if seqs + k > self.max_seqs:
                break
            need = k * kv.seq_pages(n)  # the prompt whole, and room to copy its kept part into each fork
            reserve = row_pages * (seqs + k)  # the next step of every sequence, this group's included
            if pages + need + reserve > free and (seqs or batch):  # alone in an empty pool it always goes
                # (Engine checks that it fits there at its largest)
                self.waits += 1
                break
            self.waiting.popleft()
            batch.append(group)
            longest, tokens, pages, seqs = max(longest, n), tokens + n, pages + need, seqs + k
            wide, stats = rows, needs
        slot = len(self.running)
        for group in batch:
            for seq in group:
                seq.slot, seq.order = slot, self._admitted
                seq.n_chosen = seq.n_accepted = 0
                slot += 1
            self._admitted += 1
            kv.assign(group[0].slot, len(group[0].prompt))
        return batch

    def start(self, seqs: list[Sequence]):
        """Admitted sequences, prefilled and pruned, join the running batch (in slot order)."""
        for seq in seqs:
            assert seq.slot == len(self.running)
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
        """Take a request's sequences out of the queue (an abort; running ones are finished apart)."""
        ids = {id(seq) for seq in group}
        self.waiting = deque(g for g in self.waiting if not any(id(seq) in ids for seq in g))

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
