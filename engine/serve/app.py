"""The HTTP app (FastAPI): the OpenAI routes over the engine thread.

Handlers never touch the engine: they parse and check a request (engine/serve/schema.py) off the
event loop, reserve room for its sequences (429 past max_queued), hand it to the worker
(engine/serve/worker.py) and answer from its updates (engine/serve/streams.py). A client that goes
away, or stops reading a stream, has its request aborted, and its pages go back to the pool at
once. The worker's failures are neutral; here they become HTTP errors (a 500 names an error id;
the cause is in the server's log).
"""

import asyncio
import hmac
import time
import traceback

from engine.serve.metrics import prometheus
from engine.serve.schema import MAX_CHOICES, ApiError, RequestParser, error_body, internal_error
from engine.serve.streams import STALL_S, Outbox, gather, sink_for, stream
from engine.serve.worker import MAX_QUEUED, Worker

MAX_BODY_MB = 32
UNAUTHORIZED = ApiError(
    "missing or wrong API key (Authorization: Bearer KEY)", status=401, code="invalid_api_key"
)


class Handlers:
    """What the routes do, over one engine: its worker, the request parser and the server's caps."""

    def __init__(self, eng, worker, parser, api_key, max_body_mb, stall_s):
        self.eng, self.worker, self.parser, self.stall_s = eng, worker, parser, stall_s
        self.cap = int(max_body_mb * 2**20)
        self.want_auth = None if api_key is None else f"Bearer {api_key}".encode()

    def authorized(self, request) -> bool:  # constant time: the key is not guessable by timing
        given = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        return self.want_auth is None or hmac.compare_digest(given, self.want_auth)

    async def read_body(self, request) -> bytes:
        size, cap = request.headers.get("content-length"), self.cap
        if size is not None and size.isdigit() and int(size) > cap:
            raise ApiError(f"the request body is {int(size)} bytes; at most {cap}", status=413)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > cap:
                raise ApiError(f"the request body is over {cap} bytes", status=413)
        return bytes(body)

    async def completion(self, request, chat: bool):
        from fastapi.responses import JSONResponse, StreamingResponse

        worker = self.worker
        if not self.authorized(request):
            return fail(UNAUTHORIZED)
        if not worker.alive:
            return fail(ApiError("the server is shutting down", status=503, kind="server_shutdown"))
        try:
            raw = await self.read_body(request)

            def parse():  # off the event loop: tokenizing a large body must not hold up other streams
                body = self.parser.body(raw)
                return self.parser.chat(body) if chat else self.parser.completion(body)

            job = await asyncio.to_thread(parse)
        except ApiError as e:
            return fail(e)
        if not worker.reserve(len(job.choices)):
            busy = error_body(
                f"the server holds {worker.max_queued} sequences already; retry shortly",
                "rate_limit_error",
                code="server_busy",
            )
            return JSONResponse(busy, status_code=429, headers={"Retry-After": "1"})
        rids: list = []
        # a stream's client that stops reading has its request aborted (a whole body is read at once)
        box = Outbox(self.stall_s, (lambda: worker.abort(rids)) if job.stream else None)
        rids += worker.submit(job.choices, sink_for(asyncio.get_running_loop(), box))
        index = {rid: c for rid, c in zip(rids, job.choices)}
        tok = self.eng.tokenizer
        if job.stream:
            events = stream(job, rids, index, box, tok, worker.abort)
            return StreamingResponse(events, media_type="text/event-stream")
        status, body = await gather(request, job, rids, index, box, tok, worker.abort)
        return JSONResponse(body, status_code=status)

    def models(self, request, model_name: str):
        if not self.authorized(request):
            return fail(UNAUTHORIZED)
        created = int(time.time())
        card = dict(id=model_name, object="model", created=created, owned_by="refreekv-engine")
        return {"object": "list", "data": [dict(card, max_model_len=self.eng.context)]}


def fail(e: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status)


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
    from fastapi.responses import JSONResponse, PlainTextResponse

    worker = worker or Worker(eng, max_queued)
    parser = RequestParser(eng, model_name, policy, max_tokens or eng.context, max_choices)
    h = Handlers(eng, worker, parser, api_key, max_body_mb, stall_s)

    @asynccontextmanager
    async def lifespan(app):
        if not worker.thread.is_alive():
            worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="refreekv-engine", lifespan=lifespan)
    app.state.worker = worker

    _error_handlers(app)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await h.completion(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await h.completion(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        return h.models(request, model_name)

    @app.get("/health")
    async def health():
        if not worker.alive:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(worker.snapshot), media_type="text/plain; version=0.0.4")

    return app


def _error_handlers(app):
    """Errors in OpenAI's shape: the framework's own (404, 405) and any a handler did not expect
    (a 500 naming an error id; the traceback goes to the log)."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(request, exc):
        detail = "".join(traceback.format_exception(exc))
        return fail(internal_error(f"{request.method} {request.url.path} failed", detail))
