"""What the command line shows and writes besides the text: each prompt's stats line, a batch's
progress and a long CPU prefill's, and the --stats-json / --output-jsonl files."""

import json
import sys
import time

from engine.cli import say

PREFILL_NOTE = 2048  # prompt tokens in one prefill past which the CLI says it is prefilling (CPU)
PROGRESS_S = 5.0  # a batch's progress line at most this often when stderr is not a terminal


def summary(st: dict, per_rank: bool = False) -> str:
    line = (
        f"prompt {st['prompt_tokens']} tok | KV budget {100 * st['budget']:.1f}% | "
        f"pages {st['pages_after_prefill']} -> {st['pages_after_pruning']}"
        f"{' per rank' if per_rank else ''} | "
        f"prefill {st['prefill_s'] * 1e3:.0f} ms{_chunks(st)} | prune {st['prune_s'] * 1e3:.1f} ms | "
        f"{st['new_tokens']} new tok at {st['decode_tok_s']:.1f} tok/s"
    )
    if st.get("replans") and "final_kept" in st:
        kept, seen = st["final_kept"], st["final_seen"]
        line += (
            f" | decoding: {st['replans']} re-plans, kept {kept:.0f} of {seen} tok "
            f"({100 * kept / seen:.1f}%), peak {st['peak_pages']} pages"
        )
    return line


def _chunks(st: dict) -> str:
    n = st.get("prefill_chunks", 1)
    return f" in {n} chunks" if n > 1 else ""


class Progress:
    """A batch's progress on stderr: which prompts are done and tokens so far (a live line on a
    terminal, a line every few seconds otherwise)."""

    def __init__(self, n: int):
        self.n, self.done, self.tokens, self.last = n, 0, {}, time.monotonic()
        self.tty = sys.stderr.isatty()

    def token(self, i, text):
        self.tokens[i] = self.tokens.get(i, 0) + 1
        self.show()

    def finish(self, i):
        self.done += 1
        self.show(force=not self.tty)

    def show(self, force=False):
        now = time.monotonic()
        if not force and now - self.last < (0.2 if self.tty else PROGRESS_S):
            return
        self.last = now
        line = f"{self.done}/{self.n} prompts done, {sum(self.tokens.values())} tokens so far"
        print(
            f"\r{line}\033[K" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True
        )

    def clear(self):
        if self.tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


class PrefillNote:
    """A line when a CPU prefill of more than PREFILL_NOTE prompt tokens starts (prompts prefilled
    whole or in chunks), then one every few seconds and one at its end."""

    def __init__(self):
        self.t0 = self.last = 0.0

    def __call__(self, done, layers, tokens, before=0, chunk=None):
        """After layer `done` of `layers` of a forward over `chunk` tokens of prompts of `tokens`
        tokens in all, `before` of them prefilled by earlier forwards."""
        if tokens <= PREFILL_NOTE:
            return
        chunk = tokens - before if chunk is None else chunk
        now = time.monotonic()
        if done == 1 and before == 0:
            self.t0 = self.last = now
            say(f"prefilling {tokens} prompt tokens on the CPU ({layers} layers): the first text follows it")
        elif now - self.last > PROGRESS_S or (done == layers and before + chunk == tokens):
            self.last = now
            say(f"prefill: {before + chunk * done // layers}/{tokens} tokens in {now - self.t0:.0f} s")


def write_outputs(a, results: list):
    """--stats-json and --output-jsonl (finished prompts only, after an interrupt); a failing write
    is one line, and the text already printed stays."""
    rows = [
        dict(r.stats, text=r.text, finish_reason=r.finish_reason) if r is not None else None for r in results
    ]
    if a.stats_json:
        kept = [x for x in rows if x is not None]
        _write(
            a.stats_json,
            json.dumps(kept[0] if len(results) == 1 and kept else kept, indent=1),
            "--stats-json",
        )
    if a.output_jsonl:
        lines = [
            json.dumps(
                {
                    "prompt": i,
                    "text": r.text,
                    "tokens": r.tokens,
                    "finish_reason": r.finish_reason,
                    "stats": r.stats,
                }
            )
            for i, r in enumerate(results)
            if r is not None
        ]
        _write(a.output_jsonl, "".join(x + "\n" for x in lines), "--output-jsonl")


def _write(path, text, flag):
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        say(f"error: {flag} {path} could not be written ({e.strerror}); the text above is complete")
