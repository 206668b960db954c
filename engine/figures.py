"""The figures of a workload (one Engine.generate call): what the core counted while it ran,
summed up for Engine.stats and the benches."""

import time

import torch


def workload(core, groups) -> dict:
    """The figures of a workload (one generate call) since reset_workload()."""
    runner, kv, w, sched = core.runner, core.kv, core.w, core.sched
    wall = time.perf_counter() - w["t0"]
    peak = torch.cuda.max_memory_allocated(runner.dev) if runner.cuda else _rss()
    seqs = [seq for grp in groups for seq in grp]
    new_tokens = sum(len(seq.out) for seq in seqs)
    steps = w["steps"]
    pb = w["pool_bound_steps"]
    return dict(
        requests=len(groups),
        sequences=len(seqs),
        policies=sorted({seq.policy.name for seq in seqs}),
        new_tokens=new_tokens,
        # prompt tokens of the requests, and those found in the prefix cache (not prefilled)
        prompt_tokens=sum(len(grp[0].prompt) for grp in groups),
        cached_tokens=sum(grp[0].stats.get("cached_tokens", 0) for grp in groups),
        steps=steps,
        wall_s=wall,
        tok_s=new_tokens / wall if wall else 0.0,
        req_s=len(groups) / wall if wall else 0.0,
        pool_pages=kv.n_pages,
        page_size=kv.ps,
        peak_pages=w["peak_pages"],
        peak_concurrent=w["peak_seqs"],
        mean_concurrent=w["live_sum"] / steps if steps else 0.0,
        pool_bound_steps=pb,  # steps while requests waited for pages
        mean_concurrent_pool_bound=w["pool_bound_sum"] / pb if pb else None,
        preemptions=sched.preemptions - w["preemptions0"],
        admission_waits=sched.waits - w["waits0"],
        # each sequence's pages at its last admission (a preempted one is counted once)
        pages_after_prefill=sum(seq.stats.get("pages_after_prefill", 0) for seq in seqs),
        pages_after_pruning=sum(seq.stats.get("pages_after_pruning", 0) for seq in seqs),
        peak_memory_bytes=peak,
        # launch-to-launch intervals: the host waits on step t-1 before launching t+1, so in
        # steady state each interval is one device step (prefills show up as outliers)
        step_ms=[1e3 * (b - a) for a, b in zip(w["launches"], w["launches"][1:])],
    )


def _rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
