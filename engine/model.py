"""The GQA transformer shared by Llama 3, Mistral and Qwen2.5: RMSNorm, RoPE, SDPA, SwiGLU.

Three entry points, each writing into the paged KV pool (engine/kv.py); RoPE is engine/rope.py:
  prefill(tokens [B, N] right-padded, lens [B], slots [B]) -> last-token logits, per-layer probe
  prefill_packed(tokens [T] end to end, lens, slots)    -> the same, without padding (eager); with
      decode=[Bd] the running slots [0, Bd) decode in the same forward (a mixed step)
  decode(tokens [B])  (the sequences in pool slots [0, B))  -> next-token logits
The probe is what pruning policies see: each layer's attention of the last `probe_rows`
prompt queries over all prompt keys ([L, B, H, w, N], fp32), never the N x N matrix; and, for the
policies that model future queries (Expected Attention), the moments of every prompt query before
RoPE (`moments`: sums, never the queries themselves).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.gemv import ROWS as GEMV_ROWS
from engine.rope import rope_tables, rotate, unrotate
from weights.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        h = x.float()  # no copy in fp32
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (h if h.dtype == x.dtype else h.to(x.dtype))


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.wqkv = nn.Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=c.qkv_bias)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=c.o_bias)

    def qkv(self, x, cos, sin, fast=None):
        """x [B, T, dim], cos/sin [B or T, .., 1, D] -> q [B, H, T, D], k, v [B, Hkv, T, D]; q and k
        rotated in one go (they are adjacent in the fused projection)."""
        B, T, _ = x.shape
        H, hkv, D = self.c.n_heads, self.c.n_kv_heads, self.c.head_dim
        y = linear(self.wqkv, x, fast)  # [B, T, (H + 2 Hkv) D]
        qk = rotate(y[..., : (H + hkv) * D].view(B, T, H + hkv, D), cos, sin)
        v = y[..., (H + hkv) * D :].view(B, T, hkv, D)
        return qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.transpose(1, 2)

    def out(self, o, fast=None):  # [B, H, T, D] -> [B, T, dim]
        B, H, T, D = o.shape
        return linear(self.wo, o.transpose(1, 2).reshape(B, T, H * D), fast)


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(c.dim, 2 * c.ffn_dim, bias=c.mlp_bias)  # gate and up, fused
        self.w2 = nn.Linear(c.ffn_dim, c.dim, bias=c.mlp_bias)

    def forward(self, x, fast=None):
        gate, up = linear(self.w13, x, fast).chunk(2, dim=-1)
        return linear(self.w2, F.silu(gate) * up, fast)


def linear(layer: nn.Linear, x, fast=None):
    """layer(x), or fast(x, weight, bias) (engine/kernels/gemv.py's kernel for the decode projections)."""
    return layer(x) if fast is None else fast(x, layer.weight, layer.bias)


ROW_MULTIPLE = 4  # CPU decode projections run on a multiple of this many rows (padded_linear)


def padded_linear(x, weight, bias):
    """F.linear of x [B, 1, dim] with its rows padded with zeros to a multiple of ROW_MULTIPLE: on
    this CPU's BLAS, 3 rows cost as much as 3 single rows and more than 8 (7 and 11 likewise), while
    4, 8 and 12 run at about one weight pass (bench/RESULTS.md, F.linear by rows). Each row's result
    is its own."""
    B = x.shape[0]
    rows = torch.cat([x, x.new_zeros(-B % ROW_MULTIPLE, *x.shape[1:])])
    return F.linear(rows, weight, bias)[:B]


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(c.dim, c.norm_eps), Attention(c)
        self.mlp_norm, self.mlp = RMSNorm(c.dim, c.norm_eps), MLP(c)


def _sdpa_kv(q, k, v):
    """K/V as SDPA's kernels take them. float32 on CUDA: flash attention has no fp32 kernel and the
    memory-efficient one no GQA, so K/V are repeated per query head (a copy of K/V, not the fp32
    B x H x N x N scores of the math kernel)."""
    if q.is_cuda and q.dtype == torch.float32 and k.shape[1] != q.shape[1]:
        g = q.shape[1] // k.shape[1]
        return k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return k, v


def causal_attention(q, k, v):
    """Causal GQA attention over a whole prompt without an N x N tensor."""
    k, v = _sdpa_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def windowed_attention(q, k, v, window: int, chunk: int = 256):
    """Causal sliding-window attention, query chunk by query chunk: each chunk of `chunk` queries
    attends to the keys from `window` - 1 before its first query to its last, with a mask of
    chunk x (chunk + window) instead of N x N (a 32k prompt with a 4k window: 40 MB of scores per
    head group, not 137 GB)."""
    N = q.shape[2]
    k, v = _sdpa_kv(q, k, v)
    outs = []
    for i in range(0, N, chunk):
        lo, hi = max(0, i - window + 1), min(N, i + chunk)
        qp = torch.arange(i, hi, device=q.device)
        mask = causal_mask(qp, torch.arange(lo, hi, device=q.device), window)
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, i:hi],
                k[:, :, lo:hi],
                v[:, :, lo:hi],
                attn_mask=mask,
                enable_gqa=k.shape[1] != q.shape[1],
            )
        )
    return torch.cat(outs, 2)


