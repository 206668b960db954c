"""Speed-bench report: what a run's results say, as the JSON written to --json (private keys dropped),
the markdown tables printed last and appended to --results-md, and the run's metadata."""

import datetime
import os
import platform
import shlex
from pathlib import Path

import torch

from bench.common import git_commit, is_cuda

ANCHOR = (
    "Anchors (H100 80GB, 7B shape, batch 1, prompt 512): copy 3.01 TB/s, weight floor ~213 tok/s; "
    "transformers eager 30 tok/s, static+compile 118 tok/s; HF prefill 8192 tok 279 ms (464 TFLOP/s); "
    "HF compiled batch 16 x 4096: 534 tok/s summed; bare compiled decode step 127-131 tok/s."
)


def strip_private(x):
    """Drop keys starting with '_' (generated token ids kept for comparisons) at any depth."""
    if isinstance(x, dict):
        return {k: strip_private(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, list):
        return [strip_private(v) for v in x]
    return x


def _f(x, fmt="{:.1f}"):
    return "-" if x is None or (isinstance(x, float) and x != x) else fmt.format(x)


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows])


def render(res) -> str:
    parts = []
    ours = [
        "policy",
        "batch",
        "prompt",
        "new",
        "prefill ms",
        "TFLOP/s",
        "prune ms",
        "decode ms/step",
        "tok/s",
        "KV budget",
        "peak GiB",
        "warm-up s",
    ]
    row = lambda r: [
        r["policy"],
        r["batch"],
        r["prompt"],
        r["new_tokens"],
        _f(r["prefill_ms"]),
        _f(r["prefill_tflops"], "{:.4g}"),
        _f(r["prune_ms"], "{:.2f}"),
        _f(r["decode_ms_median"], "{:.3f}"),
        _f(r["decode_tok_s"]),
        _f(100 * r["kv_budget"], "{:.1f}%"),
        _f(r["peak_mem_gib"], "{:.2f}"),
        _f(r["warmup_s"]),
    ]
    if res["speed"]:
        parts.append(
            "**Ours, batch 1** (Engine.generate; decode = median step)\n\n"
            + table(ours, [row(r) for r in res["speed"]])
        )
    if res["hf"]:

        def ratio(h):
            x = next(
                (
                    q
                    for q in res["ratios"]
                    if q["prompt"] == h["prompt"]
                    and q["batch"] == h["batch"]
                    and q["hf_mode"] == h["mode"]
                    and q["ours"] == "full"
                ),
                None,
            )
            return (
                (_f(x["decode_speedup"], "{:.2f}x"), _f(x["prefill_speedup"], "{:.2f}x")) if x else ("-", "-")
            )

        parts.append(
            "**transformers, same weights** "
            "(ours ÷ theirs: our full-KV speed over theirs, >1 = ours faster)\n\n"
            + table(
                [
                    "mode",
                    "batch",
                    "prompt",
                    "prefill ms",
                    "TFLOP/s",
                    "decode ms/step",
                    "tok/s",
                    "tok/s (anchor method)",
                    "peak GiB",
                    "warm-up s",
                    "decode ours/theirs",
                    "prefill ours/theirs",
                    "same tokens",
                ],
                [
                    [
                        h["mode"],
                        h["batch"],
                        h["prompt"],
                        _f(h["prefill_ms"]),
                        _f(h["prefill_tflops"], "{:.4g}"),
                        _f(h["decode_ms_median"], "{:.3f}"),
                        _f(h["decode_tok_s"]),
                        _f(h["decode_tok_s_anchor"]),
                        _f(h["peak_mem_gib"], "{:.2f}"),
                        _f(h["warmup_s"]),
                        *ratio(h),
                        _f(h.get("tokens_agree_prefix"), "{}"),
                    ]
                    for h in res["hf"]
                ],
            )
        )
    f = res["floor"]
    if f:
        parts.append(
            "**Weight-streaming floor** (bytes read per token ÷ measured copy bandwidth)\n\n"
            + table(
                [
                    "copy GB/s",
                    "weight GB/token",
                    "floor ms/tok",
                    "floor tok/s",
                    "ours ms/tok",
                    "ours % of floor",
                    "efficiency",
                    "achieved GB/s (gpt-fast)",
                    "e2e GB/s (gpt-fast)",
                ],
                [
                    [
                        _f(f["copy_GBps"], "{:.0f}"),
                        _f(f["weight_bytes_per_token"] / 1e9, "{:.3f}"),
                        _f(f["floor_ms"], "{:.3f}"),
                        _f(f["floor_tok_s"]),
                        _f(f.get("ours_decode_ms"), "{:.3f}"),
                        _f(f.get("ours_pct_of_floor"), "{:.0f}%"),
                        _f(f.get("bandwidth_efficiency_pct"), "{:.0f}%"),
                        _f(f.get("achieved_GBps"), "{:.0f}"),
                        _f(f.get("achieved_GBps_e2e"), "{:.0f}"),
                    ]
                ],
            )
        )
    s = res["scaling"]
    if s and s.get("rows"):
        parts.append(
            f"**Decode step vs live KV, `--kv full`** (grows with live KV: {s.get('grows_with_live_kv')})\n\n"
            + table(
                ["prompt", "decode ms/tok", "tok/s", "peak GiB"],
                [
                    [
                        r["prompt"],
                        _f(r["decode_ms_median"], "{:.3f}"),
                        _f(r["decode_tok_s"]),
                        _f(r["peak_mem_gib"], "{:.2f}"),
                    ]
                    for r in s["rows"]
                ],
            )
        )
    if res["batch"]:
        parts.append(
            "**Batched decode** (tok/s summed over the batch = batch ÷ median step)\n\n"
            + table(ours, [row(r) for r in res["batch"]])
        )
    pr = res.get("profile")
    if pr:
        parts.append(
            f"**Profile** (batch 1, prompt {pr['prompt']}, {pr['new_tokens']} tokens: "
            f"{pr['per_step_ms']:.3f} ms of self time per token; top kernels)\n\n"
            + table(
                ["kernel", "calls", "ms", "share"],
                [
                    [f"`{t['name']}`", t["calls"], _f(t["ms"], "{:.2f}"), _f(100 * t["share"], "{:.1f}%")]
                    for t in pr["top"]
                ],
            )
        )
    if res["errors"]:
        parts.append("**Errors**\n\n" + "\n".join(f"- {e['run']}: `{e['error']}`" for e in res["errors"]))
    return "\n\n".join(parts)


