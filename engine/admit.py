"""Admission: a batch of waiting requests becomes running sequences.

Prefill the batch (packed end to end when eager, right-padded when compiled) into the sources'
pages, plan each sequence's policy on the probe (sequences sharing a policy object are planned
together; a policy that raises fails its own requests alone), copy each fork's kept tokens into
its own pages, compact the sources in place and free their emptied pages, record each
sequence's KV stats, and choose the first tokens. Prompt log-probabilities (echo scoring) come
from the final hidden states, a chunk of positions at a time.
"""

import time

import torch

import refreekv
from engine.scheduler import Sequence

PROMPT_LOGPROB_CHUNK = 256  # positions whose full-vocabulary logits exist at once (prompt logprobs)


def prefill_prune(core, batch: list[list[Sequence]]):
    """Prefill a batch of admitted groups into their sources' pages, plan each sequence's policy
    on the probe (sequences sharing a policy object are planned together), copy each fork's kept
    tokens into its own pages, compact the sources in place and free their emptied pages.
    Returns the first chosen tokens and the sequences, in slot order."""
    eng, kv, w = core.eng, core.kv, core.w
    c, dev = eng.config, eng.dev
    seqs = [q for g in batch for q in g]
    B = len(batch)
    wide = max([core.probe_rows] + [q.policy.probe_rows for q in seqs])
    lens_l = [len(g[0].prompt) for g in batch]
    N = max(lens_l)
    lens = torch.tensor(lens_l, device=dev)
    src = torch.tensor([g[0].slot for g in batch], device=dev)
    pages_prefill = [kv.owned(g[0].slot) for g in batch]
    scoring = [b for b, g in enumerate(batch) if g[0].sampling.prompt_logprobs is not None]
    eng.sync()
    t0 = time.perf_counter()
    if eng.packed_prefill:  # eager: the prompts end to end, no padding
        flat = torch.tensor([t for g in batch for t in g[0].prompt], device=dev)
        hook = core.prefill_progress
        note = None if hook is None else (lambda i, n: hook(i, n, len(flat)))
        logits, probe, *hidden = eng.model.prefill_packed(flat, lens_l, kv, src, wide, bool(scoring), note)
        starts = [sum(lens_l[:b]) for b in range(B)]
        rows = [(flat, starts[b]) for b in range(B)]
    else:  # compiled: right-padded to the longest prompt (static shapes)
        tokens = torch.zeros(B, N, dtype=torch.long)  # right padding: never read, never a sink
        for b, g in enumerate(batch):
            tokens[b, : lens_l[b]] = torch.tensor(g[0].prompt)
        tokens = tokens.to(dev)
        logits, probe, hidden = eng._prefill(eng.model, tokens, lens, kv, src, wide, bool(scoring))
        hidden = [] if hidden is None else [hidden.flatten(0, 1)]
        rows = [(tokens.flatten(), b * N) for b in range(B)]
    if eng.tp.on and probe is not None:
        probe = eng.tp.gather(probe, 2)  # every query head: each policy plans exactly as on one process
    for b in scoring:
        ids, at = rows[b]
        n = lens_l[b]
        prompt_logprobs(core, batch[b], hidden[0][at : at + n], ids[at : at + n])
    del hidden
    eng.sync()
    t1 = time.perf_counter()
    keep = plan(core, batch, probe, lens, N)  # [L, S, Hkv, N] for the sequences in slot order (all heads)
    full_keep = keep
    if eng.tp.on:  # this rank's KV heads of the plan
        from weights.shard import kv_heads

        h0, nh = kv_heads(c, eng.tp.rank, eng.tp.world)
        keep = keep[:, :, h0 : h0 + nh]
    counts = torch.cat((full_keep.sum(-1), keep.sum(-1)), -1).cpu()  # one read-back
    # [L, S, .]: every head / this rank's
    kept_all, kept = counts[..., : c.n_kv_heads], counts[..., c.n_kv_heads :]
    at = {id(q): i for i, q in enumerate(seqs)}
    forks = [(b, q) for b, g in enumerate(batch) for q in g[1:]]
    if forks:  # forks first: they copy from the source before it compacts in place
        for b, q in forks:
            kv.assign(q.slot, kept[:, at[id(q)]])
        rows = eng.dev_long([at[id(q)] for _, q in forks])
        kv.compact(
            src[eng.dev_long([b for b, _ in forks])],
            eng.dev_long([q.slot for _, q in forks]),
            keep.index_select(1, rows),
        )
    w["peak_pages"] = max(w["peak_pages"], kv.used)  # the prompts and the forks' copies, before compaction
    first = eng.dev_long([at[id(g[0])] for g in batch])
    kv.compact(src, src, keep.index_select(1, first))
    for g in batch:
        kv.trim(g[0].slot, kept[:, at[id(g[0])]])
    eng.sync()
    t2 = time.perf_counter()
    evicted = None
    if wide:  # share of the last prompt query's attention (mean over query heads) on evicted keys
        last = probe[..., -1, :]  # [L, B, H, N]
        G = c.n_heads // c.n_kv_heads
        src_of = eng.dev_long([b for b, g in enumerate(batch) for _ in g])
        gone = (~full_keep).repeat_interleave(G, 2)  # [L, S, H, N]
        evicted = (last.index_select(1, src_of) * gone).sum(-1).mean(-1).cpu()  # [L, S]
    del probe
    for b, g in enumerate(batch):
        n = lens_l[b]
        for q in g:
            i = at[id(q)]
            per_head = kept_all[:, i].tolist()  # every KV head (tensor parallel: not only this rank's)
            budget = kept_all[:, i].double().mean().item() / n
            q.stats.update(
                policy=q.policy.name,
                prompt_tokens=n,
                kept_per_layer=[round(sum(h) / len(h)) for h in per_head],
                budget=budget,
                prefill_s=t1 - t0,
                prune_s=t2 - t1,
                batch=B,
                pages_after_prefill=pages_prefill[b],
                pages_after_pruning=kv.owned(q.slot),
                preempted=q.stats.get("preempted", -1) + 1,
                kept_per_head=per_head,
                evicted_per_layer=None if evicted is None else evicted[:, i].tolist(),
                _t0=t2,
            )
            if q.stats["preempted"] == 0:
                core.totals["budget_sum"] += budget
                core.totals["budgets"] += 1
    ks = [len(g) for g in batch]
    first_logits = logits if max(ks) == 1 else logits.repeat_interleave(torch.tensor(ks, device=dev), 0)
    return core.choose(first_logits, seqs, [True] * len(seqs)), seqs


