"""Speed benchmark: the engine's own path (Engine.generate: prefill, pruning, paged decode with
continuous batching) against the weight-streaming floor and against `transformers` (eager, and
static cache + torch.compile) on the *same* weights, in one process.

    python -m bench.speed                                    # Qwen2.5-7B shape, random bf16 weights, every section
    python -m bench.speed --sections speed,hf,floor --prompt-lens 512 --json $OUT/s512.json
    python -m bench.speed --model ./Qwen2.5-7B-Instruct --sections speed --prompt-lens 512,8192
    python -m bench.speed --tiny                             # ~1M-parameter Qwen2 shape (CPU smoke test)

Model: without --model the engine's Transformer is built on the device from a Qwen2.5-7B config
(7.6 B parameters, bench/common.py) and filled with N(0, 0.02); `--model` loads a real checkpoint.

Every figure comes from Engine.generate and its stats (EOS is switched off so every run makes
--new-tokens tokens): prefill_s and prune_s of the sequence, and the decode step: the median of the
engine's launch-to-launch intervals (the host queues step t+1 and then waits for step t-1, so in
steady state an interval is one device step; `decode_tok_s` = batch / median step). Each
configuration runs twice; the first run's wall time is `warmup_s`, its excess over the second
`compile_warmup_s`; dynamo's graph counters are read around each.

Formulas.
  prefill FLOPs = 2 * P * B * n + 4 * L * H * D * n^2 / 2 * B (P = parameters but the input table,
      the head counted for every token as the anchor does; `prefill_tflops_exact` counts the head at
      each sequence's last token only, which is what both engines compute).
  floor ms = bytes read per token (every parameter but the input table, plus one row of it) /
      device-to-device copy bandwidth ((read + write) bytes / time of a --bw-mib bf16 copy).
  achieved GB/s (gpt-fast's `_get_model_size` * tok/s).

Sections (--sections, comma list; default all; run in this order):
  speed    batch 1, each --prompt-lens, --new-tokens, each --policies (default full,refreekv)
  floor    copy bandwidth, weight floor, ours as % of it (ours = the full-KV batch-1 run at the
           shortest prompt; timed here when `speed` did not run)
  hf       transformers at batch 1 (same prompts) and at each --batches x --batch-prompt, each
           --hf-modes, and ours / theirs ratios
  scaling  --kv full at each --scaling-lens: the decode step must follow the live KV
  batch    each --batches x --batch-prompt tokens: full KV and forced --budgets (`streaming`)

Output: markdown tables on stdout (last), progress on stderr, JSON at --json (rewritten after every
run), and with --results-md PATH a dated section appended. Exit 1 when any run failed.
"""  # noqa: E501 (--help text)

import argparse
import json
import os
import statistics
import sys
import traceback
from pathlib import Path

import torch

import refreekv
from bench.common import (
    build_engine,
    copy_bandwidth,
    dynamo_counts,
    floats,
    free_cache,
    gptfast_model_bytes,
    ints,
    is_cuda,
    log,
    make_policy,
    names,
    policy_label,
    prefill_flops,
    random_prompts,
    weight_bytes_per_token,
)
from bench.speed import hf as hfb
from bench.speed import hf_rows as speed_hf
from bench.speed.report import append_results_md, meta, render, strip_private
from engine.sampling import Sampling
from weights.errors import UserError

SECTIONS = ("speed", "floor", "hf", "scaling", "batch", "profile")
DEFAULTS = {
    "qwen2.5-7b": dict(
        prompt_lens=[512, 8192],
        new_tokens=256,
        scaling_lens=[512, 8192, 32512],
        batches=[16],
        batch_prompt=4096,
        budgets=[0.5, 0.25],
        bw_mib=2048,
    ),
    "tiny": dict(
        prompt_lens=[24, 40],
        new_tokens=8,
        scaling_lens=[16, 48, 96],
        batches=[2, 3],
        batch_prompt=32,
        budgets=[0.5, 0.25],
        bw_mib=64,
    ),
}


