"""What the command lines share (engine.generate, engine.serve, engine.run_batch): the parser, the
engine and KV-policy flags, and the checks a flag gets before any weights load."""

import argparse
import json
import os
import re
import sys
from importlib import metadata

import refreekv
from engine.engine import MAX_SEQS, SERVE_STEP_BOUND
from engine.sampling import Sampling
from weights.errors import UserError

ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise UserError(f"{message} (see --help)")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring and the epilog as written; every flag's help as written (defaults in it)."""


def version() -> str:
    try:
        return metadata.version("refreekv-engine")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def add_common(p, what: str):
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    p.add_argument(
        "--model",
        metavar="NAME|PATH",
        help=f"checkpoint directory, hub id (e.g. Qwen/Qwen2.5-7B) or "
        f"bundled name (smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct); default: the bundled "
        f"SmolLM2-135M-Instruct{what}",
    )


def add_policy_flags(p):
    """The KV policy flags."""
    p.add_argument(
        "--kv",
        default="refreekv",
        metavar="POLICY",
        help=f"KV policy (default refreekv): {', '.join(refreekv.available())}",
    )
    p.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="ReFreeKV's threshold T, a share of the attention "
        "in [0, 1] (default 0.01 = 1%%; 0 keeps everything)",
    )
    p.add_argument(
        "--budget",
        type=float,
        metavar="B",
        help="fixed-budget policies (streaming, h2o, snapkv): a "
        "fraction of each prompt in (0, 1] or a whole token count > 1 (default 0.5)",
    )
    p.add_argument(
        "--decode-interval",
        type=int,
        metavar="N",
        help="prune during decoding too: re-plan each sequence with its policy every N generated tokens "
        "(refreekv, snapkv, streaming; default off)",
    )
    p.add_argument(
        "--on-pressure",
        action="store_true",
        help="prune during decoding when the pool runs out of pages, before preempting anyone",
    )
    p.add_argument(
        "--kv-args",
        default="{}",
        metavar="JSON",
        help='any other policy knob as JSON, e.g. \'{"sinks": 4, "protected": [0, 1], "metric": "mass"}\'',
    )


def add_engine_flags(p):
    """The engine's flags."""
    p.add_argument(
        "--kv-memory",
        type=float,
        metavar="GiB",
        help="KV pool size (default: 80%% of the GPU memory left "
        "after loading the weights; on CPU what the prompts need at most, up to 2 GiB)",
    )
    p.add_argument(
        "--max-seqs",
        type=int,
        metavar="N",
        help=f"sequences decoded at once at most, 1-{MAX_SEQS} (default 64 on GPU, 16 on CPU)",
    )
    p.add_argument(
        "--page-size",
        type=int,
        default=16,
        metavar="N",
        help="tokens per KV page, a power of two from 1 to 256 (default 16)",
    )
    p.add_argument(
        "--max-batched-tokens",
        type=int,
        metavar="N",
        help="chunked prefill: tokens one step processes, decode rows first, then chunks of prompts "
        "(a long prompt never stalls running streams); at least --max-seqs, or 0 to prefill prompts "
        "whole (default: 0 for generate and run_batch; the server: on CPU the prefill cap with "
        f"--step-bound {SERVE_STEP_BOUND:g}, on GPU 2048: bench/RESULTS.md)",
    )
    p.add_argument(
        "--step-bound",
        type=float,
        metavar="X",
        help="chunked prefill: a step that prefills costs at most X decode steps of its running batch "
        "(measured as it runs; a stream's gap between tokens stays within X of a decode step), within "
        "--max-batched-tokens, which a step with no running stream takes whole; more than 1, or 0 "
        f"for the fixed budget (default: 0; the server {SERVE_STEP_BOUND:g} on CPU unless "
        "--max-batched-tokens is given)",
    )
    p.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep prompts' full page-sized blocks in the KV pool for the next prompt that starts with "
        "them (a shared system prompt, a multiple-choice context): only the rest is prefilled, and "
        "pruning copies a request's kept tokens off the shared pages (default: on for the server, "
        "off for generate and run_batch)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the decode step (default: off). CPU: the decode step only, a warm-up of "
        "~80-90 s (SmolLM2-135M), then decode at batch 1 1.06x eager on 1 thread and 1.15x on 2, but "
        "0.87-0.97x at batch 8 (bench/RESULTS.md). CUDA: prefill too and CUDA graphs (its first H200 "
        "run failed its tests)",
    )
    p.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--tp",
        type=int,
        metavar="N",
        help="tensor parallel over N ranks (one GPU each; gloo on CPU): "
        "spawns them, or, under torchrun, must equal its --nproc-per-node (default 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=f"CPU threads for torch, 1-{os.cpu_count()} (default: "
        "torch's; on a machine whose cores are busy with other work, 1 can be several times faster)",
    )
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help="context limit in tokens, prompt + new (default: the model's max_position_embeddings)",
    )


