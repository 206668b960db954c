"""Generation: prefill -> prune (a refreekv/ policy) -> decode, for a batch of prompts; and the CLI.

    python -m engine.generate --prompt "What is the capital of France?"
    python -m engine.generate --model Qwen/Qwen2.5-7B --prompt "..." --kv refreekv --threshold 0.01
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass, field

import torch

import refreekv
from engine.kv import RaggedKV
from engine.tokenizer import Tokenizer
from weights.errors import UserError


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def check(self):
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample(logits, s: Sampling, gen: torch.Generator | None):
    """logits [B, V] -> tokens [B]."""
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        srt, idx = logits.sort(-1, descending=True)
        probs = srt.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    # exponential race (as gpt-fast): argmax p / E with E ~ Exp(1) draws from p, with no host sync
    q = torch.empty_like(logits).exponential_(1, generator=gen)
    return (logits.softmax(-1) / q).argmax(-1)


def _stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that could still grow into a stop string (held back from streaming)."""
    return next((k for k in range(min(len(text), max(map(len, stops), default=1) - 1), 0, -1)
                 if any(st.startswith(text[-k:]) for st in stops)), 0)


def prune(policy: refreekv.Policy, probe: refreekv.Probe, kv: RaggedKV):
    """The prefill -> decode transition: the policy's keep plan, then one compaction of the store."""
    kv.compact(policy.plan(probe))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Result:
    tokens: list[int]
    text: str
    stats: dict