class Bench:
    def __init__(self, a, eng, label):
        self.a, self.eng, self.label, self.dev = a, eng, label, eng.device
        eng.eos = set()  # random weights: every run makes --new-tokens tokens
        self.results = dict(meta={}, speed=[], hf=[], ratios=[], floor={}, scaling={}, batch=[], errors=[])

    @torch.no_grad()
    def measure(self, policy, B, n, new, seed) -> dict:
        """Two Engine.generate runs of B prompts of n tokens (warm-up, measured); the row of stats."""
        eng = self.eng
        prompts = random_prompts(eng, B, n, seed)
        s = Sampling(max_new_tokens=new)
        g0, _ = dynamo_counts()
        eng.generate(prompts, policy, s)
        warm = eng.stats["wall_s"]
        g1, _ = dynamo_counts()
        res = eng.generate(prompts, policy, s)
        g2, skips = dynamo_counts()
        st, first = eng.stats, res[0].stats
        if first["batch"] != B or st["peak_concurrent"] != B:  # the rows below would not be batch B's
            raise RuntimeError(
                f"batch {B} x {n} was not prefilled and decoded as one batch ({first['batch']} at once)"
            )
        steps = st["step_ms"]
        med = statistics.median(steps) if steps else float("nan")
        flops, exact = prefill_flops(eng.model, eng.config, B, n)
        return dict(
            engine="ours",
            policy=policy_label(policy),
            batch=B,
            prompt=n,
            new_tokens=new,
            prefill_ms=first["prefill_s"] * 1e3,
            prefill_flops=flops,
            prefill_tflops=flops / first["prefill_s"] / 1e12,
            prefill_tflops_exact=exact / first["prefill_s"] / 1e12,
            prune_ms=first["prune_s"] * 1e3,
            decode_ms_median=med,
            decode_ms_mean=statistics.fmean(steps) if steps else float("nan"),
            decode_tok_s=B * 1e3 / med if steps else 0.0,
            wall_s=st["wall_s"],
            kv_budget=statistics.fmean(r.stats["budget"] for r in res),
            pages_after_prefill=st["pages_after_prefill"],
            pages_after_pruning=st["pages_after_pruning"],
            peak_concurrent=st["peak_concurrent"],
            peak_mem_bytes=st["peak_memory_bytes"],
            peak_mem_gib=st["peak_memory_bytes"] / 2**30,
            warmup_s=warm,
            compile_warmup_s=max(0.0, warm - st["wall_s"]),
            compiled=bool(eng.compiled),
            graphs_compiled_warmup=g1 - g0,
            graphs_compiled_measured=g2 - g1,
            cudagraph_skips=skips,
            _tokens=[r.tokens for r in res],
        )

    def attempt(self, what, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - record it, go on with the other runs
            traceback.print_exc()
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}"
            self.results["errors"].append(dict(run=what, error=msg))
            log(f"[bench.speed] FAILED {what}: {msg}")
            free_cache(self.dev)
            return None
        finally:
            self.save()

    def save(self):
        if self.a.json:
            Path(self.a.json).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(self.a.json) + ".tmp")
            tmp.write_text(json.dumps(strip_private(self.results), indent=1, default=str))
            os.replace(tmp, self.a.json)


# -------------------------------------------------------------------------------------- sections


def section_speed(b: Bench):
    a = b.a
    for n in a.prompt_lens:
        for name in a.policies:
            policy = make_policy(name, a.threshold)
            what = f"speed {policy_label(policy)} prompt {n}"
            log(f"[bench.speed] {what} ...")

            def run():
                row = b.measure(policy, 1, n, a.new_tokens, a.seed + n)
                b.results["speed"].append(row)
                log(
                    f"[bench.speed]   prefill {row['prefill_ms']:.1f} ms "
                    f"({row['prefill_tflops']:.1f} TFLOP/s), prune {row['prune_ms']:.2f} ms, "
                    f"decode {row['decode_ms_median']:.3f} ms/tok = {row['decode_tok_s']:.1f} tok/s, "
                    f"budget {100 * row['kv_budget']:.1f}%, warm-up {row['warmup_s']:.1f} s"
                )

            b.attempt(what, run)


