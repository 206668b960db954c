"""Speed benchmark: our engine against the weight-streaming floor and against `transformers`
(eager, and static cache + torch.compile) on the *same* weights, in one process.

    python -m bench.speed                                    # Qwen2.5-7B shape, random bf16 weights, every section
    python -m bench.speed --sections speed,hf,floor --prompt-lens 512 --json $OUT/s512.json
    python -m bench.speed --model ./Qwen2.5-7B-Instruct --sections speed --prompt-lens 512,8192
    python -m bench.speed --tiny                             # ~1M-parameter Qwen2 shape (CPU smoke test)

Model. Without --model the engine's Transformer is built straight on the device from a Qwen2.5-7B
config (28 layers, hidden 3584, 28 query / 4 KV heads of 128, ffn 18944, vocab 152064, q/k/v
bias, untied head: 7.6 B parameters) and filled with N(0, 0.02) (norm weights 1), so no 15 GB of
safetensors is ever written. A temp dir holds only config.json and a byte-level tokenizer.json,
and the engine's own `Generator` is built on it with `weights.loader.load_model` patched to
return that model, so `gen.decode` (compiled or not, span bucketing) is exactly the engine's.
`--model DIR|HUB_ID` loads a real checkpoint the normal way instead.

transformers comparison. `AutoModelForCausalLM.from_config` builds the HF model, then every HF
parameter is replaced by a *view* of ours through the loader's own name map (q/k/v and gate/up
are contiguous row slices of our fused weights), so both engines read the very same memory:
same weights, no second 15 GB copy (`--hf-weights copy` clones instead). The logits of a short
prompt are compared (`parity_max_abs_logit_diff`) as a check of the mapping. Modes: `eager`
(default dynamic cache) and `static-compile` (cache_implementation="static" with
CompileConfig(fullgraph=True, mode="reduce-overhead") set on the generation config, the only
setting that reached 118 tok/s in /work/shared/MODELS.md). Timed as shared/anchors/hf_baseline.py
does it: prefill = generate(max_new_tokens=1), decode tok/s (anchor method) = (new - 1) /
(t_generate(new) - t_prefill); plus a per-step median from a streamer that synchronises and
stamps every emitted token (HF's loop syncs on every step anyway). Warm-up: 2 full generates
(compile + CUDA graph recording) for static-compile, one short one for eager.

Our decode loop mirrors Generator.generate: prefill -> policy.plan(Probe) -> kv.compact ->
decode steps through `gen.decode(tok, kv, spans)` with the same per-layer spans (each layer's
longest row, bucketed by gen.span_bucket, capped at the capacity), greedy argmax, new_tokens - 1
steps. It differs only in doing no per-step host work (no tok.tolist(), no
detokenising), so it times the engine's step itself; `engine_generate_tok_s` is the real
Generator.generate's own stat for comparison (includes its per-step host sync and detokenising).
Each step is bracketed by CUDA events recorded back to back (event i+1 after step i's argmax),
so a step's time includes any GPU idle caused by host launch overhead; events are read after a
single synchronize at the end. The median over steps is reported (plus the mean). Every
configuration runs twice on the same RaggedKV (allocated once per batch x capacity, so CUDA
graphs recorded in the warm-up are replayed, not re-recorded, in the measured run); the first
run's wall time is `warmup_s`, its excess over the measured run `compile_warmup_s`.

Formulas.
  prefill FLOPs = 2 * P * B * n + 4 * L * H * D * n^2 / 2 * B      (B sequences of n tokens)
      P = every parameter except the input embedding table (as the anchor, which counts the
      output head for every token: 464 TFLOP/s for HF at 8192); L layers, H query heads of
      width D, n^2 / 2 for the causal mask. `prefill_tflops_exact` counts the head only at each
      sequence's last token, which is what both engines compute.
  weight bytes per token = bytes of every parameter except the input embedding table, plus one
      row of it (a tied table is read whole by the head, so it counts whole).
  floor ms = weight bytes per token / device-to-device copy bandwidth, the bandwidth measured as
      the anchor does (2 GiB bf16 copy, 3 warm + 10 timed, (read + write) bytes / time).
  ours_pct_of_floor = our median decode step / floor (100% = at the floor);
  bandwidth_efficiency_pct = floor / our step.
  achieved GB/s (gpt-fast's `_get_model_size` * tokens/s) = bytes of parameters and buffers of
      every top-level child that is not an nn.Embedding * tok/s, with tok/s our median-step rate
      (`achieved_GBps`) and gpt-fast's own generated tokens / (prefill + decode) wall
      (`achieved_GBps_e2e`).

Sections (--sections, comma list; default all; always run in this order):
  speed    ours, batch 1, each --prompt-lens, --new-tokens, each --policies (default full,refreekv)
  floor    copy bandwidth, weight floor, ours as % of it, gpt-fast GB/s (ours = the full-KV batch-1
           run at the shortest prompt; timed here when `speed` did not run)
  hf       transformers, batch 1, same prompts, each --hf-modes, and ours/theirs ratios (vs ours
           with full KV when `speed` ran in the same process)
  scaling  --kv full at each --scaling-lens in one buffer of --max-length (default max + new
           tokens) for all: the step time must follow the live KV length, not the capacity; plus
           the shortest prompt again in a buffer sized to it (`small_buffer`) as a control
  batch    each --batches x --batch-prompt tokens: full KV and the fixed --budgets (the
           `streaming` policy when registered, else a sinks + recent cut of that budget)

Output: a markdown table per section on stdout (last thing printed), progress on stderr, the
JSON at --json (rewritten after every run, so a killed run keeps what it measured), and with
--results-md PATH a dated section (device, date, commit, exact command, the tables) appended.
Exit status 1 when any run failed (its error is in the JSON under "errors"), else 0.
"""
import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

