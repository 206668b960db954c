"""The OpenAI API's request shapes, shared by the server (engine/serve/app.py) and the offline batch
runner (engine/serve/run_batch.py).

A request body becomes a list of `Choice`s (one per prompt x n: token ids, Sampling, policy),
each checked here, before anything reaches the engine: a bad field is an `ApiError` naming it,
which becomes HTTP 400 in OpenAI's error shape. Results come back as `Result`s
(engine/sequence.py) and engine/serve/responses.py shapes them into completion or chat-completion
bodies, or stream chunks.

Extensions beyond OpenAI's fields: `top_k`, and `kv`, the request's KV policy: a name
(`"kv": "snapkv"`) or an object (`"kv": {"policy": "snapkv", "budget": 0.3}`); every choice of a
response carries the KV stats of its sequence (`kv`: policy, budget, pages).
"""

import json
import math
import sys
import time
import uuid
from dataclasses import dataclass, field

import refreekv
from engine.sampling import MAX_LOGPROBS, MAX_TEMPERATURE, Sampling
from weights.errors import UserError

MAX_N = 16  # choices per prompt
MAX_CHOICES = 128  # sequences per request (prompts x n); the server's --max-choices
MIN_INTERVAL = 16  # a request's kv.interval: a re-plan every few tokens would stall every stream
IGNORED_ZERO = ("frequency_penalty", "presence_penalty")  # accepted only at their neutral value


