"""What two hostile requests cost the server's engine thread and memory, before and after the fixes
of the hostile-requests issue: a long stop string (the held-back-prefix scan on every token) and a
stalled stream reader (what waits in its queue).

    python -m bench.hostile --tokens 8000 --results-md bench/RESULTS.md

Stop scan: a sequence's text grows by the characters of real tokens (CPython's documentation,
tokenized by the model); after each token the server finds stop strings in the new text and the
tail it must hold back. "before" is the scan as it was (kept here, verbatim, as `stop_prefix_before`:
every tail length up to the longest stop, each compared in full), with the 1 MB stop string it then
accepted; "after" is engine/sampling.py's scan with a stop at today's cap (256 characters). Median
microseconds per token at two output lengths.

Stalled reader: the model generates --tokens tokens (teacher-forced on real text, so the text is
real) through the step-driven core; a stream whose client reads nothing keeps every update in its
queue. "before": each update carried the whole text so far (as engine/core.py's Update did);
"after": the server's Piece carries only the new text (engine/serve/streams.py). Bytes held by those
strings (sys.getsizeof), summed over the queue.
"""

import argparse
import datetime
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import refreekv
from bench.common import append_results, git_commit, log
from engine.sampling import Sampling
from engine.tokenizer import find_stop, stop_prefix


def stop_prefix_before(text: str, stops: list[str]) -> int:
    """The scan before the fix (commit ddaa370's engine/sampling.py)."""
    return next(
        (
            k
            for k in range(min(len(text), max(map(len, stops), default=1) - 1), 0, -1)
            if any(st.startswith(text[-k:]) for st in stops)
        ),
        0,
    )


def scan_us(pieces: list[str], stops: list[str], scan, upto: int, reps: int = 200) -> float:
    """Median µs of one token's scan (find_stop on the new text + the held-back tail) once the
    text holds `upto` characters."""
    text = ""
    for p in pieces:
        if len(text) >= upto:
            break
        text += p
    times = []
    for p in pieces[:reps]:
        before = len(text)
        grown = text + p
        t0 = time.perf_counter()
        find_stop(grown, stops, before)
        scan(grown, stops)
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def stalled(eng, ids: list[int], forced: list[int]) -> dict:
    core = eng.core
    core.add_request(ids, refreekv.make("full"), Sampling(max_new_tokens=len(forced)), forced=forced)
    before = after = n = 0
    sent = 0
    while core.busy():
        for u in core.step():
            n += 1
            before += sys.getsizeof(u.text)  # the whole text so far, as each update used to carry
            after += sys.getsizeof(u.delta(sent))  # the server's Piece: the new text only
            sent = u.shown
            final = u.text
    return dict(updates=n, chars=len(final), before_mib=before / 2**20, after_mib=after / 2**20)


def real_text(n_chars: int) -> str:
    """Real English prose nobody here wrote: CPython's bundled documentation topics."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))[:n_chars]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, default=8000, help="tokens of the stalled stream")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results-md")
    a = p.parse_args(argv)
    import torch

    from engine.engine import Engine

    torch.set_num_threads(a.threads)
    eng = Engine(a.model, device="cpu", kv_memory=1.0, max_seqs=1)
    eng.eos = set()
    ids = eng.tokenizer.encode(real_text(4 * (a.tokens + 64)), special=False)
    pieces = [eng.tokenizer.decode([t]) for t in ids[: a.tokens]]
    long_stop, capped = ["\x00" + "a" * (2**20 - 1)], ["\x00" + "a" * 255]
    rows = []
    for upto in (1000, 32000):
        b = scan_us(pieces, long_stop, stop_prefix_before, upto, reps=20)
        f = scan_us(pieces, capped, stop_prefix, upto)
        f_long = scan_us(pieces, long_stop, stop_prefix, upto, reps=20)
        rows.append((upto, b, f, f_long))
        log(f"[hostile] scan at {upto} chars: before {b:.0f} us, after {f:.1f} us ({f_long:.1f} us at 1 MB)")
    log(f"[hostile] stalled reader: {a.tokens} tokens through the core ...")
    st = stalled(eng, ids[:8], ids[8 : 8 + a.tokens])
    table = (
        "| output so far | before: 1 MB stop, old scan | after: 256-char stop (the cap) "
        "| new scan, 1 MB stop |\n"
        "| --- | --- | --- | --- |\n"
        + "".join(
            f"| {u:,} chars | {b:,.0f} µs/token | {f:.1f} µs/token | {fl:.1f} µs/token |\n"
            for u, b, f, fl in rows
        )
        + f"\n| stalled stream, {a.tokens:,} tokens ({st['chars']:,} chars, {st['updates']:,} updates) | "
        "held in its queue |\n| --- | --- |\n"
        f"| before: each update carries the text so far | {st['before_mib']:.1f} MiB |\n"
        f"| after: each update carries its new text | {st['after_mib']:.2f} MiB |\n"
    )
    print(table)
    if a.results_md:
        head = (
            f"## Hostile requests: the stop-string scan and a stalled reader, before / after "
            f"({datetime.date.today()}, CPU)\n\n"
            f"CPU ({platform.processor() or 'x86'}, {a.threads} thread), {a.model}, commit {git_commit()}, "
            f"`python -m bench.hostile {shlex.join(sys.argv[1:] if argv is None else argv)}`\n\n"
        )
        append_results(Path(a.results_md), head + table)


if __name__ == "__main__":
    main()
