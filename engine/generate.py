"""The command line: prompts in, text out, through the engine (continuous batching over the paged
KV pool, a refreekv/ policy at the prefill -> decode transition).

    python -m engine.generate --prompt "What is the capital of France?"
    python -m engine.generate --model Qwen/Qwen2.5-7B --prompt "..." --kv refreekv --threshold 0.01
    python -m engine.generate --interactive                  # a multi-turn chat in the terminal
"""

import os
import signal
import sys

from engine.cli import (
    Formatter,
    Parser,
    add_common,
    add_engine_flags,
    add_policy_flags,
    check_flags,
    check_writable,
    engine_from_args,
    in_flags,
    policy_from_args,
    sampling_from_args,
    say,
    set_threads,
)
from engine.display import PrefillNote, Progress, summary, write_outputs
from weights.errors import UserError

EPILOG = """stats (stderr), one line per prompt and one for the whole run:
  prompt N tok      prompt tokens after the chat template
  KV budget X%      prompt KV entries kept after pruning, share of the prompt (mean over layers and KV heads)
  pages A -> B      KV pages the prompt held after prefill and after pruning (the rest went back to the pool)
  prefill / prune   wall time of the prefill batch it was in, and of planning + compacting it
  new tok at tok/s  tokens generated, and this sequence's own decode rate
  decoding          with --decode-interval / --on-pressure: re-plans during decoding, tokens its rows
                    hold at the end of the tokens seen (mean over rows), the most pages it held
  workload          tokens/s over the run, most sequences decoded at once, most pool pages in use,
                    preemptions (pages ran out: a sequence gave its pages back and replays later),
                    peak memory
--stats-json writes the same per prompt (with its text and finish reason);
--output-jsonl one object a line."""


def parse_args(argv=None):
    p = Parser(
        prog="python -m engine.generate", description=__doc__, epilog=EPILOG, formatter_class=Formatter
    )
    add_common(p, " (converted once from its pip package)")
    _input_flags(p)
    _sampling_flags(p)
    add_policy_flags(p)
    add_engine_flags(p)
    _output_flags(p)
    return p.parse_args(argv)


def _input_flags(p):
    # both append to one list, so a batch keeps the command line's order
    for flag, metavar, kind, help_ in (
        ("--prompt", "TEXT", "text", "prompt text; repeat for a batch"),
        (
            "--prompt-file",
            "PATH",
            "file",
            "read a prompt from a file ('-' for stdin); repeatable, mixes with --prompt in order",
        ),
    ):
        p.add_argument(flag, action="append", dest="inputs", metavar=metavar, type=_tagged(kind), help=help_)
    p.add_argument(
        "--interactive",
        action="store_true",
        help="a multi-turn chat: type a message, get the answer; "
        "/exit or Ctrl-D leaves (each turn re-prefills the conversation under the chosen policy)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=None,
        help="apply the chat template (default when the checkpoint has one)",
    )
    mode.add_argument("--raw", dest="chat", action="store_false", help="feed the prompt as is")
    p.add_argument("--system", metavar="TEXT", help="system message for --chat")


def _tagged(kind: str):
    return lambda v: (kind, v)


