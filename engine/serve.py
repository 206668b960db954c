"""An OpenAI-compatible server over the step-driven core.

    python -m engine.serve --model Qwen/Qwen2.5-7B-Instruct [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints: /v1/completions, /v1/chat/completions (streaming or not), /v1/models, /health, and
/metrics (Prometheus text). Each request may carry its own KV policy (`"kv": {"policy": "snapkv",
"budget": 0.3}`); the server's `--kv` is the default.

One thread owns the engine (engine/worker.py): it drains a queue of new requests and aborts between
steps, steps the core while anything runs and blocks on the queue when idle. HTTP handlers
(FastAPI on uvicorn: asyncio) never touch the engine: they parse and check a request
(engine/openai_api.py), hand it to the worker, and await its updates on an asyncio queue that
the worker feeds with loop.call_soon_threadsafe. A client that goes away has its request
aborted, and its pages go back to the pool at once. SIGINT/SIGTERM: uvicorn stops accepting,
in-flight requests get `--drain-s` seconds to finish, the rest are aborted, exit 0.
"""

import argparse
import asyncio
import hmac
import json
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass

from engine.openai_api import MAX_CHOICES, ApiError, Parser, error_body
from engine.openai_responses import (
    chat_logprobs,
    chunk,
    completion_logprobs,
    completion_tokens,
    kv_stats,
    prompt_tokens,
    response,
    usage_chunk,
)
from engine.worker import MAX_QUEUED, Worker, follow, internal_error, prometheus
from weights.errors import UserError

MAX_BODY_MB = 32
STALL_S = 30.0  # a stream whose client reads nothing for this long, while updates wait, is aborted
MAX_PENDING = 4096  # updates waiting for one stream's client; past this it is aborted whatever the time


@dataclass
class Piece:
    """What one engine step did to one choice, as the HTTP side needs it: the new text only (an
    Update references the whole text, and a client that reads slowly would pile those up)."""

    key: int
    text: str
    logprobs: list
    prompt_logprobs: list | None
    result: object


class Outbox:
    """One request's updates on their way to its HTTP handler (used on the event loop). A stream
    whose client stops reading would pile them up: once more than max_pending wait, or updates
    wait and none was taken for stall_s, on_stall() runs, once (the server aborts the request)."""

    def __init__(self, stall_s: float, on_stall=None, max_pending: int = MAX_PENDING, clock=time.monotonic):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stall_s, self.on_stall, self.max_pending, self.clock = stall_s, on_stall, max_pending, clock
        self.taken_at = clock()
        self.stalled = False

    def put(self, item):
        self.queue.put_nowait(item)
        waiting = self.queue.qsize()
        late = waiting > 1 and self.clock() - self.taken_at > self.stall_s
        if self.on_stall is not None and not self.stalled and (waiting > self.max_pending or late):
            self.stalled = True
            self.on_stall()

    async def get(self, timeout: float | None = None):
        """The next update (asyncio.TimeoutError after `timeout` seconds, when given)."""
        item = await (self.queue.get() if timeout is None else asyncio.wait_for(self.queue.get(), timeout))
        self.taken_at = self.clock()
        return item


