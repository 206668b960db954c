"""Admission: prompts become running sequences, one prefill forward at a time.

One step's prefill work (engine/scheduler.py `schedule`) is a list of (prompt, tokens): whole
prompts, or chunks of longer ones (chunked prefill). The forward writes each chunk into its
source's pages after the tokens already there (engine/runner.py: packed end to end when eager,
right-padded when compiled), scores the prompts that asked for their log-probabilities, and
carries what pruning needs over the chunks: the probe's rows (the last queries of the whole
prompt, each computed in the chunk that holds it, over the keys before it) and the query moments
add up. When a prompt is whole in the pool, every sequence of its group is pruned with its policy
(engine/pruning.py), exactly as if it had been prefilled in one piece, and its KV stats are
recorded. Returns the logits its first tokens are chosen from; choosing them is the core's.
"""

import time
from typing import NamedTuple

import torch

from engine import pruning

PROMPT_LOGPROB_CHUNK = 256  # positions whose full-vocabulary logits exist at once (prompt logprobs)


def probe_rows(group, at_least: int) -> int:
    """Probe rows a group's pruning reads (its policies', at least `at_least`)."""
    return max([at_least] + [seq.policy.probe_rows for seq in group])


class Forward(NamedTuple):
    """What one step's prefill forward leaves for the rest of its admission (complete)."""

    work: list  # [(Prefill, tokens)]
    logits: torch.Tensor  # [B, V] each prompt's last token in the forward
    probe: torch.Tensor | None
    moments: tuple | None
    done: list[int]  # the prompts (indices into work) now whole in the pool
    decoded: torch.Tensor | None  # a mixed step: the running batch's logits [n, V]
    error: Exception | None = None  # what failed after a mixed forward (its prompts end with it)


def admit(runner, work, at_least: int, prefilled, note=None):
    """Prefill one step's work [(Prefill, tokens)] and prune every prompt it completes: complete()
    after forward()."""
    return complete(runner, forward(runner, work, at_least, note), at_least, prefilled)


def forward(runner, work, at_least: int, note=None, decode=None) -> Forward:
    """The forward of one step's prefill work (with `decode` [n], the running batch's next tokens
    decoded in it: a mixed step): chunks written into their rows, prompts scored, the probe and
    moments of unfinished prompts carried."""
    pfs = [pf for pf, _ in work]
    chunks = [pf.prompt[pf.done : pf.done + take] for pf, take in work]
    rows = max(probe_rows(pf.group, at_least) for pf in pfs)
    scoring = [b for b, pf in enumerate(pfs) if pf.group[0].sampling.prompt_logprobs is not None]
    stats = any(seq.policy.query_stats for pf in pfs for seq in pf.group)
    runner.sync()
    t0 = time.perf_counter()
    whole, before, chunk = (
        sum(len(pf.prompt) for pf in pfs),
        sum(pf.done for pf in pfs),
        sum(map(len, chunks)),
    )
    hook = None if note is None else (lambda i, n: note(i, n, whole, before, chunk))
    logits, probe, states, where, moments, decoded = runner.prefill(
        chunks,
        [pf.group[0].slot for pf in pfs],
        rows,
        bool(scoring),
        hook,
        stats,
        prefix=[pf.done for pf in pfs],
        ends=[len(pf.prompt) for pf in pfs],
        decode=decode,
    )
    try:
        for b in scoring:
            ids, start = where[b]
            n = len(chunks[b])
            chunk_logprobs(runner, pfs[b], states[start : start + n], ids[start : start + n])
        del states
        runner.sync()
        t1 = time.perf_counter()
        done = []
        for b, (pf, take) in enumerate(work):
            whole = pf.done == 0 and take == len(pf.prompt)  # one chunk: nothing to carry
            pf.done += take
            pf.chunks += 1
            pf.seconds += t1 - t0
            if not whole:
                _carry(pf, b, probe, moments, at_least)
            if pf.left == 0:
                done.append(b)
    except Exception as e:  # noqa: BLE001 - out of memory scoring or carrying
        if decoded is None:
            raise
        # the running batch decoded in this forward: its logits stand, and only the prompts fail
        return Forward([], None, None, None, [], decoded, e)
    return Forward(work, logits, probe, moments, done, decoded)