def prefix_attention(q, k, v, first: int, window: int):
    """A chunk's queries q [B, H, n, D] at positions [first, first + n) over its row's keys k, v
    [B, Hkv, first + n, D] (the prefix and the chunk): causal, within the window (0: none)."""
    n, total = q.shape[2], k.shape[2]
    mask = causal_mask(
        torch.arange(first, first + n, device=q.device), torch.arange(total, device=q.device), window
    )
    k, v = _sdpa_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def causal_mask(q_pos, k_pos, window):
    """Boolean [.., Tq, Tk]: key visible to query (causal, optionally within a sliding window)."""
    d = q_pos[..., :, None] - k_pos[..., None, :]
    return (d >= 0) & (d < window) if window else d >= 0


MOMENT_HEAD = 8  # the first queries of each prompt kept apart: query statistics may leave out this many


def query_moments(c: ModelConfig, batch: int, device=None) -> tuple:
    """Zeroed buffers that prefill(moments=...) fills: per layer, prompt and query head, the sum of
    the pre-RoPE queries [L, B, H, D], the sum of their outer products [L, B, H, D, D] and the first
    MOMENT_HEAD queries [L, B, H, MOMENT_HEAD, D] (zero past a prompt's end). Any suffix's mean and
    covariance follows (refreekv.Probe.query_stats); the size does not grow with the prompt."""
    L, H, D = c.n_layers, c.n_heads, c.head_dim
    return (
        torch.zeros(L, batch, H, D, device=device),
        torch.zeros(L, batch, H, D, D, device=device),
        torch.zeros(L, batch, H, MOMENT_HEAD, D, device=device),
    )


