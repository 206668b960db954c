"""The step bound (engine/budget.py): a step's prompt tokens chosen from what steps cost, so that a
step with chunks takes at most `bound` decode steps of its batch. Here steps cost what a known
model of the machine says they cost; the budget sees only their durations."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.budget import FLOOR, StepBudget

CAP = 4096


def machine(decode_base: float, per_row: float, per_token: float):
    """Seconds of a step with `rows` decode rows and `tokens` prompt tokens."""
    return lambda rows, tokens: decode_base + per_row * rows + per_token * tokens


def drive(budget: StepBudget, cost, batches: list[int], steps: int = 40) -> list[tuple[int, int]]:
    """Run `steps` steps per batch size as a serving loop would (every other step has a chunk, as
    when prompts keep arriving): (rows, tokens it prefilled) of every step."""
    seen = []
    for rows in batches:
        for i in range(steps):
            tokens = budget.tokens(rows) - rows if i % 2 else 0
            budget.observe(rows, tokens, cost(rows, tokens))
            seen.append((rows, tokens))
    return seen


@settings(max_examples=60, deadline=None)
@given(
    decode_base=st.floats(0.005, 0.5),
    per_row=st.floats(0.0, 0.05),
    per_token=st.floats(1e-5, 0.02),
    bound=st.sampled_from([1.5, 2.0, 3.0, 5.0]),
    batches=st.lists(st.integers(1, 64), min_size=1, max_size=4),
)
def test_a_step_with_chunks_stays_within_the_bound(decode_base, per_row, per_token, bound, batches):
    """Once measured, a step's chunk is the largest whose step costs at most `bound` decode steps
    (within a token), unless the cap or the floor decides."""
    cost = machine(decode_base, per_row, per_token)
    budget = StepBudget(CAP, bound, start=96)
    drive(budget, cost, batches)
    for rows in sorted(set(batches)):
        d = cost(rows, 0)
        chunk = budget.tokens(rows) - rows
        best = int((bound - 1) * d / per_token)  # the oracle: the cost model solved for the chunk
        want = min(max(best, FLOOR), CAP - rows)
        assert abs(chunk - want) <= max(1, 0.01 * want), (rows, chunk, want)
        if FLOOR < chunk < CAP - rows:
            assert cost(rows, chunk) <= bound * d * 1.01 + per_token


def test_a_larger_batch_gets_a_larger_chunk():
    """A decode step of more rows costs more, so a stream can wait for more prompt tokens."""
    cost = machine(0.08, 0.01, 0.004)
    budget = StepBudget(CAP, 3.0, start=96)
    drive(budget, cost, [1, 8, 2, 4])
    chunks = [budget.tokens(rows) - rows for rows in (1, 2, 4, 8)]
    assert chunks == sorted(chunks) and chunks[0] < chunks[-1]
    assert chunks[0] == pytest.approx(2 * 0.09 / 0.004, abs=1)


def test_nobody_waits_nothing_measured_and_the_cap():
    budget = StepBudget(512, 3.0, start=96)
    assert budget.tokens(0) == 512  # no running stream: the cap, whole prompts up to it
    assert budget.tokens(3) == 96  # before any step's cost is known
    assert budget.tokens(90) == 90 + FLOOR  # a prompt always progresses
    drive(budget, machine(1.0, 0.0, 1e-6), [2])  # chunks nearly free: the cap decides
    assert budget.tokens(2) == 512


def test_the_chunk_follows_a_rising_cost():
    """A prompt's later chunks attend over more of it: their tokens cost more, and the budget
    shrinks with them (the estimate follows the last ten or so steps)."""
    budget = StepBudget(CAP, 3.0, start=96)
    drive(budget, machine(0.1, 0.0, 0.002), [4])
    before = budget.tokens(4)
    drive(budget, machine(0.1, 0.0, 0.004), [4], steps=80)
    after = budget.tokens(4)
    assert after - 4 == pytest.approx((before - 4) / 2, rel=0.05)


def test_bound_must_exceed_one():
    with pytest.raises(ValueError, match="bound must be > 1"):
        StepBudget(CAP, 1.0, start=96)