def complete(runner, fwd: Forward, at_least: int, prefilled):
    """Prune every prompt the forward completed (prefilled(pf) is told first: the pages held for its
    forks become theirs). Returns None when it completed none, else (logits [S, V] of each completed
    sequence's first token, the sequences in order, the most pages in use meanwhile, the KV budget
    of each sequence admitted for the first time)."""
    work, logits, probe, moments, done = fwd.work, fwd.logits, fwd.probe, fwd.moments, fwd.done
    if not done:
        return None
    pfs = [pf for pf, _ in work]
    cache = runner.kv.cache
    for b in done:
        prefilled(pfs[b])
        pf = pfs[b]
        if pf.insert:  # its full blocks, before pruning touches its rows
            top = pf.group[0].sampling.prompt_logprobs
            cache.insert(pf.prompt, pf.group[0].slot, pf.logprobs, top, pf.block_h)
    probe, moments = _gather(runner, [pfs[b] for b in done], done, probe, moments)
    finished = [pfs[b] for b in done]
    seqs, peak, budgets = _prune(runner, finished, probe, moments, len(work), at_least)
    if len(done) != len(work):
        logits = logits.index_select(0, runner.dev_long(done))
    ks = [len(pf.group) for pf in finished]
    if max(ks) > 1:  # one row per sequence: the forks share their prompt's
        logits = logits.repeat_interleave(torch.tensor(ks, device=logits.device), 0)
    return logits, seqs, peak, budgets


def _carry(pf, b: int, probe, moments, at_least: int):
    """Add prompt b's part of this forward's probe (its own rows) and moments to what pf carries."""
    w = probe_rows(pf.group, at_least)
    if probe is not None and w:
        if pf.probe is None:
            L, _, H = probe.shape[:3]
            pf.probe = probe.new_zeros(L, 1, H, w, len(pf.prompt))
        pf.probe[..., : pf.done] += probe[:, b : b + 1, :, probe.shape[3] - w :, : pf.done]
    if moments is not None and any(seq.policy.query_stats for seq in pf.group):
        mine = tuple(m[:, b : b + 1] for m in moments)
        if pf.moments is None:
            pf.moments = tuple(m.clone() for m in mine)
        else:
            for whole, part in zip(pf.moments, mine):
                whole += part


def _gather(runner, pfs, rows_of, probe, moments):
    """The probe [L, F, H, w, N] and moments (batch F) of the completed prompts, from this forward
    (rows_of[i]: prompt i's row in it) or from what they carried; N their longest prompt."""
    N = max(len(pf.prompt) for pf in pfs)
    if probe is not None:
        if all(pf.chunks == 1 for pf in pfs):
            if len(rows_of) != probe.shape[1]:
                probe = probe.index_select(1, runner.dev_long(rows_of))
            probe = probe[..., :N]
        else:
            L, _, H, w = probe.shape[:4]
            whole = probe.new_zeros(L, len(pfs), H, w, N)
            for i, (pf, b) in enumerate(zip(pfs, rows_of)):
                n = len(pf.prompt)
                mine = probe[:, b : b + 1, ..., :n] if pf.chunks == 1 else pf.probe
                if mine is not None:  # (None: it reads no probe)
                    whole[:, i : i + 1, :, w - mine.shape[3] :, :n] = mine
            probe = whole
    if moments is not None:
        parts = []
        for pf, b in zip(pfs, rows_of):
            mine = tuple(m[:, b : b + 1] for m in moments) if pf.chunks == 1 else pf.moments
            parts.append(mine or tuple(torch.zeros_like(m[:, :1]) for m in moments))
        moments = tuple(torch.cat(ms, 1) for ms in zip(*parts))
    return probe, moments


