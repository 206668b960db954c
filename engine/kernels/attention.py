"""Decode attention over the paged KV pool: one query token per sequence, each (sequence, KV head)
row reading only its own pages up to its own length.

    paged_decode(q, k, v, pos, table, lengths, qpos, window, span)

q [B, H, D]; k, v [pages, page_size, D] (the pool, page 0 the trash page); pos [pages, page_size]
absolute positions; table [B, Hkv, P] page ids of each row; lengths [B, Hkv] live tokens; qpos
[B] the query's position. Query head h reads KV head h // (H // Hkv).

Two implementations with one contract:
- `paged_decode_triton`: flash-decoding in Triton. One program per (row, split of the KV length):
  the GQA group's query heads are folded into one block (K/V are read once per group), the row
  is walked block by block (a block gathers whole pages) up to its own length, a partial softmax
  is kept per split and a second kernel combines each row's own splits, so a single long row
  still spreads over the GPU. Runs on CUDA, and on the CPU under TRITON_INTERPRET=1 (how CI
  tests it).
- `paged_decode_torch`: plain PyTorch (gather the first `span` pages of each row, masked SDPA).
  The CPU path and the oracle in tests; `span` (pages, known on the host) bounds what it reads.
  A decode step builds what every layer shares once (`decode_masks`: the additive masks of all
  layers in one go) and runs `paged_decode_layer` per layer (the gather and SDPA alone).
"""

import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton: the PyTorch path only
    triton = None


NO_WINDOW = 2**62  # a window no position difference reaches


def decode_masks(pos, pages, lengths, qpos, windows=None, dtype=torch.float32):
    """The masks of every layer's decode attention, built at once (they need no query):
    pages [L, B, Hkv, span] the pages each row reads (int64), lengths [L, B, Hkv], qpos [B],
    windows [L] (int64, NO_WINDOW for a full layer) or None -> (mask [L, B, Hkv, 1, span * ps]
    additive in `dtype`: 0 live, -inf not; empty [L, B, Hkv, 1, 1] rows with nothing live)."""
    L, B, hkv, span = pages.shape
    n = span * pos.shape[1]
    live = torch.arange(n, device=pages.device) < lengths[..., None]  # [L, B, Hkv, n]
    if windows is not None:
        kpos = pos.index_select(0, pages.reshape(-1)).view(L, B, hkv, n)
        live &= (qpos[:, None, None] - kpos) < windows[:, None, None, None]
    mask = torch.zeros(live.shape, dtype=dtype, device=pages.device).masked_fill_(~live, float("-inf"))
    return mask[..., None, :], ~live.any(-1)[..., None, None]


def paged_decode_layer(q, k, v, pages, mask, empty):
    """One layer: q [B, H, D] over the pages [B, Hkv, span] (int64) of k, v [pages, ps, D], with
    this layer's mask [B, Hkv, 1, n] and empty [B, Hkv, 1, 1] from decode_masks -> [B, H, D].
    Under torch.compile it is one opaque operator: inductor would lower the page gather to a scalar
    loop (an index computation and a bounds check per element, 7x slower than index_select's copy
    of whole pages on the CPU)."""
    if torch.compiler.is_compiling():
        return _paged_decode_op(q, k, v, pages, mask, empty)
    return _paged_decode_layer(q, k, v, pages, mask, empty)


