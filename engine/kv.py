"""The paged KV pool: allocated once, shared by every layer, KV head and sequence.

The pool is cut into pages of `page_size` tokens holding K (post-RoPE), V and each token's
absolute position. A page serves one (layer, KV head) row of a sequence (with the prefix cache, the
same row of several sequences that start with the same tokens); one free list serves every row,
so a page freed by pruning in one layer of one sequence can go to any row of any sequence.
A sequence occupies a slot; its rows have their own lengths (pruning is per layer and KV head).

Device state (read by the compiled steps, updated in place, fixed addresses):
  k, v [pages + 1, page_size, D], pos [pages + 1, page_size]: page 0 is the trash page: every
        unassigned table entry points at it, so padding rows of a batch write there harmlessly;
  table [L, slots, Hkv, P] page ids, lengths [L, slots, Hkv], next_pos [slots], live [slots],
  queries [L, slots, W, H, D]: each slot's last W decode queries (post-RoPE, position p at p % W),
        what a decode-time re-plan (engine/pruning.py) reads outside the compiled step.
Host state (the allocator; the host hands out pages, so it never reads the device back):
  h_table, h_pages (pages owned per row), h_len (each row's length once the queued steps ran),
  the free stack and ref, each page's holders: the rows whose tables hold it and the prefix
  cache (engine/prefix.py). Invariants: a row holds exactly ceil(h_len / page_size) pages, entries
  past them are 0, and the device table equals h_table; a page is free exactly when ref is 0; a
  page with ref > 1 is never written (PagedKV.compact copies a row's kept tokens off it).
"""

from typing import NamedTuple

import torch

from engine.kernels import attention
from engine.kernels.attention import use_triton
from weights.errors import UserError


# ------------------------------------------------------------- page arithmetic (only here)
def page_bytes(page_size: int, head_dim: int, dtype: torch.dtype) -> int:
    return page_size * (2 * head_dim * dtype.itemsize + 4)  # K, V, int32 position


