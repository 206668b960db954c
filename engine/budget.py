"""How many prompt tokens a step may prefill: a token budget that keeps every step within a bound.

A running stream waits one step per token. A step that only decodes B rows costs d(B); one that
also prefills c prompt tokens costs about d(B) + c * p (p: the seconds a prompt token adds to a
step, its attention over the prompt so far included). Keeping each step within `bound` x d(B),
so that a stream's gap between tokens stays within `bound` decode steps, caps the chunk at

    c = (bound - 1) * d(B) / p

Both are measured as the engine runs (`observe`, after every step):
- d(B): the decayed mean of recent decode-only steps of B rows (a batch size not seen yet: the
  nearest smaller one seen, else the nearest larger);
- p: the extra seconds per prompt token of recent steps with chunks, over d(B) of their rows.
  Its fixed part (gathering the prompt so far from the pool) and its attention over the prompt
  so far grow as a long prompt goes on; p follows them, and the chunk shrinks.

A step with no running stream prefills up to `cap` (nobody waits for it); until both are
measured, a step takes `start` tokens. The budget never exceeds `cap` nor falls below `floor`
tokens of prefill. Timing makes the schedule depend on the machine's speed: the tokens a request
gets never do (chunked prefill equals whole prefill, tests/test_chunked_prefill.py).
"""

import math

DECAY = 0.8  # weight of an observation per later one of its kind (about the last five count)
FLOOR = 32  # prompt tokens a step with a chunk always gets (a prompt progresses, its fixed costs spread)


class StepBudget:
    """cap: the most tokens a step processes (decode rows and chunks); bound: a step's cost in
    decode steps of its batch; start: the tokens a step takes until the costs are measured."""

    def __init__(self, cap: int, bound: float, start: int):
        if not bound > 1:
            raise ValueError(f"bound must be > 1 (a step decodes, then prefills), got {bound}")
        self.cap, self.bound, self.start = cap, bound, min(start, cap)
        self._decode: dict[int, float] = {}  # rows -> seconds of a decode-only step (decayed mean)
        self._per_token = None  # seconds a prompt token adds to a step (decayed mean)

    def decode_cost(self, rows: int) -> float | None:
        """Seconds of a decode-only step of `rows` rows (None: none measured yet)."""
        if rows in self._decode:
            return self._decode[rows]
        below = [r for r in self._decode if r < rows]
        if below:
            return self._decode[max(below)]
        return self._decode[min(self._decode)] if self._decode else None

    def tokens(self, rows: int) -> int:
        """This step's token budget with `rows` decode rows (rows + the prompt tokens it may take)."""
        if rows == 0:
            return self.cap
        d = self.decode_cost(rows)
        if d is None or self._per_token is None:
            return min(self.cap, max(self.start, rows + FLOOR))
        chunk = (self.bound - 1) * d / max(self._per_token, 1e-9)
        chunk = max(FLOOR, math.floor(chunk))
        return min(self.cap, rows + chunk)

    def observe(self, rows: int, prefilled: int, seconds: float):
        """A step took `seconds`: `rows` decode rows and `prefilled` prompt tokens."""
        if rows == 0 or seconds <= 0:
            return  # a prefill alone says nothing of what it costs a stream
        if prefilled == 0:
            self._decode[rows] = decayed(self._decode.get(rows), seconds)
            return
        d = self.decode_cost(rows)
        if d is None:
            return
        self._per_token = decayed(self._per_token, max(seconds - d, 0.0) / prefilled)


def decayed(mean: float | None, value: float) -> float:
    """A decayed mean with one more value (the value itself when there is none yet)."""
    return value if mean is None else DECAY * mean + (1 - DECAY) * value
