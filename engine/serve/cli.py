"""An OpenAI-compatible server over the step-driven core.

    python -m engine.serve --model Qwen/Qwen2.5-7B-Instruct [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints: /v1/completions, /v1/chat/completions (streaming or not), /v1/models, /health, and
/metrics (Prometheus text). Each request may carry its own KV policy (`"kv": {"policy": "snapkv",
"budget": 0.3}`); the server's `--kv` is the default.

One thread owns the engine (engine/serve/worker.py): it drains a queue of new requests and aborts
between steps, steps the core while anything runs and blocks on the queue when idle; the HTTP side
(engine/serve/app.py, FastAPI on uvicorn) only parses, checks and queues. SIGINT/SIGTERM: uvicorn
stops accepting, in-flight requests get `--drain-s` seconds to finish, the rest are aborted, exit 0.
"""

import argparse
import os
import signal
import socket
import sys

from engine.serve.app import MAX_BODY_MB, STALL_S, build_app
from engine.serve.schema import MAX_CHOICES
from engine.serve.worker import MAX_QUEUED, Worker, follow
from weights.errors import UserError


def parse_args(argv=None):
    from engine.cli import Parser, add_common, add_engine_flags, add_policy_flags

    p = Parser(
        prog="python -m engine.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(p, "")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ routes")
    p.add_argument(
        "--served-model-name",
        help="the model name clients send and /v1/models lists (default: "
        "--model, or the bundled model's name)",
    )
    p.add_argument(
        "--max-tokens", type=int, help="the most max_tokens a request may ask for (default: the context)"
    )
    p.add_argument(
        "--max-body-mb", type=float, default=MAX_BODY_MB, help=f"request body cap (default {MAX_BODY_MB})"
    )
    p.add_argument(
        "--max-choices",
        type=int,
        default=MAX_CHOICES,
        help=f"sequences one request may ask for, prompts x n (default {MAX_CHOICES})",
    )
    p.add_argument(
        "--max-queued",
        type=int,
        default=MAX_QUEUED,
        help="sequences the server holds at once (queued, waiting, running); past it a request gets "
        f"429 with Retry-After (default {MAX_QUEUED})",
    )
    p.add_argument(
        "--stall-s",
        type=float,
        default=STALL_S,
        help="a stream whose client reads nothing for this long while its updates wait is aborted "
        f"(default {STALL_S:g})",
    )
    p.add_argument(
        "--drain-s",
        type=float,
        default=30.0,
        help="on SIGINT/SIGTERM, seconds in-flight requests get "
        "to finish before they are cancelled (default 30)",
    )
    add_policy_flags(p)
    add_engine_flags(p)
    return p.parse_args(argv)


def check_server_flags(a):
    if not 0 <= a.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {a.port}")
    if a.max_tokens is not None and a.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {a.max_tokens}")
    if not a.max_body_mb > 0:
        raise UserError(f"--max-body-mb must be > 0, got {a.max_body_mb}")
    if a.max_choices < 1 or a.max_queued < 1:
        raise UserError(f"--max-choices and --max-queued must be >= 1, got {a.max_choices}, {a.max_queued}")
    if a.max_queued < a.max_choices:
        raise UserError(f"--max-queued ({a.max_queued}) must be >= --max-choices ({a.max_choices})")
    if not a.stall_s > 0:
        raise UserError(f"--stall-s must be > 0, got {a.stall_s}")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, before the weights load: a taken port fails at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def main(argv=None):
    from engine.cli import check_flags, engine_from_args, in_flags, policy_from_args, set_threads

    argv = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))  # tensor parallel: rank 0 serves, the others follow it
    try:
        a = parse_args(argv)
        check_server_flags(a)
        check_flags(a)
        policy = policy_from_args(a)
        set_threads(a.threads)
        sock = bind(a.host, a.port) if rank == 0 else None
        if a.tp and a.tp > 1 and "WORLD_SIZE" not in os.environ:
            from engine.tp import spawn

            sock.close()  # rank 0 binds it again
            return spawn(argv, a.tp, module="engine.serve")
        if a.prefix_cache is None:  # on when serving (not yet with tensor parallelism)
            a.prefix_cache = not (a.tp and a.tp > 1)
        eng = engine_from_args(a)
        if a.max_batched_tokens is None and a.step_bound is None:  # serving: no stream stalls
            eng.serve_defaults()
        eng.check_policy(policy)
        eng.load()
        if rank != 0:
            if eng.compiled:  # the same warm-up as rank 0's engine thread: the collectives pair up
                eng.warmup(policy)
            follow(eng)
            return 0
        worker = Worker(eng, a.max_queued)
        if eng.compiled:  # on the engine thread: the CUDA graphs it records are the ones served
            print(f"compile warm-up {worker.call(lambda: eng.warmup(policy)):.1f} s", file=sys.stderr)
        name = a.served_model_name or a.model or eng.path.name
        app = build_app(
            eng,
            policy,
            name,
            a.api_key,
            a.max_tokens,
            a.max_body_mb,
            worker=worker,
            max_choices=a.max_choices,
            stall_s=a.stall_s,
        )
    except UserError as e:
        if rank == 0:
            print(f"error: {in_flags(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return serve(app, sock, eng, name, policy, a.drain_s)


def serve(app, sock, eng, name, policy, drain_s: float) -> int:
    """uvicorn on the bound socket until SIGINT / SIGTERM (then `drain_s` seconds for what runs)."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    print(
        f"serving {name} (kv={policy.name}, pool {eng.kv.n_pages} pages of {eng.kv.ps} tokens"
        f"{f', tensor parallel over {eng.tp.world} ranks' if eng.tp.on else ''}) on "
        f"http://{host if ':' not in host else f'[{host}]'}:{port}/v1",
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=drain_s))
    # uvicorn handles them while it serves, then re-raises them to the handlers it found:
    # a clean stop is this process's exit 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    print("server stopped", file=sys.stderr)
    if eng.tp.on:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
