"""Admission: a batch of waiting requests becomes running sequences.

Prefill the batch into its sources' pages (engine/runner.py: packed end to end when eager,
right-padded when compiled), score the prompts that asked for their log-probabilities, prune every
sequence with its policy (engine/pruning.py), and record each sequence's KV stats. Returns the
logits its first tokens are chosen from; choosing them is the core's.
"""

import time

import torch

from engine import pruning

PROMPT_LOGPROB_CHUNK = 256  # positions whose full-vocabulary logits exist at once (prompt logprobs)


def admit(runner, batch, probe_rows: int, note=None):
    """Prefill and prune an admitted batch (groups: a prompt and its forks, each with a slot).
    Returns (logits [S, V] of each sequence's first token, the sequences in slot order, the most
    pages in use meanwhile, the KV budget of each sequence admitted for the first time)."""
    seqs = [seq for g in batch for seq in g]
    at = {id(seq): i for i, seq in enumerate(seqs)}
    rows = max([probe_rows] + [seq.policy.probe_rows for seq in seqs])
    prompts = [g[0].prompt for g in batch]
    scoring = [b for b, g in enumerate(batch) if g[0].sampling.prompt_logprobs is not None]
    pages_prefill = [runner.kv.owned(g[0].slot) for g in batch]
    runner.sync()
    t0 = time.perf_counter()
    hook = None if note is None else (lambda i, n: note(i, n, sum(map(len, prompts))))
    slots = [g[0].slot for g in batch]
    stats = any(seq.policy.query_stats for seq in seqs)
    logits, probe, states, where, moments = runner.prefill(prompts, slots, rows, bool(scoring), hook, stats)
    for b in scoring:
        ids, start = where[b]
        n = len(prompts[b])
        prompt_logprobs(runner, batch[b], states[start : start + n], ids[start : start + n])
    del states
    runner.sync()
    t1 = time.perf_counter()
    keep, kept_all, peak = pruning.prune_admitted(runner, batch, probe, [len(p) for p in prompts], moments)
    del moments
    runner.sync()
    t2 = time.perf_counter()
    evicted = _evicted(runner, batch, probe, keep) if rows else None
    del probe
    budgets = []
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
                prefill_s=t1 - t0,
                prune_s=t2 - t1,
                batch=len(batch),
                pages_after_prefill=pages_prefill[b],
                pages_after_pruning=runner.kv.owned(seq.slot),
                preempted=seq.stats.get("preempted", -1) + 1,
                kept_per_head=per_head,
                evicted_per_layer=None if evicted is None else evicted[:, i].tolist(),
                _t0=t2,
            )
            if seq.stats["preempted"] == 0:
                budgets.append(budget)
    ks = [len(g) for g in batch]
    if max(ks) > 1:
        logits = logits.repeat_interleave(torch.tensor(ks, device=runner.dev), 0)
    return logits, seqs, peak, budgets


def _evicted(runner, batch, probe, keep) -> torch.Tensor:
    """Each sequence's share of the last prompt query's attention (mean over query heads) that fell
    on evicted keys, [L, S] on the host."""
    c = runner.config
    last = probe[..., -1, :]  # [L, B, H, N]
    src_of = runner.dev_long([b for b, g in enumerate(batch) for _ in g])
    gone = (~keep).repeat_interleave(c.n_heads // c.n_kv_heads, 2)  # [L, S, H, N]
    return (last.index_select(1, src_of) * gone).sum(-1).mean(-1).cpu()


def prompt_logprobs(runner, group, h, ids):
    """Log-probability of each prompt token given the ones before it, and the top ones, from the
    final hidden states h [n, dim], a chunk of positions at a time (never n x V at once)."""
    k = group[0].sampling.prompt_logprobs
    out = [(int(ids[0]), None, None)]  # the first token has nothing before it
    for s in range(0, h.shape[0] - 1, PROMPT_LOGPROB_CHUNK):
        e = min(h.shape[0] - 1, s + PROMPT_LOGPROB_CHUNK)
        lp = runner.logits(h[s:e]).log_softmax(-1)
        chosen = lp.gather(-1, ids[s + 1 : e + 1, None])[:, 0].tolist()
        if k:
            top = lp.topk(k, -1)
            tops = [dict(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        else:
            tops = [{}] * len(chosen)
        out += list(zip(ids[s + 1 : e + 1].tolist(), chosen, tops))
    for seq in group:
        seq.prompt_logprobs = out
