"""Bad requests to the server: each gets a clear 4xx in OpenAI's error shape naming its field; a
request that could never fit is refused up front; a request whose policy fails gets its own 500
(an error id, the cause in the log) while the others are served."""

import threading

import httpx
import pytest
from helpers import SERVE_KEY as KEY
from helpers import Served, greedy, serve_engine

import refreekv

BAD = [  # (what, method, path, body or raw bytes, headers, status, words in the message, param)
    ("no API key", "POST", "/v1/completions", {"prompt": "hi"}, {}, 401, "API key", None),
    (
        "wrong API key",
        "POST",
        "/v1/completions",
        {"prompt": "hi"},
        {"Authorization": "Bearer nope"},
        401,
        "API key",
        None,
    ),
    ("body not JSON", "POST", "/v1/completions", b"{prompt: hi", None, 400, "not valid JSON", None),
    ("body a list", "POST", "/v1/completions", [1, 2], None, 400, "JSON object", None),
    ("no prompt", "POST", "/v1/completions", {"max_tokens": 3}, None, 400, "'prompt' is required", "prompt"),
    ("prompt a number", "POST", "/v1/completions", {"prompt": 5}, None, 400, "'prompt' must be", "prompt"),
    ("empty prompt", "POST", "/v1/completions", {"prompt": ""}, None, 400, "empty string", "prompt"),
    (
        "empty prompt list",
        "POST",
        "/v1/completions",
        {"prompt": []},
        None,
        400,
        "must not be empty",
        "prompt",
    ),
    (
        "token id past the vocabulary",
        "POST",
        "/v1/completions",
        {"prompt": [5, 256]},
        None,
        400,
        "outside the vocabulary [0, 256): 256",
        "prompt",
    ),
    (
        "token list holding a string",
        "POST",
        "/v1/completions",
        {"prompt": [[5, "a"]]},
        None,
        400,
        "'prompt' must be",
        "prompt",
    ),
    (
        "negative max_tokens",
        "POST",
        "/v1/completions",
        {"prompt": "hi", "max_tokens": -1},
        None,
        400,
        "'max_tokens'",
        "max_tokens",
    ),
    (
        "max_tokens a string",
        "POST",
        "/v1/completions",
        {"prompt": "hi", "max_tokens": "ten"},
        None,
        400,
        "integer",
        "max_tokens",
    ),
    (
        "max_tokens over the cap",
        "POST",
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 10**6},
        None,
        400,
        "at most",
        "max_tokens",
    ),
    (
        "prompt + max_tokens past the context",
        "POST",
        "/v1/completions",
        {"prompt": [5] * 500, "max_tokens": 20},
        None,
        400,
        "500 + 20 > 512",
        "max_tokens",
    ),
    (
        "prompt longer than the context",
        "POST",
        "/v1/completions",
        {"prompt": [5] * 600},
        None,
        400,
        "600 tokens",
        "prompt",
    ),
    (
        "max_tokens 0 without echo",
        "POST",
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 0},
        None,
        400,
        "'max_tokens'",
        "max_tokens",
    ),
    (
        "negative temperature",
        "POST",
        "/v1/completions",
        {"prompt": "hi", "temperature": -1},
        None,
        400,
        "'temperature'",
        "temperature",
    ),
    ("top_p 0", "POST", "/v1/completions", {"prompt": "hi", "top_p": 0}, None, 400, "'top_p'", "top_p"),
    ("top_k -2", "POST", "/v1/completions", {"prompt": "hi", "top_k": -2}, None, 400, "'top_k'", "top_k"),
    ("n 0", "POST", "/v1/completions", {"prompt": "hi", "n": 0}, None, 400, "'n'", "n"),
    ("n 17", "POST", "/v1/completions", {"prompt": "hi", "n": 17}, None, 400, "'n'", "n"),
    ("stop a number", "POST", "/v1/completions", {"prompt": "hi", "stop": 3}, None, 400, "'stop'", "stop"),
    (
        "logprobs 21",
        "POST",
        "/v1/completions",
        {"prompt": "hi", "logprobs": 21},
        None,
        400,
        "'logprobs'",
        "logprobs",
    ),
    ("seed a float", "POST", "/v1/completions", {"prompt": "hi", "seed": 1.5}, None, 400, "'seed'", "seed"),
    (
        "stream a string",
        "POST",
        "/v1/completions",
        {"prompt": "hi", "stream": "yes"},
        None,
        400,
        "'stream'",
        "stream",
    ),
    (
        "unknown model",
        "POST",
        "/v1/completions",
        {"prompt": "hi", "model": "gpt-4"},
        None,
        404,
        "gpt-4",
        "model",
    ),
    (
        "unknown KV policy",
        "POST",
        "/v1/completions",
        {"prompt": "hi", "kv": "magic"},
        None,
        400,
        "unknown KV policy",
        "kv",
    ),
    (
        "bad KV budget",
        "POST",
        "/v1/completions",
        {"prompt": "hi", "kv": {"policy": "snapkv", "budget": -1}},
        None,
        400,
        "budget",
        "kv",
    ),
    (
        "KV knob a policy lacks",
        "POST",
        "/v1/completions",
        {"prompt": "hi", "kv": {"policy": "full", "budget": 0.5}},
        None,
        400,
        "no knob",
        "kv",
    ),
    (
        "kv without a policy name",
        "POST",
        "/v1/completions",
        {"prompt": "hi", "kv": {"budget": 0.5}},
        None,
        400,
        "name its policy",
        "kv.policy",
    ),
    (
        "presence_penalty",
        "POST",
        "/v1/completions",
        {"prompt": "hi", "presence_penalty": 0.5},
        None,
        400,
        "not supported",
        "presence_penalty",
    ),
    (
        "stream_options without stream",
        "POST",
        "/v1/completions",
        {"prompt": "hi", "stream_options": {"include_usage": True}},
        None,
        400,
        "only allowed with stream",
        "stream_options",
    ),
    ("body over the cap", "POST", "/v1/completions", {"prompt": "x" * 300_000}, None, 413, "at most", None),
    (
        "chat without messages",
        "POST",
        "/v1/chat/completions",
        {"max_tokens": 3},
        None,
        400,
        "'messages'",
        "messages",
    ),
    (
        "chat with a bad role",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "hi"}]},
        None,
        400,
        "role",
        "messages[0].role",
    ),
    (
        "chat with image content",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        None,
        400,
        "only text",
        "messages[0].content",
    ),
    (
        "top_logprobs without logprobs",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        None,
        400,
        "needs 'logprobs'",
        "top_logprobs",
    ),
    ("unknown route", "GET", "/v1/engines", None, None, 404, "Not Found", None),
    ("wrong method", "GET", "/v1/completions", None, None, 405, "Method Not Allowed", None),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests_get_a_clear_error_in_openai_shape(served, case):
    what, method, path, body, headers, status, words, param = case
    h = {"Authorization": f"Bearer {KEY}"} if headers is None else headers
    kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    r = httpx.request(method, served.root + path, headers=h, timeout=30, **kw)
    err = r.json()["error"]
    assert r.status_code == status and words in err["message"] and err["param"] == param, (r.status_code, err)
    assert set(err) == {"message", "type", "param", "code"}