def _prune(runner, pfs, probe, moments, forward: int, at_least: int):
    """Prune the completed prompts' groups and record each sequence's KV stats. Returns (the
    sequences in order, the most pages in use meanwhile, the budgets of first admissions)."""
    batch = [pf.group for pf in pfs]
    seqs = [seq for g in batch for seq in g]
    at = {id(seq): i for i, seq in enumerate(seqs)}
    prompts = [g[0].prompt for g in batch]
    pages_prefill = [runner.kv.owned(g[0].slot) for g in batch]
    for pf in pfs:
        if pf.logprobs is not None:
            for seq in pf.group:
                seq.prompt_logprobs = pf.logprobs
    t1 = time.perf_counter()
    keep, kept_all, peak = pruning.prune_admitted(runner, batch, probe, [len(p) for p in prompts], moments)
    del moments
    runner.sync()
    t2 = time.perf_counter()
    evicted = _evicted(runner, batch, probe, keep) if probe is not None else None
    del probe
    budgets = []
    rows = [probe_rows(g, at_least) for g in batch]
    for b, g in enumerate(batch):
        n = len(prompts[b])
        for seq in g:
            i = at[id(seq)]
            per_head = kept_all[:, i].tolist()  # every KV head (tensor parallel: not only this rank's)
            budget = kept_all[:, i].double().mean().item() / n
            seq.stats.update(
                policy=seq.policy.name,
                prompt_tokens=n,
                kept_per_layer=[round(sum(h) / len(h)) for h in per_head],
                budget=budget,
                prefill_s=pfs[b].seconds,
                prefill_chunks=pfs[b].chunks,
                cached_tokens=pfs[b].cached,
                prune_s=t2 - t1,
                batch=forward,
                pages_after_prefill=pages_prefill[b],
                pages_after_pruning=runner.kv.owned(seq.slot),
                preempted=seq.stats.get("preempted", -1) + 1,
                kept_per_head=per_head,
                # (None without a probe row of its own)
                evicted_per_layer=evicted[:, i].tolist() if evicted is not None and rows[b] else None,
                _t0=t2,
            )
            if seq.stats["preempted"] == 0:
                budgets.append(budget)
    return seqs, peak, budgets


def _evicted(runner, batch, probe, keep) -> torch.Tensor:
    """Each sequence's share of the last prompt query's attention (mean over query heads) that fell
    on evicted keys, [L, S] on the host."""
    c = runner.config
    last = probe[..., -1, :]  # [L, B, H, N]
    src_of = runner.dev_long([b for b, g in enumerate(batch) for _ in g])
    gone = (~keep).repeat_interleave(c.n_heads // c.n_kv_heads, 2)  # [L, S, H, N]
    return (last.index_select(1, src_of) * gone).sum(-1).mean(-1).cpu()


def chunk_logprobs(runner, pf, h, ids):
    """Add the log-probabilities of a chunk's tokens (given the ones before them) and the top ones
    to pf.logprobs, from the chunk's final hidden states h [n, dim] (prompt positions from pf.done
    on) and the last one before it (pf.last_h), a chunk of positions at a time (never n x V at
    once). The states of the tokens that end a page-sized block are kept for the prefix cache."""
    k = pf.group[0].sampling.prompt_logprobs
    last = h[-1].clone()
    ps = runner.kv.ps
    for p in range(-(-(pf.done + 1) // ps) * ps - 1, pf.done + h.shape[0], ps):  # blocks' last tokens
        pf.block_h[p // ps] = h[p - pf.done].clone()
    if pf.logprobs is None:  # the first token has nothing before it
        pf.logprobs = [(int(ids[0]), None, None)]
        before, after = h[:-1], ids[1:]
    else:
        before, after = torch.cat([pf.last_h[None], h[:-1]]), ids
    pf.last_h = last
    for s in range(0, before.shape[0], PROMPT_LOGPROB_CHUNK):
        e = min(before.shape[0], s + PROMPT_LOGPROB_CHUNK)
        lp = runner.logits(before[s:e]).log_softmax(-1)
        chosen = lp.gather(-1, after[s:e, None])[:, 0].tolist()
        if k:
            top = lp.topk(k, -1)
            tops = [dict(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        else:
            tops = [{}] * len(chosen)
        pf.logprobs += list(zip(after[s:e].tolist(), chosen, tops))