import torch

import refreekv
from weights.errors import UserError

SECTIONS = ("speed", "floor", "hf", "scaling", "batch")  # run in this order (floor and hf use speed rows)
HF_MODES = ("eager", "static-compile")

QWEN7B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, intermediate_size=18944,
              num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
              rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768, use_sliding_window=False,
              tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16", bos_token_id=151643,
              eos_token_id=151643, initializer_range=0.02)
TINY = dict(QWEN7B, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2048, max_position_embeddings=4096, bos_token_id=1,
            eos_token_id=2, initializer_range=0.1)
SHAPES = {"qwen2.5-7b": QWEN7B, "tiny": TINY}

# Sizes per shape; every one can be overridden on the command line.
DEFAULTS = {
    "qwen2.5-7b": dict(prompt_lens=[512, 8192], new_tokens=256, scaling_lens=[512, 8192, 32768], batches=[8, 16],
                       batch_prompt=4096, budgets=[0.5, 0.25], bw_mib=2048),
    "tiny": dict(prompt_lens=[24, 40], new_tokens=8, scaling_lens=[16, 48, 96], batches=[2, 3], batch_prompt=32,
                 budgets=[0.5, 0.25], bw_mib=64),
}

ANCHOR = ("Anchors (H100 80GB, /work/shared/MODELS.md: 7B shape, batch 1, prompt 512): copy 3.01 TB/s, weight floor "
          "~213 tok/s; transformers eager 30 tok/s, static+compile 118 tok/s; HF prefill 8192 tok 279 ms (464 TFLOP/s); "
          "HF compiled batch 16 x 4096: 534 tok/s summed; bare compiled decode step 127-131 tok/s.")


# ----------------------------------------------------------------------------------------- helpers

def log(msg):
    print(msg, file=sys.stderr, flush=True)


def is_cuda(dev) -> bool:
    return torch.device(dev).type == "cuda"


def sync(dev):
    if is_cuda(dev):
        torch.cuda.synchronize()


def reset_peak(dev):
    if is_cuda(dev):
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(dev) -> int:
    if is_cuda(dev):
        return int(torch.cuda.max_memory_allocated())
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS on CPU


def free_cache(dev):
    import gc

    gc.collect()
    if is_cuda(dev):
        torch.cuda.empty_cache()


def ints(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def floats(s: str) -> list[float]:
    try:
        out = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not out or any(not 0 < x for x in out):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s!r}")
    return out


def names(choices):
    def parse(s: str) -> list[str]:
        out = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in out if x not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {s!r}")
        return out
    return parse


class StepTimer:
    """Per-step times of a loop: CUDA events recorded back to back on the current stream (no host
    sync inside the loop; read after one synchronize), or perf_counter on CPU."""

    def __init__(self, dev, steps):
        self.cuda = is_cuda(dev)
        self.dev = dev
        if self.cuda:
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        self.stamps = []
        self.i = 0

    def mark(self):  # call once before the first step and once after each step
        if self.cuda:
            self.events[self.i].record()
        else:
            self.stamps.append(time.perf_counter())
        self.i += 1

    def ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.events[: self.i - 1], self.events[1: self.i])]
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])]


def dynamo_counts():
    """(unique graphs compiled, cudagraph skips) so far in this process."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"]), int(counters["inductor"]["cudagraph_skips"])
    except Exception:  # noqa: BLE001 - diagnostics only
        return 0, 0


# ----------------------------------------------------------------------------------- model + flops

def write_shape_dir(cfg: dict, root: Path) -> Path:
    """config.json and a byte-level tokenizer.json: what Generator needs besides the weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg, indent=1))
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(root / "tokenizer.json"))
    return root


def random_model(path, device, dtype, std: float, seed: int):
    """The engine's Transformer for path/config.json, materialised on `device` and filled with
    N(0, std) (norm weights 1), without ever holding the weights anywhere else."""
    from engine.model import Transformer
    from weights.config import load_config

    c = load_config(Path(path))
    with torch.device("meta"):
        model = Transformer(c).to(dtype)
    model = model.to_empty(device=device)
    if c.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)
    return model.eval(), c


def build_generator(a):
    """Generator on a real checkpoint (--model) or on a random model of --shape."""
    from engine.generate import Generator

    if a.model:
        gen = Generator(a.model, a.device, a.dtype, None, a.compile)
        return gen, f"{gen.path.name} (real weights)"
    cfg = SHAPES[a.shape]
    root = write_shape_dir(cfg, Path(tempfile.mkdtemp(prefix="bench-speed-")) / a.shape)
    std = float(cfg.get("initializer_range", 0.02))
    with mock.patch("weights.loader.load_model",
                    lambda path, device, dtype: random_model(path, device, dtype, std, a.seed)):
        gen = Generator(str(root), a.device, a.dtype, None, a.compile)
    return gen, f"{a.shape} (random {str(gen.dtype).removeprefix('torch.')} weights)"


def param_counts(model):
    """(all params except the input embedding table, same minus the output head, head params)."""
    tied = model.lm_head.weight is model.embed.weight
    total = sum(p.numel() for p in model.parameters())  # a tied table is counted once
    emb = model.embed.weight.numel()
    head = model.lm_head.weight.numel()
    no_embed = total if tied else total - emb
    return no_embed, no_embed - head, head


def prefill_flops(model, c, B, n):
    """(anchor formula: head counted for every token, exact: head at each last token only)."""
    no_embed, body, head = param_counts(model)
    attn = 4 * c.n_layers * c.n_heads * c.head_dim * n * n / 2 * B
    return 2 * no_embed * B * n + attn, 2 * body * B * n + 2 * head * B + attn


