"""transformers on the engine's very weights: the anchor the speed bench compares against.

`AutoModelForCausalLM.from_config` builds the HF model, then every HF parameter is replaced by a
*view* of ours through the loader's own name map (q/k/v and gate/up are contiguous row slices of
our fused weights), so both read the same memory (no second copy of a 7B; `copy=True` clones).
Modes: `eager` (dynamic cache) and `static-compile` (cache_implementation="static" with
CompileConfig(fullgraph=True, mode="reduce-overhead"), the setting of the published anchor).
Timed as shared/anchors/hf_baseline.py does it: prefill = generate(max_new_tokens=1), decode tok/s
(anchor method) = B (new - 1) / (t_generate(new) - t_prefill); plus a per-step median from a
streamer that synchronises and stamps each step (HF's loop syncs every step anyway).
"""

import statistics
import time

import torch

from bench.common import dynamo_counts, free_cache, is_cuda, prefill_flops, sync

MODES = ("eager", "static-compile")


class _Stamps:
    """A generate() streamer that synchronises and stamps each put: the prompt, then every step."""

    def __init__(self, dev):
        self.dev, self.t = dev, []

    def put(self, value):
        sync(self.dev)
        self.t.append(time.perf_counter())

    def end(self):
        pass


def views(eng, copy: bool = False):
    """The transformers model of the engine's config, every parameter a view of (or a copy of) ours."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from weights.loader import name_map

    transformers.logging.set_verbosity_error()
    conf = AutoConfig.from_pretrained(str(eng.path))
    with torch.device(eng.device):
        hf = AutoModelForCausalLM.from_config(conf, dtype=eng.dtype)
    hf.eval()
    ours = dict(eng.model.named_parameters(remove_duplicate=False))
    table = name_map(eng.config)
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    tied = eng.config.tie_embeddings
    for hname, p in theirs.items():
        if hname not in table:
            if tied and hname == "lm_head.weight":
                continue
            raise RuntimeError(f"transformers parameter {hname} has no counterpart in the engine's name map")
        name, rows, _ = table[hname]
        src = ours[name].detach() if rows is None else ours[name].detach()[rows]
        if src.shape != p.shape:
            raise RuntimeError(f"{hname}: ours {tuple(src.shape)} vs transformers {tuple(p.shape)}")
        src = src.to(p.dtype) if src.dtype != p.dtype else src.clone() if copy else src
        mod, _, leaf = hname.rpartition(".")
        setattr(hf.get_submodule(mod), leaf, torch.nn.Parameter(src, requires_grad=False))
    if tied:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    free_cache(eng.device)  # transformers' own random init is garbage now
    return hf


@torch.no_grad()
def parity(eng, hf, ids: list[int]) -> float:
    """Max |logit difference| at the last token of a short prompt: ours (the engine's first logits)
    vs theirs."""
    import refreekv
    from engine.sampling import Sampling

    got = {}
    eng.generate(
        [ids],
        refreekv.make("full"),
        Sampling(max_new_tokens=1),
        on_logits=lambda keys, steps, lg: got.update(ours=lg[0].float().clone()) if 0 in steps else None,
    )
    theirs = hf(torch.tensor([ids], device=eng.device)).logits[0, -1].float()
    return (theirs - got["ours"]).abs().max().item()


@torch.no_grad()
def measure(eng, hf, mode, prompts: list[list[int]], new: int) -> dict:
    dev = eng.device
    ids = torch.tensor(prompts, device=dev)
    B, n = ids.shape
    # explicit all-ones mask: without it transformers masks prompt tokens equal to pad_token_id
    kw = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
    )
    if mode == "static-compile":
        from transformers import CompileConfig

        hf.generation_config.cache_implementation = "static"
        if is_cuda(dev):
            config = CompileConfig(fullgraph=True, mode="reduce-overhead")
        else:  # transformers compiles on CUDA alone unless told (a private flag); no CUDA graphs here
            config = CompileConfig(fullgraph=True, mode="default")
            config._compile_all_devices = True
        hf.generation_config.compile_config = config
    else:
        hf.generation_config.cache_implementation = None
    g0, _ = dynamo_counts()
    t0 = time.perf_counter()
    short = new if mode == "static-compile" else min(new, 8)
    for _ in range(2 if mode == "static-compile" else 1):  # compile + CUDA graphs need the full run twice
        hf.generate(ids, **dict(kw, max_new_tokens=short, min_new_tokens=short))
    sync(dev)
    warm = time.perf_counter() - t0
    g1, _ = dynamo_counts()
    t0 = time.perf_counter()
    hf.generate(ids, **dict(kw, max_new_tokens=1, min_new_tokens=1))
    sync(dev)
    t_pref = time.perf_counter() - t0
    stamps = _Stamps(dev)
    if is_cuda(dev):
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    out = hf.generate(ids, streamer=stamps, **kw) if B == 1 else hf.generate(ids, **kw)
    sync(dev)
    t_all = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) if is_cuda(dev) else 0
    g2, skips = dynamo_counts()
    toks = out.shape[1] - n
    steps = [(y - x) * 1e3 for x, y in zip(stamps.t[1:], stamps.t[2:])]  # t[0]: prompt, t[1]: first token
    anchor = B * (toks - 1) / max(t_all - t_pref, 1e-9)
    med = statistics.median(steps) if steps else B * 1e3 / anchor
    flops, exact = prefill_flops(eng.model, eng.config, B, n)
    return dict(
        engine="transformers",
        mode=mode,
        batch=B,
        prompt=n,
        new_tokens=toks,
        prefill_ms=t_pref * 1e3,
        prefill_flops=flops,
        prefill_tflops=flops / t_pref / 1e12,
        prefill_tflops_exact=exact / t_pref / 1e12,
        decode_ms_median=med,
        decode_tok_s=B * 1e3 / med,
        decode_tok_s_anchor=anchor,
        total_s=t_all,
        peak_mem_bytes=peak,
        peak_mem_gib=peak / 2**30,
        warmup_s=warm,
        kv_budget=1.0,
        graphs_compiled_warmup=g1 - g0,
        graphs_compiled_measured=g2 - g1,
        cudagraph_skips=skips,
        _tokens=out[:, n:].cpu(),
    )