def engine_from_args(a):
    """The Engine the engine flags describe, its weights not yet loaded (cheap checks first)."""
    from engine.engine import Engine

    return Engine(
        a.model,
        a.device,
        a.dtype,
        a.max_length,
        a.compile,
        a.kv_memory,
        a.max_seqs,
        a.page_size,
        max_batched_tokens=a.max_batched_tokens,
        step_bound=a.step_bound,
        load=False,
        tp=a.tp,
        prefix_cache=bool(a.prefix_cache),
    )


def policy_from_args(a) -> refreekv.Policy:
    try:
        kw = json.loads(a.kv_args)
    except json.JSONDecodeError as e:
        raise UserError(f"--kv-args is not valid JSON: {e}") from None
    if not isinstance(kw, dict):
        raise UserError("--kv-args must be a JSON object")
    for name in ("threshold", "budget"):
        flag = getattr(a, name)
        if flag is None:
            continue
        if name in kw and kw[name] != flag:
            raise UserError(
                f"{name} given twice: --{name} {flag:g} and --kv-args {name} {kw[name]}; pass one"
            )
        kw[name] = flag  # a policy without this knob rejects it in refreekv.make
    flags = {"interval": "--decode-interval", "on_pressure": "--on-pressure"}
    for name, flag in flags.items():
        value = getattr(a, flag[2:].replace("-", "_"), None)
        if value is None or value is False:
            continue
        if a.kv in refreekv.available() and name not in refreekv.knobs(a.kv):
            decoding = [n for n in refreekv.available() if "interval" in refreekv.knobs(n)]
            raise UserError(
                f"--kv {a.kv} does not prune during decoding ({flag}); these do: {', '.join(decoding)}"
            )
        if name in kw and kw[name] != value:
            raise UserError(f"{name} given twice: {flag} and --kv-args; pass one")
        kw[name] = value
    return refreekv.make(a.kv, **kw)


def unescape(s: str) -> str:
    r"""The usual escapes of a stop string typed on a command line: \n, \t, \r, \\, \", \', \0."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in ESCAPES:
            out.append(ESCAPES[s[i + 1]])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def sampling_from_args(a, warn=None) -> Sampling:
    """Sampling from the flags, checked; errors name the flag. `warn(msg)` hears of values that are
    legal but change nothing."""
    s = Sampling(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed, [unescape(x) for x in a.stop])
    try:
        s.check()
    except UserError as e:  # the API names the field, the CLI its flag
        field = str(e).split(" ", 1)[0]
        raise UserError("--" + field.replace("_", "-") + str(e)[len(field) :]) from None
    if warn is not None and s.temperature == 0:
        idle = [
            f
            for f, on in (("--top-k", s.top_k), ("--top-p", s.top_p < 1), ("--seed", s.seed is not None))
            if on
        ]
        if idle:
            warn(
                f"{', '.join(idle)} {'has' if len(idle) == 1 else 'have'} no effect under greedy decoding "
                "(--temperature 0); pass --temperature > 0 to sample"
            )
    return s


def check_flags(a):
    """Bounds on counts, before anything is allocated."""
    if a.threads is not None:
        n = os.cpu_count() or 1
        if not 1 <= a.threads <= n:
            raise UserError(f"--threads must be in [1, {n}] (this machine's CPUs), got {a.threads}")
    if a.tp is not None and a.tp < 1:
        raise UserError(f"--tp must be >= 1, got {a.tp}")


def check_writable(path: str | None, flag: str):
    """An output file must be writable before any weights load (the work is not lost at the end)."""
    if not path:
        return
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory: name a file")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UserError(f"{flag}: directory of {path} does not exist")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written: {e.strerror}") from None
    if not existed:
        os.unlink(path)


def set_threads(n: int | None):
    if n is not None:
        import torch

        torch.set_num_threads(n)


# named by the engine
ARGS = (
    "max_new_tokens",
    "kv_memory",
    "max_seqs",
    "page_size",
    "max_length",
    "max_batched_tokens",
    "step_bound",
)


def in_flags(e: UserError) -> str:
    """An engine error in command-line words: the argument it starts with (e.arg) and any other
    argument it names become their flags (kv_memory -> --kv-memory)."""
    msg = str(e)
    arg = getattr(e, "arg", None)
    if arg and msg.startswith(arg):
        msg = "--" + arg.replace("_", "-") + msg[len(arg) :]
    named = r"(?<![-\w])(" + "|".join(ARGS) + r")\b"
    msg = re.sub(named, lambda m: "--" + m.group(1).replace("_", "-"), msg)
    msg = msg.replace("pass truncate middle", "pass --truncate middle")
    return msg.replace("or chat=False", "or --raw was given")


def say(msg: str, out=None):
    print(msg, file=out or sys.stderr, flush=True)
