"""Pruning during decoding: running sequences re-planned by their own policies.

A policy that defines `replan` (refreekv/__init__.py) and has a trigger is asked again while its
sequence decodes:
- every `interval` generated tokens (g = tokens generated into the cache: the re-plan follows the
  step that wrote the interval-th one, and the next query sees the pruned rows); and
- with `on_pressure`, when the pool has no page for the next step, before anyone is preempted
  (only sequences that decoded `decode_window` tokens since their last re-plan: a re-plan that
  frees nothing leaves preemption as the last answer).

The probe is built outside the compiled step from what the step leaves behind: the last W decode
queries of each slot (kv.queries, written inside the step) and each row's live keys, read through
the page table; a softmax per query row over the row's slots, causal by position. The kept slots
are compacted in place (PagedKV.compact), the emptied pages go back at once (PagedKV.trim), and the
last W slots of every row stay whatever the policy returned (the policy keeps its own sinks).
Triggers depend only on g, so a preempted sequence replays the same re-plans (pressure ones aside).
"""

import math

import torch

import refreekv

PROBE_BYTES = 2**30  # sequences re-planned in one policy call: their fp32 probe within this


def due(running) -> list:
    """Running sequences whose interval trigger fires now (g reached their next mark)."""
    return [
        q for q in running if q.live and q.policy.decodes and q.policy.interval and q.fed >= q.next_replan
    ]


def pressure_candidates(running, window: int) -> list:
    """Sequences that may give pages back under pressure: on_pressure, live, W new tokens since."""
    return [
        q
        for q in running
        if q.live and q.policy.on_pressure and q.policy.decodes and q.fed - q.replanned_at >= window
    ]


def start(q):
    """A sequence admitted (again): its triggers count from its first generated token. `replans`
    counts this admission's re-plans (a replay repeats the interval ones it had before); the
    pressure re-plans and the budget trace are its whole history (a replayed point is not
    traced twice)."""
    q.next_replan = q.policy.interval
    q.replanned_at = 0
    q.stats.pop("replans", None)