def build_app(
    eng,
    policy,
    model_name: str,
    api_key: str | None = None,
    max_tokens: int | None = None,
    max_body_mb: float = MAX_BODY_MB,
    worker: Worker | None = None,
    max_choices: int = MAX_CHOICES,
    max_queued: int = MAX_QUEUED,
    stall_s: float = STALL_S,
):
    """The FastAPI app over a loaded engine (the worker starts and stops with the app).
    max_choices: sequences one request may ask for (prompts x n); max_queued: sequences the server
    holds at once, past which a request gets 429; stall_s: how long a stream's client may read
    nothing while updates wait before its request is aborted."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    worker = worker or Worker(eng, max_queued)
    parser = Parser(eng, model_name, policy, max_tokens or eng.context, max_choices)
    tok = eng.tokenizer
    cap = int(max_body_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app):
        if not worker.thread.is_alive():
            worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="refreekv-engine", lifespan=lifespan)
    app.state.worker = worker

    def fail(e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(
            exc.status_code, "invalid_request_error"
        )
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(request, exc):
        e = internal_error(
            f"{request.method} {request.url.path} failed", "".join(traceback.format_exception(exc))
        )
        return fail(e)

    want_auth = None if api_key is None else f"Bearer {api_key}".encode()

    def authorized(request: Request) -> bool:  # constant time: the key is not guessable by timing
        given = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        return want_auth is None or hmac.compare_digest(given, want_auth)

    async def read_body(request: Request) -> bytes:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cap:
            raise ApiError(f"the request body is {int(size)} bytes; at most {cap}", status=413)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > cap:
                raise ApiError(f"the request body is over {cap} bytes", status=413)
        return bytes(body)

    async def handle(request: Request, chat: bool):
        if not authorized(request):
            return fail(
                ApiError(
                    "missing or wrong API key (Authorization: Bearer KEY)", status=401, code="invalid_api_key"
                )
            )
        if not worker.alive:
            return fail(ApiError("the server is shutting down", status=503, kind="server_shutdown"))
        try:
            raw = await read_body(request)

            def parse():  # off the event loop: tokenizing a large body must not hold up other streams
                body = parser.body(raw)
                return parser.chat(body) if chat else parser.completion(body)

            job = await asyncio.to_thread(parse)
        except ApiError as e:
            return fail(e)
        if not worker.reserve(len(job.choices)):
            return JSONResponse(
                error_body(
                    f"the server holds {worker.max_queued} sequences already; retry shortly",
                    "rate_limit_error",
                    code="server_busy",
                ),
                status_code=429,
                headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        sent: dict = {}  # engine thread: characters of each choice's text already passed on
        rids: list = []
        # a stream's client that stops reading has its request aborted (a whole body is read at once)
        box = Outbox(stall_s, (lambda: worker.abort(rids)) if job.stream else None)

        def sink(item):  # on the engine thread: an Update becomes the small Piece the handler needs
            if not isinstance(item, ApiError):
                since = sent.get(item.key, 0)
                sent[item.key] = item.shown
                item = Piece(
                    item.key, item.delta(since), list(item.logprobs), item.prompt_logprobs, item.result
                )
            loop.call_soon_threadsafe(box.put, item)

        rids += worker.submit(job.choices, sink)
        index = {rid: c for rid, c in zip(rids, job.choices)}
        if job.stream:
            return StreamingResponse(stream(job, rids, index, box), media_type="text/event-stream")
        return await gather(request, job, rids, index, box)

    async def gather(request, job, rids, index, box):
        results, left = {}, set(rids)
        try:
            while left:
                try:
                    item = await box.get(1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if isinstance(item, ApiError):
                    return fail(item)
                if item.result is not None:
                    left.discard(item.key)
                    if item.result.finish_reason == "error":
                        return fail(internal_error("the request failed", item.result.error or "?"))
                    results[index[item.key].index] = item.result
        finally:
            if left:
                worker.abort(left)
        return JSONResponse(response(job, results, tok))

    async def stream(job, rids, index, box):
        left = set(rids)
        offset = {rid: 0 for rid in rids}  # text_offset of each choice's next token (as unstreamed)

        def sse(obj):
            return f"data: {json.dumps(obj)}\n\n"

        try:
            for rid in rids:
                c = index[rid]
                if job.chat:
                    yield sse(chunk(job, c.index, "", role=True))
                elif job.echo:  # the prompt's logprobs come with the first generated chunk (after prefill)
                    yield sse(chunk(job, c.index, c.prompt_text))
            completion = 0
            while left:
                item = await box.get()
                if box.stalled:
                    break  # aborted: the client read nothing for too long
                if isinstance(item, ApiError):
                    yield sse(item.body())
                    break
                rid, c = item.key, index[item.key]
                r = item.result
                if r is not None and r.finish_reason == "error":
                    left.discard(rid)
                    yield sse(internal_error("the request failed", r.error or "?").body())
                    break
                entries = (item.prompt_logprobs or [] if job.echo else []) + item.logprobs
                lps = None
                if job.logprobs is not None and entries:
                    if job.chat:
                        lps = chat_logprobs(tok, entries)
                    else:  # offsets run on across chunks, from the start of the choice's text
                        lps = completion_logprobs(tok, entries, offset[rid])
                        offset[rid] += sum(map(len, lps["tokens"]))
                finish = r.finish_reason if r is not None else None
                if r is not None:
                    left.discard(rid)
                    completion += completion_tokens(r)
                if item.text or lps or finish:
                    kv = kv_stats(r) if r is not None else None
                    yield sse(chunk(job, c.index, item.text, finish, lps, kv))
            if job.include_usage and not left:
                yield sse(usage_chunk(job, prompt_tokens(job), completion))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended early): nothing keeps running for it
            if left:
                worker.abort(left)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorized(request):
            return fail(
                ApiError(
                    "missing or wrong API key (Authorization: Bearer KEY)", status=401, code="invalid_api_key"
                )
            )
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "refreekv-engine",
                    "max_model_len": eng.context,
                }
            ],
        }

    @app.get("/health")
    async def health():
        if not worker.alive:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(worker.snapshot), media_type="text/plain; version=0.0.4")

    return app


# ------------------------------------------------------------------------------------- CLI
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


def main(argv=None):
    from engine.cli import check_flags, engine_from_args, policy_from_args, set_threads

    argv = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))  # tensor parallel: rank 0 serves, the others follow it
    try:
        a = parse_args(argv)
        if not 0 <= a.port <= 65535:
            raise UserError(f"--port must be in [0, 65535], got {a.port}")
        if a.max_tokens is not None and a.max_tokens < 1:
            raise UserError(f"--max-tokens must be >= 1, got {a.max_tokens}")
        if not a.max_body_mb > 0:
            raise UserError(f"--max-body-mb must be > 0, got {a.max_body_mb}")
        if a.max_choices < 1 or a.max_queued < 1:
            raise UserError(
                f"--max-choices and --max-queued must be >= 1, got {a.max_choices}, {a.max_queued}"
            )
        if a.max_queued < a.max_choices:
            raise UserError(f"--max-queued ({a.max_queued}) must be >= --max-choices ({a.max_choices})")
        if not a.stall_s > 0:
            raise UserError(f"--stall-s must be > 0, got {a.stall_s}")
        check_flags(a)
        policy = policy_from_args(a)
        set_threads(a.threads)
        sock = None
        if rank == 0:
            sock = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((a.host, a.port))  # before the weights load: a taken port fails at once
            except OSError as e:
                raise UserError(f"cannot listen on {a.host}:{a.port}: {e.strerror}") from None
        if a.tp and a.tp > 1 and "WORLD_SIZE" not in os.environ:
            from engine.tp import spawn

            sock.close()  # rank 0 binds it again
            return spawn(argv, a.tp, module="engine.serve")
        eng = engine_from_args(a)
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
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    import uvicorn

    host, port = sock.getsockname()[:2]
    print(
        f"serving {name} (kv={policy.name}, pool {eng.kv.n_pages} pages of {eng.kv.ps} tokens"
        f"{f', tensor parallel over {eng.tp.world} ranks' if eng.tp.on else ''}) on "
        f"http://{host if ':' not in host else f'[{host}]'}:{port}/v1",
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=a.drain_s))
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