def _paged_decode_layer(q, k, v, pages, mask, empty):
    B, H, D = q.shape
    hkv, ps = pages.shape[1], k.shape[1]
    n = pages.shape[-1] * ps
    flat = pages.reshape(-1)  # index_select on whole pages: the cheapest gather on the CPU
    keys = k.view(k.shape[0], ps * D).index_select(0, flat).view(B, hkv, n, D)
    vals = v.view(v.shape[0], ps * D).index_select(0, flat).view(B, hkv, n, D)
    o = F.scaled_dot_product_attention(q.view(B, hkv, H // hkv, D), keys, vals, attn_mask=mask)
    return o.masked_fill(empty, 0.0).reshape(B, H, D)  # a row with nothing live: 0


@torch.library.custom_op("refreekv::paged_decode_layer", mutates_args=())
def _paged_decode_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pages: torch.Tensor,
    mask: torch.Tensor,
    empty: torch.Tensor,
) -> torch.Tensor:
    return _paged_decode_layer(q, k, v, pages.contiguous(), mask, empty)


@_paged_decode_op.register_fake
def _(q, k, v, pages, mask, empty):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def paged_decode_torch(q, k, v, pos, table, lengths, qpos, window=None, span=None):
    """One layer's decode attention in plain PyTorch (the contract above; the tests' oracle)."""
    pages = (table if span is None else table[:, :, :span]).long()
    windows = None if not window else torch.tensor([window], device=q.device)
    mask, empty = decode_masks(pos, pages[None], lengths[None], qpos, windows, q.dtype)
    return paged_decode_layer(q, k, v, pages, mask[0], empty[0])


if triton is not None:

    @triton.jit
    def _decode_split(
        Q,
        K,
        V,
        POS,
        TABLE,
        LENS,
        QPOS,
        SPLIT_LEN,
        O,
        ML,
        stride_tb,
        stride_th,
        scale,
        window,
        splits,
        HKV: tl.constexpr,
        G: tl.constexpr,
        GP: tl.constexpr,
        D: tl.constexpr,
        DP: tl.constexpr,
        PS: tl.constexpr,
        BLOCK: tl.constexpr,
        WINDOW: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """One (row, split): the row's tokens [split * span, (split + 1) * span) up to its length."""
        row = tl.program_id(0)  # b * HKV + h
        split = tl.program_id(1)
        b, h = row // HKV, row % HKV
        n = tl.load(LENS + row)
        span = tl.load(SPLIT_LEN)  # tokens per split, a multiple of BLOCK (set on the device)
        lo = split * span
        hi = tl.minimum(n, lo + span)
        g, d = tl.arange(0, GP), tl.arange(0, DP)
        gm, dm = g < G, d < D
        q = tl.load(
            Q + (b * HKV * G + h * G + g)[:, None] * D + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0
        )
        qpos = tl.load(QPOS + b)
        m = tl.full([GP], -1e30, tl.float32)  # finite: a fully masked block leaves m, l and acc unchanged
        l = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        t0 = tl.arange(0, BLOCK)
        tab = TABLE + b * stride_tb + h * stride_th
        for start in range(lo, hi, BLOCK):
            t = start + t0
            tm = t < hi
            page = tl.load(tab + t // PS, mask=tm, other=0)
            slot = page.to(tl.int64) * PS + t % PS
            kv_mask = tm[:, None] & dm[None, :]
            kb = tl.load(K + slot[:, None] * D + d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(kb), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kb))
            ok = tm
            if WINDOW:
                kpos = tl.load(POS + slot, mask=tm, other=0)
                ok = ok & (qpos - kpos < window)
            s = tl.where(ok[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            vb = tl.load(V + slot[:, None] * D + d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb)
            m = m_new
        # only splits that hold tokens of this row write (the combine reads exactly those)
        out = (row * splits + split) * G + g
        wm = gm & (tl.zeros([GP], tl.int32) + lo < n)
        tl.store(O + out[:, None] * D + d[None, :], acc, mask=wm[:, None] & dm[None, :])
        tl.store(ML + out * 2, m, mask=wm)
        tl.store(ML + out * 2 + 1, l, mask=wm)

    @triton.jit
    def _decode_combine(
        O,
        ML,
        LENS,
        SPLIT_LEN,
        OUT,
        splits,
        G: tl.constexpr,
        GP: tl.constexpr,
        D: tl.constexpr,
        DP: tl.constexpr,
    ):
        """out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over the row's own splits."""
        row = tl.program_id(0)
        n = tl.load(LENS + row)
        span = tl.load(SPLIT_LEN)
        g, d = tl.arange(0, GP), tl.arange(0, DP)
        gm, dm = g < G, d < D
        m = tl.full([GP], -1e30, tl.float32)
        l = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        for split in range(0, tl.cdiv(n, span)):
            at = (row * splits + split) * G + g
            ms = tl.load(ML + at * 2, mask=gm, other=-1e30)
            ls = tl.load(ML + at * 2 + 1, mask=gm, other=0.0)
            os = tl.load(O + at[:, None] * D + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
            m_new = tl.maximum(m, ms)
            a, c = tl.exp(m - m_new), tl.exp(ms - m_new)
            l = l * a + ls * c
            acc = acc * a[:, None] + os * c[:, None]
            m = m_new
        res = tl.where(l[:, None] > 0, acc / tl.maximum(l, 1e-30)[:, None], 0.0)  # nothing live: 0
        tl.store(
            OUT + (row * G + g)[:, None] * D + d[None, :],
            res.to(OUT.dtype.element_ty),
            mask=gm[:, None] & dm[None, :],
        )


MIN_SPLIT = 256  # tokens: shorter splits cost more in partial results than they win in parallelism
TARGET_PROGRAMS = 264  # about two per SM of an H100


def pow2(x: int, at_least: int = 1) -> int:
    return max(at_least, 1 << max(0, x - 1).bit_length())


def paged_decode_triton(
    q, k, v, pos, table, lengths, qpos, window=None, span=None, min_split=MIN_SPLIT, target=TARGET_PROGRAMS
):
    """`span` is ignored: every row stops at its own length. The grid is fixed by the shapes
    (rows x the most splits the table width allows); the tokens per split are set on the device
    from the longest row, so that rows x active splits is about TARGET_PROGRAMS: a single long
    row is spread over the GPU, and no host value enters (CUDA graphs replay it as is)."""
    B, H, D = q.shape
    hkv, P, ps = table.shape[1], table.shape[2], k.shape[1]
    G, rows = H // hkv, B * hkv
    # tokens per block: large pages are walked in parts (shared memory bounds the tile)
    block = min(max(16, ps), 64)
    min_split = -(-min_split // block) * block
    # the grid's splits: as many as the table width allows, but never more than a row can use: each
    # split spans >= longest * rows / target tokens (below), so a row has <= target / rows <= target / hkv
    # active splits. A static bound: a long context at a large batch launches no idle programs and
    # allocates no partials it cannot fill
    splits = min(-(-(P * ps) // min_split), -(-target // hkv) + 1)
    GP, DP = pow2(G, 16), pow2(D, 16)
    longest = (
        lengths.amax().reshape(1).long()
        if lengths.numel()
        else torch.zeros(1, dtype=torch.long, device=q.device)
    )
    want = (longest * rows + target - 1) // target  # tokens per split for ~target programs
    split_len = ((want.clamp(min=min_split) + block - 1) // block * block).to(torch.int32)
    o = torch.empty(rows * splits * G * D, dtype=torch.float32, device=q.device)
    ml = torch.empty(rows * splits * G * 2, dtype=torch.float32, device=q.device)
    lens = lengths.contiguous()
    _decode_split[(rows, splits)](
        q.contiguous(),
        k,
        v,
        pos,
        table,
        lens,
        qpos,
        split_len,
        o,
        ml,
        table.stride(0),
        table.stride(1),
        1.0 / math.sqrt(D),
        int(window or 0),
        splits,
        HKV=hkv,
        G=G,
        GP=GP,
        D=D,
        DP=DP,
        PS=ps,
        BLOCK=block,
        WINDOW=bool(window),
        IEEE=q.dtype == torch.float32,
    )
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    _decode_combine[(rows,)](o, ml, lens, split_len, out, splits, G=G, GP=GP, D=D, DP=DP)
    return out


def use_triton(device) -> bool:
    """The kernel on CUDA (unless REFREEKV_ATTENTION=torch); on the CPU only if asked for
    (REFREEKV_ATTENTION=triton with TRITON_INTERPRET=1: slow, for tests)."""
    want = os.environ.get("REFREEKV_ATTENTION", "")
    if triton is None or want == "torch":
        return False
    return torch.device(device).type == "cuda" or want == "triton"
