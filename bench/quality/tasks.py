"""Quality-bench tasks: real text and code nobody here wrote, cut into prompts with the model's
tokenizer (fidelity windows, GSM8K-style arithmetic, summaries)."""

import importlib
import inspect
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from weights.errors import UserError

FAMILIES = ("text", "code", "arithmetic", "summary")
FIDELITY = ("text", "code")
METRIC = {
    "text": "top-1 agree %",
    "code": "top-1 agree %",
    "arithmetic": "accuracy %",
    "summary": "ROUGE-L vs full",
}

# Pure-Python standard-library modules whose source is the code material (fixed list, sorted).
CODE_MODULES = sorted(
    [
        "argparse",
        "ast",
        "asyncio.base_events",
        "bisect",
        "calendar",
        "collections",
        "configparser",
        "contextlib",
        "csv",
        "dataclasses",
        "datetime",
        "difflib",
        "email.message",
        "enum",
        "fractions",
        "ftplib",
        "functools",
        "gettext",
        "heapq",
        "http.client",
        "imaplib",
        "inspect",
        "ipaddress",
        "json.decoder",
        "json.encoder",
        "logging",
        "mailbox",
        "pathlib",
        "pickle",
        "pprint",
        "queue",
        "random",
        "shutil",
        "smtplib",
        "statistics",
        "string",
        "subprocess",
        "tarfile",
        "tempfile",
        "textwrap",
        "threading",
        "tokenize",
        "traceback",
        "typing",
        "urllib.parse",
        "uuid",
        "zipfile",
    ]
)


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
    answer: str | None = None  # arithmetic: the known answer
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
            chunk = text[start : start + chars]
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
        tasks.append(
            Task(family, ids[:prompt_tokens], target=ids[prompt_tokens:], meta={"source": src, "char": s})
        )
    if len(tasks) < n:
        raise UserError(f"could not cut {n} windows of {prompt_tokens + cont_tokens} tokens for {family}")
    return tasks


NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Dev",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Kemi",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Pablo",
    "Quinn",
    "Rosa",
    "Sami",
    "Tara",
]


def word_problem(rng: random.Random, t: int | None = None) -> tuple[str, list[str], int, int]:
    """A multi-step word problem of template t (random if None): (question, worked steps, answer, t)."""
    name = rng.choice(NAMES)
    t = rng.randrange(5) if t is None else t
    q, s, ans = _problem(rng, name, t)
    return q, s, ans, t


def _problem(rng, name, t):
    if t == 0:
        a, b, c, d = rng.randint(5, 40), rng.randint(2, 6), rng.randint(3, 12), rng.randint(1, 20)
        q = (
            f"{name} has {a} marbles. {name} buys {b} bags with {c} marbles in each bag, "
            f"then gives {d} marbles to a friend. How many marbles does {name} have now?"
        )
        s = [
            f"The bags hold {b} * {c} = {b * c} marbles.",
            f"After buying: {a} + {b * c} = {a + b * c}.",
            f"After giving {d} away: {a + b * c} - {d} = {a + b * c - d}.",
        ]
        return q, s, a + b * c - d
    if t == 1:
        per, hours, days, spent = rng.randint(8, 25), rng.randint(2, 8), rng.randint(2, 6), rng.randint(5, 60)
        q = (
            f"{name} earns {per} dollars per hour and works {hours} hours a day for {days} days. Then {name} "
            f"spends {spent} dollars on a gift. How many dollars does {name} have left?"
        )
        s = [
            f"Per day: {per} * {hours} = {per * hours} dollars.",
            f"In {days} days: {per * hours} * {days} = {per * hours * days}.",
            f"After the gift: {per * hours * days} - {spent} = {per * hours * days - spent}.",
        ]
        return q, s, per * hours * days - spent
    if t == 2:
        boxes, each, sold, k = rng.randint(3, 9), rng.randint(6, 15), rng.randint(2, 20), rng.randint(2, 5)
        total = boxes * each
        sold = min(sold, total - 1)
        left = total - sold
        left -= left % k
        sold = total - left
        q = (
            f"A shop has {boxes} boxes with {each} pens in each box. It sells {sold} pens and shares "
            f"the rest equally among {k} classrooms. How many pens does each classroom get?"
        )
        s = [
            f"Pens: {boxes} * {each} = {total}.",
            f"After selling: {total} - {sold} = {left}.",
            f"Each classroom: {left} / {k} = {left // k}.",
        ]
        return q, s, left // k
    if t == 3:
        price, n1, n2, paid = rng.randint(2, 9), rng.randint(2, 8), rng.randint(2, 8), 0
        cost = price * (n1 + n2)
        paid = cost + rng.randint(1, 30)
        q = (
            f"Apples cost {price} dollars each. {name} buys {n1} apples on Monday and {n2} apples "
            f"on Tuesday, and pays with {paid} dollars. How much change does {name} get?"
        )
        s = [
            f"Apples: {n1} + {n2} = {n1 + n2}.",
            f"Cost: {n1 + n2} * {price} = {cost}.",
            f"Change: {paid} - {cost} = {paid - cost}.",
        ]
        return q, s, paid - cost
    start, grow, weeks, eaten = rng.randint(10, 50), rng.randint(3, 12), rng.randint(2, 6), rng.randint(1, 9)
    q = (
        f"A garden has {start} flowers. Every week {grow} new flowers bloom and rabbits eat {eaten} flowers. "
        f"How many flowers are in the garden after {weeks} weeks?"
    )
    s = [
        f"Net change per week: {grow} - {eaten} = {grow - eaten}.",
        f"Over {weeks} weeks: {grow - eaten} * {weeks} = {(grow - eaten) * weeks}.",
        f"Total: {start} + {(grow - eaten) * weeks} = {start + (grow - eaten) * weeks}.",
    ]
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
        tasks.append(
            Task(
                "arithmetic",
                m.g.encode(head + "".join(shots) + tail),
                answer=str(ans),
                meta={"question": q, "template": kind, "shots": len(shots)},
            )
        )
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
    return {"arithmetic": arithmetic_tasks, "summary": summary_tasks}[family](m, rng, n, prompt_tokens)