class ApiError(Exception):
    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        kind: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code
        self.kind = kind or {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            413: "invalid_request_error",
            500: "internal_server_error",
        }.get(status, "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def internal_error(what: str, detail: str) -> ApiError:
    """A 500 whose body names an error id, not the cause: the cause goes to the server's log under it."""
    eid = f"err-{uuid.uuid4().hex[:12]}"
    print(f"[{eid}] {what}: {detail}", file=sys.stderr, flush=True)
    return ApiError(f"{what} (error id {eid}: the server's log has the details)", status=500)


def from_failure(f) -> ApiError:
    """The engine thread's neutral Failure (engine/serve/worker.py) as an HTTP error."""
    if f.kind == "shutdown":
        return ApiError(f.message, status=503, kind="server_shutdown")
    if f.kind == "invalid":
        return ApiError(f.message)
    return internal_error(f.message, f.detail)


@dataclass
class Choice:
    index: int
    prompt: list[int]
    sampling: Sampling
    policy: object
    prompt_text: str = ""  # for echo


@dataclass
class Job:
    """One HTTP request, parsed: what to run and how to shape the answer."""

    chat: bool
    model: str
    choices: list[Choice]
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None  # completions: top-N per token; chat: top_logprobs (with logprobs=true)
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


# --------------------------------------------------------------------------------- parsing
def _shown(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(body, name, default, lo=None, hi=None, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    try:
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))
    except OverflowError:  # an integer of hundreds of digits
        ok = False
    if not ok:
        raise ApiError(f"'{name}' must be a finite number, got {_shown(v)}", name)
    if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and v > hi:
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise ApiError(f"'{name}' must be in {rng}, got {v}", name)
    return v


def _int(body, name, default, lo=None, hi=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"'{name}' must be an integer, got {_shown(v)}", name)
    if lo is not None and v < lo or hi is not None and v > hi:
        top = hi if hi is not None else "inf"
        raise ApiError(f"'{name}' must be in [{lo}, {top}], got {_shown(v)}", name)
    return v


def _text(v: str, param: str) -> str:
    """A string the tokenizer can take: JSON may carry lone surrogates ("\\ud800"), UTF-8 cannot."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(f"'{param}' holds text that is not valid Unicode (a lone surrogate)", param) from None
    return v


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _bool(body, name, default=False):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(f"'{name}' must be true or false, got {json.dumps(v)}", name)
    return v


class RequestParser:
    """Turns request bodies into Jobs for one loaded engine (its tokenizer, context and pool)."""

    def __init__(self, eng, model_name: str, default_policy, max_tokens: int, max_choices: int = MAX_CHOICES):
        self.eng, self.model_name, self.default_policy = eng, model_name, default_policy
        self.max_tokens, self.max_choices = max_tokens, max_choices
        self._policies: dict[str, object] = {}  # one object per distinct knob set: planned together

    def body(self, raw: bytes) -> dict:
        try:
            body = json.loads(raw, parse_constant=_no_constant)  # NaN / Infinity are not JSON
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise ApiError(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError("the request body is not valid JSON: it nests too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(f"the request body must be a JSON object, not {type(body).__name__}")
        return body

    def _model(self, body):
        m = body.get("model")
        if m is not None and m != self.model_name:
            raise ApiError(
                f"The model `{m}` does not exist; this server serves `{self.model_name}`",
                "model",
                404,
                code="model_not_found",
            )
        return self.model_name

    def policy(self, spec):
        if spec is None:
            return self.default_policy
        if isinstance(spec, str):
            name, kw = spec, {}
        elif isinstance(spec, dict):
            kw = dict(spec)
            name = kw.pop("policy", None)
            if not isinstance(name, str):
                raise ApiError("'kv' must name its policy: {\"policy\": NAME, knob: value, ...}", "kv.policy")
        else:
            raise ApiError(f"'kv' must be a policy name or an object, got {json.dumps(spec)}", "kv")
        key = json.dumps([name, kw], sort_keys=True)
        if key not in self._policies:
            try:  # the model's own checks of it come with the prompt (_check)
                pol = refreekv.make(name, **kw)
            except UserError as e:
                raise ApiError(str(e), "kv") from None
            if pol.interval and pol.interval < MIN_INTERVAL:  # the engine thread is everyone's
                raise ApiError(
                    f"'kv.interval' must be 0 or at least {MIN_INTERVAL} on this server, got {pol.interval}",
                    "kv.interval",
                )
            if len(self._policies) >= 256:
                self._policies.pop(next(iter(self._policies)))
            self._policies[key] = pol
        return self._policies[key]

    def _unsupported(self, body):
        for name in IGNORED_ZERO:
            if body.get(name) not in (None, 0, 0.0):
                raise ApiError(f"'{name}' is not supported (only 0)", name)
        if body.get("logit_bias"):
            raise ApiError("'logit_bias' is not supported", "logit_bias")
        if body.get("best_of") not in (None, 1) and body.get("best_of") != body.get("n", 1):
            raise ApiError("'best_of' is not supported (only equal to n)", "best_of")
        if body.get("suffix") not in (None, ""):
            raise ApiError("'suffix' is not supported", "suffix")
        if body.get("response_format") not in (None, {"type": "text"}):
            raise ApiError("'response_format' is not supported (only text)", "response_format")
        if body.get("tools"):
            raise ApiError("'tools' is not supported", "tools")

    def _stops(self, body):
        stop = body.get("stop")
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or any(not isinstance(s, str) for s in stop):
            raise ApiError(f"'stop' must be a string or a list of strings, got {_shown(stop)}", "stop")
        return [s for s in stop if s]  # an empty stop string matches nothing (as OpenAI treats it)

    def _sampling(self, body, prompt_len: int, max_name: str, default_max, logprobs, prompt_logprobs):
        ctx = self.eng.context
        room = ctx - prompt_len
        if room < 1 or prompt_len > ctx:
            raise ApiError(
                f"the prompt has {prompt_len} tokens but the context is {ctx} tokens (prompt + "
                "max_tokens must fit)",
                "messages" if max_name == "max_completion_tokens" else "prompt",
                code="context_length_exceeded",
            )
        mt = (
            body.get(max_name, body.get("max_tokens")) if max_name != "max_tokens" else body.get("max_tokens")
        )
        least = 0 if prompt_logprobs is not None else 1
        if mt is None:
            mt = min(room, self.max_tokens) if default_max is None else min(default_max, room)
            mt = min(mt, self.eng.max_new_fitting(prompt_len))  # unasked: what the pool can hold
        else:
            mt = _int({max_name: mt}, max_name, None, least, None)
            if mt > self.max_tokens:
                raise ApiError(
                    f"'{max_name}' is {mt}; this server allows at most {self.max_tokens}", max_name
                )
            if prompt_len + mt > ctx:
                raise ApiError(
                    f"the prompt has {prompt_len} tokens and {max_name} is {mt}, but the context is "
                    f"{ctx} tokens: {prompt_len} + {mt} > {ctx}",
                    max_name,
                    code="context_length_exceeded",
                )
        top_k = _int(body, "top_k", 0, -1, self.eng.config.vocab_size)
        s = Sampling(
            max_new_tokens=mt,
            temperature=_number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
            top_k=max(0, top_k),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            seed=_int(body, "seed", None, -(2**63), 2**64 - 1),
            stop=self._stops(body),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        return s

    def _check(self, ids, s, policy, param):
        """The engine's own check of the whole request (Engine.check_request), as a 400 naming the
        field: a sampling setting by its name, the policy as kv, the pool fit as `param`."""
        try:
            self.eng.check_request(ids, [policy], s)
        except UserError as e:
            part = getattr(e, "part", None)
            if part == "sampling":
                raise ApiError(str(e), str(e).split(" ", 1)[0]) from None
            if part == "policy":
                raise ApiError(str(e), "kv") from None
            if part == "ids":
                raise ApiError(str(e), "prompt") from None
            msg = str(e).replace("max_new_tokens", param)
            raise ApiError(f"this request could never fit the KV pool: {msg}", param) from None

    def completion(self, body: dict) -> Job:
        model = self._model(body)
        self._unsupported(body)
        n = _int(body, "n", 1, 1, MAX_N)
        echo, stream = _bool(body, "echo"), _bool(body, "stream")
        lp = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
        if "prompt" not in body:
            raise ApiError("'prompt' is required", "prompt")
        prompts = self._prompts(body["prompt"])
        if len(prompts) * n > self.max_choices:
            raise ApiError(
                f"'prompt' holds {len(prompts)} prompts and n is {n}: {len(prompts) * n} sequences; this "
                f"server takes at most {self.max_choices} per request",
                "prompt",
            )
        policy = self.policy(body.get("kv"))
        job = Job(False, model, [], stream, echo, lp, self._usage_opt(body, stream))
        for i, p in enumerate(prompts):
            ids = self.eng.tokenizer.encode(p) if isinstance(p, str) else p
            s = self._sampling(
                body,
                len(ids),
                "max_tokens",
                16,
                lp,
                lp if echo and lp is not None else (0 if echo and body.get("max_tokens") == 0 else None),
            )
            self._check(ids, s, policy, "max_tokens")  # token ids included: then they decode
            text = p if isinstance(p, str) else (self.eng.tokenizer.decode(p) if echo else "")
            for j in range(n):
                sj = (
                    s
                    if j == 0 or s.seed is None
                    else Sampling(**{**s.__dict__, "seed": (s.seed + j) % 2**64})
                )
                job.choices.append(Choice(i * n + j, ids, sj, policy, text))
        return job

    def _prompts(self, prompt):
        err = ApiError(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists",
            "prompt",
        )
        if isinstance(prompt, str):
            prompt = [prompt]
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise ApiError("'prompt' must not be empty", "prompt") if prompt == [] else err
        for p in prompt:
            if isinstance(p, str):
                if not p:
                    raise ApiError("'prompt' holds an empty string", "prompt")
                _text(p, "prompt")
            elif not (
                isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            ):
                raise err
        return prompt

    def _usage_opt(self, body, stream):
        so = body.get("stream_options")
        if so is None:
            return False
        if not isinstance(so, dict):
            raise ApiError("'stream_options' must be an object", "stream_options")
        if not stream:
            raise ApiError("'stream_options' is only allowed with stream: true", "stream_options")
        return _bool(so, "include_usage")

    def chat(self, body: dict) -> Job:
        model = self._model(body)
        self._unsupported(body)
        n = _int(body, "n", 1, 1, MAX_N)
        stream = _bool(body, "stream")
        want = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
        if top is not None and not want:
            raise ApiError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError("'messages' must be a non-empty list of {role, content} objects", "messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in (
                "system",
                "user",
                "assistant",
                "developer",
                "tool",
            ):
                raise ApiError(
                    f"messages[{i}] must be an object with a role of system, user, assistant, developer "
                    "or tool",
                    f"messages[{i}].role",
                )
            c = m.get("content")
            if isinstance(c, list):  # content parts: text only
                if not all(
                    isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                    for p in c
                ):
                    raise ApiError(
                        f"messages[{i}].content: only text parts are supported", f"messages[{i}].content"
                    )
                c = "".join(p["text"] for p in c)
            if not isinstance(c, str):
                raise ApiError(
                    f"messages[{i}].content must be a string or a list of text parts",
                    f"messages[{i}].content",
                )
            _text(c, f"messages[{i}].content")
            clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": c})
        if self.eng.tokenizer.chat_template is None:
            raise ApiError("this model has no chat template: use /v1/completions", "messages")
        try:
            text = self.eng.tokenizer.apply_messages(clean)
        except UserError as e:
            raise ApiError(str(e), "messages") from None
        ids = self.eng.tokenizer.encode(text, special=False)
        policy = self.policy(body.get("kv"))
        job = Job(True, model, [], stream, False, (top or 0) if want else None, self._usage_opt(body, stream))
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        s = self._sampling(body, len(ids), name, None, job.logprobs, None)
        self._check(ids, s, policy, name)
        for j in range(n):
            sj = s if j == 0 or s.seed is None else Sampling(**{**s.__dict__, "seed": (s.seed + j) % 2**64})
            job.choices.append(Choice(j, ids, sj, policy))
        return job
