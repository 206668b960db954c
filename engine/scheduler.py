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
from dataclasses import dataclass, field

from engine.kv import PagedKV


@dataclass(eq=False)
class Sequence:
    idx: int  # prompt index in the request
    fork: int  # policy index (fan-out)
    prompt: list[int]
    policy: object
    forced: list[int] = field(default_factory=list)  # tokens taken instead of sampling, in order
    out: list[int] = field(default_factory=list)  # tokens produced so far (forced and sampled)
    slot: int = -1
    order: int = -1  # admission counter: the highest is preempted first
    n_chosen: int = 0  # tokens chosen on the device in this admission (some not yet read back)
    n_seen: int = 0  # of those, read back and accepted
    done: bool = False
    stats: dict = field(default_factory=dict)
    # set by the core (engine/core.py) when the request is added
    key: object = None  # the request id, or (id, fork) for a request with several policies
    sampling: object = None  # engine.sampling.Sampling
    seed: int = 0  # its sampling seed (drawn at random when the request named none)
    detok: object = None
    text: str = ""
    shown: int = 0  # characters of text streamed so far
    lp: list = field(default_factory=list)  # log-probabilities of chosen tokens not yet read back
    logprobs: list | None = None  # of accepted tokens, when asked for
    prompt_logprobs: list | None = None
    prompt_sent: bool = False  # prompt_logprobs went out with an update
    reason: str = "length"  # finish reason
    error: str | None = None
    # decode-time pruning (engine/prune.py): the next interval trigger, g at the last re-plan
    next_replan: int = 0
    replanned_at: int = 0
    peak_pages: int = 0  # the most pages its rows held at once (this admission and earlier ones)

    @property
    def live(self) -> bool:
        """Still fed: its last chosen token goes through another decode step (else it only drains)."""
        return self.n_chosen < self.sampling.max_new_tokens

    @property
    def fed(self) -> int:
        """Tokens generated into its rows in this admission (the last chosen one is not in yet)."""
        return self.n_chosen - 1

    @property
    def seen(self) -> int:
        """Tokens its rows have seen: the prompt and what was fed since (its next position)."""
        return len(self.prompt) + self.fed


class Scheduler:
    def __init__(self, kv: PagedKV, max_seqs: int, max_prefill_tokens: int, free=None):
        self.kv, self.max_seqs, self.max_prefill_tokens = kv, min(max_seqs, kv.S), max_prefill_tokens
        self.free = free or (lambda: kv.n_free)  # tensor parallel: the least free pages of any rank
        self.padded = True  # prefill pads a batch to its longest prompt (False: packed, real tokens only)
        # probe_fits(rows, longest prompt, batch): the batch's attention probe stays within its
        # bound (Engine.probe_bytes and max_probe_bytes; every prompt is padded to the longest)
        self.probe_fits = lambda rows, n, batch: True
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
        wide = self.probe_rows
        row_pages = kv.L * kv.H  # one page per row: what a sequence may need for its next step
        free = self.free() if self.waiting else 0
        while self.waiting:
            grp = self.waiting[0]
            n, k = len(grp[0].prompt), len(grp)
            # padded to the longest, or packed
            work = (len(batch) + 1) * max(longest, n) if self.padded else tokens + n
            if batch and work > self.max_prefill_tokens:
                break
            rows = max([wide] + [q.policy.probe_rows for q in grp])
            if batch and not self.probe_fits(rows, max(longest, n), len(batch) + 1):
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
            batch.append(grp)
            longest, tokens, pages, seqs = max(longest, n), tokens + n, pages + need, seqs + k
            wide = rows
        slot = len(self.running)
        for grp in batch:
            for s in grp:
                s.slot, s.order = slot, self._admitted
                s.n_chosen = s.n_seen = 0
                slot += 1
            self._admitted += 1
            kv.assign(grp[0].slot, len(grp[0].prompt))
        return batch

    def start(self, seqs: list[Sequence]):
        """Admitted sequences, prefilled and pruned, join the running batch (in slot order)."""
        for s in seqs:
            assert s.slot == len(self.running)
            self.running.append(s)

    def _remove(self, s: Sequence):
        kv, last = self.kv, self.running[-1]
        kv.release(s.slot)
        if last is not s:
            kv.move(last.slot, s.slot)
            self.running[s.slot], last.slot = last, s.slot
        self.running.pop()
        s.slot = -1

    def drop(self, group: list[Sequence]):
        """Take a request's sequences out of the queue (an abort; running ones are finished apart)."""
        ids = {id(s) for s in group}
        self.waiting = deque(g for g in self.waiting if not any(id(s) in ids for s in g))

    def finish(self, s: Sequence):
        s.done = True
        self._remove(s)

    def preempt(self) -> Sequence:
        """Free the most recently admitted running sequence; it waits at the head of the queue and
        will replay what it produced."""
        s = max(self.running, key=lambda x: x.order)
        self._remove(s)
        s.forced = s.out + s.forced[len(s.out) :]
        self.waiting.appendleft([s])
        self.preemptions += 1
        return s