def _sampling_flags(p):
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        metavar="N",
        help="tokens to generate at most per prompt (default 256)",
    )
    p.add_argument("--temperature", type=float, default=0.0, metavar="X", help="0 = greedy (default 0)")
    p.add_argument(
        "--top-k",
        type=int,
        default=0,
        metavar="K",
        help="sample from the K most likely tokens only (default 0 = off)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        metavar="P",
        help="sample from the smallest set of tokens with this much probability, in (0, 1] (default 1 = off)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="sampling seed (default: a fresh one per prompt; a seeded prompt gives "
        "the same text whatever else runs beside it)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help=r"stop string (repeatable); "
        r"the escapes \n \t \r \\ are read, so --stop '\n' stops at a newline",
    )


def _output_flags(p):
    p.add_argument(
        "--truncate", choices=["middle"], help="middle-truncate prompts that do not fit (default: an error)"
    )
    p.add_argument("--stats-json", metavar="PATH", help="write per-prompt stats, text and finish reason here")
    p.add_argument(
        "--output-jsonl",
        metavar="PATH",
        help="write one JSON object per prompt: prompt index, text, tokens, finish reason, stats",
    )


def read_prompts(a) -> list[str]:
    prompts = []
    for kind, v in a.inputs or []:
        try:
            prompts.append(
                v if kind == "text" else sys.stdin.read() if v == "-" else open(v, encoding="utf-8").read()
            )
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {v}: {e}") from None
    if any(not p.strip() for p in prompts):
        raise UserError("empty prompt")
    return prompts


def run(a, eng, policy, s, ids) -> int:
    """Generate for every prompt: stream one, or print a batch's answers as they finish (labelled)."""
    many = len(ids) > 1
    shown, done = [0], {}
    progress = Progress(len(ids)) if many else None

    def on_token(i, text):
        if not many:
            sys.stdout.write(text[shown[0] :])
            sys.stdout.flush()
            shown[0] = len(text)
        else:
            progress.token(i, text)

    def on_finish(i, r):
        done[i] = r
        if many:
            progress.clear()
            sys.stdout.write(f"=== prompt {i} ({r.finish_reason}) ===\n{r.text}\n")
            sys.stdout.flush()
            progress.finish(i)

    if not eng.cuda:  # a prefill of thousands of tokens takes a while on a CPU: say how far it is
        eng.core.prefill_progress = PrefillNote()
    try:
        results = eng.generate(ids, policy, s, on_token=on_token, on_finish=on_finish)
    except KeyboardInterrupt:
        if progress:
            progress.clear()
        if not many:
            sys.stdout.write("\n")
        cut = [i for i in range(len(ids)) if i not in done]
        say(
            f"interrupted: {len(done)} of {len(ids)} prompt(s) finished; cut: "
            f"{', '.join(map(str, cut[:20]))}{' ...' if len(cut) > 20 else ''}"
        )
        write_outputs(a, [done.get(i) for i in range(len(ids))])
        return 130
    if progress:
        progress.clear()
    if not many:
        sys.stdout.write(results[0].text[shown[0] :] + "\n")
        sys.stdout.flush()
    for i, r in enumerate(results):
        say((f"prompt {i}: " if many else "") + summary(r.stats, eng.tp.on))
    w = eng.stats
    say(
        f"workload: {w['requests']} prompt(s), {w['new_tokens']} new tok in {w['wall_s']:.2f} s "
        f"({w['tok_s']:.1f} tok/s) | peak {w['peak_concurrent']} seqs, "
        f"{w['peak_pages']}/{w['pool_pages']} pages | "
        f"{w['preemptions']} preemptions | peak mem {w['peak_memory_bytes'] / 2**30:.2f} GiB"
    )
    write_outputs(a, results)
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # tensor parallel: only rank 0 speaks
    try:
        return _main(argv, rank0)
    except UserError as e:
        if rank0:
            print(f"error: {in_flags(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed (| head): end quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _main(argv, rank0) -> int:
    a = parse_args(argv)
    check_flags(a)
    if a.tp and a.tp > 1 and "WORLD_SIZE" not in os.environ:
        if any(kind == "file" and v == "-" for kind, v in a.inputs or []) or a.interactive:
            raise UserError("--prompt-file - (stdin) and --interactive cannot be combined with --tp")
        from engine.tp import spawn

        return spawn(argv, a.tp)
    warn = (lambda m: say(f"warning: {m}")) if rank0 else None
    s = sampling_from_args(a, warn)
    policy = policy_from_args(a)
    check_writable(a.stats_json, "--stats-json")
    check_writable(a.output_jsonl, "--output-jsonl")
    prompts = read_prompts(a)
    if a.interactive and prompts:
        raise UserError("--interactive reads its messages from the terminal: drop --prompt / --prompt-file")
    if not prompts and not a.interactive:
        raise UserError("no prompt: pass --prompt TEXT or --prompt-file PATH (or --interactive)")
    set_threads(a.threads)
    eng = engine_from_args(a)
    if a.interactive:
        from engine.chat import interactive

        return interactive(eng, policy, s, a)
    ids = _encode(eng, prompts, a, s, warn)
    eng.check_policy(policy)
    budget = getattr(policy, "budget", None)
    if warn and budget is not None and budget > 1 and budget >= max(map(len, ids)):
        warn(f"--budget {budget:g} tokens is at least every prompt's length: every token is kept (100%)")
    _size_pool(eng, ids, s, warn)
    eng.check_fits(ids, s.max_new_tokens)  # before the weights load, where the pool size is known
    eng.load()
    out = sys.stderr if rank0 else open(os.devnull, "w")
    if eng.compiled:  # compile now, so every figure below is steady state
        print(f"compile warm-up {eng.warmup(policy):.1f} s (not in the figures below)", file=out)
    print(
        f"[{eng.path.name}] {len(ids)} prompt(s), {sum(map(len, ids))} tokens, kv={policy.name}, "
        f"device={eng.device}, dtype={str(eng.dtype).removeprefix('torch.')}, "
        f"pool {eng.kv.n_pages} pages of {eng.kv.ps} tokens"
        + (f" per rank, tensor parallel over {eng.tp.world} rank(s)" if eng.tp.on else ""),
        file=out,
        flush=True,
    )
    if not rank0:
        eng.generate(ids, policy, s)
        return 0
    return run(a, eng, policy, s, ids)


def _encode(eng, prompts, a, s, warn) -> list[list[int]]:
    """Each prompt's token ids, through the chat template unless --raw, middle-truncated when asked."""
    ids = []
    for i, p in enumerate(prompts):
        whole = eng.encode(p, a.chat, a.system)
        cut = eng.fit(whole, s.max_new_tokens, a.truncate)
        if len(cut) < len(whole) and warn:
            warn(f"prompt {i}: --truncate middle dropped {len(whole) - len(cut)} of its {len(whole)} tokens")
        ids.append(cut)
    return ids


def _size_pool(eng, ids, s, warn):
    """On CPU without --kv-memory, the pool the prompts need at most; a --kv-memory past what can
    be used is capped, with a word."""
    if eng.kv_memory is None and not eng.cuda:
        eng.kv_memory = eng.needed_gib([len(p) + s.max_new_tokens for p in ids[: eng.max_seqs]])
    elif eng.kv_memory is not None and warn:
        usable = eng.usable_pages()
        if eng.pool_pages() is not None and usable < eng.requested_pages():
            warn(
                f"--kv-memory {eng.kv_memory:g} GiB capped to {eng.pool_gib(usable):.2f} GiB: all that "
                f"{eng.max_seqs} sequences of {eng.context} tokens can use"
            )


if __name__ == "__main__":
    sys.exit(main())