class Generator:
    def __init__(self, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 max_length: int | None = None, compile: bool | None = None):
        from weights.config import load_config
        from weights.loader import load_model
        from weights.resolve import resolve

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):
            raise UserError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda requested but CUDA is not available")
        dt = dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        if dt not in ("float32", "bfloat16", "float16"):
            raise UserError(f"--dtype must be float32, bfloat16 or float16, got {dt!r}")
        self.dtype = getattr(torch, dt)
        self.path = resolve(model)
        load_config(self.path)  # cheap checks first: a bad config.json or tokenizer fails before any weights load
        self.tokenizer = Tokenizer(self.path)
        self.model, self.config = load_model(self.path, self.device, self.dtype)
        self.context = min(max_length or self.config.max_positions, self.config.max_positions)
        if self.context < 2:
            raise UserError(f"--max-length must be >= 2, got {max_length}")
        # torch.compile: one graph for every decode step, the span symbolic (dynamic=True) so a
        # growing cache never recompiles; on GPU CUDA graphs, with spans bucketed so each
        # bucket is recorded once. Prefill and pruning compile with dynamic prompt length and
        # batch but no CUDA graphs (one would be recorded per length). Off by default on CPU,
        # where compiling costs more than it saves.
        cuda = self.device.startswith("cuda")
        self.compiled = cuda if compile is None else compile
        self.decode, self.prefill, self.prune = self.model.decode, self.model.prefill, prune
        self.span_bucket = 256 if self.compiled and cuda else 1
        if self.compiled:
            self.decode = torch.compile(self.model.decode, fullgraph=True, dynamic=True,
                                        mode="reduce-overhead" if cuda else None)
            self.prefill = torch.compile(self.model.prefill, fullgraph=True, dynamic=True)
            self.prune = torch.compile(prune, dynamic=True)  # a policy that breaks the graph still runs
        self.eos = set(self.config.eos_ids) | {i for i in [self.tokenizer.token_id(self.tokenizer.eos)] if i is not None}
        self.model.setup_rope(self.context, self.device)  # once: a fixed table keeps compiled graphs valid

    def encode(self, prompt: str, chat: bool | None = None, system: str | None = None) -> list[int]:
        """chat=None: use the checkpoint's chat template when it has one."""
        if not prompt.strip():
            raise UserError("empty prompt")
        if chat is None:
            chat = self.tokenizer.chat_template is not None
        if chat:
            return self.tokenizer.encode(self.tokenizer.apply_chat(prompt, system), special=False)
        if system is not None:
            raise UserError("--system needs the chat template (the checkpoint has none, or --raw was given)")
        return self.tokenizer.encode(prompt)

    def fit(self, ids: list[int], max_new: int, truncate: str | None = None) -> list[int]:
        """Check a prompt against the context; middle-truncate when asked."""
        room = self.context - max_new
        if len(ids) <= room:
            return ids
        if truncate == "middle" and room >= 2:
            return ids[: room // 2] + ids[len(ids) - (room - room // 2):]
        raise UserError(f"prompt has {len(ids)} tokens but the context is {self.context} tokens "
                        f"(--max-length / max_position_embeddings) and {max_new} new tokens were asked for; "
                        "shorten it, lower --max-new-tokens or pass --truncate middle")

    def _store(self, batch: int, capacity: int) -> RaggedKV:
        """The ragged KV store, reused while it is big enough: prefill overwrites every slot it
        makes live, so reuse needs no reset, and fixed addresses keep compiled graphs valid."""
        kv = getattr(self, "_kv", None)
        if kv is None or kv.k.shape[1] != batch or kv.capacity < capacity:
            self._kv = kv = None  # free the old one first
            c = self.config
            self._kv = kv = RaggedKV(c.n_layers, batch, c.n_kv_heads, capacity, c.head_dim, self.dtype, self.device)
        return kv

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], policy: refreekv.Policy, s: Sampling, on_token=None) -> list[Result]:
        """Generate for a batch of token-id prompts; on_token(b, text_so_far) streams each row's text."""
        s.check()
        c, dev, B = self.config, self.device, len(prompts)
        cuda = dev.startswith("cuda")
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        N = int(lens.max())
        cap = N + s.max_new_tokens
        if cap > self.context:
            raise UserError(f"prompt of {N} tokens + {s.max_new_tokens} new tokens exceeds the context of {self.context} tokens")
        tokens = torch.zeros(B, N, dtype=torch.long, device=dev)  # right padding: never read, never a sink
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = torch.tensor(p)
        kv = self._store(B, cap)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        _sync(dev); t0 = time.perf_counter()
        logits, probe_attn = self.prefill(tokens, lens, kv, probe_rows=policy.probe_rows)
        _sync(dev); t1 = time.perf_counter()
        self.prune(policy, refreekv.Probe(probe_attn, lens, c.n_layers, c.n_kv_heads, N), kv)
        del probe_attn
        _sync(dev); t2 = time.perf_counter()
        kept = kv.lengths.to("cpu", copy=True)  # [L, B, Hkv]; decode keeps appending to kv.lengths

        gen = torch.Generator(device=dev).manual_seed(s.seed) if s.seed is not None else None
        out = [[] for _ in range(B)]
        texts = [""] * B
        done = [False] * B
        longest = kept.amax((1, 2))  # [L] longest row per layer; every decode step appends one token to each row
        tok = sample(logits, s, gen)
        host_tok = torch.empty(B, dtype=torch.long, pin_memory=cuda)
        steps = 0
        for step in range(s.max_new_tokens):
            # the device never waits on the host: step t+1 is queued before token t is read back
            # (one step may be wasted after the last EOS), and detokenising overlaps it
            host_tok.copy_(tok, non_blocking=True)
            if cuda:
                ready = torch.cuda.Event()
                ready.record()
            if step < s.max_new_tokens - 1:
                steps += 1
                # every layer's span grows by whole buckets at the same step, so a compiled decode
                # sees one new set of spans per bucket of steps (one CUDA-graph recording), not one per layer
                grown = -(-steps // self.span_bucket) * self.span_bucket
                nxt = sample(self.decode(tok, kv, (longest + grown).clamp(max=kv.capacity).tolist()), s, gen)
            if cuda:
                ready.synchronize()
            host = host_tok.tolist()
            for b in range(B):
                if done[b]:
                    continue
                if host[b] in self.eos:
                    done[b] = True
                    continue
                out[b].append(host[b])
                text = self.tokenizer.decode(out[b])
                cut = min((text.find(x) for x in s.stop if x in text), default=-1)
                if cut >= 0:
                    text, done[b] = text[:cut], True
                if on_token and not text.endswith("\ufffd"):
                    on_token(b, text if done[b] else text[: len(text) - _stop_prefix(text, s.stop)])
                texts[b] = text
            if all(done) or step == s.max_new_tokens - 1:
                break
            tok = nxt
        _sync(dev); t3 = time.perf_counter()

        peak = torch.cuda.max_memory_allocated() if cuda else _rss()
        results = []
        for b in range(B):
            n = int(lens[b])
            per_head = kept[:, b].tolist()  # [L][Hkv]
            per_layer = [round(sum(h) / len(h)) for h in per_head]
            stats = dict(policy=policy.name, prompt_tokens=n, kept_per_layer=per_layer,
                         budget=kept[:, b].double().mean().item() / n, new_tokens=len(out[b]),
                         prefill_s=t1 - t0, prune_s=t2 - t1, decode_tok_s=steps / (t3 - t2) if steps else 0.0,
                         batch=B, peak_memory_bytes=peak, kept_per_head=per_head)
            results.append(Result(out[b], texts[b], stats))
        return results


def _rss():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise UserError(f"{message} (see --help)")


def parse_args(argv=None):
    p = _Parser(prog="python -m engine.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory, hub id (e.g. Qwen/Qwen2.5-7B) or bundled name; "
                   "default: the bundled SmolLM2-135M-Instruct")
    # both append to one list, so a batch keeps the command line's order
    p.add_argument("--prompt", action="append", dest="inputs", type=lambda v: ("text", v), help="prompt text; repeat for a batch")
    p.add_argument("--prompt-file", action="append", dest="inputs", type=lambda v: ("file", v),
                   help="read a prompt from a file ('-' for stdin); repeatable, mixes with --prompt in order")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None, help="apply the chat template (default when the checkpoint has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="feed the prompt as is")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--kv", default="refreekv", help="KV policy: " + ", ".join(refreekv.available()))
    p.add_argument("--threshold", type=float, help="ReFreeKV threshold T (default 0.01)")
    p.add_argument("--budget", type=float, help="fixed-budget policies: fraction of the prompt (<= 1) or a token count (> 1)")
    p.add_argument("--kv-args", default="{}", help='policy knobs as JSON, e.g. \'{"sinks": 4, "protected": [0, 1]}\'')
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (default: on for CUDA, off on CPU)")
    p.add_argument("--device")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--max-length", type=int, help="context limit in tokens (prompt + new)")
    p.add_argument("--truncate", choices=["middle"], help="middle-truncate prompts that do not fit")
    p.add_argument("--stats-json", help="write per-prompt stats (budget, kept per layer, timings) here")
    return p.parse_args(argv)