def plan(core, batch, probe, lens, N) -> torch.Tensor:
    """Each sequence's keep mask, [L, S, Hkv, N] in slot order. Sequences sharing a policy object
    are planned in one call; a policy that raises fails its own sequences alone (they keep
    everything until they are finished with reason "error")."""
    c, dev = core.eng.config, core.eng.dev
    seqs = [(b, q) for b, g in enumerate(batch) for q in g]
    by_policy: dict[int, list[int]] = {}
    for i, (_, q) in enumerate(seqs):
        by_policy.setdefault(id(q.policy), []).append(i)
    keep = torch.zeros(c.n_layers, len(seqs), c.n_kv_heads, N, dtype=torch.bool, device=dev)
    for members in by_policy.values():
        pol = seqs[members[0]][1].policy
        bs = sorted({seqs[i][0] for i in members})
        sel = core.eng.dev_long(bs)
        attn = None
        if pol.probe_rows:
            attn = probe[..., probe.shape[-2] - pol.probe_rows :, :].index_select(1, sel)
        try:
            k = pol.plan(refreekv.Probe(attn, lens.index_select(0, sel), c.n_layers, c.n_kv_heads, N))
            if k.shape != (c.n_layers, len(bs), c.n_kv_heads, N) or k.dtype != torch.bool:
                raise ValueError(
                    f"plan returned {tuple(k.shape)} {k.dtype}, not "
                    f"{(c.n_layers, len(bs), c.n_kv_heads, N)} bool"
                )
        except Exception as e:  # noqa: BLE001 - a policy is research code: its failure is its requests' alone
            k = refreekv.Probe(None, lens.index_select(0, sel), c.n_layers, c.n_kv_heads, N).real
            k = k[None, :, None].expand(c.n_layers, -1, c.n_kv_heads, -1)
            for i in members:
                seqs[i][1].reason = "error"
                seqs[i][1].error = f"KV policy {pol.name!r} failed: {type(e).__name__}: {e}"
        real = torch.arange(N, device=dev) < lens.index_select(0, sel)[:, None]
        k = k & real[None, :, None]  # never padding, whatever the policy returned
        for i in members:
            keep[:, i] = k[:, bs.index(seqs[i][0])]
    return keep


def prompt_logprobs(core, grp, h, ids):
    """Log-probability of each prompt token given the ones before it, and the top ones, from the
    final hidden states h [n, dim], a chunk of positions at a time (never n x V at once)."""
    k = grp[0].sampling.prompt_logprobs
    model = core.eng.model
    out = [(int(ids[0]), None, None)]  # the first token has nothing before it
    for s in range(0, h.shape[0] - 1, PROMPT_LOGPROB_CHUNK):
        e = min(h.shape[0] - 1, s + PROMPT_LOGPROB_CHUNK)
        lp = model._logits(h[s:e]).log_softmax(-1)
        chosen = lp.gather(-1, ids[s + 1 : e + 1, None])[:, 0].tolist()
        if k:
            top = lp.topk(k, -1)
            tops = [dict(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        else:
            tops = [{}] * len(chosen)
        out += list(zip(ids[s + 1 : e + 1].tolist(), chosen, tops))
    for q in grp:
        q.prompt_logprobs = out


# --------------------------------------------------------------------------- figures