def weight_bytes_per_token(model) -> int:
    tied = model.lm_head.weight is model.embed.weight
    emb = model.embed.weight
    total = 0
    for p in model.parameters():
        if p is emb and not tied:
            total += emb.shape[1] * emb.element_size()  # one row of the input table
        else:
            total += p.numel() * p.element_size()
    return total


def gptfast_model_bytes(model) -> int:
    """gpt-fast's _get_model_size: params + buffers of every top-level child that is not an Embedding."""
    import itertools

    return sum(p.numel() * p.element_size()
               for _, child in model.named_children() if not isinstance(child, torch.nn.Embedding)
               for p in itertools.chain(child.parameters(), child.buffers()))


def copy_bandwidth(dev, mib: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, (read + write) / time, as the anchor measures it."""
    n = mib * 2**20 // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    if is_cuda(dev):
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        dt = s.elapsed_time(e) / 10 / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(10):
            b.copy_(a)
        dt = (time.perf_counter() - t0) / 10
    bw = 2 * a.numel() * a.element_size() / dt
    del a, b
    free_cache(dev)
    return bw


# -------------------------------------------------------------------------------------- policies

class ForcedCut(refreekv.Policy):
    """Fallback fixed budget when `streaming` is not registered: a ReFreeKV-shaped cut (sinks +
    the most recent tokens) forced to ceil(budget * n) kept tokens in every layer. Not registered."""
    probe_rows = 0

    def __init__(self, budget: float, sinks: int = 4):
        self.budget, self.sinks, self.name = float(budget), int(sinks), "forced-cut"

    def plan(self, probe: refreekv.Probe):
        n = probe.lens.long()
        k = torch.ceil(n.double() * self.budget - 1e-6).long().clamp(min=1) if self.budget <= 1 else \
            torch.full_like(n, int(self.budget))
        k = torch.minimum(k, n)
        s = k.clamp(max=self.sinks)
        pos = probe.positions
        keep = ((pos < s[:, None]) | (pos >= (n - (k - s))[:, None])) & probe.real  # [B, N]
        return keep[None, :, None].expand(probe.n_layers, -1, probe.n_kv_heads, -1).contiguous()


def fixed_budget(budget: float) -> refreekv.Policy:
    if "streaming" in refreekv.available():
        return refreekv.make("streaming", budget=budget)
    return ForcedCut(budget)


def make_policy(name: str, threshold: float) -> refreekv.Policy:
    if name == "refreekv":
        return refreekv.make("refreekv", threshold=threshold)
    return refreekv.make(name)


def policy_label(p: refreekv.Policy) -> str:
    if getattr(p, "budget", None) is not None:
        b = p.budget
        return f"{p.name} {100 * b:g}%" if b <= 1 else f"{p.name} {int(b)} tok"
    if getattr(p, "threshold", None) is not None:
        return f"{p.name} T={p.threshold:g}"
    return p.name


# ------------------------------------------------------------------------------- our decode loop

class Bench:
    def __init__(self, a, gen, label):
        self.a, self.gen, self.label = a, gen, label
        self.dev = gen.device
        self.c = gen.config
        self._kv_key, self._kv = None, None
        self.results = dict(meta={}, speed=[], hf=[], ratios=[], floor={}, scaling={}, batch=[], errors=[])

    # one RaggedKV alive at a time, reused while (batch, capacity) stays the same: the compiled
    # decode's CUDA graphs hold its addresses, so reuse means replay instead of re-recording
    def kv(self, B, cap):
        from engine.kv import RaggedKV

        if self._kv_key != (B, cap):
            self._kv = None
            free_cache(self.dev)
            c = self.c
            self._kv = RaggedKV(c.n_layers, B, c.n_kv_heads, cap, c.head_dim, self.gen.dtype, self.dev)
            self._kv_key = (B, cap)
        return self._kv

    def drop_kv(self):
        self._kv_key, self._kv = None, None
        free_cache(self.dev)

    def prompts(self, B, n, seed):
        g = torch.Generator().manual_seed(seed)
        hi = min(self.c.vocab_size, 150000)
        return torch.randint(0, hi, (B, n), generator=g)

    @torch.no_grad()
    def one_run(self, policy, B, n, new, cap, seed):
        """Prefill -> plan -> compact -> new - 1 decode steps, as Generator.generate; returns raw timings."""
        gen, c, dev = self.gen, self.c, self.dev
        kv = self.kv(B, cap)
        tokens = self.prompts(B, n, seed).to(dev)
        lens = torch.full((B,), n, dtype=torch.long, device=dev)
        reset_peak(dev)
        sync(dev)
        t0 = time.perf_counter()
        logits, probe = gen.prefill(tokens, lens, kv, probe_rows=policy.probe_rows)  # compiled when gen.compiled
        sync(dev)
        t1 = time.perf_counter()
        gen.prune(policy, refreekv.Probe(probe, lens, c.n_layers, c.n_kv_heads, n), kv)
        del probe
        sync(dev)
        t2 = time.perf_counter()
        kept = kv.lengths.to("cpu", copy=True)  # [L, B, Hkv]
        live = kept.amax((1, 2))  # [L] longest row per layer (host tensor: no device sync in the loop)
        bucket = gen.span_bucket
        steps = new - 1
        tok = logits.argmax(-1)
        out, seen = [tok], set()  # seen: distinct span lists = CUDA graphs a fresh store records
        timer = StepTimer(dev, steps)
        timer.mark()
        for _ in range(steps):
            live += 1  # per-layer spans, bucketed and capped exactly as Generator.generate does
            spans = ((live + bucket - 1) // bucket * bucket).clamp(max=cap)
            sp = spans.tolist()
            seen.add(tuple(sp))
            logits = gen.decode(tok, kv, sp)
            tok = logits.argmax(-1)  # a fresh tensor: CUDA-graph outputs are overwritten by the next replay
            out.append(tok)
            timer.mark()
        sync(dev)
        t3 = time.perf_counter()
        step_ms = timer.ms()
        return dict(prefill_s=t1 - t0, prune_s=t2 - t1, decode_s=t3 - t2, step_ms=step_ms, kept=kept,
                    peak=peak_bytes(dev), tokens=torch.stack(out, 1).cpu(), final_live=int(live.max()), span_sets=len(seen))

    def measure(self, policy, B, n, new, cap, seed):
        """Warm-up run then measured run on the same store; the row of stats."""
        if cap > self.gen.model.cos.shape[0]:  # main() sized the tables for the largest capacity up front
            raise ValueError(f"capacity {cap} exceeds the RoPE tables ({self.gen.model.cos.shape[0]} positions)")
        g0, s0 = dynamo_counts()
        tw = time.perf_counter()
        self.one_run(policy, B, n, new, cap, seed)
        warm = time.perf_counter() - tw
        g1, s1 = dynamo_counts()
        r = self.one_run(policy, B, n, new, cap, seed)
        g2, s2 = dynamo_counts()
        med = statistics.median(r["step_ms"]) if r["step_ms"] else float("nan")
        mean = statistics.fmean(r["step_ms"]) if r["step_ms"] else float("nan")
        kept = r["kept"]
        flops, exact = prefill_flops(self.gen.model, self.c, B, n)
        total = r["prefill_s"] + r["prune_s"] + r["decode_s"]
        return dict(engine="ours", policy=policy_label(policy), batch=B, prompt=n, new_tokens=new, max_length=cap,
                    prefill_ms=r["prefill_s"] * 1e3, prefill_flops=flops,
                    prefill_tflops=flops / r["prefill_s"] / 1e12, prefill_tflops_exact=exact / r["prefill_s"] / 1e12,
                    prune_ms=r["prune_s"] * 1e3, decode_ms_median=med, decode_ms_mean=mean,
                    decode_tok_s=B * 1e3 / med if r["step_ms"] else 0.0,
                    decode_tok_s_mean=B * len(r["step_ms"]) / r["decode_s"] if r["step_ms"] else 0.0,
                    live_kv_end=r["final_live"], distinct_span_sets=r["span_sets"], kv_budget=kept.double().mean().item() / n,
                    kept_tokens_mean=kept.double().mean().item(), peak_mem_bytes=r["peak"],
                    peak_mem_gib=r["peak"] / 2**30, warmup_s=warm, compile_warmup_s=max(0.0, warm - total),
                    compiled=bool(self.gen.compiled), graphs_compiled_warmup=g1 - g0,
                    graphs_compiled_measured=g2 - g1, cudagraph_skips=s2, _tokens=r["tokens"])

    def engine_generate_tok_s(self, policy, n, new, seed):
        """Generator.generate's own decode rate (second of two calls), for comparison with our loop."""
        from engine.generate import Sampling

        self.drop_kv()  # Generator allocates its own store
        ids = self.prompts(1, n, seed)[0].tolist()
        eos, self.gen.eos = self.gen.eos, set()
        try:
            for _ in range(2):
                res = self.gen.generate([ids], policy, Sampling(max_new_tokens=new))
        finally:
            self.gen.eos = eos
        free_cache(self.dev)
        return res[0].stats["decode_tok_s"]

    # ------------------------------------------------------------------------------- recording

    def attempt(self, what, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - record it, go on with the other runs
            traceback.print_exc()
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}"
            self.results["errors"].append(dict(run=what, error=msg))
            log(f"[bench.speed] FAILED {what}: {msg}")
            self.drop_kv()
            return None
        finally:
            self.save()

    def save(self):
        if self.a.json:
            Path(self.a.json).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(self.a.json) + ".tmp")
            tmp.write_text(json.dumps(strip_private(self.results), indent=1, default=_jsonable))
            os.replace(tmp, self.a.json)


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x))