def row_pages(n_tokens, page_size: int):
    """Pages a row of n tokens owns (an int or a tensor)."""
    return -(-n_tokens // page_size)


def seq_pages(n_tokens: int, n_layers: int, n_kv_heads: int, page_size: int) -> int:
    """Pages a sequence whose every (layer, KV head) row holds n tokens owns."""
    return n_layers * n_kv_heads * row_pages(n_tokens, page_size)


class DecodeStep(NamedTuple):
    """What one decode step's layers share, built once by PagedKV.begin_decode."""

    page: torch.Tensor  # [L, B, Hkv] int64: the page of each row's new token
    at: torch.Tensor  # [L, B, Hkv] int64: its place in the page
    pages: torch.Tensor | None  # [L, B, Hkv, span] int64: the pages the PyTorch attention reads
    mask: torch.Tensor | None  # [L, B, Hkv, 1, span * page_size] additive (0 live, -inf not)
    empty: torch.Tensor | None  # [L, B, Hkv, 1, 1] rows with nothing live (their output is 0)


class PagedKV:
    def __init__(
        self,
        n_layers,
        n_kv_heads,
        head_dim,
        n_pages,
        page_size=16,
        max_seqs=8,
        max_len=4096,
        dtype=torch.float32,
        device="cpu",
        n_heads=None,
        window=8,
    ):
        if page_size < 1 or page_size & (page_size - 1) or page_size > 256:
            raise UserError(f"page_size must be a power of two from 1 to 256, got {page_size}", "page_size")
        if max_seqs < 1:
            raise UserError(f"max_seqs must be >= 1, got {max_seqs}", "max_seqs")
        if n_pages < 1:
            raise UserError(f"the KV pool must hold at least one page, got {n_pages}")
        L, H, S = n_layers, n_kv_heads, max_seqs
        self.L, self.H, self.D, self.S, self.ps, self.n_pages = L, H, head_dim, S, page_size, n_pages
        self.P = row_pages(max_len, page_size)  # table width: pages of the longest row
        self.device = torch.device(device)
        dev = self.device
        self.k = torch.zeros(n_pages + 1, page_size, head_dim, dtype=dtype, device=dev)
        self.v = torch.zeros(n_pages + 1, page_size, head_dim, dtype=dtype, device=dev)
        self.pos = torch.zeros(n_pages + 1, page_size, dtype=torch.int32, device=dev)
        self.table = torch.zeros(L, S, H, self.P, dtype=torch.int32, device=dev)
        self.lengths = torch.zeros(L, S, H, dtype=torch.int32, device=dev)
        self.next_pos = torch.zeros(S, dtype=torch.int64, device=dev)
        self.live = torch.zeros(S, dtype=torch.int32, device=dev)
        self.W = window if n_heads else 0  # no query ring without the query heads (a bare store)
        qshape = (L, S, self.W, n_heads, head_dim) if self.W else (0,)
        self.queries = torch.zeros(qshape, dtype=dtype, device=dev)
        if dev.type == "cuda":  # fixed addresses: CUDA graphs mutate them in place; no guard, no recompiles
            state = (self.k, self.v, self.pos, self.table, self.lengths, self.next_pos, self.live)
            for t in (*state, self.queries):
                torch._dynamo.mark_static_address(t, guard=False)
        self.h_table = torch.zeros(L, S, H, self.P, dtype=torch.int32)
        self.h_pages = torch.zeros(L, S, H, dtype=torch.int64)
        self.h_len = torch.zeros(L, S, H, dtype=torch.int64)
        self._free = torch.arange(n_pages, 0, -1, dtype=torch.int32)  # a stack: the top is the end
        self.n_free = n_pages
        self.ref = torch.zeros(n_pages + 1, dtype=torch.int32)  # holders of each page (0: free)
        self.cache = None  # the prefix cache (engine/prefix.py) that holds pages too, if any
        self.held = 0  # free pages promised (to the forks of a prompt being prefilled): not available
        self.triton = use_triton(dev)  # decode attention: the Triton kernel, or PyTorch (reads `span` pages)

    # ----------------------------------------------------------------------------- host allocator
    def pages_for(self, n_tokens):
        """Pages a row of n tokens owns (int or tensor)."""
        return row_pages(n_tokens, self.ps)

    def seq_pages(self, n_tokens: int) -> int:
        """Pages a sequence whose every row holds n tokens owns."""
        return seq_pages(n_tokens, self.L, self.H, self.ps)

    @property
    def used(self) -> int:
        return self.n_pages - self.n_free

    @property
    def available(self) -> int:
        """Free pages not held for anyone, and the prefix cache's unused pages (evicted on demand)."""
        return self.n_free - self.held + (self.cache.evictable() if self.cache else 0)

    def _alloc(self, k: int) -> torch.Tensor:
        if k > self.n_free - self.held and self.cache:  # unused cached blocks go before held pages
            self.cache.evict(k - self.n_free + self.held)
        assert k <= self.n_free, (k, self.n_free)
        self.n_free -= k
        ids = self._free[self.n_free : self.n_free + k].clone()
        self.ref[ids.long()] = 1
        return ids

    def _release(self, ids: torch.Tensor):
        """Drop one reference per occurrence of a page in ids; those no one holds are free again."""
        self.ref_pages(ids, -1)

    def ref_pages(self, ids: torch.Tensor, by: int):
        """Add `by` (+1 or -1) to the holders of a page per occurrence in ids (one page may occur
        several times: rows of several sequences sharing it); free the pages no one holds."""
        ids = ids.reshape(-1).long()
        self.ref.index_add_(0, ids, torch.full_like(ids, by, dtype=self.ref.dtype))
        if by < 0:
            ids = ids.unique()
            gone = ids[self.ref[ids] == 0].int()
            k = gone.numel()
            self._free[self.n_free : self.n_free + k] = gone
            self.n_free += k

    def _h2d(self, dst: torch.Tensor, src: torch.Tensor):
        """Host -> device without waiting for the device (pinned staging on CUDA)."""
        if dst.is_cuda:
            dst.copy_(src.pin_memory(), non_blocking=True)
        else:
            dst.copy_(src)

    def _push(self, slot: int):
        self._h2d(self.table[:, slot], self.h_table[:, slot])

    def assign(self, slot: int, lengths, shared: torch.Tensor | None = None) -> None:
        """Give an empty slot's rows pages for `lengths` tokens (an int, or [L, Hkv] per row).
        shared [L, Hkv, c]: the rows' first c pages are these (a cached prefix: referenced, not
        copied); the rest are fresh."""
        ln = torch.as_tensor(lengths, dtype=torch.int64).expand(self.L, self.H)
        assert self.h_pages[:, slot].sum() == 0, f"slot {slot} is not empty"
        need = self.pages_for(ln)
        c = 0 if shared is None else shared.shape[-1]
        if c:  # referenced first: allocating may evict unused cached blocks
            self.ref_pages(shared, 1)
        ids = self._alloc(int(need.sum()) - c * self.L * self.H)
        cols = torch.arange(self.P)
        owned = (cols >= c) & (cols < need[..., None])  # [L, Hkv, P]
        self.h_table[:, slot][owned] = ids  # row-major: each row's pages in order
        if c:
            self.h_table[:, slot, :, :c] = shared
        self.h_pages[:, slot], self.h_len[:, slot] = need, ln
        self._push(slot)

    def trim(self, slot: int, lengths: torch.Tensor) -> None:
        """After compaction: rows keep `lengths` [L, Hkv] tokens; the emptied trailing pages go back."""
        ln = lengths.to(torch.int64)
        need = self.pages_for(ln)
        assert (need <= self.h_pages[:, slot]).all()
        tab = self.h_table[:, slot]
        gone = (torch.arange(self.P) >= need[..., None]) & (
            torch.arange(self.P) < self.h_pages[:, slot, :, None]
        )
        self._release(tab[gone])
        tab[gone] = 0
        self.h_pages[:, slot], self.h_len[:, slot] = need, ln
        self._push(slot)

    def release(self, slot: int) -> None:
        """Return every page of a slot (a finished or preempted sequence) and clear it."""
        tab = self.h_table[:, slot]
        self._release(tab[tab > 0])
        tab.zero_()
        self.h_pages[:, slot] = 0
        self.h_len[:, slot] = 0
        self._push(slot)
        self.lengths[:, slot] = 0
        self.live[slot] = 0

    def reset(self) -> None:
        """Release every slot (after a generation that did not finish: an error, an interrupt)."""
        for slot in range(self.S):
            if self.h_pages[:, slot].any() or self.h_len[:, slot].any():
                self.release(slot)
        self.live.zero_()
        self.held = 0

    def move(self, src: int, dst: int) -> None:
        """Move a sequence from slot src to the empty slot dst (keeps running slots contiguous)."""
        for t in (self.h_table, self.h_pages, self.h_len):
            t[:, dst] = t[:, src]
            t[:, src] = 0
        self.table[:, dst] = self.table[:, src]
        self.lengths[:, dst] = self.lengths[:, src]
        if self.W:
            self.queries[:, dst] = self.queries[:, src]
        self.next_pos[dst], self.live[dst] = self.next_pos[src], self.live[src]
        self.table[:, src], self.lengths[:, src], self.live[src] = 0, 0, 0

    def swap(self, a: int, b: int) -> None:
        """Exchange the sequences of slots a and b (everything move carries)."""
        ab, ba = [a, b], [b, a]
        for t in (self.h_table, self.h_pages, self.h_len, self.table, self.lengths, self.queries):
            if t.dim() > 1:
                t[:, ab] = t[:, ba]
        for t in (self.next_pos, self.live):
            t[ab] = t[ba]

    def shortage(self, live: list[bool]) -> int:
        """Pages missing for the next decode step of the slots [0, len(live)) marked live (0: it fits)."""
        n = len(live)
        grows = torch.tensor(live, dtype=torch.bool)[None, :, None]
        full = (self.h_len[:, :n] >= self.h_pages[:, :n] * self.ps) & grows  # rows whose last page is full
        return max(0, int(full.sum()) - self.available)

    def grow(self, live: list[bool]) -> int:
        """Reserve room for one more token in every row of the slots [0, len(live)) marked live
        (the next decode step). Returns 0 when done, else how many pages are missing (then nothing
        changed)."""
        n = len(live)
        grows = torch.tensor(live, dtype=torch.bool)[None, :, None]
        ln, pg = self.h_len[:, :n], self.h_pages[:, :n]
        full = (ln >= pg * self.ps) & grows  # rows whose last page is full
        k = int(full.sum())
        if k > self.available:
            return k - self.available
        if k:
            l, s, h = full.nonzero(as_tuple=True)
            ids = self._alloc(k)
            cols = pg[full]
            self.h_table[l, s, h, cols] = ids
            pg[full] += 1
            flat = ((l * self.S + s) * self.H + h) * self.P + cols
            if self.table.is_cuda:
                flat, ids = (t.pin_memory().to(self.device, non_blocking=True) for t in (flat, ids))
            self.table.view(-1)[flat] = ids
        ln += grows
        return 0

    def set_live(self, live: list[bool]) -> None:
        """Which of the slots [0, len(live)) advance in the next decode steps (the rest of the
        batch, and every other slot, is padding: it writes into the trash page)."""
        mask = torch.zeros(self.S, dtype=torch.int32)
        mask[: len(live)] = torch.tensor(live, dtype=torch.int32)
        self._h2d(self.live, mask)

    def owned(self, slot: int) -> int:
        return int(self.h_pages[:, slot].sum())

    def read(self, layer: int, slots: torch.Tensor, n: int):
        """The first n slots of the rows of `slots` [B] in one layer, as they sit in the pool: k, v
        [B, Hkv, n, D] (pool dtype) and positions [B, Hkv, n]. Slots past a row's length hold
        whatever their page holds (the trash page past the owned ones): callers mask by length."""
        npg = self.pages_for(n)
        flat = self.table[layer, slots, :, :npg].reshape(-1).long()  # [B * Hkv * npg]
        B, ps, D = slots.shape[0], self.ps, self.D

        def rows(buf, *tail):
            return buf.index_select(0, flat).view(B, self.H, npg * ps, *tail)[:, :, :n]

        return rows(self.k, D), rows(self.v, D), rows(self.pos)

    # ------------------------------------------------------------------------- device (compiled)
    def _flat(self, page: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Where token t of a row sits in the flat k / v / pos buffers, given its page (reads; the
        steps' writes index k[page, t % page_size] itself: written through a flat view, a compiled
        step would copy the whole pool for each write)."""
        return page.long() * self.ps + t % self.ps

    def write_prompt(
        self,
        layer: int,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lens: torch.Tensor,
        first=None,
    ):
        """Prefill: write right-padded prompts' K/V [B, Hkv, N, D] into the slots' pages; row b is
        live up to lens[b] (padding lands past the length or in the trash page). first [B] or None:
        the rows already hold that many tokens (a chunk after a paged prefix) and this goes after."""
        B, H, N, D = k.shape
        t = torch.arange(N, device=k.device)
        if first is not None:
            t = (first[:, None] + t)[:, None]  # [B, 1, N] positions
        cols = (t // self.ps).clamp(max=self.P - 1).expand(B, H, N)
        page = self.table[layer, slots].gather(-1, cols).long()  # [B, Hkv, N]
        if first is not None:  # padding past the table goes to the trash page
            page = torch.where(t < self.P * self.ps, page, 0)
        at = t % self.ps
        self.k[page, at] = k
        self.v[page, at] = v
        self.pos[page, at] = t.int()
        self.lengths[layer, slots] = (lens if first is None else first + lens)[:, None].int()

    def write_packed(
        self, layer: int, owner: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ):
        """Prefill, packed: token t of k, v [Hkv, T, D] goes to slot owner[t] at position pos[t]
        in every KV head's row (each row owns pages for its prompt)."""
        H = k.shape[0]
        heads = torch.arange(H, device=k.device)
        page = self.table[layer, owner[:, None], heads[None], (pos // self.ps)[:, None]].long()  # [T, Hkv]
        at = (pos % self.ps)[:, None]
        self.k[page, at] = k.transpose(0, 1)  # [T, Hkv, D], written from the strided view
        self.v[page, at] = v.transpose(0, 1)
        self.pos[page, at] = pos[:, None].int()

    def begin_decode(self, B: int, windows: tuple, span=None) -> DecodeStep:
        """Decode, once per step for every layer (slots [0, B)): where each row's new token goes,
        its position written, every row's length advanced by the slot's live flag, and (PyTorch
        attention) the pages read and the masks. windows: each layer's window (0: none)."""
        # compiled, a slice [:, :B] of the pool's state would be contiguous for B == max_seqs
        # alone (a program of its own): rows are read with index_select (a fresh contiguous tensor)
        # and the lengths advance whole (live is 0 past the batch)
        rows = torch.arange(B, device=self.device)
        ln = self.lengths.index_select(1, rows)  # [L, B, Hkv]
        page = self.table.gather(-1, (ln // self.ps).long()[..., None])[..., 0].long()
        # rows that do not advance (a CUDA-graph bucket's padding, which may be a slot still being
        # prefilled) write into the trash page
        page = page * self.live.index_select(0, rows)[None, :, None].long()
        at = (ln % self.ps).long()
        self.pos[page, at] = self.next_pos[:B, None].int()
        self.lengths += self.live[:, None]
        if self.triton:
            return DecodeStep(page, at, None, None, None)
        ln += self.live[:B, None]
        pages = self.table.index_select(1, rows)
        if span is not None:
            pages = pages.index_select(3, torch.arange(span, device=self.device))
        pages = pages.long()
        wins = None
        if any(windows):
            wins = torch.tensor([w or attention.NO_WINDOW for w in windows], device=self.device)
        mask, empty = attention.decode_masks(self.pos, pages, ln, self.next_pos[:B], wins, self.k.dtype)
        return DecodeStep(page, at, pages, mask, empty)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: DecodeStep):
        """Decode: write one token per slot [B, Hkv, 1, D] where begin_decode placed it."""
        page, at = step.page[layer], step.at[layer]
        self.k[page, at] = k[:, :, 0]
        self.v[page, at] = v[:, :, 0]

    def end_decode(self, q: torch.Tensor):
        """Decode, after every layer: keep q [L, B, H, D] (slots [0, B)) as each slot's query at its
        position, and move every live slot on by one position."""
        if self.W:
            B = q.shape[1]
            at = self.next_pos[:B] % self.W
            self.queries[:, torch.arange(B, device=q.device), at] = q
        self.next_pos += self.live  # 0 past the batch: a whole-buffer add, no slice to specialise on

    def attend(self, layer: int, q: torch.Tensor, window, step: DecodeStep) -> torch.Tensor:
        """Decode attention of q [B, H, D] (slots [0, B)) over each row's live tokens."""
        if not self.triton:
            pages, mask, empty = step.pages[layer], step.mask[layer], step.empty[layer]
            return attention.paged_decode_layer(q, self.k, self.v, pages, mask, empty)
        B = q.shape[0]
        return attention.paged_decode_triton(
            q,
            self.k,
            self.v,
            self.pos,
            self.table[layer, :B],
            self.lengths[layer, :B],
            self.next_pos[:B],
            window,
        )

    def compact(self, src: torch.Tensor, dst: torch.Tensor, keep: torch.Tensor, own=None):
        """Keep the prompt slots marked in keep [L, B, Hkv, N] of the sequences in slots `src`,
        moved to the front of the rows of slots `dst` in order (dst == src: in place; otherwise
        dst rows must own pages for keep.sum(-1) tokens). Gathers before it scatters, layer by layer.
        In place, a shared page (a cached prefix) is never written: the row's kept tokens from its
        first evicted one on go to fresh pages (from its first token on, for the rows of the slots
        in `own`: they will re-plan while decoding), and the row drops its reference."""
        ps, D = self.ps, self.D
        N = keep.shape[-1]
        j = torch.arange(N, device=keep.device)
        src_table = dst_table = self.table
        if self.cache is not None and torch.equal(src, dst):
            src_table, dst_table = self._unshare(dst.tolist(), keep, own or ())
        for layer in range(self.L):
            # [B, Hkv, N] source of slot j
            order = torch.argsort((~keep[layer]).to(torch.int8), dim=-1, stable=True)
            s_flat = self._flat(src_table[layer, src].gather(-1, order // ps), order).reshape(-1)
            d_tab = dst_table[layer, dst]
            d_flat = self._flat(d_tab.gather(-1, (j // ps).expand_as(order)), j).reshape(-1)
            for buf in (self.k.view(-1, D), self.v.view(-1, D), self.pos.view(-1)):
                buf[d_flat] = buf[s_flat]
            self.lengths[layer, dst] = keep[layer].sum(-1).int()
        self.next_pos[dst] = self.next_pos[src]

    def _unshare(self, slots: list[int], keep: torch.Tensor, own) -> tuple[torch.Tensor, torch.Tensor]:
        """Before an in-place compaction of `slots` (keep [L, B, Hkv, N]): each row's shared pages
        from its first evicted token's page up to its kept length are replaced by fresh ones (the
        row drops its reference; from page 0 for the slots in `own`). Returns the tables the
        compaction reads through (the old pages) and writes through: fresh pages where they
        replace shared ones, the trash page for the other shared pages (the kept tokens already
        there, or tokens past the kept length)."""
        tab = self.h_table[:, slots]  # [L, B, Hkv, P]
        shared = (self.ref[tab.long()] > 1) & (tab > 0)
        if not shared.any():
            return self.table, self.table
        old = self.table.clone()
        evicted = ~keep.cpu()
        N = keep.shape[-1]
        first = torch.where(evicted.any(-1), evicted.int().argmax(-1), N)  # [L, B, Hkv]
        for b, slot in enumerate(slots):
            if slot in own:
                first[:, b] = 0
        cols = torch.arange(self.P)
        kept = self.pages_for(keep.sum(-1).cpu())[..., None]
        fresh = shared & (cols >= first[..., None] // self.ps) & (cols < kept)
        ids = self._alloc(int(fresh.sum()))
        write = tab.clone()
        write[shared] = 0
        write[fresh] = ids
        self._release(tab[fresh])
        tab[fresh] = ids
        self.h_table[:, slots] = tab
        out = old.clone()
        out[:, slots] = write.to(self.device)
        for slot in slots:
            self._push(slot)
        return old, out