def probe(eng, seqs, rows: int) -> refreekv.DecodeProbe:
    """The DecodeProbe of running sequences (rows: query rows the policy reads, <= W)."""
    kv, c = eng.kv, eng.local
    L, Hkv, H, D, ps, W = kv.L, kv.H, c.n_heads, kv.D, kv.ps, kv.W
    G = H // Hkv
    slots = [q.slot for q in seqs]
    B = len(slots)
    sl = eng.dev_long(slots)
    seen_l = [q.seen for q in seqs]
    N = int(kv.h_len[:, slots].max())
    if eng.tp.on:  # one width on every rank (ranks hold different heads)
        N = eng.tp.host_max(N)
    npg = -(-N // ps)
    dev = eng.dev
    tab = kv.table[:, sl, :, :npg]  # [L, B, Hkv, npg]
    lens = kv.lengths[:, sl].long()  # [L, B, Hkv]
    j = torch.arange(N, device=dev)
    real = j < lens[..., None]
    pos = kv.pos.index_select(0, tab.reshape(-1).long()).view(L, B, Hkv, npg * ps)[..., :N]
    pos = torch.where(real, pos.long(), -1)
    seen = torch.tensor(seen_l, device=dev)
    prompt = torch.tensor([len(q.prompt) for q in seqs], device=dev)
    queries = (seen - prompt).clamp(max=rows)
    attn = None
    if rows:
        ar = torch.arange(rows, device=dev)
        qpos = seen[:, None] - rows + ar  # [B, rows]
        real_row = ar >= (rows - queries)[:, None]  # [B, rows]
        at = qpos.clamp(min=0) % W
        attn = torch.empty(L, B, H, rows, N, device=dev)
        for layer in range(L):
            flat = tab[layer].reshape(-1).long()
            keys = kv.k.view(-1, ps * D).index_select(0, flat).view(B, Hkv, npg * ps, D)[:, :, :N].float()
            q = kv.queries[layer, sl[:, None], at].float()  # [B, rows, H, D]
            q = q.permute(0, 2, 1, 3).reshape(B, Hkv, G * rows, D)
            s = (q @ keys.transpose(-1, -2) / math.sqrt(D)).view(B, Hkv, G, rows, N)
            p = pos[layer][:, :, None, None, :]  # [B, Hkv, 1, 1, N]
            qp = qpos[:, None, None, :, None]
            mask = real[layer][:, :, None, None, :] & (p <= qp) & real_row[:, None, None, :, None]
            win = c.layer_windows[layer]
            if win:
                mask = mask & (qp - p < win)
            s = s.masked_fill(~mask, float("-inf"))
            attn[layer] = torch.softmax(s, -1).nan_to_num(0.0).view(B, H, rows, N)
    if eng.tp.on:  # every query and KV head: each policy plans exactly as on one process
        attn = None if attn is None else eng.tp.gather(attn, 2)
        lens = eng.tp.gather(lens, 2)
        pos = eng.tp.gather(pos, 2)
        every = eng.tp.world // eng.config.n_kv_heads
        if every > 1:  # fewer KV heads than ranks: each is replicated on `every` ranks in a row
            lens = lens[:, :, ::every]
            pos = pos[:, :, ::every]
    return refreekv.DecodeProbe(attn, lens, pos, seen, prompt, queries, eng.config.n_kv_heads)


def replan(core, seqs, pressure: bool = False) -> int:
    """Re-plan running sequences with their policies (sequences sharing a policy object in one
    call), compact their rows and free the emptied pages. Returns the pages freed. A policy that
    raises keeps its rows whole and ends its own sequences with finish reason "error"."""
    eng, kv = core.eng, core.kv
    free0 = kv.n_free
    by_policy: dict[int, list] = {}
    for q in seqs:
        by_policy.setdefault(id(q.policy), []).append(q)
    groups = []
    for members in by_policy.values():  # chunks whose probe stays within PROBE_BYTES
        rows = min(members[0].policy.probe_rows, kv.W)
        longest = max(len(q.prompt) + q.n_chosen for q in members)  # >= any row (the same on every rank)
        c = eng.config
        # per token of a row: the fp32 probe (twice under TP: local and gathered), one layer's keys
        # (gathered and in fp32), positions and masks of every layer
        per_token = c.n_layers * c.n_heads * max(rows, 1) * 4 * (2 if eng.tp.on else 1)
        per_token += c.n_kv_heads * c.head_dim * 6 + c.n_layers * c.n_kv_heads * 17
        per_seq = per_token * longest
        k = max(1, PROBE_BYTES // per_seq)
        groups += [members[i : i + k] for i in range(0, len(members), k)]
    failed = []
    for members in groups:
        pol = members[0].policy
        pr = probe(eng, members, min(pol.probe_rows, kv.W))
        real = pr.real
        ok = True
        try:
            keep = pol.replan(pr)
            if keep.shape != real.shape or keep.dtype != torch.bool or keep.device != real.device:
                want = f"{tuple(real.shape)} bool on {real.device}"
                raise ValueError(
                    f"replan returned {tuple(keep.shape)} {keep.dtype} on {keep.device}, not {want}"
                )
        except Exception as e:  # noqa: BLE001 - a policy is research code: its failure is its requests' alone
            keep = real
            ok = False
            for q in members:
                q.reason = "error"
                q.error = f"KV policy {pol.name!r} failed while decoding: {type(e).__name__}: {e}"
                failed.append(q)
        recent = pr.slots >= pr.lens[..., None] - kv.W  # the last W always stay
        keep = (keep | recent) & real
        local = keep
        if eng.tp.on:  # this rank's KV heads of the plan
            from weights.shard import kv_heads

            h0, nh = kv_heads(eng.config, eng.tp.rank, eng.tp.world)
            local = keep[:, :, h0 : h0 + nh]
        Hall = keep.shape[2]
        counts = torch.cat((keep.sum(-1), local.sum(-1)), -1).cpu()  # one read-back, [L, B, Hkv + local]
        kept_all, kept = counts[..., :Hall], counts[..., Hall:]
        sl = eng.dev_long([q.slot for q in members])
        kv.compact(sl, sl, local)
        for i, q in enumerate(members):
            kv.trim(q.slot, kept[:, i])
            if not ok:
                continue
            g = q.fed
            st = q.stats
            st["replans"] = st.get("replans", 0) + 1
            if pressure:
                st["replans_pressure"] = st.get("replans_pressure", 0) + 1
            # [tokens seen, mean tokens kept per row] after each re-plan (every KV head, all ranks)
            mean = kept_all[:, i].double().mean().item()
            trace = st.setdefault("budget_trace", [])
            if not trace or q.seen > trace[-1][0]:  # a replay after preemption re-plans known points
                trace.append([q.seen, round(mean, 2)])
            q.replanned_at = g
            while q.policy.interval and q.next_replan <= g:
                q.next_replan += q.policy.interval
    for q in failed:
        if q.slot >= 0:
            core.finish(q)
    return kv.n_free - free0
