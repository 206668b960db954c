"""Quality benchmark: ReFreeKV (threshold T) against full cache and fixed-budget pruning.

    python -m bench.quality --model smollm2-135m-instruct --n 8 --prompt-tokens 1024
    python -m bench.quality --model ./Qwen2.5-7B-Instruct --device cuda --n 50 --prompt-tokens 4096

Task families (all generated from --seed; material is real text and code nobody here wrote):
  text        fidelity: a long prompt cut from Python's documentation (pydoc_data.topics), then the
              next --fidelity-tokens real tokens teacher-forced through the pruned cache.
              Score: top-1 agreement with the full cache (%); also KL(full || pruned), perplexity.
  code        the same on CPython standard-library source files (inspect.getsourcefile).
  retrieval   RULER-style: a passkey / magic number inserted at 10%, 50% or 90% depth of a long
              real text, asked for at the end. Score: exact match (answer contained in the output, %).
  arithmetic  generated multi-step word problems with known integer answers, few-shot chain-of-thought
              (worked examples of the same problem kind fill the prompt, GSM8K-style), greedy; the last
              integer of the output is the answer. Score: accuracy (%).
  summary     summarise / explain / answer over a real document (docs or code). Score: ROUGE-L F1
              (word tokens) of the greedy output against the full-cache output (full = 100).

Every generative family also reports agreement with the full-cache output (ROUGE-L F1 and the share
of outputs identical to it), and every cell carries the mean KV budget the policy kept (prompt
tokens kept / prompt tokens, averaged over layers, as the engine's stats).

Policies: full; refreekv at --threshold; every other registered policy named in --policies at each
of --budgets; ReFreeKV again at every --sweep threshold. A policy that is not registered is
skipped with a note. One prefill per batch is shared by all policies: the probe is captured with
the widest window any policy asks for (a policy needing w rows sees the last w of them, which is
exactly what a prefill with probe_rows = w returns), the store is cloned per policy, planned and
compacted with the engine's own calls (Transformer.prefill -> Policy.plan(Probe) ->
RaggedKV.compact -> Transformer.decode), as Generator.generate does.

Outputs: a section appended to --results-md (default bench/RESULTS.md), a JSON file and two PNG
plots in --out (default bench/results/).
"""
import argparse
import copy
import datetime
import importlib
import inspect
import json
import math
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import refreekv
from weights.errors import UserError

FAMILIES = ("text", "code", "retrieval", "arithmetic", "summary")
FIDELITY = ("text", "code")
METRIC = {"text": "top-1 agree %", "code": "top-1 agree %", "retrieval": "passkey EM %",
          "arithmetic": "accuracy %", "summary": "ROUGE-L vs full"}
THRESHOLD_POLICIES = ("refreekv", "refreekv-h2o")
DEPTHS = (0.1, 0.5, 0.9)
ROOT = Path(__file__).resolve().parent.parent

# Pure-Python standard-library modules whose source is the code material (fixed list, sorted).
CODE_MODULES = sorted([
    "argparse", "ast", "asyncio.base_events", "bisect", "calendar", "collections", "configparser", "contextlib",
    "csv", "dataclasses", "datetime", "difflib", "email.message", "enum", "fractions", "ftplib", "functools",
    "gettext", "heapq", "http.client", "imaplib", "inspect", "ipaddress", "json.decoder", "json.encoder",
    "logging", "mailbox", "pathlib", "pickle", "pprint", "queue", "random", "shutil", "smtplib", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize", "traceback", "typing",
    "urllib.parse", "uuid", "zipfile",
])


# ---------------------------------------------------------------------------------------------
# Material and task generation
# ---------------------------------------------------------------------------------------------

