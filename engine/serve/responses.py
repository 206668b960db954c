"""OpenAI API responses: completion and chat-completion bodies, stream chunks and their logprobs,
shaped from the core's Results for the Jobs engine/serve/schema.py parsed (the server and run_batch)."""

from engine.serve.schema import Job


def kv_stats(result) -> dict:
    st = result.stats
    return {
        k: st.get(k)
        for k in (
            "policy",
            "budget",
            "prompt_tokens",
            "pages_after_prefill",
            "pages_after_pruning",
            "prefill_chunks",
            "cached_tokens",
            "preempted",
            "kept_per_head",
            # pruning during decoding ("interval" / "on_pressure" in the kv object)
            "replans",
            "final_kept",
            "final_seen",
            "peak_pages",
        )
        if k in st or k in ("policy", "budget", "prompt_tokens")
    }


def completion_logprobs(tok, entries, start: int = 0) -> dict:
    """OpenAI's legacy completions logprobs from (token, logprob, {token: logprob}) entries:
    tokens, token_logprobs, top_logprobs, text_offset (an echoed first token: null, null); offsets
    count from `start` (a stream's later chunks go on from where the earlier ones ended)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = start
    for t, lp, top in entries:
        s = tok.decode([t])
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
        token_lps.append(lp)
        tops.append(None if top is None else {tok.decode([k]): v for k, v in top.items()})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tok, entries) -> dict:
    def one(t, lp):  # bytes: the token's own (part of a character, where it splits one)
        return {"token": tok.decode([t]), "logprob": lp, "bytes": list(tok.token_bytes(t))}

    return {
        "content": [
            dict(one(t, lp), top_logprobs=[one(k, v) for k, v in top.items()]) for t, lp, top in entries
        ]
    }


def completion_tokens(r) -> int:
    """Tokens a sequence generated, an ending EOS included (as OpenAI and vLLM count them)."""
    return len(r.tokens) + bool(r.stats.get("eos"))


def prompt_tokens(job: Job) -> int:
    """Each prompt's tokens once, however many choices (n) it has."""
    return sum(len(c.prompt) for c in job.choices if c.index % max(1, _n(job)) == 0)


def response(job: Job, results: dict, tok) -> dict:
    """The whole (non-streamed) body: results[index] is each choice's Result."""
    choices, completion = [], 0
    prompt = prompt_tokens(job)
    for c in job.choices:
        r = results[c.index]
        completion += completion_tokens(r)
        if job.chat:
            ch = {
                "index": c.index,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": chat_logprobs(tok, r.logprobs) if job.logprobs is not None else None,
                "finish_reason": r.finish_reason,
            }
        else:
            text = (c.prompt_text if job.echo else "") + r.text
            lp = None
            if job.logprobs is not None:
                lp = completion_logprobs(tok, (r.prompt_logprobs if job.echo else []) + (r.logprobs or []))
            ch = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": r.finish_reason}
        ch["kv"] = kv_stats(r)
        choices.append(ch)
    return {
        "id": ("chatcmpl-" if job.chat else "cmpl-") + job.id,
        "object": "chat.completion" if job.chat else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def _n(job: Job) -> int:
    """Choices per prompt."""
    prompts = {id(c.prompt) for c in job.choices}
    return len(job.choices) // max(1, len(prompts))


def chunk(
    job: Job,
    index: int,
    text: str,
    finish: str | None = None,
    lps=None,
    kv: dict | None = None,
    role: bool = False,
) -> dict:
    """One streamed chunk for one choice."""
    if job.chat:
        delta = (
            {"role": "assistant", "content": text}
            if role
            else ({"content": text} if text or not finish else {})
        )
        ch = {"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish}
    else:
        ch = {"index": index, "text": text, "logprobs": lps, "finish_reason": finish}
    if kv is not None:
        ch["kv"] = kv
    return {
        "id": ("chatcmpl-" if job.chat else "cmpl-") + job.id,
        "object": "chat.completion.chunk" if job.chat else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": [ch],
    }


def usage_chunk(job: Job, prompt_tokens: int, completion: int) -> dict:
    return {
        "id": ("chatcmpl-" if job.chat else "cmpl-") + job.id,
        "object": "chat.completion.chunk" if job.chat else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        },
    }
