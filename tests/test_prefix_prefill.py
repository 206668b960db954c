"""Prefill over a paged prefix (engine/model.py prefill_packed(prefix=...)), the one function chunked
prefill and a prefix cache share: a prompt prefilled chunk by chunk, each chunk attending to its
row's keys in the pool, leaves the pool, the last-token logits, the probe and the query moments of
one whole prefill, with sliding windows, several prompts at different offsets in one call, and
chunks from one token to longer than the prompt."""

import pytest
import torch
from helpers import examples, paged
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.engine import Engine
from engine.model import query_moments


def chunked(draw, n: int, last: int) -> list[int]:
    """A split of n tokens into chunks (sizes drawn), the last one at least `last` long."""
    sizes, left = [], n
    while left > 0:
        size = min(left, draw(st.integers(1, max(1, n))))
        if 0 < left - size < last:  # what would remain is too short to end on: take it all now
            size = left
        sizes.append(size)
        left -= size
    return sizes


def whole_and_chunked(eng, prompts, splits, w):
    """(logits, probe, moments, kv) of one prefill of every prompt, and the same chunk by chunk:
    round r prefills chunk r of every prompt that still has one, in one call."""
    c, m = eng.config, eng.model
    lens = [len(p) for p in prompts]
    out = []
    kv, slots = paged(c, lens, page_size=4)
    mom = query_moments(c, len(prompts))
    logits, probe = m.prefill_packed(torch.tensor(sum(prompts, [])), lens, kv, slots, w, moments=mom)
    out.append((logits, probe, mom, kv))
    kv, slots = paged(c, lens, page_size=4)
    mom = query_moments(c, len(prompts))
    done = [0] * len(prompts)
    last_logits, last_probe = [None] * len(prompts), [None] * len(prompts)
    for r in range(max(map(len, splits))):
        batch = [b for b in range(len(prompts)) if r < len(splits[b])]
        chunk = [prompts[b][done[b] : done[b] + splits[b][r]] for b in batch]
        sel = torch.tensor(batch)
        part = tuple(x[:, sel].clone() for x in mom)
        lg, pr = m.prefill_packed(
            torch.tensor(sum(chunk, [])),
            [len(x) for x in chunk],
            kv,
            slots[sel],
            w,
            moments=part,
            prefix=[done[b] for b in batch],
        )
        for i, b in enumerate(batch):
            for whole, piece in zip(mom, part):
                whole[:, b] = piece[:, i]
            done[b] += len(chunk[i])
            if r == len(splits[b]) - 1:
                last_logits[b] = lg[i]
                last_probe[b] = pr if pr is None else pr[:, i]
    out.append((torch.stack(last_logits), last_probe, mom, kv))
    return out


@settings(max_examples=examples(12), deadline=None)
@given(st.data())
@pytest.mark.parametrize("family", ["llama", "qwen2-window"])
def test_chunked_prefill_equals_one_prefill(tiny_ckpts, family, data):
    eng = Engine(str(tiny_ckpts[family, False]), device="cpu", kv_memory=0.05)
    c = eng.config
    w = data.draw(st.integers(1, 4), label="probe rows")
    lens = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=3), label="prompt lengths")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lens]
    splits = [chunked(data.draw, n, min(w, n)) for n in lens]
    (l1, p1, m1, kv1), (l2, p2, m2, kv2) = whole_and_chunked(eng, prompts, splits, w)
    torch.testing.assert_close(l2, l1, atol=1e-4, rtol=1e-4)
    for b, n in enumerate(lens):  # the probe of the last chunk spans the whole prompt
        torch.testing.assert_close(p2[b][..., :n], p1[:, b, ..., :n], atol=1e-5, rtol=1e-4)
    for whole, parts in zip(m1, m2):
        torch.testing.assert_close(parts, whole, atol=1e-3, rtol=1e-4)
    assert torch.equal(kv1.lengths, kv2.lengths) and torch.equal(kv1.next_pos, kv2.next_pos)
    slots = torch.arange(len(lens))
    for layer in range(c.n_layers):
        k1, v1, pos1 = kv1.read(layer, slots, max(lens))
        k2, v2, pos2 = kv2.read(layer, slots, max(lens))
        for b, n in enumerate(lens):
            torch.testing.assert_close(k2[b, :, :n], k1[b, :, :n], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(v2[b, :, :n], v1[b, :, :n], atol=1e-4, rtol=1e-4)
            assert torch.equal(pos2[b, :, :n], pos1[b, :, :n])


def test_probe_rows_before_the_chunk_are_zero(tiny_ckpts):
    """A chunk shorter than the probe sees only its own queries: the rows before it are zero (the
    scheduler ends every prompt on a chunk at least the probe's rows long)."""
    eng = Engine(str(tiny_ckpts["llama", False]), device="cpu", kv_memory=0.05)
    kv, slots = paged(eng.config, [20], page_size=4)
    eng.model.prefill_packed(torch.arange(3, 13), [10], kv, slots, 0)
    _, probe = eng.model.prefill_packed(torch.arange(3, 6), [3], kv, slots, 5, prefix=[10])
    assert not probe[..., :2, :].any() and probe[..., 2:, :13].sum(-1).allclose(torch.tensor(1.0))