def section_floor(b: Bench):
    a, model = b.a, b.eng.model
    bw = copy_bandwidth(b.dev, a.bw_mib)
    wbytes = weight_bytes_per_token(model)
    floor_ms = wbytes / bw * 1e3
    f = b.results["floor"] = dict(
        copy_GBps=bw / 1e9,
        weight_bytes_per_token=wbytes,
        floor_ms=floor_ms,
        floor_tok_s=1e3 / floor_ms,
        gptfast_model_bytes=gptfast_model_bytes(model),
        params=sum(p.numel() for p in model.parameters()),
    )
    ref = next((r for r in b.results["speed"] if r["policy"] == "full" and r["batch"] == 1), None)
    if ref is None:  # floor alone: time a full-KV run at the shortest prompt
        n = min(a.prompt_lens)
        ref = b.attempt(
            f"floor reference prompt {n}",
            lambda: b.measure(make_policy("full"), 1, n, a.new_tokens, a.seed + n),
        )
    if ref is None:
        return
    med = ref["decode_ms_median"]
    f.update(
        ref_prompt=ref["prompt"],
        ref_policy=ref["policy"],
        ours_decode_ms=med,
        ours_tok_s=ref["decode_tok_s"],
        ours_pct_of_floor=100 * med / floor_ms,
        bandwidth_efficiency_pct=100 * floor_ms / med,
        achieved_GBps=f["gptfast_model_bytes"] * ref["decode_tok_s"] / 1e9,
        achieved_GBps_e2e=f["gptfast_model_bytes"] * ref["new_tokens"] / ref["wall_s"] / 1e9,
    )
    log(
        f"[bench.speed] floor {floor_ms:.3f} ms/tok at {bw / 1e9:.0f} GB/s; "
        f"ours {med:.3f} ms = {f['ours_pct_of_floor']:.0f}% of it"
    )


def section_scaling(b: Bench):
    a = b.a
    s = b.results["scaling"] = dict(rows=[], grows_with_live_kv=None)
    for n in a.scaling_lens:
        log(f"[bench.speed] scaling full KV prompt {n} ...")
        row = b.attempt(
            f"scaling prompt {n}", lambda: b.measure(make_policy("full"), 1, n, a.new_tokens, a.seed + n)
        )
        if row:
            s["rows"].append(row)
            log(f"[bench.speed]   {row['decode_ms_median']:.3f} ms/tok")
    t = [r["decode_ms_median"] for r in sorted(s["rows"], key=lambda r: r["prompt"])]
    if len(t) >= 2:
        s["grows_with_live_kv"] = all(x < y for x, y in zip(t, t[1:]))


def section_batch(b: Bench):
    a = b.a
    n = a.batch_prompt
    policies = [make_policy("full")] + [make_policy("streaming", budget=x) for x in a.budgets]
    for B in a.batches:
        for p in policies:
            what = f"batch {B} x {n} {policy_label(p)}"
            log(f"[bench.speed] {what} ...")

            def run():
                row = b.measure(p, B, n, a.new_tokens, a.seed + B)
                b.results["batch"].append(row)
                log(
                    f"[bench.speed]   {row['decode_ms_median']:.3f} ms/step = "
                    f"{row['decode_tok_s']:.1f} tok/s summed, budget {100 * row['kv_budget']:.1f}%"
                )

            b.attempt(what, run)


