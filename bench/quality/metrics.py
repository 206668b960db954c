"""Quality-bench scoring: ROUGE-L, answers, per-policy summaries, and teacher-forced fidelity
(top-1 agreement, KL and NLL against the full cache) collected from the engine's logits."""

import math
import re

import torch

from bench.quality.tasks import FIDELITY


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


def cut_stop(text: str, stop: list[str]) -> str:
    cut = min((text.find(x) for x in stop if x in text), default=-1)
    return text[:cut] if cut >= 0 else text


class Fidelity:
    """An engine on_logits hook for teacher forcing with fan-out: policy `full` (index full_j) and
    every other policy see the same real continuation; per (prompt, policy) it keeps, for each
    step t, the NLL of targets[i][t], whether the argmax agrees with the full cache's, and
    KL(full || policy). A step seen again (a replay after preemption) overwrites its entry."""

    def __init__(self, targets: list[list[int]], full_j: int = 0):
        self.targets, self.full_j = targets, full_j
        self.full: dict = {}  # (i, t) -> full-cache log-probs
        self.pending: dict = {}  # (i, j, t) -> log-probs waiting for the full cache's step t
        self.nll, self.top1, self.kl = {}, {}, {}

    def __call__(self, keys, steps, logits):
        lp = torch.log_softmax(logits.float(), -1)
        tgt = torch.tensor([self.targets[i][t] for (i, _), t in zip(keys, steps)], device=lp.device)
        nll = (-lp.gather(1, tgt[:, None])[:, 0]).tolist()
        for r, ((i, j), t) in enumerate(zip(keys, steps)):
            self.nll[i, j, t] = nll[r]
            if j == self.full_j:
                self.full[i, t] = lp[r].clone()
        for r, ((i, j), t) in enumerate(zip(keys, steps)):
            self.pending[i, j, t] = lp[r] if j != self.full_j else self.full[i, t]
        for key in [k for k in self.pending if (k[0], k[2]) in self.full]:
            i, j, t = key
            ref, got = self.full[i, t], self.pending.pop(key)
            self.top1[key] = float(ref.argmax() == got.argmax())
            self.kl[key] = max(0.0, (ref.exp() * (ref - got)).sum().item())

    def result(self, i: int, j: int) -> dict:
        T = len(self.targets[i])
        mean = lambda d: sum(d[i, j, t] for t in range(T)) / T
        return {"nll": mean(self.nll), "top1": mean(self.top1), "kl": mean(self.kl)}


def summarise(family, records, specs) -> dict:
    out = {}
    for spec in specs:
        rows = [r["by_policy"][spec.label] for r in records]
        n = len(rows)
        s = {
            "n": n,
            "score": sum(d["score"] for d in rows) / n,
            "budget": sum(d["budget"] for d in rows) / n,
            "budget_min": min(d["budget"] for d in rows),
            "budget_max": max(d["budget"] for d in rows),
            "kept_per_layer": [sum(col) / n for col in zip(*(d["kept_per_layer"] for d in rows))],
            "evicted_per_layer": [sum(col) / n for col in zip(*(d["evicted_per_layer"] for d in rows))],
            "seconds_per_sample": sum(d["seconds"] for d in rows) / n,
        }
        s["evicted"] = _mean(s["evicted_per_layer"])
        if family in FIDELITY:
            s["kl"] = sum(d["kl"] for d in rows) / n
            s["ppl"] = math.exp(sum(d["nll"] for d in rows) / n)
        else:
            s["agree"] = sum(d["agree"] for d in rows) / n
            s["same"] = 100 * sum(d["same"] for d in rows) / n
        out[spec.label] = s
    full = out["full"]["score"]
    for s in out.values():
        s["rel"] = s["score"] / full if full else None  # undefined when the full cache scores 0
    return out


def _mean(x):
    return sum(x) / len(x) if x else float("nan")
