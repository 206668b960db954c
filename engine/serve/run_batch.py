"""Offline batch in OpenAI's Batch format (as vLLM's run-batch): one request per JSONL line in,
one result per line out, with the server's request and response schema
(engine/serve/schema.py, engine/serve/responses.py).

    python -m engine.run_batch -i requests.jsonl -o results.jsonl [--model M] [--kv snapkv --budget 0.3]

A line: {"custom_id": "q1", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
"body": {...}}. Its result: {"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}: a bad request gets its 4xx status and OpenAI's error body, and the rest still run. Every
request is queued at once; continuous batching does the rest. Results are written as each line
finishes (match them by custom_id, as with OpenAI's Batch API), so an interrupted run keeps them.
"""

import argparse
import json
import os
import sys
import time
import uuid

from engine.serve.responses import response
from engine.serve.schema import ApiError, RequestParser, error_body
from weights.errors import UserError

URLS = {"/v1/completions": False, "/v1/chat/completions": True}


def parse_args(argv=None):
    from engine.cli import Parser, add_common, add_engine_flags, add_policy_flags

    p = Parser(
        prog="python -m engine.run_batch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-i", "--input-file", required=True, help="requests, one JSON object a line ('-': stdin)")
    p.add_argument("-o", "--output-file", required=True, help="results, one JSON object a line ('-': stdout)")
    add_common(p, "")
    p.add_argument("--served-model-name", help="the model name requests may carry (default: --model)")
    add_policy_flags(p)
    add_engine_flags(p)
    return p.parse_args(argv)


def read_lines(path: str) -> list[str]:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"{path} holds no requests")
    return lines


def run(eng, parser: RequestParser, lines: list[str], progress=None, emit=None) -> list[dict]:
    """Every line's result object, in line order; emit(obj) is called with each as soon as it is
    known (a bad line at once, the others as their last choice finishes), so a run cut short keeps
    what was done. A line whose choice fails gets its own 500; the other lines run on."""
    core = eng.core
    outs: list[dict | None] = [None] * len(lines)
    ids = [(None, f"req-{uuid.uuid4().hex[:16]}") for _ in lines]  # each line's (custom_id, request id)
    jobs = {}  # open line -> (job, {rid: choice}, {choice index: Result})
    owner = {}  # rid -> its line, while the line is open

    def close(n, status, body):
        _, index, _ = jobs.pop(n, (None, {}, None))
        for other in index:  # its other choices stop here
            if owner.pop(other, None) is not None:
                core.abort(other)
        outs[n] = _line(*ids[n], status, body)
        if emit:
            emit(outs[n])

    for n, line in enumerate(lines):
        try:
            req = _request(n, line)
            ids[n] = (req.get("custom_id"), ids[n][1])  # before the checks: an error names it too
            body = _body(req)
            job = parser.chat(body) if URLS[req["url"]] else parser.completion(body)
            jobs[n] = (job, {}, {})
            for c in job.choices:
                r = core.add_request(c.prompt, c.policy, c.sampling)
                jobs[n][1][r] = c
                owner[r] = n
        except (ApiError, UserError) as e:
            e = e if isinstance(e, ApiError) else ApiError(str(e))
            close(n, e.status, e.body())
    done = 0
    while core.busy():
        for u in core.step():
            n = owner.pop(u.key, None) if u.result is not None else None
            if n is None:  # not finished, or its line is closed already (an aborted sibling)
                continue
            job, index, results = jobs[n]
            if u.result.finish_reason == "error":
                close(n, 500, error_body(u.result.error or "the request failed", "internal_server_error"))
                continue
            results[index[u.key].index] = u.result
            if len(results) == len(index):
                close(n, 200, response(job, results, eng.tokenizer))
                done += 1
                if progress:
                    progress(done, len(lines))
    return outs


def _request(n: int, line: str) -> dict:
    """A line's request object (ApiError when it is none)."""
    try:
        req = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ApiError(f"line {n + 1} is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise ApiError(f"line {n + 1} must be a JSON object")
    return req


def _body(req: dict) -> dict:
    """A request's body, its method and url checked (ApiError naming what is wrong)."""
    if req.get("method", "POST") != "POST":
        raise ApiError("'method' must be POST", "method")
    if req.get("url") not in URLS:
        raise ApiError(f"'url' must be one of {', '.join(URLS)}, got {json.dumps(req.get('url'))}", "url")
    body = req.get("body")
    if not isinstance(body, dict):
        raise ApiError("'body' must be a JSON object", "body")
    if body.get("stream"):
        raise ApiError("'stream' is not available in a batch", "stream")
    return body


def _line(custom, rid, status, body) -> dict:
    return {
        "id": f"batch_{rid}",
        "custom_id": custom,
        "response": {"status_code": status, "request_id": rid, "body": body},
        "error": None,
    }


def main(argv=None):
    from engine.cli import check_flags, engine_from_args, in_flags, policy_from_args, set_threads

    try:
        a = parse_args(argv)
        if a.tp not in (None, 1):
            raise UserError("run_batch runs on one process for now: --tp must be 1")
        check_flags(a)
        policy = policy_from_args(a)
        lines = read_lines(a.input_file)
        if a.output_file != "-":
            d = os.path.dirname(os.path.abspath(a.output_file))
            if not os.path.isdir(d) or os.path.isdir(a.output_file):
                raise UserError(f"-o {a.output_file}: not a file in an existing directory")
            open(a.output_file, "a").close()  # writable, checked before the weights load
        set_threads(a.threads)
        eng = engine_from_args(a)
        eng.check_policy(policy)
        eng.load()
        parser = RequestParser(eng, a.served_model_name or a.model or eng.path.name, policy, eng.context)
        t0 = time.perf_counter()

        def progress(k, n):
            print(f"\r{k}/{n} requests done", end="", file=sys.stderr, flush=True)

        out = sys.stdout if a.output_file == "-" else open(a.output_file, "w", encoding="utf-8")
        try:

            def emit(obj):  # as each line finishes: an interrupted run keeps what was done
                out.write(json.dumps(obj) + "\n")
                out.flush()

            outs = run(eng, parser, lines, progress, emit)
        finally:
            if out is not sys.stdout:
                out.close()
        print(file=sys.stderr)
        ok = sum(o["response"]["status_code"] == 200 for o in outs)
        toks = eng.core.totals["new_tokens"]
        wall = time.perf_counter() - t0
        print(
            f"{ok}/{len(outs)} requests ok, {toks} new tokens in {wall:.1f} s ({toks / wall:.1f} tok/s)",
            file=sys.stderr,
        )
    except UserError as e:
        print(f"error: {in_flags(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