def meta(a, eng, label, argv):
    dev = eng.device
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = None
    name = (
        torch.cuda.get_device_name(dev)
        if is_cuda(dev)
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    c = eng.config
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=dev,
        device_name=name,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        transformers=tf,
        commit=git_commit(a.commit),
        command="python -m bench.speed " + shlex.join(argv),
        model=label,
        dtype=str(eng.dtype).removeprefix("torch."),
        compiled=bool(eng.compiled),
        page_size=eng.page_size,
        decode_projections="triton gemv" if eng.model.gemv is not None else "F.linear",
        attention="triton" if eng.kv.triton else "torch",
        pool_pages=eng.kv.n_pages,
        params=sum(p.numel() for p in eng.model.parameters()),
        sections=a.sections,
        config=dict(
            layers=c.n_layers,
            dim=c.dim,
            heads=c.n_heads,
            kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            ffn=c.ffn_dim,
            vocab=c.vocab_size,
        ),
    )


def append_results_md(path, res, text):
    m = res["meta"]
    head = (
        f"\n## Speed — {m['date']} — {m['device_name']}\n\n"
        f"- model: {m['model']}, {m['params'] / 1e9:.3f} B parameters, compiled: {m['compiled']}, "
        f"pool {m['pool_pages']} pages of {m['page_size']} tokens, "
        f"decode projections: {m['decode_projections']}, decode attention: {m['attention']}\n"
        f"- torch {m['torch']} (CUDA {m['cuda']}), transformers {m['transformers']}, commit `{m['commit']}`\n"
        f"- command: `{m['command']}`\n\n"
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:  # append only: others append to the same file
        fh.write(head + text + f"\n\n{ANCHOR}\n")