def section_profile(b: Bench):
    """Where a batch-1 decode step's time goes: torch.profiler over one warm generate at the
    shortest prompt (kernels inside CUDA-graph replays included), top kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    a, n, new = b.a, min(b.a.prompt_lens), min(b.a.new_tokens, 64)
    prompts, s, policy = (
        random_prompts(b.eng, 1, n, a.seed),
        Sampling(max_new_tokens=new),
        make_policy("full"),
    )
    b.eng.generate(prompts, policy, s)  # warm: compiled and recorded before the profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda(b.dev) else [])
    with profile(activities=acts) as prof:
        b.eng.generate(prompts, policy, s)
    if a.trace:
        prof.export_chrome_trace(a.trace)
    dev_time = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
    ev = prof.key_averages()
    key = dev_time if is_cuda(b.dev) else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in ev) or 1
    top = sorted(ev, key=key, reverse=True)[:15]
    b.results["profile"] = dict(
        prompt=n,
        new_tokens=new,
        total_ms=total / 1e3,
        per_step_ms=total / 1e3 / new,
        top=[dict(name=e.key[:90], calls=e.count, ms=key(e) / 1e3, share=key(e) / total) for e in top],
    )
    log(
        f"[bench.speed] profile: {total / 1e3:.1f} ms of {'device' if is_cuda(b.dev) else 'CPU'} time "
        f"over {new} tokens"
    )


# ------------------------------------------------------------------------------------------ CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see --help)")


def parse_args(argv=None):
    p = _Parser(
        prog="python -m bench.speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model", help="real checkpoint (dir / hub id / bundled name) instead of random weights"
    )
    src.add_argument("--shape", choices=sorted(DEFAULTS), help="random-weight shape (default qwen2.5-7b)")
    src.add_argument(
        "--tiny", action="store_true", help="same as --shape tiny: ~1M-parameter Qwen2 shape, small sizes"
    )
    p.add_argument(
        "--sections", type=names(SECTIONS), default=list(SECTIONS), help="comma list of " + ",".join(SECTIONS)
    )
    p.add_argument("--prompt-lens", type=ints, help="speed/hf prompt lengths (default 512,8192)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per run (default 256)")
    p.add_argument(
        "--scaling-lens",
        type=ints,
        help="scaling prompt lengths (default 512,8192,32512: 32k live at the end)",
    )
    p.add_argument("--batches", type=ints, help="batch sizes of the batch and hf sections (default 16)")
    p.add_argument("--batch-prompt", type=int, help="batch section prompt length (default 4096)")
    p.add_argument(
        "--budgets",
        type=lambda s: [] if s == "none" else floats(s),
        help="batch section forced budgets, or none: full KV alone (default 0.5,0.25)",
    )
    p.add_argument(
        "--policies",
        type=names(tuple(refreekv.available())),
        default=["full", "refreekv"],
        help="speed section policies (default full,refreekv)",
    )
    p.add_argument("--threshold", type=float, default=0.01, help="ReFreeKV T (default 0.01)")
    p.add_argument(
        "--hf-modes",
        type=names(hfb.MODES),
        help="transformers modes (default eager,static-compile on CUDA, eager on CPU)",
    )
    p.add_argument(
        "--hf-weights",
        choices=["view", "copy"],
        default="view",
        help="transformers parameters as views of ours or copies",
    )
    p.add_argument("--device")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile (default: the engine's)",
    )
    p.add_argument("--kv-memory", type=float, help="the engine's KV pool in GiB (default: the engine's)")
    p.add_argument("--page-size", type=int, default=16, help="KV page size (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", help="profile section: write its chrome trace here")
    p.add_argument("--bw-mib", type=int, help="copy-bandwidth buffer size in MiB (default 2048)")
    p.add_argument("--json", help="write the results here (rewritten after every run)")
    p.add_argument(
        "--results-md", help="append a dated section to this markdown file (e.g. bench/RESULTS.md)"
    )
    p.add_argument("--commit", help="git commit to record (default: git describe)")
    a = p.parse_args(argv)
    if a.tiny:
        a.shape = "tiny"
    if not a.model and not a.shape:
        a.shape = "qwen2.5-7b"
    for k, v in DEFAULTS[a.shape or "qwen2.5-7b"].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.new_tokens < 2:
        raise UserError("--new-tokens must be >= 2 (one prefill token + at least one decode step)")
    return a


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = parse_args(argv)
        longest = (
            max(a.prompt_lens + a.scaling_lens * ("scaling" in a.sections) + [a.batch_prompt]) + a.new_tokens
        )
        # one prefill batch per measured run: every batch row decodes all B at once from its first step
        batch_tokens = (
            max(a.batches + [1]) * a.batch_prompt if "batch" in a.sections or "hf" in a.sections else 0
        )
        eng, label = build_engine(
            a,
            max_length=longest + (a.page_size or 16),  # a page of slack per row: admission reserves one
            kv_memory=a.kv_memory,
            page_size=a.page_size,
            max_seqs=max(a.batches + [1]),
            max_prefill_tokens=max(batch_tokens, *a.prompt_lens) or None,
            max_batched_tokens=0,  # prompts prefilled whole: these rows time one prefill
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    b = Bench(a, eng, label)
    b.results["meta"] = meta(a, eng, label, argv)
    m = b.results["meta"]
    log(
        f"[bench.speed] {label} on {m['device_name']}, {m['params'] / 1e9:.3f} B params, "
        f"dtype {m['dtype']}, compiled {eng.compiled}"
    )
    steps = {
        "speed": section_speed,
        "hf": speed_hf.section,
        "floor": section_floor,
        "scaling": section_scaling,
        "batch": section_batch,
        "profile": section_profile,
    }
    # hf last: its ratios use our rows; compiled HF runs are slow
    for name in ("speed", "floor", "scaling", "batch", "profile", "hf"):
        if name in a.sections:
            b.attempt(f"section {name}", lambda: steps[name](b))
    text = render(b.results)
    if a.results_md:
        append_results_md(a.results_md, b.results, text)
    b.save()
    print(text + "\n", flush=True)
    return 1 if b.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