def doc_corpus() -> str:
    """Python's own documentation topics (pydoc_data.topics), concatenated in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def code_sources() -> list[tuple[str, str]]:
    """(module, source) for the stdlib modules in CODE_MODULES whose source is on disk."""
    out = []
    for name in CODE_MODULES:
        try:
            path = inspect.getsourcefile(importlib.import_module(name))
            if path and os.path.isfile(path):
                out.append((name, Path(path).read_text(encoding="utf-8", errors="replace")))
        except Exception:  # a stripped-down Python: use what exists
            continue
    if not out:
        raise UserError("no standard-library source files found (the code families need them)")
    return out


def paragraph_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in re.finditer(r"\n\s*\n", text)]


def line_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in re.finditer(r"\n", text)]


@dataclass
class Task:
    family: str
    ids: list[int]  # prompt token ids
    target: list[int] | None = None  # fidelity: the real continuation
    answer: str | None = None  # retrieval / arithmetic: the known answer
    meta: dict = field(default_factory=dict)


class Material:
    """Cuts real text / code into token windows with the model's tokenizer."""

    def __init__(self, g):
        self.g = g
        self.docs = doc_corpus()
        self.doc_starts = paragraph_starts(self.docs)
        self.code = code_sources()

    def tok(self, text):
        return self.g.tokenizer.encode(text, special=False)

    def detok(self, ids):
        return self.g.tokenizer.decode(ids).rstrip("\ufffd")

    def window(self, text: str, start: int, n_tokens: int, special: bool = False) -> list[int] | None:
        """n_tokens ids of text[start:], or None when the text runs out first."""
        chars = 6 * n_tokens + 64
        while True:
            chunk = text[start:start + chars]
            ids = self.g.tokenizer.encode(chunk, special=special) if special else self.tok(chunk)
            if len(ids) >= n_tokens + 2:  # +2: the last token of a cut chunk may be a partial word
                return ids[:n_tokens]
            if start + chars >= len(text):
                return None
            chars *= 2

    def doc_text(self, rng: random.Random, n_tokens: int) -> tuple[str, dict]:
        """About n_tokens of documentation prose starting at a random paragraph."""
        for _ in range(100):
            s = rng.choice(self.doc_starts)
            ids = self.window(self.docs, s, n_tokens)
            if ids is not None:
                return self.detok(ids), {"source": "pydoc_data.topics", "char": s}
        raise UserError(f"documentation corpus too short for {n_tokens} tokens")

    def code_text(self, rng: random.Random, n_tokens: int) -> tuple[str, dict]:
        """About n_tokens of stdlib source starting at a random line of a random module."""
        for _ in range(200):
            name, src = rng.choice(self.code)
            starts = line_starts(src)
            s = rng.choice(starts[: max(1, len(starts) // 2)])
            ids = self.window(src, s, n_tokens)
            if ids is not None:
                return self.detok(ids), {"source": name, "char": s}
        raise UserError(f"no standard-library file long enough for {n_tokens} tokens")


def fidelity_tasks(m: Material, family, rng, n, prompt_tokens, cont_tokens) -> list[Task]:
    """Raw (no chat template) context + real continuation, both in tokens of the model."""
    tasks, seen = [], set()
    for _ in range(50 * n):
        if len(tasks) == n:
            break
        if family == "text":
            text, src = m.docs, "pydoc_data.topics"
            s = rng.choice(m.doc_starts)
        else:
            src, text = rng.choice(m.code)
            starts = line_starts(text)
            s = rng.choice(starts[: max(1, len(starts) // 2)])
        if (src, s) in seen:
            continue
        ids = m.window(text, s, prompt_tokens + cont_tokens, special=True)
        if ids is None:
            continue
        seen.add((src, s))
        tasks.append(Task(family, ids[:prompt_tokens], target=ids[prompt_tokens:],
                          meta={"source": src, "char": s}))
    if len(tasks) < n:
        raise UserError(f"could not cut {n} windows of {prompt_tokens + cont_tokens} tokens for {family}")
    return tasks


def insert_at(text: str, depth: float, needle: str) -> str:
    """Insert needle at the sentence / line boundary nearest depth * len(text)."""
    target = int(depth * len(text))
    cands = [0, len(text)] + [mm.end() for mm in re.finditer(r"(?<=[.!?:])\s+|\n", text)]
    at = min(cands, key=lambda c: abs(c - target))
    return text[:at].rstrip(" ") + ("\n" if at and not text[:at].endswith("\n") else "") + needle + "\n" + text[at:].lstrip(" ")


WORDS = ["amber", "basil", "cedar", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper",
         "kestrel", "lantern", "meadow", "nectar", "orchid", "pepper", "quartz", "raven", "saffron", "tundra"]


def retrieval_tasks(m: Material, rng, n, prompt_tokens) -> list[Task]:
    tasks = []
    for i in range(n):
        depth = DEPTHS[i % len(DEPTHS)]
        key = str(rng.randint(10000, 99999))
        if i % 2 == 0:
            needle = f"The secret passkey is {key}. Remember it. {key} is the passkey."
            intro = "There is a secret passkey hidden inside the following text. Find it and remember it."
            q = "What is the secret passkey hidden in the text above? Answer with the number only."
            kind = "passkey"
        else:
            word = rng.choice(WORDS)
            needle = f"One of the special magic numbers for {word} is: {key}."
            intro = "A special magic number is hidden inside the following text. Memorize it."
            q = f"What is the special magic number for {word} mentioned in the text above? Answer with the number only."
            kind = f"magic:{word}"
        overhead = len(m.tok(intro + needle + q)) + 24
        hay, src = m.doc_text(rng, max(16, prompt_tokens - overhead))
        content = f"{intro}\n\n{insert_at(hay, depth, needle)}\n\n{q}"
        tasks.append(Task("retrieval", m.g.encode(content), answer=key,
                          meta={"depth": depth, "kind": kind, **src}))
    return tasks


NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemi", "Liam", "Maya",
         "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara"]


def word_problem(rng: random.Random, t: int | None = None) -> tuple[str, list[str], int, int]:
    """A multi-step word problem of template t (random if None): (question, worked steps, answer, t)."""
    name = rng.choice(NAMES)
    t = rng.randrange(5) if t is None else t
    q, s, ans = _problem(rng, name, t)
    return q, s, ans, t


def _problem(rng, name, t):
    if t == 0:
        a, b, c, d = rng.randint(5, 40), rng.randint(2, 6), rng.randint(3, 12), rng.randint(1, 20)
        q = (f"{name} has {a} marbles. {name} buys {b} bags with {c} marbles in each bag, then gives {d} marbles "
             f"to a friend. How many marbles does {name} have now?")
        s = [f"The bags hold {b} * {c} = {b * c} marbles.", f"After buying: {a} + {b * c} = {a + b * c}.",
             f"After giving {d} away: {a + b * c} - {d} = {a + b * c - d}."]
        return q, s, a + b * c - d
    if t == 1:
        per, hours, days, spent = rng.randint(8, 25), rng.randint(2, 8), rng.randint(2, 6), rng.randint(5, 60)
        q = (f"{name} earns {per} dollars per hour and works {hours} hours a day for {days} days. Then {name} "
             f"spends {spent} dollars on a gift. How many dollars does {name} have left?")
        s = [f"Per day: {per} * {hours} = {per * hours} dollars.", f"In {days} days: {per * hours} * {days} = {per * hours * days}.",
             f"After the gift: {per * hours * days} - {spent} = {per * hours * days - spent}."]
        return q, s, per * hours * days - spent
    if t == 2:
        boxes, each, sold, k = rng.randint(3, 9), rng.randint(6, 15), rng.randint(2, 20), rng.randint(2, 5)
        total = boxes * each
        sold = min(sold, total - 1)
        left = total - sold
        left -= left % k
        sold = total - left
        q = (f"A shop has {boxes} boxes with {each} pens in each box. It sells {sold} pens and shares the rest "
             f"equally among {k} classrooms. How many pens does each classroom get?")
        s = [f"Pens: {boxes} * {each} = {total}.", f"After selling: {total} - {sold} = {left}.",
             f"Each classroom: {left} / {k} = {left // k}."]
        return q, s, left // k
    if t == 3:
        price, n1, n2, paid = rng.randint(2, 9), rng.randint(2, 8), rng.randint(2, 8), 0
        cost = price * (n1 + n2)
        paid = cost + rng.randint(1, 30)
        q = (f"Apples cost {price} dollars each. {name} buys {n1} apples on Monday and {n2} apples on Tuesday, "
             f"and pays with {paid} dollars. How much change does {name} get?")
        s = [f"Apples: {n1} + {n2} = {n1 + n2}.", f"Cost: {n1 + n2} * {price} = {cost}.",
             f"Change: {paid} - {cost} = {paid - cost}."]
        return q, s, paid - cost
    start, grow, weeks, eaten = rng.randint(10, 50), rng.randint(3, 12), rng.randint(2, 6), rng.randint(1, 9)
    q = (f"A garden has {start} flowers. Every week {grow} new flowers bloom and rabbits eat {eaten} flowers. "
         f"How many flowers are in the garden after {weeks} weeks?")
    s = [f"Net change per week: {grow} - {eaten} = {grow - eaten}.",
         f"Over {weeks} weeks: {grow - eaten} * {weeks} = {(grow - eaten) * weeks}.",
         f"Total: {start} + {(grow - eaten) * weeks} = {start + (grow - eaten) * weeks}."]
    return q, s, start + (grow - eaten) * weeks


def arithmetic_tasks(m: Material, rng, n, prompt_tokens) -> list[Task]:
    tasks = []
    for _ in range(n):
        q, _, ans, kind = word_problem(rng)
        head = "Solve the math word problems. Think step by step and end with 'The answer is N.'\n\n"
        tail = f"Question: {q}\nAnswer:"
        shots, used = [], len(m.tok(head + tail)) + 24
        while True:  # few-shot worked examples up to about prompt_tokens (none if even one does not fit)
            eq, es, ea, _ = word_problem(rng, kind)  # worked examples of the same kind, GSM8K-style CoT shots
            shot = f"Question: {eq}\nAnswer: {' '.join(es)} The answer is {ea}.\n\n"
            k = len(m.tok(shot))
            if used + k > prompt_tokens:
                break
            shots.append(shot)
            used += k
        tasks.append(Task("arithmetic", m.g.encode(head + "".join(shots) + tail), answer=str(ans),
                          meta={"question": q, "template": kind, "shots": len(shots)}))
    return tasks


SUMMARY_ASKS = [
    ("doc", "Summarize the document above in three sentences."),
    ("code", "Explain what the code above does in three sentences."),
    ("doc", "Which Python statements, functions or rules does the document above describe? Answer briefly."),
]


def summary_tasks(m: Material, rng, n, prompt_tokens) -> list[Task]:
    tasks = []
    for i in range(n):
        kind, ask = SUMMARY_ASKS[i % len(SUMMARY_ASKS)]
        body_tokens = max(16, prompt_tokens - len(m.tok(ask)) - 24)
        body, src = m.doc_text(rng, body_tokens) if kind == "doc" else m.code_text(rng, body_tokens)
        tasks.append(Task("summary", m.g.encode(f"{body}\n\n{ask}"), meta={"ask": ask, **src}))
    return tasks


def make_tasks(g, family, n, seed, prompt_tokens, cont_tokens, m: Material) -> list[Task]:
    rng = random.Random(f"{seed}:{family}")
    if family in FIDELITY:
        return fidelity_tasks(m, family, rng, n, prompt_tokens, cont_tokens)
    return {"retrieval": retrieval_tasks, "arithmetic": arithmetic_tasks, "summary": summary_tasks}[family](
        m, rng, n, prompt_tokens)


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

def words(s: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", s.lower())


def lcs(a: list, b: list) -> int:
    """Longest common subsequence length, O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyp: str, ref: str) -> float:
    """ROUGE-L F1 over word tokens; 1.0 when both are empty."""
    h, r = words(hyp), words(ref)
    if not h and not r:
        return 1.0
    k = lcs(h, r)
    if k == 0:
        return 0.0
    p, rc = k / len(h), k / len(r)
    return 2 * p * rc / (p + rc)


def last_int(s: str) -> str | None:
    nums = re.findall(r"-?\d[\d,]*", s)
    return nums[-1].replace(",", "") if nums else None


# ---------------------------------------------------------------------------------------------
# Running policies on a shared prefill
# ---------------------------------------------------------------------------------------------

def ensure_rope(g, cap: int):
    """The Generator builds the rotary tables for its whole context; check they cover cap."""
    if cap > g.context:
        raise UserError(f"prompt + new tokens = {cap} exceed the context of {g.context} tokens")
    cos = getattr(g.model, "cos", None)
    if cos is None or cos.shape[0] < cap:
        g.model.setup_rope(g.context, g.device)


def clone_kv(kv):
    """An independent copy of a RaggedKV store (every tensor attribute cloned)."""
    new = copy.copy(kv)
    for k, v in vars(kv).items():
        if isinstance(v, torch.Tensor):
            setattr(new, k, v.clone())
    return new


@dataclass
class Prefilled:
    kv: object
    logits: torch.Tensor  # [B, V] last-prompt-token logits
    probe: torch.Tensor | None  # [L, B, H, w, N]
    lens: torch.Tensor
    width: int


def prefill(g, prompts: list[list[int]], probe_rows: int, new_tokens: int) -> Prefilled:
    """The first half of Generator.generate: right-padded batch, one RaggedKV, Transformer.prefill."""
    from engine.kv import RaggedKV

    c, dev, B = g.config, g.device, len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    N = int(lens.max())
    cap = N + new_tokens
    ensure_rope(g, cap)
    tokens = torch.zeros(B, N, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    kv = RaggedKV(c.n_layers, B, c.n_kv_heads, cap, c.head_dim, g.dtype, dev)
    logits, probe = g.model.prefill(tokens, lens, kv, probe_rows=probe_rows)
    return Prefilled(kv, logits, probe, lens, N)


def pruned(g, pf: Prefilled, policy):
    """Clone the prefilled store, plan with the policy's probe window and compact it.

    Returns (kv, kept fraction [B][L], evicted mass [B][L]): the share of the prompt each layer
    kept (mean over KV heads), and the share of the last prompt query's attention (mean over query
    heads, sinks included) that fell on evicted keys, a diagnostic of what the cut threw away."""
    c = g.config
    w = policy.probe_rows
    attn = None if not w else pf.probe[..., -w:, :].contiguous()
    keep = policy.plan(refreekv.Probe(attn, pf.lens, c.n_layers, c.n_kv_heads, pf.width))
    last = pf.probe[..., -1, :]  # [L, B, H, N]; zero on padding
    gone = (~keep).repeat_interleave(last.shape[2] // c.n_kv_heads, dim=2)
    evicted = (last * gone).sum(-1).mean(-1).T  # [B, L]
    kv = clone_kv(pf.kv)
    kv.compact(keep)
    frac = (kv.lengths.double().mean(-1) / pf.lens.double()[None]).T  # [B, L]
    return kv, frac.tolist(), evicted.tolist()


def teacher_forced(g, kv, first_logits, targets: torch.Tensor, full_lp: torch.Tensor | None):
    """Feed the real continuation targets [B, T] one token at a time through Transformer.decode.

    Position t scores targets[:, t] with the logits after targets[:, :t] (t = 0: the prefill's).
    Returns per-sequence mean NLL, and with full_lp ([B, T, V] full-cache log-probs) the top-1
    agreement and mean KL(full || this); without it the log-probs themselves (the reference)."""
    B, T = targets.shape
    base = kv.lengths.amax((1, 2))  # [L]
    logits = first_logits
    nll = torch.zeros(B, dtype=torch.float64)
    agree = torch.zeros(B, dtype=torch.float64)
    kl = torch.zeros(B, dtype=torch.float64)
    lps = []
    for t in range(T):
        lp = torch.log_softmax(logits.float(), -1)
        nll -= lp.gather(1, targets[:, t:t + 1])[:, 0].double().cpu()
        if full_lp is None:
            lps.append(lp)
        else:
            ref = full_lp[:, t]
            agree += (lp.argmax(-1) == ref.argmax(-1)).double().cpu()
            kl += (ref.exp() * (ref - lp)).sum(-1).clamp(min=0).double().cpu()
        if t < T - 1:  # eager decode: cloned stores would defeat compiled graphs' static addresses
            logits = g.model.decode(targets[:, t], kv, (base + t + 1).clamp(max=kv.capacity).tolist())
    out = {"nll": (nll / T).tolist()}
    if full_lp is None:
        return out, torch.stack(lps, 1)
    out.update(top1=(agree / T).tolist(), kl=(kl / T).tolist())
    return out, None


def greedy(g, kv, first_logits, max_new: int, stop: list[str]) -> list[list[int]]:
    """Greedy decoding from a compacted store, the decode half of Generator.generate at
    temperature 0 (same eos set, same stop-string rule: a row stops at its first stop string)."""
    B = first_logits.shape[0]
    out, done = [[] for _ in range(B)], [False] * B
    base = kv.lengths.amax((1, 2))  # [L]
    tok = first_logits.argmax(-1)
    for step in range(max_new):
        host = tok.tolist()
        for b in range(B):
            if done[b]:
                continue
            if host[b] in g.eos:
                done[b] = True
                continue
            out[b].append(host[b])
            if stop and any(x in g.tokenizer.decode(out[b]) for x in stop):
                done[b] = True
        if all(done) or step == max_new - 1:
            break
        tok = g.model.decode(tok, kv, (base + step + 1).clamp(max=kv.capacity).tolist()).argmax(-1)
    return out


def cut_stop(text: str, stop: list[str]) -> str:
    cut = min((text.find(x) for x in stop if x in text), default=-1)
    return text[:cut] if cut >= 0 else text


# ---------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------

@dataclass
class Spec:
    label: str
    name: str
    kwargs: dict
    kind: str  # full | threshold | budget | sweep
    value: float | None = None  # T or budget


def fmt_budget(b: float) -> str:
    return f"{b * 100:g}%" if b <= 1 else f"{int(b)} tok"


def policy_specs(names, budgets, threshold, sweep, variants=()) -> tuple[list[Spec], list[str]]:
    avail = refreekv.available()
    specs, notes = [], []
    for name in names:
        if name not in avail:
            notes.append(f"skipped {name}: not a registered KV policy (registered: {', '.join(avail)})")
            continue
        if name == "full":
            specs.append(Spec("full", name, {}, "full"))
        elif name in THRESHOLD_POLICIES:
            specs.append(Spec(f"{name} T={threshold:g}", name, {"threshold": threshold}, "threshold", threshold))
        else:
            for b in budgets:
                specs.append(Spec(f"{name} {fmt_budget(b)}", name, {"budget": b}, "budget", b))
    if "refreekv" in avail and "refreekv" in names:
        for t in sweep:
            if t != threshold:
                specs.append(Spec(f"refreekv T={t:g}", "refreekv", {"threshold": t}, "sweep", t))
    for name, kw in variants:
        if name not in avail:
            notes.append(f"skipped variant {name}: not a registered KV policy")
            continue
        label = name + " " + " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in kw.items())
        specs.append(Spec(label.strip(), name, dict(kw), "variant", kw.get("threshold", kw.get("budget"))))
    if not any(s.name == "full" for s in specs):
        specs.insert(0, Spec("full", "full", {}, "full"))  # the reference every score needs
    specs.sort(key=lambda s: s.name != "full")
    return specs, notes


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

class Progress:
    """One stderr line: a carriage-return bar on a terminal, plain lines in a log file."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.done, self.t0, self.quiet = total, 0, time.perf_counter(), quiet
        self.tty = sys.stderr.isatty()

    def show(self, what: str, advance: int = 0):
        self.done += advance
        if self.quiet:
            return
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done) if self.done else float("nan")
        w = 24
        fill = int(w * self.done / max(1, self.total))
        line = (f"[quality] [{'#' * fill}{'.' * (w - fill)}] {self.done}/{self.total} {_hms(el)} elapsed"
                f"{'' if math.isnan(eta) else ', ETA ' + _hms(eta)} | {what}")
        if self.tty:
            sys.stderr.write("\r" + line[:160].ljust(160))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.tty and not self.quiet:
            sys.stderr.write("\n")


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

def run_family(g, family, tasks, specs, policies, a, prog) -> list[dict]:
    """Every policy on every task of one family; returns one record per task."""
    probe_rows = max([1] + [p.probe_rows for p in policies])  # >= 1: the evicted-mass diagnostic reads the last row
    records = []
    fid = family in FIDELITY
    max_new = a.fidelity_tokens if fid else (min(a.max_new_tokens, a.retrieval_tokens) if family == "retrieval"
                                              else a.max_new_tokens)
    stop = ["\nQuestion:"] if family == "arithmetic" else []
    nb = math.ceil(len(tasks) / a.batch)
    for bi in range(nb):
        batch = tasks[bi * a.batch:(bi + 1) * a.batch]
        where = f"{family} batch {bi + 1}/{nb}"
        prog.show(f"{where}: prefill {len(batch)} x ~{max(len(t.ids) for t in batch)} tok")
        pf = prefill(g, [t.ids for t in batch], probe_rows, max_new)
        recs = [{"meta": t.meta, "prompt_tokens": len(t.ids), "answer": t.answer, "by_policy": {}} for t in batch]
        targets = torch.tensor([t.target for t in batch], device=g.device) if fid else None
        full_lp = None
        for spec, pol in zip(specs, policies):
            prog.show(f"{where}: {spec.label}")
            t0 = time.perf_counter()
            kv, frac, evicted = pruned(g, pf, pol)
            if fid:
                m, lp = teacher_forced(g, kv, pf.logits, targets, full_lp)
                if spec.kind == "full":
                    full_lp = lp
                    m["top1"], m["kl"] = [1.0] * len(batch), [0.0] * len(batch)
                for b, r in enumerate(recs):
                    r["by_policy"][spec.label] = {
                        "budget": sum(frac[b]) / len(frac[b]), "kept_per_layer": frac[b],
                        "evicted_per_layer": evicted[b], "score": 100 * m["top1"][b], "top1": m["top1"][b], "kl": m["kl"][b], "nll": m["nll"][b]}
            else:
                outs = greedy(g, kv, pf.logits, max_new, stop)
                for b, r in enumerate(recs):
                    text = cut_stop(g.tokenizer.decode(outs[b]), stop)
                    r["by_policy"][spec.label] = {"budget": sum(frac[b]) / len(frac[b]), "kept_per_layer": frac[b],
                                                  "evicted_per_layer": evicted[b], "output": text, "new_tokens": len(outs[b])}
            del kv
            for r in recs:
                r["by_policy"][spec.label]["seconds"] = (time.perf_counter() - t0) / len(batch)
            prog.show(f"{where}: {spec.label} done", advance=1)
        del pf, full_lp
        if not fid:
            for r in recs:
                ref = r["by_policy"]["full"]["output"]
                for label, d in r["by_policy"].items():
                    d["agree"] = 100 * rouge_l(d["output"], ref)
                    d["same"] = float(d["output"] == ref)
                    if family == "retrieval":
                        d["correct"] = float(r["answer"] in d["output"])
                    elif family == "arithmetic":
                        d["pred"] = last_int(d["output"])
                        d["correct"] = float(d["pred"] == r["answer"])
                    d["score"] = 100 * d["correct"] if "correct" in d else d["agree"]
        records.extend(recs)
    return records


def summarise(family, records, specs) -> dict:
    out = {}
    for spec in specs:
        rows = [r["by_policy"][spec.label] for r in records]
        n = len(rows)
        s = {"n": n, "score": sum(d["score"] for d in rows) / n, "budget": sum(d["budget"] for d in rows) / n,
             "budget_min": min(d["budget"] for d in rows), "budget_max": max(d["budget"] for d in rows),
             "kept_per_layer": [sum(col) / n for col in zip(*(d["kept_per_layer"] for d in rows))],
             "evicted_per_layer": [sum(col) / n for col in zip(*(d["evicted_per_layer"] for d in rows))],
             "seconds_per_sample": sum(d["seconds"] for d in rows) / n}
        s["evicted"] = _mean(s["evicted_per_layer"])
        if family in FIDELITY:
            s["kl"] = sum(d["kl"] for d in rows) / n
            s["ppl"] = math.exp(sum(d["nll"] for d in rows) / n)
        else:
            s["agree"] = sum(d["agree"] for d in rows) / n
            s["same"] = 100 * sum(d["same"] for d in rows) / n
        if family == "retrieval":
            s["by_depth"] = {str(dp): 100 * _mean([d["correct"] for r, d in zip(records, rows) if r["meta"]["depth"] == dp])
                             for dp in DEPTHS if any(r["meta"]["depth"] == dp for r in records)}
        out[spec.label] = s
    full = out["full"]["score"]
    for s in out.values():
        s["rel"] = s["score"] / full if full else None  # undefined when the full cache scores 0
    return out


def _mean(x):
    return sum(x) / len(x) if x else float("nan")


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

def git_commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(g) -> str:
    if str(g.device).startswith("cuda"):
        return f"{g.device} ({torch.cuda.get_device_name(torch.device(g.device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _cell(s) -> str:
    return f"{s['score']:.1f} [{100 * s['budget']:.0f}%]"


def markdown(res: dict) -> str:
    fams, specs = res["config"]["families"], res["policies"]
    main = [s for s in specs if s["kind"] != "sweep"]
    R = res["results"]
    L = [f"## Quality: {res['model']} ({res['date']})", "",
         f"- device: {res['device']}, dtype {res['dtype']}; torch {res['torch']}, Python {res['python']}",
         f"- git commit: `{res['commit']}`; runtime {_hms(res['runtime_s'])}",
         f"- command: `{res['command']}`",
         f"- model: `{res['model']}` ({res['model_path']})",
         f"- {res['config']['n']} samples per family, prompts ~{res['config']['prompt_tokens']} tokens "
         f"(mean per family below), seed {res['config']['seed']}; chat template: {res['chat']}"]
    L += [f"- note: {x}" for x in res["notes"]]
    L += ["", "Each cell: score [mean KV budget kept]. Scores: text/code = top-1 agreement with the full cache over "
          f"{res['config']['fidelity_tokens']} teacher-forced real tokens; retrieval = passkey exact match; arithmetic "
          "= accuracy; summary = ROUGE-L F1 against the full-cache output.", ""]
    L.append("| family (metric) | prompt tok | " + " | ".join(s["label"] for s in main) + " |")
    L.append("|---|---:|" + "---:|" * len(main))
    for f in fams:
        L.append(f"| {f} ({METRIC[f]}) | {res['prompt_tokens'][f]:.0f} | "
                 + " | ".join(_cell(R[f][s["label"]]) for s in main) + " |")
    L += ["", "Secondary metrics (fidelity: mean KL(full || pruned) nats/token and perplexity of the real "
          "continuation; generative: ROUGE-L vs the full-cache output / % of outputs identical to it):", ""]
    L.append("| family | " + " | ".join(s["label"] for s in main) + " |")
    L.append("|---|" + "---:|" * len(main))
    for f in fams:
        if f in FIDELITY:
            cells = [f"KL {R[f][s['label']]['kl']:.3f}, ppl {R[f][s['label']]['ppl']:.2f}" for s in main]
        else:
            cells = [f"{R[f][s['label']]['agree']:.1f} / {R[f][s['label']]['same']:.0f}%" for s in main]
        L.append(f"| {f} | " + " | ".join(cells) + " |")
    if "retrieval" in fams:
        L += ["", "Retrieval exact match by needle depth (%):", "",
              "| depth | " + " | ".join(s["label"] for s in main) + " |", "|---|" + "---:|" * len(main)]
        for dp in R["retrieval"]["full"]["by_depth"]:
            L.append(f"| {float(dp):.0%} | " + " | ".join(f"{R['retrieval'][s['label']]['by_depth'][dp]:.0f}"
                                                       for s in main) + " |")
    sweep = sorted((s for s in specs if s["name"] == "refreekv" and s["kind"] in ("threshold", "sweep")),
                   key=lambda s: s["value"])
    if sweep:
        L += ["", "ReFreeKV threshold sweep: score [mean budget] (budget range over samples):", "",
              "| family | " + " | ".join(f"T={s['value']:g}" for s in sweep) + " |", "|---|" + "---:|" * len(sweep)]
        for f in fams:
            L.append(f"| {f} | " + " | ".join(
                f"{_cell(R[f][s['label']])} ({100 * R[f][s['label']]['budget_min']:.0f}-"
                f"{100 * R[f][s['label']]['budget_max']:.0f}%)" for s in sweep) + " |")
    L += ["", "Score relative to full cache (1.00 = equal; for summary the full cache is 100 by definition):", "",
          "| family | " + " | ".join(s["label"] for s in main if s["kind"] != "full") + " |",
          "|---|" + "---:|" * (len(main) - 1)]
    for f in fams:
        L.append(f"| {f} | " + " | ".join(f"{R[f][s['label']]['rel']:.3f}" if R[f]["full"]["score"] else "n/a"
                                         for s in main if s["kind"] != "full") + " |")
    L += ["", "Attention mass of the last prompt query (mean over heads, sinks included) that fell on evicted keys, "
          "mean over layers (%):", "", "| family | " + " | ".join(s["label"] for s in main if s["kind"] != "full") + " |",
          "|---|" + "---:|" * (len(main) - 1)]
    for f in fams:
        L.append(f"| {f} | " + " | ".join(f"{100 * R[f][s['label']]['evicted']:.1f}" for s in main if s["kind"] != "full")
                 + " |")
    rf = next((s for s in specs if s["name"] == "refreekv" and s["kind"] == "threshold"), None)
    if rf:
        L += ["", f"{rf['label']} per layer: kept % / evicted last-row attention mass % (mean over samples):", "",
              "| layer | " + " | ".join(fams) + " |", "|---:|" + "---:|" * len(fams)]
        for i in range(len(R[fams[0]][rf["label"]]["kept_per_layer"])):
            L.append(f"| {i} | " + " | ".join(f"{100 * R[f][rf['label']]['kept_per_layer'][i]:.0f} / "
                                              f"{100 * R[f][rf['label']]['evicted_per_layer'][i]:.1f}" for f in fams) + " |")
    L += ["", "Plots: " + ", ".join(f"`{p}`" for p in res["plots"]), ""]
    return "\n".join(L) + "\n"


HEADER = """# Benchmark results

Sections are appended by the bench scripts (`python -m bench.quality`, ...), newest last; a
section is never rewritten. Each names its device, date, git commit, model and exact command.

"""


def append_results(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write(HEADER)
        f.write("\n" + text)


def plots(res: dict, out: Path, slug: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams, specs, R = res["config"]["families"], res["policies"], res["results"]
    ref = sorted((s for s in specs if s["name"] == "refreekv" and s["kind"] in ("threshold", "sweep")),
                 key=lambda s: s["value"])
    paths = []
    if ref:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for f in fams:
            ax.plot([s["value"] for s in ref], [100 * R[f][s["label"]]["budget"] for s in ref], "o-", label=f)
        ax.set_xscale("log")
        ax.set_xlabel("ReFreeKV threshold T")
        ax.set_ylabel("mean KV budget kept (%)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(title="task family")
        ax.set_title(f"{res['model']}: budget chosen per family vs T", fontsize=10)
        fig.tight_layout()
        p = out / f"quality-{slug}-budget_vs_T.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)

    cols = min(3, len(fams))
    rows = math.ceil(len(fams) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.7 * rows), squeeze=False)
    fixed = sorted({s["name"] for s in specs if s["kind"] == "budget"})
    colours = dict(zip(fixed, ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]))
    for i, f in enumerate(fams):
        ax = axes[i // cols][i % cols]
        full = R[f]["full"]["score"]
        ax.axhline(full, color="grey", ls="--", lw=1, label="full cache")
        for name in fixed:
            pts = sorted((s["value"], R[f][s["label"]]["budget"], R[f][s["label"]]["score"]) for s in specs
                         if s["name"] == name and s["kind"] == "budget")
            xs = [100 * b for _, b, _ in pts] + [100.0]
            ys = [sc for _, _, sc in pts] + [full]
            ax.plot(xs, ys, "s-", color=colours[name], ms=4, lw=1.2, label=name)
        if ref:
            ax.plot([100 * R[f][s["label"]]["budget"] for s in ref], [R[f][s["label"]]["score"] for s in ref],
                    ":", color="tab:red", lw=1)
            marked = []
            for s in sorted(ref, key=lambda s: s["kind"] != "threshold"):  # the main T first
                x, y = 100 * R[f][s["label"]]["budget"], R[f][s["label"]]["score"]
                main = s["kind"] == "threshold"
                ax.plot(x, y, "*" if main else "o", color="tab:red", ms=13 if main else 5,
                        label="ReFreeKV T=%g" % s["value"] if main else None, zorder=5)
                if all(abs(x - mx) > 4 or abs(y - my) > 6 for mx, my in marked):  # label only distinct points
                    ax.annotate(f"T={s['value']:g}", (x, y), textcoords="offset points", xytext=(4, -11), fontsize=7,
                                color="tab:red")
                    marked.append((x, y))
        for k, s in enumerate(v for v in specs if v["kind"] == "variant"):
            ax.plot(100 * R[f][s["label"]]["budget"], R[f][s["label"]]["score"], "Dv^<>ph"[k % 7], color="black",
                    ms=6, label=s["label"], zorder=4)
        ax.set_title(f"{f} ({METRIC[f]})", fontsize=10)
        ax.set_xlabel("mean KV budget kept (%)")
        ax.set_xlim(0, 105)
        lo = max(0, 10 * math.floor((min(R[f][s["label"]]["score"] for s in specs) - 5) / 10))  # zoom on the data
        ax.set_ylim(lo, max(102, full * 1.02))
        ax.grid(alpha=0.3)
    for j in range(len(fams), rows * cols):
        axes[j // cols][j % cols].axis("off")
    h, lab = axes[0][0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower right" if len(fams) % cols else "upper center", fontsize=9,
               ncol=1 if len(fams) % cols else len(lab), bbox_to_anchor=None if len(fams) % cols else (0.5, 1.0))
    fig.suptitle(f"{res['model']}: score vs KV budget (fixed budgets vs ReFreeKV)", fontsize=11,
                 y=1.0 if len(fams) % cols else 1.06)
    fig.tight_layout()
    p = out / f"quality-{slug}-score_vs_budget.png"
    fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    paths.append(p)
    return [str(x) for x in paths]


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see --help)")


def _floats(s):
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated numbers, got {s!r}") from None


def parse_args(argv=None):
    p = _Parser(prog="python -m bench.quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint dir, hub id or bundled name (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--max-length", type=int, help="context limit (prompt + new tokens)")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    p.add_argument("--n", type=int, default=6, help="samples per family")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="approximate prompt length in tokens")
    p.add_argument("--max-new-tokens", type=int, default=96, help="greedy tokens for arithmetic and summary")
    p.add_argument("--retrieval-tokens", type=int, default=32, help="greedy tokens for retrieval (capped by --max-new-tokens)")
    p.add_argument("--fidelity-tokens", type=int, default=128, help="teacher-forced real tokens for text and code")
    p.add_argument("--batch", type=int, default=6, help="prompts per batch (all policies share one prefill per batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", default="full,refreekv,streaming,h2o,snapkv")
    p.add_argument("--budgets", default="0.5,0.2", help="fixed budgets: fractions <= 1 or token counts > 1")
    p.add_argument("--threshold", type=float, default=0.01, help="ReFreeKV's T in the main table")
    p.add_argument("--variant", action="append", default=[], metavar="'NAME JSON'",
                   help='an extra policy column with its own knobs, e.g. \'refreekv {"rows": 8}\' (repeatable)')
    p.add_argument("--sweep", default="0.001,0.01,0.1", help="ReFreeKV thresholds for the sweep ('' for none)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for JSON and PNGs")
    p.add_argument("--results-md", default=str(ROOT / "bench" / "RESULTS.md"), help="markdown file to append to ('' for none)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own; 1 is much faster on a "
                   "machine whose cores are shared with other jobs: OpenMP barriers stall on a busy core)")
    p.add_argument("--tag", help="suffix for the output file names (they are quality-MODEL[-FAMILIES][-TAG].*)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--replot", metavar="JSON", help="only redraw the PNGs of an earlier run's JSON into --out")
    a = p.parse_args(argv)
    a.families = [f.strip() for f in a.families.split(",") if f.strip()]
    bad = [f for f in a.families if f not in FAMILIES]
    if bad or not a.families:
        raise UserError(f"unknown task families {bad}; choose from {', '.join(FAMILIES)}")
    if a.threads is not None and a.threads < 1:
        raise UserError("--threads must be >= 1")
    for k in ("n", "prompt_tokens", "max_new_tokens", "retrieval_tokens", "fidelity_tokens", "batch"):
        if getattr(a, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1")
    a.budgets, a.sweep = _floats(a.budgets), _floats(a.sweep)
    a.policies = [x.strip() for x in a.policies.split(",") if x.strip()]
    variants = []
    for v in a.variant:
        name, _, js = v.strip().partition(" ")
        try:
            kw = json.loads(js or "{}")
        except json.JSONDecodeError as e:
            raise UserError(f"--variant {v!r}: not 'NAME JSON' ({e})") from None
        if not isinstance(kw, dict):
            raise UserError(f"--variant {v!r}: the knobs must be a JSON object")
        variants.append((name, kw))
    a.variant = variants
    return a


def run(a, argv) -> dict:
    from engine.generate import Generator

    t_start = time.perf_counter()
    commit = git_commit()  # at the start: the code this run imported
    if a.threads:
        torch.set_num_threads(a.threads)
    specs, notes = policy_specs(a.policies, a.budgets, a.threshold, a.sweep, a.variant)
    policies = [refreekv.make(s.name, **s.kwargs) for s in specs]
    g = Generator(a.model, a.device, a.dtype, a.max_length)
    chat = g.tokenizer.chat_template is not None
    if not chat:
        notes.append("the checkpoint has no chat template: prompts are fed raw")
    longest_new = max(a.fidelity_tokens, a.max_new_tokens)
    room = g.context - longest_new - 48
    if a.prompt_tokens > room:
        if room < 32:
            raise UserError(f"context {g.context} too short for {longest_new} new tokens")
        notes.append(f"--prompt-tokens {a.prompt_tokens} lowered to {room} to fit the context of {g.context}")
        a.prompt_tokens = room
    m = Material(g)
    tasks = {f: make_tasks(g, f, a.n, a.seed, a.prompt_tokens, a.fidelity_tokens, m) for f in a.families}
    for f, ts in tasks.items():
        for t in ts:
            g.fit(t.ids, a.fidelity_tokens if f in FIDELITY else a.max_new_tokens)
    units = sum(math.ceil(len(ts) / a.batch) for ts in tasks.values()) * len(specs)
    prog = Progress(units, a.quiet)
    print(f"[quality] {g.path.name} on {g.device} ({str(g.dtype).removeprefix('torch.')}): "
          f"{len(specs)} policies x {len(a.families)} families x {a.n} samples", file=sys.stderr)
    for x in notes:
        print(f"[quality] note: {x}", file=sys.stderr)
    records, results = {}, {}
    with torch.inference_mode():
        for f in a.families:
            records[f] = run_family(g, f, tasks[f], specs, policies, a, prog)
            results[f] = summarise(f, records[f], specs)
    prog.close()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", (a.model or "smollm2-135m-instruct").rstrip("/").split("/")[-1]) or "model"
    stem = slug + ("" if a.families == list(FAMILIES) else "-" + "-".join(a.families)) + (f"-{a.tag}" if a.tag else "")
    res = {
        "model": slug, "model_path": str(g.path), "device": device_name(g),
        "dtype": str(g.dtype).removeprefix("torch."), "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "commit": commit,
        "command": "python -m bench.quality " + shlex.join(argv), "chat": chat, "notes": notes,
        "config": {k: getattr(a, k) for k in ("families", "n", "prompt_tokens", "max_new_tokens", "retrieval_tokens",
                                               "fidelity_tokens", "batch", "seed", "policies", "budgets", "threshold",
                                               "sweep", "threads", "variant", "tag")},
        "policies": [dict(label=s.label, name=s.name, kind=s.kind, value=s.value, kwargs=s.kwargs) for s in specs],
        "prompt_tokens": {f: _mean([len(t.ids) for t in tasks[f]]) for f in a.families},
        "runtime_s": time.perf_counter() - t_start,
        "results": results, "samples": records,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res["plots"] = [os.path.relpath(p, ROOT) if Path(p).resolve().is_relative_to(ROOT) else p
                    for p in plots(res, out, stem)]
    jpath = out / f"quality-{stem}.json"
    jpath.write_text(json.dumps(_round(res), indent=1))
    md = markdown(res)
    if a.results_md:
        append_results(Path(a.results_md), md)
    print(md)
    print(f"[quality] wrote {jpath}" + (f" and appended to {a.results_md}" if a.results_md else ""), file=sys.stderr)
    return res


def _round(x, digits=5):
    """Floats to `digits` significant digits, so result files stay small and diffable."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    return x


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        a = parse_args(argv)
        if a.replot:
            res = json.loads(Path(a.replot).read_text())
            Path(a.out).mkdir(parents=True, exist_ok=True)
            print("\n".join(plots(res, Path(a.out), Path(a.replot).stem.removeprefix("quality-"))))
            return 0
        run(a, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
