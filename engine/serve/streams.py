"""A request's updates on their way from the engine thread to its HTTP handler, and the two ways a
handler answers: one body when every choice is done (`gather`), or server-sent events as tokens
come (`stream`)."""

import asyncio
import json
import time
from dataclasses import dataclass

from engine.serve.responses import (
    chat_logprobs,
    chunk,
    completion_logprobs,
    completion_tokens,
    kv_stats,
    prompt_tokens,
    response,
    usage_chunk,
)
from engine.serve.schema import from_failure, internal_error
from engine.serve.worker import Failure

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


def sink_for(loop, box: Outbox):
    """The sink the worker calls on the engine thread: an Update becomes the small Piece the
    handler needs (its new text only), a Failure passes as it is."""
    sent: dict = {}  # characters of each choice's text already passed on

    def sink(item):
        if not isinstance(item, Failure):
            since = sent.get(item.key, 0)
            sent[item.key] = item.shown
            item = Piece(item.key, item.delta(since), list(item.logprobs), item.prompt_logprobs, item.result)
        loop.call_soon_threadsafe(box.put, item)

    return sink


async def gather(request, job, rids, index, box, tok, abort):
    """Every choice's Result, then one body (an error body when any fails). Returns (status, body)."""
    results, left = {}, set(rids)
    try:
        while left:
            try:
                item = await box.get(1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return 499, {}
                continue
            if not isinstance(item, Piece):
                e = from_failure(item)
                return e.status, e.body()
            if item.result is not None:
                left.discard(item.key)
                if item.result.finish_reason == "error":
                    e = internal_error("the request failed", item.result.error or "?")
                    return e.status, e.body()
                results[index[item.key].index] = item.result
    finally:
        if left:
            abort(left)
    return 200, response(job, results, tok)


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def stream(job, rids, index, box, tok, abort):
    """Server-sent events: each choice's role (chat) or echoed prompt first, then its pieces as the
    engine makes them, the usage when asked, and [DONE]."""
    left = set(rids)
    offset = {rid: 0 for rid in rids}  # text_offset of each choice's next token (as unstreamed)
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
            if not isinstance(item, Piece):
                yield sse(from_failure(item).body())
                break
            rid, c, r = item.key, index[item.key], item.result
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
                yield sse(chunk(job, c.index, item.text, finish, lps, kv_stats(r) if r is not None else None))
        if job.include_usage and not left:
            yield sse(usage_chunk(job, prompt_tokens(job), completion))
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the stream ended early): nothing keeps running for it
        if left:
            abort(left)