class Transformer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.tp = None  # engine/tp.py's TP when this is one rank's shard: sums the row-parallel outputs
        self.gemv = None  # engine/kernels/gemv.py's gemv when the engine chose it for the decode projections
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        # tensor parallel: this rank's rows
        self.lm_head = nn.Linear(c.dim, c.head_rows or c.vocab_size, bias=False)
        if c.tie_embeddings and not c.head_rows:
            self.lm_head.weight = self.embed.weight

    def setup_rope(self, max_len: int, device=None):
        """Precompute fp32 cos/sin for positions [0, max_len) (not a parameter: built after loading)."""
        cos, sin = rope_tables(self.c, torch.arange(max_len, device=device))
        # buffers, not plain attributes: compiled graphs then read them in place (no per-replay copy)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def prefill(
        self,
        tokens,
        lens,
        kv,
        slots,
        probe_rows: int = 1,
        all_logits: bool = False,
        hidden: bool = False,
        moments=None,
        prefix=None,
        ends=None,
        width: int | None = None,
    ):
        """Run right-padded prompts [B, N] (row b real up to lens[b]) and write their K/V into the
        pool slots `slots` [B] (whose rows own pages for their prompts).

        Returns (logits, probe): logits [B, V] at each row's last real token ([B, N, V] with
        all_logits), probe [L, B, H, w, N] fp32 attention of the last w real queries of each
        row (rows before the prompt start are zero), or None when probe_rows == 0. hidden=True adds
        a third value: the final normed hidden states [B, N, dim] (prompt logprobs are computed
        from them a chunk at a time, never as B x N x V logits). `moments` (see query_moments), when
        given, is filled in place with each layer's query moments.

        A chunk of longer prompts (chunked prefill, a cached prefix): `ends` [B] is each prompt's
        whole length (the probe's rows are its last w queries; those outside this chunk are zero, so
        the chunks' probes add up) and, with `prefix` [B], row b's first prefix[b] tokens already
        sit in its slot's rows: tokens hold positions prefix[b] on, attend to the pool's keys and
        the probe spans `width` = max(prefix + lens) keys."""
        c, (B, N) = self.c, tokens.shape
        dev = tokens.device
        ar = torch.arange(N, device=dev)
        if prefix is None:
            first, K = torch.zeros_like(lens), N
            cos, sin = self.cos[:N, None], self.sin[:N, None]  # [N, 1, D]
            qpos = ar[None]  # [1, N]
        else:
            first, K = prefix, width
            qpos = first[:, None] + ar  # [B, N]; padding may run past the table: clamped
            at = qpos.clamp(max=self.cos.shape[0] - 1)
            cos, sin = self.cos[at][:, :, None], self.sin[at][:, :, None]  # [B, N, 1, D]
        total = first + lens
        kar = torch.arange(K, device=dev)
        if prefix is not None:  # the keys each query sees in the pool (causal, windowed), per window
            inside = kar < total[:, None, None]
            amasks = {win: causal_mask(qpos, kar, win) & inside for win in set(c.layer_windows)}
        w = probe_rows
        if w:
            ends = total if ends is None else ends
            rows = ends[:, None] - w + torch.arange(w, device=dev)  # [B, w] absolute positions
            real = (rows >= first[:, None]) & (rows < total[:, None])  # the probed queries in this chunk
            real = real[..., None] & (kar < total[:, None, None])
            rmasks = {win: causal_mask(rows, kar, win) & real for win in set(c.layer_windows)}
            at_rows = (rows - first[:, None]).clamp(0, N - 1)  # their indices in the chunk
            probe = torch.empty(c.n_layers, B, c.n_heads, w, K, device=dev)
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            win = c.layer_windows[i]
            q, k, v = layer.attn.qkv(layer.attn_norm(x), cos, sin)
            kv.write_prompt(i, slots, k, v, lens, prefix)
            if prefix is not None:  # the row's keys so far, this chunk's included, from the pool
                k, v, _ = kv.read(i, slots, K)
                kk, vv = _sdpa_kv(q, k, v)
                o = F.scaled_dot_product_attention(
                    q, kk, vv, attn_mask=amasks[win][:, None], enable_gqa=kk.shape[1] != q.shape[1]
                )
            elif win and N > win:
                o = windowed_attention(q, k, v, win)
            else:  # a window at least as long as the prompt is plain causal attention
                o = causal_attention(q, k, v)
            x = x + self._sum(layer.attn.out(o))
            x = x + self._sum(layer.mlp(layer.mlp_norm(x)))
            if w:
                probe[i] = self._probe(q, k, at_rows, rmasks[win])
            if moments is not None:
                cq, sq = cos.transpose(-2, -3), sin.transpose(-2, -3)  # [1 or B, 1, N, D]
                self._moments(moments, i, q, cq, sq, qpos.expand(B, N), ar < lens[:, None])
        kv.next_pos[slots] = total
        if hidden or all_logits:
            x = self.norm(x)
            last = x if all_logits else x[torch.arange(B, device=x.device), lens - 1]
        else:
            last = self.norm(x[torch.arange(B, device=x.device), lens - 1])
        if hidden:
            return self._logits(last), (probe if w else None), x
        return self._logits(last), (probe if w else None)

    @torch.no_grad()
    def prefill_packed(
        self,
        tokens,
        lens: list[int],
        kv,
        slots,
        probe_rows: int = 1,
        hidden: bool = False,
        progress=None,
        moments=None,
        prefix: list[int] | None = None,
        ends: list[int] | None = None,
        decode=None,
        span=None,
    ):
        """prefill() for prompts packed end to end: tokens [T] (T = sum(lens), no padding), lens
        on the host. Embedding, projections and MLP run on the T real tokens only; attention and
        the probe run prompt by prompt. One 8k prompt batched with fifty short ones costs 8k + 50
        short rows, not 51 x 8k. Returns what prefill() returns (probe [L, B, H, w, max(total)]),
        with hidden states [T, dim] (prompt b's rows at offsets sum(lens[:b]) onwards). Eager:
        the per-prompt slices are host ints (compiled, prefill() keeps its static shapes).
        progress(layers_done, layers) is called after each layer (long prefills on a CPU).

        Prefill over a paged prefix (chunked prefill, a cached prefix): with `prefix`, prompt b's
        first prefix[b] tokens already sit in its slot's rows and tokens holds the next lens[b]
        (positions prefix[b] on); each chunk attends to its row's keys in the pool and its own. The
        probe spans every key of the prompt so far; its rows are the last w queries of the whole
        prompt (`ends` [B]: each prompt's whole length; default the end of this chunk), those outside
        this chunk being zero, so the chunks' probes add up, as the `moments` do.

        A mixed step (chunked prefill): `decode` [Bd] are the next tokens of the running slots [0, Bd),
        decoded in the same forward as decode() would (`span` as there): their rows go first, so the
        projections and the MLP read the weights once for both, and attention splits (the paged
        decode attention for them, the prompts' for the chunks). Their logits come first [Bd + B, V]."""
        c, dev = self.c, tokens.device
        first = prefix or [0] * len(lens)
        total = [f + n for f, n in zip(first, lens)]  # each prompt's tokens after this call
        B, N = len(lens), max(total)
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        total_t = torch.tensor(total, device=dev)
        ends_t = torch.tensor(ends or total, device=dev)
        # [T] each token's position in its prompt
        pos = torch.cat([torch.arange(f, f + n, device=dev) for f, n in zip(first, lens)])
        x = self.embed(tokens)[None]  # [1, T, dim]
        Bd = 0 if decode is None else decode.shape[0]
        every = pos  # every row's position, the decode rows' first
        if Bd:  # the decode rows first: [1, Bd + T, dim]
            step = kv.begin_decode(Bd, c.layer_windows, span)
            every = torch.cat([kv.next_pos[:Bd].long(), pos])
            x = torch.cat([self.embed(decode)[None], x], 1)
            queries = []
        cos_all, sin_all = self.cos[every][:, None], self.sin[every][:, None]  # [Bd + T, 1, D]
        cos, sin = cos_all[Bd:], sin_all[Bd:]  # the chunks' [T, 1, D]
        ar = torch.arange(N, device=dev)
        w = probe_rows
        if w:
            rows = ends_t[:, None] - w + torch.arange(w, device=dev)  # [B, w] absolute positions
            # the probed queries in this chunk; the others (and those before the prompt) are zero
            real = (rows >= torch.tensor(first, device=dev)[:, None]) & (rows < total_t[:, None])
            real = real[..., None] & (ar < total_t[:, None, None])
            rmasks = {win: causal_mask(rows, ar, win) & real for win in set(c.layer_windows)}
            probe = torch.zeros(c.n_layers, B, c.n_heads, w, N, device=dev)
        owner = slots.repeat_interleave(torch.tensor(lens, device=dev))  # [T] the slot of each token
        for i, layer in enumerate(self.layers):
            win = c.layer_windows[i]
            q, k, v = layer.attn.qkv(layer.attn_norm(x), cos_all, sin_all)  # [1, H, Bd + T, D]
            outs = []
            if Bd:
                outs.append(self._decode_rows(i, q, k, v, kv, step, queries))
                q, k, v = (t[:, :, Bd:] for t in (q, k, v))
            kv.write_packed(i, owner, pos, k[0], v[0])
            for b, n in enumerate(lens):
                qb, kb, vb = (t[:, :, starts[b] : starts[b + 1]] for t in (q, k, v))
                if first[b]:  # the row's keys so far, this chunk's included, from the pool
                    kb, vb, _ = kv.read(i, slots[b : b + 1], total[b])
                    outs.append(prefix_attention(qb, kb, vb, first[b], win))
                else:
                    outs.append(
                        windowed_attention(qb, kb, vb, win)
                        if win and n > win
                        else causal_attention(qb, kb, vb)
                    )
                if w:
                    at = (rows[b : b + 1] - first[b]).clamp(0, n - 1)  # the probed queries within the chunk
                    probe[i, b, ..., : total[b]] = self._probe(
                        qb, kb, at, rmasks[win][b : b + 1, ..., : total[b]]
                    )[0]
                if moments is not None:
                    cb, sb = (t[starts[b] : starts[b + 1]].transpose(0, 1) for t in (cos, sin))
                    self._moments(moments, i, qb, cb, sb, pos[None, starts[b] : starts[b + 1]], b=b)
            x = x + self._sum(layer.attn.out(torch.cat(outs, 2)))
            x = x + self._sum(layer.mlp(layer.mlp_norm(x)))
            if progress is not None:
                progress(i + 1, c.n_layers)
        if Bd:
            kv.end_decode(torch.stack(queries))
        kv.lengths[:, slots] = total_t[None, :, None].int()
        kv.next_pos[slots] = total_t
        x = x[0]
        lasts = torch.tensor(starts[1:], device=dev) - 1 + Bd
        if Bd:
            lasts = torch.cat([torch.arange(Bd, device=dev), lasts])
        if hidden:
            x = self.norm(x)
            return self._logits(x[lasts]), (probe if w else None), x[Bd:]
        return self._logits(self.norm(x[lasts])), (probe if w else None)

    def _decode_rows(self, layer, q, k, v, kv, step, queries):
        """A mixed step's decode rows [0, Bd) of q [1, H, Bd + T, D] and k, v [1, Hkv, Bd + T, D]:
        their keys and values appended to their slots, their attention over their rows [1, H, Bd, D]
        (as decode() does); their queries go to `queries`."""
        Bd = step.page.shape[1]
        qd = q[0, :, :Bd].transpose(0, 1).contiguous()  # [Bd, H, D]
        kd, vd = (t[0, :, :Bd].transpose(0, 1)[:, :, None] for t in (k, v))  # [Bd, Hkv, 1, D]
        kv.append(layer, kd, vd, step)
        queries.append(qd)
        return kv.attend(layer, qd, self.c.layer_windows[layer], step).transpose(0, 1)[None]

    def _logits(self, x, fast=None):
        """fp32 logits over the whole vocabulary (tensor parallel with a split head: each rank's
        rows, gathered)."""
        y = linear(self.lm_head, x, fast)
        if self.c.head_rows:
            y = self.tp.gather(y, -1)
        return y.float()

    def _sum(self, x):
        """Row-parallel outputs (o_proj, down_proj) summed over tensor-parallel ranks."""
        return x if self.tp is None else self.tp.all_reduce(x)

    def _moments(self, moments, layer, q, cos, sin, positions, real=None, b=None):
        """Add one layer's queries q [B, H, N, D] (post-RoPE; cos/sin broadcast against q rotated
        them) at `positions` [B, N] (real [B, N] or None: all real) to `moments` at `layer` (and
        batch row b when q is one prompt)."""
        s1, s2, head = (m[layer] if b is None else m[layer, b : b + 1] for m in moments)
        pre = unrotate(q, cos, sin, self.cos[0, 0])
        first = (positions[..., None] == torch.arange(head.shape[2], device=q.device)).float()  # [B, N, 8]
        if real is not None:
            pre = pre * real[:, None, :, None]
            first = first * real[..., None]
        s1 += pre.sum(2)
        s2 += pre.transpose(-1, -2) @ pre
        head += torch.einsum("bnk,bhnd->bhkd", first, pre)  # the first MOMENT_HEAD queries, by position

    def _probe(self, q, k, rows, rmask):
        """Softmax attention (fp32) of the query rows [B, w] (indices into q) over all keys k [B, Hkv,
        N, D]: [B, H, w, N]."""
        B, H, _, D = q.shape
        hkv, w, N = k.shape[1], rows.shape[1], k.shape[2]
        qr = q.gather(2, rows[:, None, :, None].expand(B, H, w, D)).float()
        # GQA: groups folded into rows
        s = qr.view(B, hkv, -1, D) @ k.float().transpose(-1, -2) / math.sqrt(D)
        s = s.view(B, H, w, N).masked_fill(~rmask[:, None], float("-inf"))
        return torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows before the prompt start are all -inf -> 0

    @torch.no_grad()
    def decode(self, tokens, kv, span=None):
        """One step for the sequences in pool slots [0, B): tokens [B] at positions kv.next_pos.
        Slots whose kv.live is 0 are padding (a CUDA-graph bucket): they write into the trash
        page and advance nothing. `span` (pages, or None) bounds what the PyTorch attention reads."""
        B = tokens.shape[0]
        pos = kv.next_pos[:B]
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # [B, 1, 1, D]
        x = self.embed(tokens)[:, None]  # [B, 1, dim]
        fast = self.gemv if self.gemv is not None and B <= GEMV_ROWS else None
        # (compiled, the batch is never compared here: a guard on its size would recompile)
        cpu = fast is None and x.device.type == "cpu"
        if cpu and not torch.compiler.is_compiling() and B > 1 and B % ROW_MULTIPLE:
            fast = padded_linear
        windows = self.c.layer_windows
        step = kv.begin_decode(B, windows, span)  # what every layer shares: built once
        queries = []
        for i, layer in enumerate(self.layers):
            q, k, v = layer.attn.qkv(layer.attn_norm(x), cos, sin, fast)
            kv.append(i, k, v, step)
            queries.append(q[:, :, 0])
            o = kv.attend(i, q[:, :, 0], windows[i], step)  # [B, H, D]
            x = x + self._sum(layer.attn.out(o[:, :, None], fast))
            x = x + self._sum(layer.mlp(layer.mlp_norm(x), fast))
        kv.end_decode(torch.stack(queries))
        return self._logits(self.norm(x[:, 0]), fast)


def load_model(model_dir, device="cpu", dtype=torch.float32, rank: int = 0, world: int = 1):
    """This Transformer with a checkpoint's weights (weights/loader.py reads them into it)."""
    from weights import loader

    return loader.load_model(model_dir, device, dtype, rank, world, Transformer)