def policy_from_args(a) -> refreekv.Policy:
    try:
        kw = json.loads(a.kv_args)
    except json.JSONDecodeError as e:
        raise UserError(f"--kv-args is not valid JSON: {e}") from None
    if not isinstance(kw, dict):
        raise UserError("--kv-args must be a JSON object")
    if a.threshold is not None:
        kw["threshold"] = a.threshold  # a policy without a threshold rejects it in refreekv.make
    if a.budget is not None:
        kw["budget"] = a.budget
    return refreekv.make(a.kv, **kw)


def main(argv=None):
    try:
        a = parse_args(argv)
        s = Sampling(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed, a.stop)
        s.check()
        policy = policy_from_args(a)
        prompts = []
        for kind, v in a.inputs or []:
            try:
                prompts.append(v if kind == "text" else sys.stdin.read() if v == "-" else open(v, encoding="utf-8").read())
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read prompt file {v}: {e}") from None
        if not prompts:
            raise UserError("no prompt: pass --prompt TEXT or --prompt-file PATH")
        g = Generator(a.model, a.device, a.dtype, a.max_length, a.compile)
        ids = [g.fit(g.encode(p, a.chat, a.system), s.max_new_tokens, a.truncate) for p in prompts]
        print(f"[{g.path.name}] {len(ids)} prompt(s), {sum(map(len, ids))} tokens, kv={policy.name}, "
              f"device={g.device}, dtype={str(g.dtype).removeprefix('torch.')}", file=sys.stderr)
        shown = [0]

        def stream(b, text):  # batch of one: stream as produced; larger batches print in order at the end
            if len(ids) == 1:
                sys.stdout.write(text[shown[0]:])
                sys.stdout.flush()
                shown[0] = len(text)

        results = g.generate(ids, policy, s, on_token=stream)
        if len(ids) == 1:
            sys.stdout.write(results[0].text[shown[0]:] + "\n")
        else:
            sys.stdout.write("\n\n".join(r.text for r in results) + "\n")
        sys.stdout.flush()
        for r in results:
            st = r.stats
            print(f"prompt {st['prompt_tokens']} tok | KV budget {100 * st['budget']:.1f}% | prefill {st['prefill_s'] * 1e3:.0f} ms "
                  f"| prune {st['prune_s'] * 1e3:.1f} ms | {st['new_tokens']} new tok at {st['decode_tok_s']:.1f} tok/s "
                  f"| peak mem {st['peak_memory_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
        if a.stats_json:
            stats = [r.stats for r in results]
            with open(a.stats_json, "w") as f:
                json.dump(stats[0] if len(stats) == 1 else stats, f, indent=1)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
