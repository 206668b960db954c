"""The one home of pruning: each sequence's policy plans its rows at the prefill -> decode transition
(`prune_admitted`) and, when it prunes during decoding, re-plans them while the sequence decodes
(`due`, `pressure_candidates`, `replan`). Both go through `_ask`: sequences sharing a policy object
are planned in one call, the mask is checked, a policy that raises fails its own sequences alone
(they keep everything and end with finish reason "error"), every result is cut to the real slots,
and under tensor parallelism each rank keeps its own KV heads of the plan. The kept tokens are
compacted to the front of their rows (PagedKV.compact) and the emptied pages go back at once
(PagedKV.trim).

Decode-time re-plans happen every `interval` generated tokens (g = tokens generated into the cache:
the re-plan follows the step that wrote the interval-th one, and the next query sees the pruned
rows) and, with `on_pressure`, when the pool has no page for the next step, before anyone is
preempted (only sequences that decoded `decode_window` tokens since their last re-plan). Their probe
is built outside the compiled step from what the step leaves behind: the last W decode queries of
each slot (kv.queries) and each row's live keys, read through the page table; a softmax per query
row over the row's slots, causal by position. The last W slots of every row stay whatever the
policy returned. Triggers depend only on g, so a preempted sequence replays the same re-plans
(pressure ones aside).
"""

import math

import torch

import refreekv
from engine.rope import rope_tables, unrotate

PROBE_BYTES = 2**30  # sequences re-planned in one policy call: their fp32 probe within this


def _by_policy(seqs) -> list[list]:
    """Sequences grouped by policy object (each group is one policy call), in order."""
    groups: dict[int, list] = {}
    for seq in seqs:
        groups.setdefault(id(seq.policy), []).append(seq)
    return list(groups.values())


def _ask(policy, method: str, probe, real: torch.Tensor, members, during: str = ""):
    """policy.<method>(probe), checked: a bool mask shaped and placed like `real`, cut to it. A
    policy that raises (or returns anything else) keeps every real slot and ends `members` with
    finish reason "error". Returns (keep, ok)."""
    try:
        keep = getattr(policy, method)(probe)
        if keep.shape != real.shape or keep.dtype != torch.bool or keep.device != real.device:
            got = f"{tuple(keep.shape)} {keep.dtype} on {keep.device}"
            raise ValueError(f"{method} returned {got}, not {tuple(real.shape)} bool on {real.device}")
    except Exception as e:  # noqa: BLE001 - a policy is research code: its failure is its requests' alone
        for seq in members:
            seq.reason = "error"
            seq.error = f"KV policy {policy.name!r} failed{during}: {type(e).__name__}: {e}"
        return real, False
    return keep & real, True


def _this_rank(runner, keep: torch.Tensor):
    """(this rank's KV heads of a plan [L, B, Hkv, N], kept counts of every head [L, B, Hkv] and of
    this rank's, both read back at once)."""
    local = keep
    if runner.tp.on:
        from weights.shard import kv_heads

        h0, nh = kv_heads(runner.config, runner.tp.rank, runner.tp.world)
        local = keep[:, :, h0 : h0 + nh]
    heads = keep.shape[2]
    counts = torch.cat((keep.sum(-1), local.sum(-1)), -1).cpu()
    return local, counts[..., :heads], counts[..., heads:]


