"""The paged pool: page ownership under any sequence of scheduler operations (a Hypothesis state
machine with a shadow copy of every row's tokens), and paged decode attention (PyTorch and the
Triton kernel under TRITON_INTERPRET=1) against plain masked attention."""

import math

import pytest
import torch
from helpers import examples
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from engine.kernels import attention
from engine.kernels.attention import paged_decode_torch
from engine.kv import PagedKV
from engine.scheduler import Scheduler
from engine.sequence import Sequence

L, H, D = 2, 2, 4


class PoolMachine(RuleBasedStateMachine):
    """Admit / prefill (whole or chunk by chunk) / compact / append / finish / preempt / abort in
    any order. Every token written carries a unique id (K = id, V = -id, pos = id), and a shadow
    list per (sequence, layer, KV head) says which ids the row must hold, in order; a prompt being
    prefilled holds slots apart from the running batch, which decode steps (padded past the batch
    into those slots) must never touch."""

    @initialize(
        ps=st.sampled_from([1, 2, 4, 8]),
        pages=st.integers(30, 160),
        forks=st.integers(1, 2),
        budget=st.sampled_from([0, 4, 5, 13]),
    )
    def setup(self, ps, pages, forks, budget):
        self.kv = PagedKV(L, H, D, pages, ps, max_seqs=4, max_len=64)
        self.sched = Scheduler(self.kv, 4, max_prefill_tokens=48, max_batched_tokens=budget)
        self.forks, self.uid, self.shadow, self.next, self.retired = forks, 0, {}, {}, []
        self.ids = {}  # a prompt being prefilled: the ids of every token it will hold

    def _ids(self, shape):
        n = math.prod(shape)
        ids = torch.arange(self.uid + 1, self.uid + 1 + n, dtype=torch.float32).view(shape)
        self.uid += n
        return ids

    @rule(n=st.integers(1, 30))
    def add(self, n):
        # fits alone (the engine checks this)
        assume(self.forks * self.kv.seq_pages(n + 8) <= self.kv.n_pages)
        self.sched.add([Sequence(0, j, [1] * n, policy=None) for j in range(self.forks)])

    @rule(data=st.data(), decoding=st.integers(0, 3))
    def prefill_prune(self, data, decoding):
        """One step's prefill work: each chunk written after what its rows hold; a prompt that is
        whole is pruned (forks copied, the source compacted) and starts running."""
        kv, sched = self.kv, self.sched
        work = sched.schedule(min(decoding, len(sched.running)))
        if sched.max_batched_tokens:
            assert sum(t for _, t in work) + min(decoding, len(sched.running)) <= sched.max_batched_tokens
        for pf, take in work:
            src, n, first = pf.group[0].slot, len(pf.prompt), pf.done
            if id(pf) not in self.ids:
                self.ids[id(pf)] = self._ids((L, 1, H, n))
            ids = self.ids[id(pf)][..., first : first + take]
            for l in range(L):  # padded past the chunk: the padding must land harmlessly
                pad = torch.cat([ids[l], torch.full((1, H, 3), -7.0)], -1)
                kv.write_prompt(
                    l,
                    torch.tensor([src]),
                    pad[..., None].expand(1, H, take + 3, D),
                    -pad[..., None].expand(1, H, take + 3, D),
                    torch.tensor([take]),
                    torch.tensor([first]) if first else None,
                )
            pf.done += take
            kv.next_pos[src] = pf.done  # as the model's prefill does
            if pf.left:
                continue
            grp, ids = pf.group, self.ids.pop(id(pf))
            sched.prefilled(pf)
            flags = st.lists(st.booleans(), min_size=L * H * n, max_size=L * H * n)
            keeps = [torch.tensor(data.draw(flags)).view(L, 1, H, n) for _ in grp]
            for j, q in enumerate(grp[1:], 1):
                kv.assign(q.slot, keeps[j].sum(-1)[:, 0])
                kv.compact(torch.tensor([src]), torch.tensor([q.slot]), keeps[j])
            kv.compact(torch.tensor([src]), torch.tensor([src]), keeps[0])
            kv.trim(src, keeps[0].sum(-1)[:, 0])
            t = torch.arange(n)
            for j, q in enumerate(grp):  # (id, absolute position) of every kept token
                self.shadow[id(q)] = [
                    [
                        list(zip(ids[l, 0, h][keeps[j][l, 0, h]].tolist(), t[keeps[j][l, 0, h]].tolist()))
                        for h in range(H)
                    ]
                    for l in range(L)
                ]
                self.next[id(q)] = n
            sched.start(grp)

    @precondition(lambda self: self.sched.prefilling)
    @rule()
    def abort_prefilling(self):
        pf = self.sched.prefilling[0]
        self.sched.drop(pf.group)
        self.ids.pop(id(pf))
        self.retired += pf.group

    @precondition(lambda self: self.sched.running)
    @rule(data=st.data())
    def decode_step(self, data):
        """One step over a batch padded past the running sequences, some of them draining (not live:
        their token is not kept, as the engine does for a sequence whose last token is chosen)."""
        kv, sched = self.kv, self.sched
        drawn = data.draw(st.lists(st.booleans(), min_size=len(sched.running), max_size=len(sched.running)))
        flag = {id(q): f for q, f in zip(sched.running, drawn)}
        while kv.grow(live := [flag[id(q)] for q in sched.running]):
            self._drop(sched.preempt())
        n = len(sched.running)
        if not n:
            return
        B = data.draw(st.integers(n, kv.S))  # a CUDA-graph bucket: rows past n are padding
        kv.set_live(live)
        ids = self._ids((L, B, H))
        step = kv.begin_decode(B, [None] * L)
        for l in range(L):
            kv.append(
                l,
                ids[l, :, :, None, None].expand(B, H, 1, D),
                -ids[l, :, :, None, None].expand(B, H, 1, D),
                step,
            )
        for q, lv in zip(sched.running, live):
            if lv:
                for l in range(L):
                    for h in range(H):
                        self.shadow[id(q)][l][h].append((ids[l, q.slot, h].item(), self.next[id(q)]))
                self.next[id(q)] += 1
        kv.next_pos[:B] += kv.live[:B]  # as the model's decode does

    @precondition(lambda self: self.sched.running)
    @rule(data=st.data())
    def finish(self, data):
        q = data.draw(st.sampled_from(self.sched.running))
        self.sched.finish(q)
        self._drop(q)

    @precondition(lambda self: self.sched.running)
    @rule()
    def preempt(self):
        self._drop(self.sched.preempt())

    def _drop(self, q):
        self.shadow.pop(id(q))
        self.next.pop(id(q))
        self.retired.append(q)

    @invariant()
    def pages_are_owned_once(self):
        kv = self.kv
        owned = kv.h_table[kv.h_table > 0]
        free = kv._free[: kv.n_free]
        assert owned.numel() == owned.unique().numel(), "a page is owned twice"
        assert owned.numel() + kv.n_free == kv.n_pages, "owned + free != pool"
        assert not set(owned.tolist()) & set(free.tolist()) and free.numel() == free.unique().numel()
        assert set(owned.tolist()) | set(free.tolist()) == set(range(1, kv.n_pages + 1))

    @invariant()
    def rows_own_exactly_their_length(self):
        kv = self.kv
        assert torch.equal(kv.h_pages, -(-kv.h_len // kv.ps)), (
            "a row owns other than ceil(length / page_size) pages"
        )
        col = torch.arange(kv.P)
        assert ((kv.h_table > 0) == (col < kv.h_pages[..., None])).all()
        assert torch.equal(kv.table, kv.h_table), "device page table differs from the host's"
        n = len(self.sched.running)
        sources = [pf.group[0].slot for pf in self.sched.prefilling]
        idle = [s for s in range(n, kv.S) if s not in sources]
        assert kv.h_pages[:, idle].sum() == 0, "a slot no sequence runs in or is prefilled into owns pages"
        assert kv.lengths[:, idle].sum() == 0 and kv.live[n:].sum() == 0
        prefilling = [q for pf in self.sched.prefilling for q in pf.group]
        placed = self.sched.running + prefilling  # (a preempted sequence comes back)
        assert all(q.slot == -1 for q in self.retired if q not in placed)
        assert [q.slot for q in self.sched.running] == list(range(n))
        slots = [q.slot for q in prefilling]
        assert len(set(slots)) == len(slots) and min(slots, default=n) >= n, "prefill slots overlap"
        held = sum((len(pf.group) - 1) * kv.seq_pages(len(pf.prompt)) for pf in self.sched.prefilling)
        assert kv.held == held <= kv.n_free, "pages held for the forks of prompts being prefilled"

    @invariant()
    def prompts_being_prefilled_hold_their_chunks(self):
        kv = self.kv
        for pf in self.sched.prefilling:
            src, m = pf.group[0].slot, pf.done
            assert kv.next_pos[src] == m and (kv.lengths[:, src] == m).all()
            t = torch.arange(m)
            for l in range(L):
                for h in range(H):
                    page = kv.table[l, src, h, t // kv.ps].long()
                    assert kv.k[page, t % kv.ps, 0].tolist() == self.ids[id(pf)][l, 0, h, :m].tolist()
                    assert kv.pos[page, t % kv.ps].tolist() == t.tolist()

    @invariant()
    def rows_hold_their_tokens(self):
        kv = self.kv
        for q in self.sched.running:
            assert kv.next_pos[q.slot] == self.next[id(q)]
            for l in range(L):
                for h in range(H):
                    want = self.shadow[id(q)][l][h]
                    m = len(want)
                    assert kv.h_len[l, q.slot, h] == m and kv.lengths[l, q.slot, h] == m
                    t = torch.arange(m)
                    page = kv.table[l, q.slot, h, t // kv.ps].long()
                    assert kv.k[page, t % kv.ps, 0].tolist() == [x for x, _ in want]
                    assert kv.v[page, t % kv.ps, 1].tolist() == [-x for x, _ in want]
                    assert kv.pos[page, t % kv.ps].tolist() == [p for _, p in want]


TestPool = PoolMachine.TestCase
TestPool.settings = settings(max_examples=examples(200), stateful_step_count=25, deadline=None)


def masked_attention(q, keys, vals, visible):
    """q [H, D]; keys/vals [Hkv, T, D]; visible [Hkv, T] -> [H, D] (query head h reads KV head h // group)."""
    g = q.shape[0] // keys.shape[0]
    k, v, vis = keys.repeat_interleave(g, 0), vals.repeat_interleave(g, 0), visible.repeat_interleave(g, 0)
    s = (k @ q[..., None])[..., 0] / math.sqrt(q.shape[-1])
    p = torch.softmax(s.masked_fill(~vis, -math.inf), -1).nan_to_num(0.0)
    return (p[..., None] * v).sum(-2)


def _paged_case(data, seed, dtype):
    B, hkv, group = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    ps, Dh = data.draw(st.sampled_from([1, 2, 4, 16, 128])), data.draw(st.sampled_from([4, 16, 24]))
    lens = data.draw(st.lists(st.integers(0, 70), min_size=B * hkv, max_size=B * hkv))
    lens = torch.tensor(lens).view(B, hkv)
    window = data.draw(st.sampled_from([None, 5, 40]))
    P = -(-int(lens.max().clamp(min=1)) // ps) + data.draw(st.integers(0, 2))
    g = torch.Generator().manual_seed(seed)
    n_pages = B * hkv * P + 3
    perm = torch.randperm(n_pages, generator=g)[: B * hkv * P] + 1  # pages scattered over the pool
    table = perm.view(B, hkv, P).int()
    k = torch.randn(n_pages + 1, ps, Dh, generator=g).to(dtype)
    v = torch.randn(n_pages + 1, ps, Dh, generator=g).to(dtype)
    qpos = lens.amax(1).long() + torch.randint(0, 5, (B,), generator=g)
    pos = torch.randint(0, 80, (n_pages + 1, ps), generator=g, dtype=torch.int32)
    q = torch.randn(B, hkv * group, Dh, generator=g).to(dtype)
    return q, k, v, pos, table, lens.int(), qpos, window


def _reference(q, k, v, pos, table, lens, qpos, window):
    B, hkv, P = table.shape
    ps = k.shape[1]
    out = []
    for b in range(B):
        t = torch.arange(P * ps)
        pages = table[b].long()[:, t // ps]  # [Hkv, T]
        keys, vals = k[pages, t % ps].double(), v[pages, t % ps].double()
        visible = t < lens[b][:, None].long()
        if window:
            visible &= (qpos[b] - pos[pages, t % ps]) < window
        out.append(masked_attention(q[b].double(), keys, vals, visible))
    return torch.stack(out)


@settings(max_examples=examples(60), deadline=None)
@given(st.integers(0, 2**31 - 1), st.data())
def test_torch_paged_attention_equals_masked_attention(seed, data):
    case = _paged_case(data, seed, torch.float64)
    span = data.draw(st.sampled_from([None, "tight"]))
    lens = case[5]
    if span == "tight":
        span = max(1, -(-int(lens.max()) // case[1].shape[1]))
    got = paged_decode_torch(*case, span=span)
    torch.testing.assert_close(got, _reference(*case), atol=1e-10, rtol=0)


@pytest.mark.skipif(attention.triton is None, reason="triton is not installed")
@settings(max_examples=examples(40), deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([16, 32, 64]), st.sampled_from([1, 3, 8, 264]), st.data())
def test_triton_paged_attention_equals_masked_attention(seed, min_split, target, data):
    """On CPU the kernel runs under TRITON_INTERPRET=1 (conftest sets it without CUDA); small
    minimum splits make long rows spread over several splits, so the combine is exercised, and
    small program targets make the grid's bound on splits bind (the device-set split length must
    then still cover every row)."""
    case = _paged_case(data, seed, torch.float32)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    got = attention.paged_decode_triton(
        *[t.to(dev) for t in case[:-1]], case[-1], min_split=min_split, target=target
    ).cpu()
    torch.testing.assert_close(got.double(), _reference(*case), atol=2e-5, rtol=0)


@pytest.mark.skipif(attention.triton is None, reason="triton is not installed")
@pytest.mark.parametrize("hkv,target", [(1, 3), (1, 5), (2, 3), (2, 8)])
def test_triton_long_rows_fill_every_split_the_grid_allows(hkv, target):
    """Rows of ~1k tokens with 16-token minimum splits: the device-set split length makes a row use
    up to target / rows splits, exactly what the grid's static bound provides (one fewer loses tokens)."""
    g = torch.Generator().manual_seed(target)
    B, G, D, ps = 1, 2, 16, 16
    lens = torch.tensor([[1000, 517][:hkv]], dtype=torch.int32)
    P = 63
    table = (torch.randperm(B * hkv * P, generator=g) + 1).view(B, hkv, P).int()
    k, v = (torch.randn(B * hkv * P + 1, ps, D, generator=g) for _ in range(2))
    pos = torch.zeros(B * hkv * P + 1, ps, dtype=torch.int32)
    q = torch.randn(B, hkv * G, D, generator=g)
    case = (q, k, v, pos, table, lens, lens.amax(1).long(), None)
    got = attention.paged_decode_triton(*case[:-1], case[-1], min_split=16, target=target)
    torch.testing.assert_close(got.double(), _reference(*case), atol=2e-5, rtol=0)


def test_attention_implementation_choice(monkeypatch):
    monkeypatch.setenv("REFREEKV_ATTENTION", "torch")
    assert not attention.use_triton("cuda")
    monkeypatch.setenv("REFREEKV_ATTENTION", "")
    assert not attention.use_triton("cpu")
    assert attention.use_triton("cuda") == (attention.triton is not None)
