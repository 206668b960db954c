"""One Engine.generate call: continuous batching's step loop over the paged pool.

Each iteration queues the next decode step for the running batch before it reads the previous
step's tokens back (the device never waits for the host; a sequence whose last token turns out to
be EOS costs one wasted row), then accepts those tokens (streaming, stop strings, EOS, limits),
finishes sequences (their pages go back at once), admits and prefills waiting requests whose
prompts fit, prunes them with their policies, and hands out the pages the next step needs,
preempting the newest sequence when there are none. Sequences keep slots [0, n) of the pool in
order; the tokens of the next step are gathered into that order on the device.
"""
import time
from dataclasses import dataclass

import torch

import refreekv
from engine.attention import pow2
from engine.sampling import Sampling, find_stop, sample, stop_prefix
from engine.scheduler import Scheduler, Sequence


@dataclass
class Result:
    tokens: list[int]
    text: str
    stats: dict


class Run:
    def __init__(self, eng, sched: Scheduler, groups: list[list[Sequence]], policies, s: Sampling, fan: bool,
                 on_token=None, on_finish=None, on_logits=None, probe_rows: int = 0):
        self.eng, self.kv, self.sched, self.groups, self.policies, self.s, self.fan = eng, eng.kv, sched, groups, policies, s, fan
        self.on_token, self.on_finish, self.on_logits, self.probe_rows = on_token, on_finish, on_logits, probe_rows
        self.gen = torch.Generator(device=eng.dev).manual_seed(s.seed) if s.seed is not None else None
        self.key = (lambda q: (q.idx, q.fork)) if fan else (lambda q: q.idx)
        self.steps = 0  # decode steps so far
        self.w = dict(steps=0, live_sum=0, peak_seqs=0, peak_pages=0, launches=[],
                      pool_bound_steps=0, pool_bound_sum=0)

    def loop(self):
        """Until every request is done: queue a step, read the last one back, finish, admit, grow."""
        eng, sched, groups, kv, M, w = self.eng, self.sched, self.groups, self.kv, self.s.max_new_tokens, self.w
        t_start = time.perf_counter()
        cur_seqs: list[Sequence] = []  # the running batch whose chosen tokens are `cur`
        cur = None
        cur_host = torch.empty(0, dtype=torch.long)
        ready = None
        while sched.busy():
            new = None
            live = [q.n_chosen < M for q in cur_seqs]  # a sequence with all its tokens chosen only drains
            if any(live):  # queue the next step before reading the last one back
                n = len(cur_seqs)
                nb = pow2(n) if eng.cuda and eng.compiled else n
                toks = cur if nb == n else torch.cat([cur, cur.new_zeros(nb - n)])
                # the PyTorch attention reads `span` pages; under CUDA graphs a changing host value would
                # re-record per span, so there it reads the whole table (a debugging path on GPUs)
                span = None if kv.triton or (eng.cuda and eng.compiled) else max(1, int(kv.h_pages[:, :n].max()))
                w["launches"].append(time.perf_counter())
                logits = eng._decode(eng.model, toks, kv, span)[:n]
                new = self.choose(logits, cur_seqs, live)
                w["steps"] = self.steps = w["steps"] + 1
                w["live_sum"] += n
                if sched.waiting and n < sched.max_seqs:  # requests wait for pages: the pool is the limit
                    w["pool_bound_steps"] += 1
                    w["pool_bound_sum"] += n
            if cur_seqs:  # the tokens that step was fed: emit, stop, finish
                if ready is not None:
                    ready.synchronize()
                for q, t in zip(cur_seqs, cur_host.tolist()):
                    if not q.done and q.slot >= 0 and self.accept(q, t):
                        self.finish(q)
            # where each running sequence's next input is: `new` (the step just queued), then `firsts`
            index = {id(q): i for i, q in enumerate(cur_seqs)} if new is not None else {}
            batch = sched.admit()
            firsts = None
            if batch:
                firsts, admitted = self.prefill_prune(batch)
                sched.start(admitted)
                for i, q in enumerate(admitted):
                    index[id(q)] = (0 if new is None else len(cur_seqs)) + i
            elif not sched.running and sched.waiting:
                raise RuntimeError("scheduler stalled with an empty pool")  # check_fits rules this out
            while True:  # pages for the next step; the newest sequence makes room when there are none
                live = [q.n_chosen < M for q in sched.running]
                short = kv.shortage(live)
                if eng.tp.on:  # every rank preempts when any rank is short (ranks hold different heads)
                    short = eng.tp.host_max(short)
                if short == 0:
                    kv.grow(live)
                    break
                sched.preempt()
            kv.set_live(live)  # every step: slots change hands as sequences finish, move and arrive
            w["peak_seqs"] = max(w["peak_seqs"], len(sched.running))
            w["peak_pages"] = max(w["peak_pages"], kv.used)
            pool = [t for t in (new, firsts) if t is not None]
            order = [index[id(q)] for q in sched.running]
            if not order:
                cur_seqs, cur = [], None
                continue
            allc = pool[0] if len(pool) == 1 else torch.cat(pool)
            cur = allc if order == list(range(allc.shape[0])) else allc[eng.dev_long(order)]
            cur_seqs = list(sched.running)
            cur_host = torch.empty(len(cur_seqs), dtype=torch.long, pin_memory=eng.cuda)
            cur_host.copy_(cur, non_blocking=eng.cuda)
            if eng.cuda:
                ready = torch.cuda.Event()
                ready.record()
        wall = time.perf_counter() - t_start
        peak = torch.cuda.max_memory_allocated(eng.dev) if eng.cuda else _rss()
        seqs = [q for grp in groups for q in grp]
        new_tokens = sum(len(q.out) for q in seqs)
        eng.stats = dict(requests=len(groups), sequences=len(seqs), policies=[p.name for p in self.policies],
                          new_tokens=new_tokens, steps=w["steps"], wall_s=wall, tok_s=new_tokens / wall,
                          req_s=len(groups) / wall, pool_pages=kv.n_pages, page_size=kv.ps,
                          peak_pages=w["peak_pages"], peak_concurrent=w["peak_seqs"],
                          mean_concurrent=w["live_sum"] / w["steps"] if w["steps"] else 0.0,
                          pool_bound_steps=w["pool_bound_steps"],  # steps while requests waited for pages
                          mean_concurrent_pool_bound=w["pool_bound_sum"] / w["pool_bound_steps"] if w["pool_bound_steps"] else None,
                          preemptions=sched.preemptions, admission_waits=sched.waits,
                          # each sequence's pages at its last admission (a preempted one is counted once)
                          pages_after_prefill=sum(q.stats["pages_after_prefill"] for q in seqs),
                          pages_after_pruning=sum(q.stats["pages_after_pruning"] for q in seqs),
                          peak_memory_bytes=peak,
                          # launch-to-launch intervals: the host waits on step t-1 before launching t+1, so in
                          # steady state each interval is one device step (prefills show up as outliers)
                          step_ms=[1e3 * (b - a) for a, b in zip(w["launches"], w["launches"][1:])])
        results = [[Result(q.out, q.text, dict(q.stats, peak_memory_bytes=peak)) for q in grp] for grp in groups]
        return results if self.fan else [r[0] for r in results]

    def choose(self, logits, seqs, live) -> torch.Tensor:
        """Tokens from logits [n, V] for seqs: forced where a sequence has one left, else sampled."""
        rows = [i for i, lv in enumerate(live) if lv]  # draining rows' logits are padding
        if self.on_logits is not None and rows:
            self.on_logits([self.key(seqs[i]) for i in rows], [seqs[i].n_chosen for i in rows],
                           logits if len(rows) == len(seqs) else logits[self.eng.dev_long(rows)])
        tok = sample(logits, self.s, self.gen)
        forced = [(i, q.forced[q.n_chosen]) for i, q in enumerate(seqs) if live[i] and q.n_chosen < len(q.forced)]
        if forced:
            at, val = zip(*forced)
            tok = tok.index_put((self.eng.dev_long(list(at)),), self.eng.dev_long(list(val)))
        for q, lv in zip(seqs, live):
            q.n_chosen += lv
        tp = self.eng.tp
        return tp.broadcast(tok) if tp.on else tok  # rank 0's tokens everywhere

    def accept(self, q: Sequence, tok: int) -> bool:
        """A token read back for q; returns True when q is done."""
        s, i = self.s, q.n_seen
        q.n_seen += 1
        if i < len(q.out):  # replayed after a preemption: produced, streamed and checked before
            return False
        forced = i < len(q.forced)  # forced tokens are taken as given: no EOS or stop-string check
        if not forced and tok in self.eng.eos:
            if self.on_token is not None:  # the end: text held back as a possible stop's prefix goes out
                q.shown = len(q.text)
                self.on_token(self.key(q), q.text)
            return True
        q.out.append(tok)
        before = len(q.text)
        text = q.detok.push(tok)
        done = len(q.out) >= s.max_new_tokens
        cut = -1 if forced or not s.stop else find_stop(text, s.stop, before)
        if cut >= 0:
            text, done = text[:cut], True
        q.text = text
        if self.on_token is not None:
            shown = text if done else text[: len(text) - stop_prefix(text, s.stop)]  # a stop's prefix waits
            if len(shown) > q.shown or done:
                q.shown = len(shown)
                self.on_token(self.key(q), shown)
        return done

    def finish(self, q: Sequence):
        self.sched.finish(q)
        t = time.perf_counter() - q.stats.pop("_t0")
        q.stats.update(new_tokens=len(q.out), decode_tok_s=(len(q.out) - 1) / t if len(q.out) > 1 and t > 0 else 0.0,
                       finished_at_step=self.steps)
        if self.on_finish is not None:
            self.on_finish(self.key(q), Result(q.out, q.text, dict(q.stats)))

    def prefill_prune(self, batch: list[list[Sequence]]):
        """Prefill a batch of admitted groups into their sources' pages, plan every policy on the
        probe, copy each fork's kept tokens into its own pages, compact the source in place and
        free its emptied pages. Returns the first chosen tokens and the sequences, in slot order."""
        eng, kv, w = self.eng, self.kv, self.w
        c, dev = eng.config, eng.dev
        pols = [q.policy for q in batch[0]]
        K, B = len(pols), len(batch)
        wide = max([self.probe_rows] + [p.probe_rows for p in pols])
        lens_l = [len(g[0].prompt) for g in batch]
        N = max(lens_l)
        tokens = torch.zeros(B, N, dtype=torch.long)  # right padding: never read, never a sink
        for b, g in enumerate(batch):
            tokens[b, : lens_l[b]] = torch.tensor(g[0].prompt)
        tokens, lens = tokens.to(dev), torch.tensor(lens_l, device=dev)
        src = torch.tensor([g[0].slot for g in batch], device=dev)
        pages_prefill = [kv.owned(g[0].slot) for g in batch]
        eng.sync()
        t0 = time.perf_counter()
        logits, probe = eng._prefill(eng.model, tokens, lens, kv, src, wide)
        if eng.tp.on and probe is not None:
            probe = eng.tp.gather(probe, 2)  # every query head: each policy plans exactly as on one process
        eng.sync()
        t1 = time.perf_counter()
        keeps = []
        for p in pols:
            attn = probe[..., probe.shape[-2] - p.probe_rows:, :] if p.probe_rows else None
            keeps.append(p.plan(refreekv.Probe(attn, lens, c.n_layers, c.n_kv_heads, N)))
        full_keeps = keeps
        if eng.tp.on:  # this rank's KV heads of the plan
            from weights.shard import kv_heads

            h0, nh = kv_heads(c, eng.tp.rank, eng.tp.world)
            keeps = [k[:, :, h0:h0 + nh] for k in full_keeps]
        counts = torch.stack([torch.cat((f.sum(-1), k.sum(-1)), -1) for f, k in zip(full_keeps, keeps)]).cpu()  # one read-back
        kept_all, kept = counts[..., :c.n_kv_heads], counts[..., c.n_kv_heads:]  # [K, L, B, .]: every KV head / this rank's
        for j in range(1, K):  # forks first: they copy from the source before it compacts in place
            for b, g in enumerate(batch):
                kv.assign(g[j].slot, kept[j, :, b])
            kv.compact(src, torch.tensor([g[j].slot for g in batch], device=dev), keeps[j])
        w["peak_pages"] = max(w["peak_pages"], kv.used)  # the prompts and the forks' copies, before compaction
        kv.compact(src, src, keeps[0])
        for b, g in enumerate(batch):
            kv.trim(g[0].slot, kept[0, :, b])
        eng.sync()
        t2 = time.perf_counter()
        evicted = None
        if wide:  # share of the last prompt query's attention (mean over query heads) on evicted keys
            last = probe[..., -1, :]  # [L, B, H, N]
            G = c.n_heads // c.n_kv_heads
            evicted = torch.stack([(last * (~k).repeat_interleave(G, 2)).sum(-1).mean(-1) for k in full_keeps]).cpu()  # [K, L, B]
        del probe
        seqs = [q for g in batch for q in g]
        for b, g in enumerate(batch):
            n = lens_l[b]
            for j, q in enumerate(g):
                per_head = kept_all[j, :, b].tolist()  # every KV head (tensor parallel: not only this rank's)
                q.stats.update(policy=pols[j].name, prompt_tokens=n, kept_per_layer=[round(sum(h) / len(h)) for h in per_head],
                               budget=kept_all[j, :, b].double().mean().item() / n, prefill_s=t1 - t0, prune_s=t2 - t1,
                               batch=B, pages_after_prefill=pages_prefill[b], pages_after_pruning=kv.owned(q.slot),
                               preempted=q.stats.get("preempted", -1) + 1, kept_per_head=per_head,
                               evicted_per_layer=None if evicted is None else evicted[j, :, b].tolist(), _t0=t2)
        first = logits.repeat_interleave(K, 0) if K > 1 else logits
        return self.choose(first, seqs, [True] * len(seqs)), seqs


def _rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