def test_a_request_that_could_never_fit_the_pool_is_a_400(chat_tiny):
    with Served(serve_engine(chat_tiny, kv_memory=0.0002), refreekv.make("full"), "tiny") as s:
        r = httpx.post(s.url + "/completions", json={"prompt": [5] * 300, "max_tokens": 100}, timeout=30)
        assert r.status_code == 400 and "could never fit the KV pool" in r.json()["error"]["message"]
        r = httpx.post(
            s.url + "/completions", json={"prompt": [5] * 20, "max_tokens": 4, "temperature": 0}, timeout=30
        )
        assert r.status_code == 200


@refreekv.register("boom-test")
class Boom(refreekv.Policy):
    """A research policy with a bug: its plan raises."""

    def plan(self, probe):
        raise RuntimeError("bug in a research policy")


def test_a_failing_request_fails_alone_and_the_server_keeps_serving(served, offline, capfd):
    """Its 500 names an error id, not the exception: the cause is in the server's log under it."""
    ids = [7, 8, 9, 10, 11, 12]
    out = {}

    def go(k, kv):
        out[k] = httpx.post(
            served.url + "/completions",
            json={"prompt": ids, "max_tokens": 8, "temperature": 0, "kv": kv},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )

    ts = [threading.Thread(target=go, args=(k, kv)) for k, kv in (("bad", "boom-test"), ("good", "full"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    message = out["bad"].json()["error"]["message"]
    assert out["bad"].status_code == 500 and "bug in a research policy" not in message
    eid = message.split("error id ")[1].split(":")[0]
    log = capfd.readouterr().err
    assert f"[{eid}]" in log and "bug in a research policy" in log.split(f"[{eid}]")[1].splitlines()[0]
    assert out["good"].status_code == 200
    assert out["good"].json()["choices"][0]["text"] == greedy(offline, ids, 8, refreekv.make("full")).text
    served.idle()