def strip_private(x):
    """Drop keys starting with '_' (generated token ids kept for comparisons) at any depth."""
    if isinstance(x, dict):
        return {k: strip_private(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, list):
        return [strip_private(v) for v in x]
    return x


# -------------------------------------------------------------------------------------- sections

def section_speed(b: Bench):
    a = b.a
    for n in a.prompt_lens:
        for name in a.policies:
            policy = make_policy(name, a.threshold)
            what = f"speed {policy_label(policy)} prompt {n}"
            log(f"[bench.speed] {what} ...")

            def run():
                row = b.measure(policy, 1, n, a.new_tokens, n + a.new_tokens, a.seed + n)
                b.results["speed"].append(row)
                row["engine_generate_tok_s"] = None
                if a.engine_generate:
                    b.save()
                    row["engine_generate_tok_s"] = b.engine_generate_tok_s(policy, n, a.new_tokens, a.seed + n)
                log(f"[bench.speed]   prefill {row['prefill_ms']:.1f} ms ({row['prefill_tflops']:.1f} TFLOP/s), "
                    f"prune {row['prune_ms']:.2f} ms, decode {row['decode_ms_median']:.3f} ms/tok = "
                    f"{row['decode_tok_s']:.1f} tok/s, budget {100 * row['kv_budget']:.1f}%, warm-up {row['warmup_s']:.1f} s")
            b.attempt(what, run)
    b.drop_kv()


class _Stamps:
    """A generate() streamer that synchronises and stamps each put: the prompt, then every token."""

    def __init__(self, dev):
        self.dev, self.t = dev, []

    def put(self, value):
        sync(self.dev)
        self.t.append(time.perf_counter())

    def end(self):
        pass


def hf_views(b: Bench, copy: bool):
    """The transformers model of the same config, every parameter a view of (or a copy of) ours."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from weights.loader import name_map

    transformers.logging.set_verbosity_error()
    conf = AutoConfig.from_pretrained(str(b.gen.path))
    with torch.device(b.dev):
        try:
            hf = AutoModelForCausalLM.from_config(conf, dtype=b.gen.dtype)
        except TypeError:  # transformers 4.x spells it torch_dtype
            hf = AutoModelForCausalLM.from_config(conf, torch_dtype=b.gen.dtype)
    hf.eval()
    ours = dict(b.gen.model.named_parameters(remove_duplicate=False))
    table = name_map(b.c)
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    tied = b.c.tie_embeddings
    for hname, p in theirs.items():
        if hname not in table:
            if tied and hname == "lm_head.weight":
                continue
            raise RuntimeError(f"transformers parameter {hname} has no counterpart in the engine's name map")
        name, rows = table[hname]
        src = ours[name].detach() if rows is None else ours[name].detach()[rows]
        if src.shape != p.shape:
            raise RuntimeError(f"{hname}: ours {tuple(src.shape)} vs transformers {tuple(p.shape)}")
        if src.dtype != p.dtype:  # a parameter transformers keeps in another dtype: a converted copy
            src = src.to(p.dtype)
        elif copy:
            src = src.clone()
        mod, _, leaf = hname.rpartition(".")
        setattr(hf.get_submodule(mod), leaf, torch.nn.Parameter(src, requires_grad=False))
    missing = [k for k in table if k not in theirs]
    if missing:
        raise RuntimeError(f"the engine maps {missing[0]} which transformers' model lacks")
    if tied:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    free_cache(b.dev)  # transformers' own random init is garbage now
    return hf


@torch.no_grad()
def hf_parity(b: Bench, hf, n=16):
    ids = b.prompts(1, n, 1234).to(b.dev)
    theirs = hf(ids).logits[0, -1].float()
    ours, _ = b.gen.model.prefill(ids, torch.tensor([n], device=b.dev), b.kv(1, n), probe_rows=0)
    b.drop_kv()
    return (theirs - ours[0]).abs().max().item()


@torch.no_grad()
def hf_measure(b: Bench, hf, mode, n, new, seed):
    dev = b.dev
    ids = b.prompts(1, n, seed).to(dev)
    # explicit all-ones mask: without it transformers masks prompt tokens equal to pad_token_id
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if mode == "static-compile":
        from transformers import CompileConfig

        hf.generation_config.cache_implementation = "static"
        hf.generation_config.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    else:
        hf.generation_config.cache_implementation = None
    g0, _ = dynamo_counts()
    t0 = time.perf_counter()
    for _ in range(2 if mode == "static-compile" else 1):  # compile + CUDA graphs need the full run twice
        hf.generate(ids, **dict(kw, max_new_tokens=new if mode == "static-compile" else min(new, 8),
                                min_new_tokens=new if mode == "static-compile" else min(new, 8)))
    sync(dev)
    warm = time.perf_counter() - t0
    g1, _ = dynamo_counts()
    sync(dev)
    t0 = time.perf_counter()
    hf.generate(ids, **dict(kw, max_new_tokens=1, min_new_tokens=1))
    sync(dev)
    t_pref = time.perf_counter() - t0
    stamps = _Stamps(dev)
    reset_peak(dev)
    sync(dev)
    t0 = time.perf_counter()
    out = hf.generate(ids, streamer=stamps, **kw)
    sync(dev)
    t_all = time.perf_counter() - t0
    peak = peak_bytes(dev)
    g2, skips = dynamo_counts()
    toks = out.shape[1] - n
    steps = [(y - x) * 1e3 for x, y in zip(stamps.t[1:], stamps.t[2:])]  # t[0]: prompt, t[1]: first token
    med = statistics.median(steps) if steps else float("nan")
    flops, exact = prefill_flops(b.gen.model, b.c, 1, n)
    return dict(engine="transformers", mode=mode, batch=1, prompt=n, new_tokens=toks, prefill_ms=t_pref * 1e3,
                prefill_flops=flops, prefill_tflops=flops / t_pref / 1e12, prefill_tflops_exact=exact / t_pref / 1e12,
                decode_ms_median=med, decode_tok_s=1e3 / med if steps else 0.0,
                decode_tok_s_anchor=(toks - 1) / max(t_all - t_pref, 1e-9), total_s=t_all, peak_mem_bytes=peak,
                peak_mem_gib=peak / 2**30, warmup_s=warm, kv_budget=1.0, graphs_compiled_warmup=g1 - g0,
                graphs_compiled_measured=g2 - g1, cudagraph_skips=skips, _tokens=out[0, n:].cpu())


def section_hf(b: Bench):
    a = b.a
    modes = a.hf_modes or (list(HF_MODES) if is_cuda(b.dev) else ["eager"])
    hf = b.attempt("transformers model", lambda: hf_views(b, a.hf_weights == "copy"))
    if hf is None:
        return
    parity = b.attempt("transformers parity", lambda: hf_parity(b, hf))
    b.results["meta"]["hf_weights"] = a.hf_weights
    b.results["meta"]["parity_max_abs_logit_diff"] = parity
    for mode in modes:  # eager first: static-compile leaves compiled state behind
        for n in a.prompt_lens:
            what = f"transformers {mode} prompt {n}"
            log(f"[bench.speed] {what} ...")

            def run():
                row = hf_measure(b, hf, mode, n, a.new_tokens, a.seed + n)
                row["parity_max_abs_logit_diff"] = parity
                ref = next((r for r in b.results["speed"] if r["policy"] == "full" and r["prompt"] == n), None)
                row["tokens_agree_prefix"] = None
                if ref is not None:
                    x, y = ref["_tokens"][0].tolist(), row["_tokens"].tolist()
                    row["tokens_agree_prefix"] = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                b.results["hf"].append(row)
                log(f"[bench.speed]   prefill {row['prefill_ms']:.1f} ms, decode {row['decode_ms_median']:.3f} ms/tok = "
                    f"{row['decode_tok_s']:.1f} tok/s ({row['decode_tok_s_anchor']:.1f} anchor method), warm-up {row['warmup_s']:.1f} s")
            b.attempt(what, run)
        free_cache(b.dev)
    del hf
    free_cache(b.dev)
    ratios(b)


def ratios(b: Bench):
    out = []
    for h in b.results["hf"]:
        for r in b.results["speed"]:
            if r["prompt"] != h["prompt"] or r["batch"] != 1:
                continue
            out.append(dict(prompt=h["prompt"], hf_mode=h["mode"], ours=r["policy"],
                            decode_speedup=r["decode_tok_s"] / h["decode_tok_s"] if h["decode_tok_s"] else None,
                            prefill_speedup=h["prefill_ms"] / r["prefill_ms"] if r["prefill_ms"] else None))
    b.results["ratios"] = out


def section_floor(b: Bench):
    a = b.a
    model = b.gen.model
    bw = copy_bandwidth(b.dev, a.bw_mib)
    wbytes = weight_bytes_per_token(model)
    floor_ms = wbytes / bw * 1e3
    f = dict(copy_GBps=bw / 1e9, weight_bytes_per_token=wbytes, floor_ms=floor_ms, floor_tok_s=1e3 / floor_ms,
             gptfast_model_bytes=gptfast_model_bytes(model), params=sum(p.numel() for p in model.parameters()))
    b.results["floor"] = f
    ref = next((r for r in b.results["speed"] if r["policy"] == "full" and r["batch"] == 1), None)
    if ref is None:  # floor alone: time a full-KV run at the shortest prompt
        n = min(a.prompt_lens)
        log(f"[bench.speed] floor: full-KV reference run at prompt {n} ...")
        ref = b.attempt(f"floor reference prompt {n}", lambda: b.measure(make_policy("full", a.threshold), 1, n,
                                                                          a.new_tokens, n + a.new_tokens, a.seed + n))
        b.drop_kv()
    if ref is None:
        return
    med = ref["decode_ms_median"]
    e2e_tok_s = ref["new_tokens"] / ((ref["prefill_ms"] + ref["prune_ms"]) / 1e3 + (ref["new_tokens"] - 1) / ref["decode_tok_s_mean"]) \
        if ref["decode_tok_s_mean"] else 0.0
    f.update(ref_prompt=ref["prompt"], ref_policy=ref["policy"], ours_decode_ms=med, ours_tok_s=ref["decode_tok_s"],
             ours_pct_of_floor=100 * med / floor_ms, bandwidth_efficiency_pct=100 * floor_ms / med,
             achieved_GBps=f["gptfast_model_bytes"] * ref["decode_tok_s"] / 1e9,
             achieved_GBps_e2e=f["gptfast_model_bytes"] * e2e_tok_s / 1e9)
    b.save()
    log(f"[bench.speed] floor {floor_ms:.3f} ms/tok at {bw / 1e9:.0f} GB/s; ours {med:.3f} ms = {f['ours_pct_of_floor']:.0f}% of it")


def section_scaling(b: Bench):
    a = b.a
    full = make_policy("full", a.threshold)
    cap = a.max_length or max(a.scaling_lens) + a.new_tokens
    if cap < max(a.scaling_lens) + a.new_tokens:
        raise UserError(f"--max-length {cap} < longest scaling prompt + new tokens ({max(a.scaling_lens) + a.new_tokens})")
    s = b.results["scaling"] = dict(max_length=cap, rows=[], small_buffer=None, grows_with_live_kv=None,
                                    capacity_independent=None)
    for n in a.scaling_lens:
        log(f"[bench.speed] scaling full KV prompt {n} in a buffer of {cap} ...")
        row = b.attempt(f"scaling prompt {n}", lambda: b.measure(full, 1, n, a.new_tokens, cap, a.seed + n))
        if row:
            s["rows"].append(row)
            log(f"[bench.speed]   {row['decode_ms_median']:.3f} ms/tok")
    b.drop_kv()
    n = min(a.scaling_lens)
    log(f"[bench.speed] scaling control: prompt {n} in a buffer of {n + a.new_tokens} ...")
    row = b.attempt(f"scaling small buffer {n}", lambda: b.measure(full, 1, n, a.new_tokens, n + a.new_tokens, a.seed + n))
    b.drop_kv()
    s["small_buffer"] = row
    t = [r["decode_ms_median"] for r in sorted(s["rows"], key=lambda r: r["prompt"])]
    if len(t) >= 2:
        s["grows_with_live_kv"] = all(x < y for x, y in zip(t, t[1:]))
    big = next((r for r in s["rows"] if r["prompt"] == n), None)
    if row and big:
        s["capacity_ratio"] = big["decode_ms_median"] / row["decode_ms_median"]
        s["capacity_independent"] = abs(s["capacity_ratio"] - 1) < 0.10
    b.save()


def section_batch(b: Bench):
    a = b.a
    n = a.batch_prompt
    policies = [make_policy("full", a.threshold)] + [fixed_budget(x) for x in a.budgets]
    for B in a.batches:
        for p in policies:
            what = f"batch {B} x {n} {policy_label(p)}"
            log(f"[bench.speed] {what} ...")

            def run():
                row = b.measure(p, B, n, a.new_tokens, n + a.new_tokens, a.seed + B)
                b.results["batch"].append(row)
                log(f"[bench.speed]   {row['decode_ms_median']:.3f} ms/step = {row['decode_tok_s']:.1f} tok/s summed, "
                    f"budget {100 * row['kv_budget']:.1f}%")
            b.attempt(what, run)
    b.drop_kv()


# -------------------------------------------------------------------------------------- output

def _f(x, fmt="{:.1f}"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def render(res) -> str:
    parts = []
    if res["speed"]:
        parts.append("**Ours, batch 1** (decode: median per-step time; `generate` = Generator.generate's own rate)\n\n" + table(
            ["policy", "prompt", "new", "prefill ms", "TFLOP/s", "prune ms", "decode ms/tok", "tok/s", "generate tok/s",
             "KV budget", "peak GiB", "warm-up s"],
            [[r["policy"], r["prompt"], r["new_tokens"], _f(r["prefill_ms"]), _f(r["prefill_tflops"], "{:.4g}"), _f(r["prune_ms"], "{:.2f}"),
              _f(r["decode_ms_median"], "{:.3f}"), _f(r["decode_tok_s"]), _f(r.get("engine_generate_tok_s")),
              _f(100 * r["kv_budget"], "{:.1f}%"), _f(r["peak_mem_gib"], "{:.2f}"), _f(r["warmup_s"])] for r in res["speed"]]))
    if res["hf"]:
        def ratio(h):
            x = next((q for q in res["ratios"] if q["prompt"] == h["prompt"] and q["hf_mode"] == h["mode"] and q["ours"] == "full"), None)
            return (_f(x["decode_speedup"], "{:.2f}x"), _f(x["prefill_speedup"], "{:.2f}x")) if x else ("-", "-")
        parts.append("**transformers, same weights, batch 1** (ours ÷ theirs: our full-KV speed over theirs, >1 = ours faster)\n\n" + table(
            ["mode", "prompt", "prefill ms", "TFLOP/s", "decode ms/tok", "tok/s", "tok/s (anchor method)", "peak GiB",
             "warm-up s", "decode ours/theirs", "prefill ours/theirs", "same tokens"],
            [[h["mode"], h["prompt"], _f(h["prefill_ms"]), _f(h["prefill_tflops"], "{:.4g}"), _f(h["decode_ms_median"], "{:.3f}"),
              _f(h["decode_tok_s"]), _f(h["decode_tok_s_anchor"]), _f(h["peak_mem_gib"], "{:.2f}"), _f(h["warmup_s"]),
              *ratio(h), _f(h.get("tokens_agree_prefix"), "{}")] for h in res["hf"]]))
    f = res["floor"]
    if f:
        parts.append("**Weight-streaming floor** (bytes read per token ÷ measured copy bandwidth)\n\n" + table(
            ["copy GB/s", "weight GB/token", "floor ms/tok", "floor tok/s", "ours ms/tok", "ours % of floor",
             "efficiency", "achieved GB/s (gpt-fast)", "e2e GB/s (gpt-fast)"],
            [[_f(f["copy_GBps"], "{:.0f}"), _f(f["weight_bytes_per_token"] / 1e9, "{:.3f}"), _f(f["floor_ms"], "{:.3f}"),
              _f(f["floor_tok_s"]), _f(f.get("ours_decode_ms"), "{:.3f}"), _f(f.get("ours_pct_of_floor"), "{:.0f}%"),
              _f(f.get("bandwidth_efficiency_pct"), "{:.0f}%"), _f(f.get("achieved_GBps"), "{:.0f}"),
              _f(f.get("achieved_GBps_e2e"), "{:.0f}")]]))
    s = res["scaling"]
    if s and s.get("rows"):
        rows = [[r["prompt"], r["live_kv_end"], r["max_length"], _f(r["decode_ms_median"], "{:.3f}"), _f(r["decode_tok_s"]),
                 _f(r["peak_mem_gib"], "{:.2f}")] for r in s["rows"]]
        sb = s.get("small_buffer")
        if sb:
            rows.append([f"{sb['prompt']} (control)", sb["live_kv_end"], sb["max_length"], _f(sb["decode_ms_median"], "{:.3f}"),
                         _f(sb["decode_tok_s"]), _f(sb["peak_mem_gib"], "{:.2f}")])
        parts.append(f"**Decode step vs live KV, `--kv full`, one buffer of {s['max_length']} tokens** "
                     f"(grows with live KV: {s.get('grows_with_live_kv')}; same step in a buffer sized to the prompt: "
                     f"{s.get('capacity_independent')}, ratio {_f(s.get('capacity_ratio'), '{:.3f}')})\n\n" + table(
                         ["prompt", "live KV at end", "allocated", "decode ms/tok", "tok/s", "peak GiB"], rows))
    if res["batch"]:
        parts.append("**Batched decode** (tokens/s summed over the batch = batch ÷ median step)\n\n" + table(
            ["batch", "prompt", "policy", "KV budget", "decode ms/step", "tok/s summed", "prefill ms", "peak GiB", "warm-up s"],
            [[r["batch"], r["prompt"], r["policy"], _f(100 * r["kv_budget"], "{:.1f}%"), _f(r["decode_ms_median"], "{:.3f}"),
              _f(r["decode_tok_s"]), _f(r["prefill_ms"]), _f(r["peak_mem_gib"], "{:.2f}"), _f(r["warmup_s"])] for r in res["batch"]]))
    if res["errors"]:
        parts.append("**Errors**\n\n" + "\n".join(f"- {e['run']}: `{e['error']}`" for e in res["errors"]))
    return "\n\n".join(parts)


def git_commit(override):
    if override:
        return override
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - no git on the machine
        return "unknown"


def meta(a, gen, label, argv):
    dev = gen.device
    try:
        import transformers

        tf = transformers.__version__
    except Exception:  # noqa: BLE001
        tf = None
    name = torch.cuda.get_device_name() if is_cuda(dev) else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), device=dev,
                device_name=name, torch=torch.__version__, cuda=torch.version.cuda, transformers=tf,
                commit=git_commit(a.commit), command="python -m bench.speed " + shlex.join(argv), model=label,
                dtype=str(gen.dtype).removeprefix("torch."), compiled=bool(gen.compiled), span_bucket=gen.span_bucket,
                params=sum(p.numel() for p in gen.model.parameters()), sections=a.sections,
                config=dict(layers=gen.config.n_layers, dim=gen.config.dim, heads=gen.config.n_heads,
                            kv_heads=gen.config.n_kv_heads, head_dim=gen.config.head_dim, ffn=gen.config.ffn_dim,
                            vocab=gen.config.vocab_size))


def append_results_md(path, res, text):
    m = res["meta"]
    head = (f"\n## Speed — {m['date']} — {m['device_name']}\n\n"
            f"- model: {m['model']}, {m['params'] / 1e9:.3f} B parameters, compiled decode: {m['compiled']}\n"
            f"- torch {m['torch']} (CUDA {m['cuda']}), transformers {m['transformers']}, commit `{m['commit']}`\n"
            f"- command: `{m['command']}`\n\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:  # append only: others append to the same file
        fh.write(head + text + f"\n\n{ANCHOR}\n")


# ------------------------------------------------------------------------------------------ CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see --help)")


def parse_args(argv=None):
    p = _Parser(prog="python -m bench.speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="real checkpoint (dir / hub id / bundled name) instead of random weights")
    src.add_argument("--shape", choices=sorted(SHAPES), help="random-weight shape (default qwen2.5-7b)")
    src.add_argument("--tiny", action="store_true", help="same as --shape tiny: ~1M-parameter Qwen2 shape, small sizes")
    p.add_argument("--sections", type=names(SECTIONS), default=list(SECTIONS), help="comma list of " + ",".join(SECTIONS))
    p.add_argument("--prompt-lens", type=ints, help="speed/hf prompt lengths (default 512,8192)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per run (default 256)")
    p.add_argument("--scaling-lens", type=ints, help="scaling prompt lengths (default 512,8192,32768)")
    p.add_argument("--max-length", type=int, help="scaling buffer capacity (default longest scaling prompt + new tokens)")
    p.add_argument("--batches", type=ints, help="batch section batch sizes (default 8,16)")
    p.add_argument("--batch-prompt", type=int, help="batch section prompt length (default 4096)")
    p.add_argument("--budgets", type=floats, help="batch section fixed budgets (default 0.5,0.25)")
    p.add_argument("--policies", type=names(tuple(refreekv.available())), default=["full", "refreekv"],
                   help="speed section policies (default full,refreekv)")
    p.add_argument("--threshold", type=float, default=0.01, help="ReFreeKV T (default 0.01)")
    p.add_argument("--hf-modes", type=names(HF_MODES), help="transformers modes (default eager,static-compile on CUDA, eager on CPU)")
    p.add_argument("--hf-weights", choices=["view", "copy"], default="view",
                   help="transformers parameters as views of ours (default) or copies")
    p.add_argument("--engine-generate", action=argparse.BooleanOptionalAction, default=True,
                   help="also time Generator.generate itself in the speed section (default on)")
    p.add_argument("--device")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (default: the engine's, on for CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bw-mib", type=int, help="copy-bandwidth buffer size in MiB (default 2048)")
    p.add_argument("--json", help="write the results here (rewritten after every run)")
    p.add_argument("--results-md", help="append a dated section to this markdown file (e.g. bench/RESULTS.md)")
    p.add_argument("--commit", help="git commit to record (default: git rev-parse HEAD, else 'unknown')")
    a = p.parse_args(argv)
    if a.tiny:
        a.shape = "tiny"
    if not a.model and not a.shape:
        a.shape = "qwen2.5-7b"
    d = DEFAULTS[a.shape or "qwen2.5-7b"]
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.new_tokens < 2:
        raise UserError("--new-tokens must be >= 2 (one prefill token + at least one decode step)")
    return a


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = parse_args(argv)
        gen, label = build_generator(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    b = Bench(a, gen, label)
    b.results["meta"] = meta(a, gen, label, argv)
    log(f"[bench.speed] {label} on {b.results['meta']['device_name']}, {b.results['meta']['params'] / 1e9:.3f} B params, "
        f"dtype {b.results['meta']['dtype']}, compiled decode {gen.compiled}")
    # RoPE tables once, for the longest capacity any section uses (before anything is compiled)
    caps = [n + a.new_tokens for n in a.prompt_lens] + [a.batch_prompt + a.new_tokens, 16]
    if "scaling" in a.sections:
        caps.append(a.max_length or max(a.scaling_lens) + a.new_tokens)
    if max(caps) > gen.model.cos.shape[0]:  # e.g. 32768 + new tokens: past the model's context
        gen.model.setup_rope(max(caps), gen.device)
    b.save()
    steps = {"speed": section_speed, "hf": section_hf, "floor": section_floor, "scaling": section_scaling,
             "batch": section_batch}
    for name in SECTIONS:  # fixed order: floor and hf use the speed rows; the slow compiled HF runs come late
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
