"""The command line: prompts in, text out, through the engine (continuous batching over the paged
KV pool, a refreekv/ policy at the prefill -> decode transition).

    python -m engine.generate --prompt "What is the capital of France?"
    python -m engine.generate --model Qwen/Qwen2.5-7B --prompt "..." --kv refreekv --threshold 0.01
"""
import argparse
import json
import os
import sys

import refreekv
from engine.engine import Engine, Result
from engine.sampling import Sampling
from weights.errors import UserError

__all__ = ["Engine", "Result", "Sampling", "main"]


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
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most per prompt (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens only (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens with this much probability (1 = off)")
    p.add_argument("--seed", type=int, help="random seed for sampling (a run with the same prompts and settings repeats)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_policy_flags(p)
    add_engine_flags(p)
    p.add_argument("--truncate", choices=["middle"], help="middle-truncate prompts that do not fit")
    p.add_argument("--stats-json", help="write per-prompt stats (budget, kept per layer, pages, timings) here")
    return p.parse_args(argv)


def add_policy_flags(p):
    """The KV policy flags (engine.generate and engine.serve)."""
    p.add_argument("--kv", default="refreekv", help="KV policy: " + ", ".join(refreekv.available()))
    p.add_argument("--threshold", type=float, help="ReFreeKV threshold T (default 0.01)")
    p.add_argument("--budget", type=float, help="fixed-budget policies: fraction of the prompt (<= 1) or a token count (> 1)")
    p.add_argument("--kv-args", default="{}", help='policy knobs as JSON, e.g. \'{"sinks": 4, "protected": [0, 1]}\'')


def add_engine_flags(p):
    """The engine's flags (engine.generate and engine.serve)."""
    p.add_argument("--kv-memory", type=float, help="KV pool size in GiB (default: 80%% of the GPU memory left after "
                   "loading the weights; 2 GiB on CPU)")
    p.add_argument("--max-seqs", type=int, help="sequences decoded at once at most (default 64 on GPU, 16 on CPU)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page, a power of two (default 16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile prefill, pruning and the decode step (CUDA graphs on GPU); default: on for CUDA, off on CPU")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--tp", type=int, help="tensor parallel over this many ranks (one GPU each; gloo on CPU): spawns them, "
                   "or, under torchrun, must equal its --nproc-per-node")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; on a machine whose cores are "
                   "busy with other work, 1 can be several times faster)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--max-length", type=int, help="context limit in tokens (prompt + new)")


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


def summary(st: dict, per_rank: bool = False) -> str:
    return (f"prompt {st['prompt_tokens']} tok | KV budget {100 * st['budget']:.1f}% | pages {st['pages_after_prefill']} -> "
            f"{st['pages_after_pruning']}{' per rank' if per_rank else ''} | prefill {st['prefill_s'] * 1e3:.0f} ms | prune {st['prune_s'] * 1e3:.1f} ms "
            f"| {st['new_tokens']} new tok at {st['decode_tok_s']:.1f} tok/s")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # tensor parallel: only rank 0 speaks
    try:
        a = parse_args(argv)
        if a.tp is not None and a.tp < 1:
            raise UserError(f"--tp must be >= 1, got {a.tp}")
        if a.tp and a.tp > 1 and "WORLD_SIZE" not in os.environ:
            if any(kind == "file" and v == "-" for kind, v in a.inputs or []):
                raise UserError("--prompt-file - (stdin) cannot be combined with --tp: pass the prompt in a file")
            from engine.tp import spawn

            return spawn(argv, a.tp)
        s = Sampling(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed, a.stop)
        try:
            s.check()
        except UserError as e:  # the API names the field, the CLI its flag
            field = str(e).split(" ", 1)[0]
            raise UserError("--" + field.replace("_", "-") + str(e)[len(field):]) from None
        policy = policy_from_args(a)
        if a.stats_json and not os.path.isdir(os.path.dirname(os.path.abspath(a.stats_json))):
            raise UserError(f"--stats-json: directory of {a.stats_json} does not exist")
        if a.stats_json and os.path.isdir(a.stats_json):
            raise UserError(f"--stats-json {a.stats_json} is a directory: name a file")
        prompts = []
        for kind, v in a.inputs or []:
            try:
                prompts.append(v if kind == "text" else sys.stdin.read() if v == "-" else open(v, encoding="utf-8").read())
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read prompt file {v}: {e}") from None
        if not prompts:
            raise UserError("no prompt: pass --prompt TEXT or --prompt-file PATH")
        if any(not p.strip() for p in prompts):
            raise UserError("empty prompt")
        if a.threads is not None:
            if a.threads < 1:
                raise UserError(f"--threads must be >= 1, got {a.threads}")
            import torch

            torch.set_num_threads(a.threads)
        eng = Engine(a.model, a.device, a.dtype, a.max_length, a.compile, a.kv_memory, a.max_seqs, a.page_size, load=False,
                     tp=a.tp)
        ids = [eng.fit(eng.encode(p, a.chat, a.system), s.max_new_tokens, a.truncate) for p in prompts]
        eng.check_policy(policy)
        eng.check_fits(ids, s.max_new_tokens)  # before the weights load, where the pool size is known
        eng.load()
        out = sys.stderr if rank0 else open(os.devnull, "w")
        if eng.compiled:  # compile now, so every figure below is steady state
            print(f"compile warm-up {eng.warmup(policy):.1f} s (not in the figures below)", file=out)
        print(f"[{eng.path.name}] {len(ids)} prompt(s), {sum(map(len, ids))} tokens, kv={policy.name}, device={eng.device}, "
              f"dtype={str(eng.dtype).removeprefix('torch.')}, pool {eng.kv.n_pages} pages of {eng.kv.ps} tokens"
              + (f" per rank, tensor parallel over {eng.tp.world} rank(s)" if eng.tp.on else ""), file=out)
        shown, done, printed = [0], {}, [0]

        def stream(i, text):  # one prompt: stream as produced
            if len(ids) == 1:
                sys.stdout.write(text[shown[0]:])
                sys.stdout.flush()
                shown[0] = len(text)

        def finished(i, r):  # a batch: each answer as soon as it and every earlier one are done
            done[i] = r
            while printed[0] in done and len(ids) > 1:
                sys.stdout.write(("\n" if printed[0] else "") + done[printed[0]].text + "\n")
                sys.stdout.flush()
                printed[0] += 1

        results = eng.generate(ids, policy, s, on_token=stream if rank0 else None, on_finish=finished if rank0 else None)
        if not rank0:
            return 0
        if len(ids) == 1:
            sys.stdout.write(results[0].text[shown[0]:] + "\n")
            sys.stdout.flush()
        for r in results:
            print(summary(r.stats, eng.tp.on), file=sys.stderr)
        w = eng.stats
        print(f"workload: {w['requests']} prompt(s), {w['new_tokens']} new tok in {w['wall_s']:.2f} s ({w['tok_s']:.1f} tok/s) "
              f"| peak {w['peak_concurrent']} seqs, {w['peak_pages']}/{w['pool_pages']} pages | {w['preemptions']} preemptions "
              f"| peak mem {w['peak_memory_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
        if a.stats_json:
            stats = [r.stats for r in results]
            with open(a.stats_json, "w") as f:
                json.dump(stats[0] if len(stats) == 1 else stats, f, indent=1)
    except UserError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
