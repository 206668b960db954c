"""Prefill over a paged prefix (engine/model.py prefill_packed / prefill with prefix=...), the one
function chunked prefill and a prefix cache share: a prompt prefilled chunk by chunk, each chunk
attending to its row's keys in the pool, leaves the pool, the last-token logits, the probe (the
chunks' probes added up: each fills the rows of the whole prompt's last queries it holds) and the
query moments of one whole prefill, with sliding windows, several prompts at different offsets in
one call, chunks from one token to longer than the prompt, packed and right-padded."""

import pytest
import torch
from helpers import examples, paged
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.engine import Engine
from engine.model import query_moments


def chunked(draw, n: int) -> list[int]:
    """A split of n tokens into chunks (sizes drawn)."""
    sizes, left = [], n
    while left > 0:
        size = min(left, draw(st.integers(1, max(1, n))))
        sizes.append(size)
        left -= size
    return sizes


def padded_prefill(m, chunk, kv, slots, w, moments, prefix, ends):
    """The right-padded prefill (the compiled path's) of one round of chunks."""
    lens = torch.tensor([len(x) for x in chunk])
    tokens = torch.zeros(len(chunk), int(lens.max()), dtype=torch.long)
    for b, x in enumerate(chunk):
        tokens[b, : len(x)] = torch.tensor(x)
    first = torch.tensor(prefix)
    chunk_kw = dict(ends=torch.tensor(ends), width=int((first + lens).max()))
    if first.any():
        chunk_kw["prefix"] = first
    return m.prefill(tokens, lens, kv, slots, probe_rows=w, moments=moments, **chunk_kw)


def whole_and_chunked(eng, prompts, splits, w, padded=False):
    """(logits, probe, moments, kv) of one prefill of every prompt, and the same chunk by chunk:
    round r prefills chunk r of every prompt that still has one, in one call; the probes add up."""
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
    last_logits = [None] * len(prompts)
    probes = torch.zeros_like(probe)
    for r in range(max(map(len, splits))):
        batch = [b for b in range(len(prompts)) if r < len(splits[b])]
        chunk = [prompts[b][done[b] : done[b] + splits[b][r]] for b in batch]
        sel = torch.tensor(batch)
        part = tuple(x[:, sel].clone() for x in mom)
        prefix, ends = [done[b] for b in batch], [lens[b] for b in batch]
        if padded:
            lg, pr = padded_prefill(m, chunk, kv, slots[sel], w, part, prefix, ends)
        else:
            lg, pr = m.prefill_packed(
                torch.tensor(sum(chunk, [])),
                [len(x) for x in chunk],
                kv,
                slots[sel],
                w,
                moments=part,
                prefix=prefix,
                ends=ends,
            )
        for i, b in enumerate(batch):
            for whole, piece in zip(mom, part):
                whole[:, b] = piece[:, i]
            done[b] += len(chunk[i])
            probes[:, b, ..., : done[b]] += pr[:, i, ..., : done[b]]
            if r == len(splits[b]) - 1:
                last_logits[b] = lg[i]
    out.append((torch.stack(last_logits), probes, mom, kv))
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
    splits = [chunked(data.draw, n) for n in lens]
    padded = data.draw(st.booleans(), label="padded")
    (l1, p1, m1, kv1), (l2, p2, m2, kv2) = whole_and_chunked(eng, prompts, splits, w, padded)
    torch.testing.assert_close(l2, l1, atol=1e-4, rtol=1e-4)
    for b, n in enumerate(lens):  # the chunks' probes add up to the whole prompt's
        torch.testing.assert_close(p2[:, b, ..., :n], p1[:, b, ..., :n], atol=1e-5, rtol=1e-4)
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


def test_a_chunk_fills_only_the_probe_rows_it_holds(tiny_ckpts):
    """The probe's rows are the last 5 queries of a 13-token prompt (positions 8-12): a chunk of
    positions 10-12 fills the last three, over the 13 keys so far; the chunk before it the first two."""
    eng = Engine(str(tiny_ckpts["llama", False]), device="cpu", kv_memory=0.05)
    kv, slots = paged(eng.config, [20], page_size=4)
    _, early = eng.model.prefill_packed(torch.arange(3, 13), [10], kv, slots, 5, ends=[13])
    _, probe = eng.model.prefill_packed(torch.arange(3, 6), [3], kv, slots, 5, prefix=[10], ends=[13])
    assert not probe[..., :2, :].any() and probe[..., 2:, :13].sum(-1).allclose(torch.tensor(1.0))
    assert not early[..., 2:, :].any() and early[..., :2, :10].sum(-1).allclose(torch.tensor(1.0))
    assert not early[..., 0, 9:].any()  # position 8 sees keys 0-8 only