class PoolRows:
    """A probe's reader (refreekv.Probe.keys / values): one layer's K or V of the probed rows,
    read from the pool on each call, fp32, every KV head (gathered from the ranks under tensor
    parallelism: every rank's policy makes the same calls), zeroed past each row's length.
    slots [B] the rows' pool slots, lens [L, B, Hkv] their lengths, pos [L, B, Hkv, N] the
    positions of their slots (for rope=False: the rotation undone)."""

    def __init__(self, runner, slots: torch.Tensor, width: int, lens: torch.Tensor, pos: torch.Tensor):
        self.runner, self.slots, self.width, self.lens, self.pos = runner, slots, width, lens, pos

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's (cos, sin) at positions [n] -> [n, D] each, as they rotate queries and keys
        (YaRN's attention factor included): x_rotated = x * cos + rotate_half(x) * sin."""
        return rope_tables(self.runner.model.c, positions)  # the tables' own formula, at any position

    def __call__(self, layer: int, what: str, rope: bool) -> torch.Tensor:
        runner = self.runner
        k, v, _ = runner.kv.read(layer, self.slots, self.width)
        x = _every_head(runner, (k if what == "k" else v).float(), 1)  # [B, Hkv, N, D]
        real = torch.arange(self.width, device=x.device) < self.lens[layer][..., None]
        x = x * real[..., None]
        if what == "k" and not rope:
            cos, sin = runner.model.cos, runner.model.sin  # [max positions, D], YaRN-scaled
            at = self.pos[layer].clamp(min=0)
            x = unrotate(x, cos[at], sin[at], cos[0, 0])
        return x


def _every_head(runner, t: torch.Tensor, dim: int) -> torch.Tensor:
    """t with this rank's KV heads along dim -> every KV head once (tensor parallel: gathered from
    the ranks; with fewer KV heads than ranks each is replicated on `every` ranks in a row)."""
    tp = runner.tp
    if not tp.on:
        return t
    t = tp.gather(t, dim)
    every = tp.world // runner.config.n_kv_heads
    if every > 1:
        t = t.index_select(dim, torch.arange(0, t.shape[dim], every, device=t.device))
    return t


# ----------------------------------------------------------------------- at the prefill -> decode
def prune_admitted(runner, batch, probe, lens_l: list[int], moments=None):
    """Plan every sequence of an admitted batch on the prefill probe (and the prompts' query
    moments, for the policies that read query statistics) and compact the pool: each
    fork's kept tokens are copied into its own pages, then each source is compacted in place and
    its emptied pages freed. Returns (keep over every KV head [L, S, Hkv, N] in slot order, kept
    counts of every head [L, S, Hkv], the pool's pages in use before compaction)."""
    kv, c = runner.kv, runner.config
    seqs = [seq for g in batch for seq in g]
    N = max(lens_l)
    lens = torch.tensor(lens_l, device=runner.dev)
    prompt_of = {id(seq): b for b, g in enumerate(batch) for seq in g}
    at = {id(seq): i for i, seq in enumerate(seqs)}
    keep = torch.zeros(c.n_layers, len(seqs), c.n_kv_heads, N, dtype=torch.bool, device=runner.dev)
    for members in _by_policy(seqs):
        pol = members[0].policy
        rows = sorted({prompt_of[id(seq)] for seq in members})  # the prompts this call plans
        sel = runner.dev_long(rows)
        attn = None
        if pol.probe_rows:
            attn = probe[..., probe.shape[-2] - pol.probe_rows :, :].index_select(1, sel)
        plens = lens.index_select(0, sel)
        slots = runner.dev_long([batch[b][0].slot for b in rows])
        row_lens = plens[None, :, None].expand(c.n_layers, -1, c.n_kv_heads)
        slot_pos = torch.arange(N, device=runner.dev).expand(c.n_layers, 1, 1, N)  # slot j = position j
        reader = PoolRows(runner, slots, N, row_lens, slot_pos)
        stats = None
        if pol.query_stats:
            stats = (*(m.index_select(1, sel) for m in moments), plens)
        pr = refreekv.Probe(attn, plens, c.n_layers, c.n_kv_heads, N, reader, stats)
        real = pr.real[None, :, None].expand(c.n_layers, -1, c.n_kv_heads, -1)
        k, _ = _ask(pol, "plan", pr, real, members)
        for seq in members:
            keep[:, at[id(seq)]] = k[:, rows.index(prompt_of[id(seq)])]
    local, kept_all, kept = _this_rank(runner, keep)
    forks = [(b, seq) for b, g in enumerate(batch) for seq in g[1:]]
    src = torch.tensor([g[0].slot for g in batch], device=runner.dev)
    if forks:  # forks first: they copy from the source before it compacts in place
        for _, seq in forks:
            kv.assign(seq.slot, kept[:, at[id(seq)]])
        idx = runner.dev_long([at[id(seq)] for _, seq in forks])
        kv.compact(
            src[runner.dev_long([b for b, _ in forks])],
            runner.dev_long([seq.slot for _, seq in forks]),
            local.index_select(1, idx),
        )
    peak = kv.used  # the prompts and the forks' copies, before compaction
    own = [g[0].slot for g in batch if g[0].policy.decodes]  # they re-plan: no shared page in their rows
    kv.compact(src, src, local.index_select(1, runner.dev_long([at[id(g[0])] for g in batch])), own)
    for g in batch:
        kv.trim(g[0].slot, kept[:, at[id(g[0])]])
    return keep, kept_all, peak


# ------------------------------------------------------------------------------ during decoding
def due(running) -> list:
    """Running sequences whose interval trigger fires now (g reached their next mark)."""
    return [
        seq
        for seq in running
        if seq.live and seq.policy.decodes and seq.policy.interval and seq.fed >= seq.next_replan
    ]


def pressure_candidates(running, window: int) -> list:
    """Sequences that may give pages back under pressure: on_pressure, live, W new tokens since."""
    return [
        seq
        for seq in running
        if seq.live and seq.policy.on_pressure and seq.policy.decodes and seq.fed - seq.replanned_at >= window
    ]


def start(seq):
    """A sequence admitted (again): its triggers count from its first generated token. `replans`
    counts this admission's re-plans (a replay repeats the interval ones it had before); the
    pressure re-plans and the budget trace are its whole history (a replayed point is not
    traced twice)."""
    seq.next_replan = seq.policy.interval
    seq.replanned_at = 0
    seq.stats.pop("replans", None)


def decode_probe(runner, seqs, rows: int, stats: bool = False) -> refreekv.DecodeProbe:
    """The DecodeProbe of running sequences (rows: query rows the policy reads, <= W; stats: the
    moments of their last decode queries, for query_stats)."""
    kv, c = runner.kv, runner.local
    L, Hkv, H, D, ps, W = kv.L, kv.H, c.n_heads, kv.D, kv.ps, kv.W
    G = H // Hkv
    slots = [seq.slot for seq in seqs]
    B = len(slots)
    sl = runner.dev_long(slots)
    N = int(kv.h_len[:, slots].max())
    if runner.tp.on:  # one width on every rank (ranks hold different heads)
        N = runner.tp.host_max(N)
    npg = kv.pages_for(N)
    dev = runner.dev
    tab = kv.table[:, sl, :, :npg]  # [L, B, Hkv, npg]
    lens = kv.lengths[:, sl].long()  # [L, B, Hkv]
    real = torch.arange(N, device=dev) < lens[..., None]
    pos = kv.pos.index_select(0, tab.reshape(-1).long()).view(L, B, Hkv, npg * ps)[..., :N]
    pos = torch.where(real, pos.long(), -1)
    seen = torch.tensor([seq.seen for seq in seqs], device=dev)
    prompt = torch.tensor([len(seq.prompt) for seq in seqs], device=dev)
    queries = (seen - prompt).clamp(max=rows)
    attn = None
    if rows:
        ar = torch.arange(rows, device=dev)
        qpos = seen[:, None] - rows + ar  # [B, rows]
        real_row = ar >= (rows - queries)[:, None]  # [B, rows]
        at = qpos.clamp(min=0) % W
        attn = torch.empty(L, B, H, rows, N, device=dev)
        for layer in range(L):
            keys = kv.read(layer, sl, N)[0].float()  # [B, Hkv, N, D]
            query = kv.queries[layer, sl[:, None], at].float()  # [B, rows, H, D]
            query = query.permute(0, 2, 1, 3).reshape(B, Hkv, G * rows, D)
            s = (query @ keys.transpose(-1, -2) / math.sqrt(D)).view(B, Hkv, G, rows, N)
            p = pos[layer][:, :, None, None, :]  # [B, Hkv, 1, 1, N]
            qp = qpos[:, None, None, :, None]
            mask = real[layer][:, :, None, None, :] & (p <= qp) & real_row[:, None, None, :, None]
            win = c.layer_windows[layer]
            if win:
                mask = mask & (qp - p < win)
            s = s.masked_fill(~mask, float("-inf"))
            attn[layer] = torch.softmax(s, -1).nan_to_num(0.0).view(B, H, rows, N)
    if runner.tp.on:  # every query and KV head: each policy plans exactly as on one process
        attn = None if attn is None else runner.tp.gather(attn, 2)
    moments = _decode_moments(runner, sl, seen, (seen - prompt).clamp(max=W)) if stats else None
    lens, pos = _every_head(runner, lens, 2), _every_head(runner, pos, 2)
    reader = PoolRows(runner, sl, N, lens, pos)
    return refreekv.DecodeProbe(
        attn, lens, pos, seen, prompt, queries, runner.config.n_kv_heads, reader, moments
    )


def _decode_moments(runner, sl, seen, count) -> tuple:
    """engine/model.py's query moments of the last count[b] <= W decode queries of each slot (the
    query ring: post-RoPE, position p at p % W), every query head; no first queries kept apart."""
    kv = runner.kv
    ar = torch.arange(kv.W, device=seen.device)
    qpos = seen[:, None] - kv.W + ar  # [B, W] the ring's positions, oldest first
    real = ar >= (kv.W - count)[:, None]
    q = kv.queries[:, sl[:, None], qpos.clamp(min=0) % kv.W].float()  # [L, B, W, H, D]
    cos, sin = (t[qpos.clamp(min=0)][None, :, :, None] for t in (runner.model.cos, runner.model.sin))
    pre = unrotate(q, cos, sin, runner.model.cos[0, 0]) * real[None, :, :, None, None]
    pre = pre.transpose(2, 3)  # [L, B, H, W, D]
    if runner.tp.on:  # every query head, as the prefill's probe
        pre = runner.tp.gather(pre, 2)
    head = pre.new_zeros(*pre.shape[:3], 0, pre.shape[-1])
    return pre.sum(3), pre.transpose(-1, -2) @ pre, head, count


def _chunks(runner, members) -> list[list]:
    """A policy's sequences in chunks whose re-plan probe stays within PROBE_BYTES."""
    c, kv = runner.config, runner.kv
    rows = min(members[0].policy.probe_rows, kv.W)
    longest = max(len(seq.prompt) + seq.n_chosen for seq in members)  # >= any row (the same on every rank)
    # per token of a row: the fp32 probe (twice under TP: local and gathered), one layer's keys
    # (gathered and in fp32), positions and masks of every layer
    per_token = c.n_layers * c.n_heads * max(rows, 1) * 4 * (2 if runner.tp.on else 1)
    per_token += c.n_kv_heads * c.head_dim * 6 + c.n_layers * c.n_kv_heads * 17
    k = max(1, PROBE_BYTES // (per_token * longest))
    return [members[i : i + k] for i in range(0, len(members), k)]


def replan(runner, seqs, pressure: bool = False) -> tuple[int, list]:
    """Re-plan running sequences with their policies, compact their rows and free the emptied
    pages. Returns (pages freed, the sequences whose policy failed: the caller ends them)."""
    kv = runner.kv
    free0 = kv.n_free
    failed = []
    for members in [ch for group in _by_policy(seqs) for ch in _chunks(runner, group)]:
        pol = members[0].policy
        pr = decode_probe(runner, members, min(pol.probe_rows, kv.W), pol.query_stats)
        keep, ok = _ask(pol, "replan", pr, pr.real, members, " while decoding")
        if not ok:
            failed += members
        keep = keep | (pr.real & (pr.slots >= pr.lens[..., None] - kv.W))  # the last W always stay
        local, kept_all, kept = _this_rank(runner, keep)
        sl = runner.dev_long([seq.slot for seq in members])
        kv.compact(sl, sl, local)
        for i, seq in enumerate(members):
            kv.trim(seq.slot, kept[:, i])
            if ok:
                _record(seq, kept_all[:, i], pressure)
    return kv.n_free - free0, failed


def _record(seq, kept_all: torch.Tensor, pressure: bool):
    """A re-plan's stats: counts, [tokens seen, mean tokens kept per row] (every KV head, all
    ranks), and the next interval trigger."""
    st = seq.stats
    st["replans"] = st.get("replans", 0) + 1
    if pressure:
        st["replans_pressure"] = st.get("replans_pressure", 0) + 1
    trace = st.setdefault("budget_trace", [])
    if not trace or seq.seen > trace[-1][0]:  # a replay after preemption re-plans known points
        trace.append([seq.seen, round(kept_all.double().mean().item(), 2)])
    seq.replanned_at = seq.fed
    while seq.policy.interval and seq.next_replan <= seq.fed:
        seq.next_replan += seq.policy.interval
