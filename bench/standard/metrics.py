"""Official metrics of the benchmarks the field reports, reimplemented to give the official numbers.

LongBench v1 (THUDM/LongBench at 2e00731, LongBench/metrics.py and LongBench/eval.py): the English metrics
under their own names and signatures `name(prediction, ground_truth, **kwargs)`, `dataset2metric` for the 16
English tasks, `scorer` (first line only for trec / triviaqa / samsum / lsht, the best score over the answers,
x 100, rounded to 2 places) and `scorer_e` (LongBench-E: the same per length bucket, 0-4k / 4-8k / 8k+).
The Chinese variants (jieba) are left out.

RULER (NVIDIA/RULER at c3f5e3b, scripts/eval/synthetic/constants.py and scripts/eval/evaluate.py):
`postprocess_pred`, `string_match_all`, `string_match_part`.

The official LongBench code imports two packages this project does not depend on. Their behaviour is
reproduced here from their sources (and tests/test_standard_bench.py checks it on worked examples, and
against the packages themselves where they happen to be installed):

  rouge (pltrdy, 1.0.1): `Rouge().get_scores([pred], [ref], avg=True)["rouge-l"]["f"]` is its
    *summary-level* ROUGE-L, not the textbook sentence LCS: both texts are cut into "sentences" at every
    "." (so "3.5" is two sentences), each sentence into words at single spaces; R = |U| / m, P = |U| / n
    with m, n the numbers of *distinct* words of the reference / prediction, and U the set of distinct
    words on the LCS that its table walk reconstructs for every (reference sentence, prediction sentence)
    pair (its tie-breaking decides which words); F = 2 P R / (P + R + 1e-8). An empty side raises inside
    the package and LongBench's bare `except` scores 0. Its reconstruction is recursive: a sentence pair
    whose walk needs more than 991 calls overflows Python's default recursion limit (1000) under
    LongBench's eval.py, and that too scores 0; we reproduce it by counting the calls.
  fuzzywuzzy (0.18.0) `fuzz.ratio`, without python-Levenshtein (LongBench's requirements.txt does not
    list it): 100 for equal strings (two empty ones included), 0 when one is empty, else
    difflib.SequenceMatcher(None, a, b).ratio() x 100 rounded by Python's round (half to even).
"""

import difflib
import re
import string
from collections import Counter

import numpy as np

# ---------------------------------------------------------------- LongBench v1

_PUNCTUATION = set(string.punctuation)


def normalize_answer(s):
    """Lower text and remove punctuation, articles and extra whitespace (SQuAD's normalisation)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction, ground_truth, **kwargs):
    """Token-bag F1 of two token lists (int 0 when nothing is shared, as the official)."""
    common = Counter(prediction) & Counter(ground_truth)
    same = sum(common.values())
    if same == 0:
        return 0
    precision = 1.0 * same / len(prediction)
    recall = 1.0 * same / len(ground_truth)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction, ground_truth, **kwargs):
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def count_score(prediction, ground_truth, **kwargs):
    """Share of the numbers in the prediction that equal the answer."""
    numbers = re.findall(r"\d+", prediction)
    right = sum(1 for x in numbers if str(x) == str(ground_truth))
    return 0.0 if not numbers else float(right / len(numbers))


def retrieval_score(prediction, ground_truth, **kwargs):
    """Share of the numbers in the prediction that equal N of the answer's "Paragraph N"."""
    want = re.findall(r"Paragraph (\d+)", ground_truth)[0]
    numbers = re.findall(r"\d+", prediction)
    right = sum(1 for x in numbers if str(x) == str(want))
    return 0.0 if not numbers else float(right / len(numbers))


def classification_score(prediction, ground_truth, **kwargs):
    """1 / (classes named in the prediction) when the right one is among them, else 0.

    Classes that are substrings of the answer (and not the answer) are dropped from the matches, in the
    official's way: it removes them from the list it is iterating over, so the match right after each
    removed one is never looked at. The walk below steps its index exactly like that iteration.
    (The first LongBench release guarded the division with `if em_match_list != 0`, which is always true;
    the current code dropped it; same results either way.)"""
    matched = [c for c in kwargs["all_classes"] if c in prediction]
    i = 0
    while i < len(matched):
        term = matched[i]
        if term in ground_truth and term != ground_truth:
            matched.remove(term)
        i += 1  # advances even after a removal: the skipped neighbour is the official's quirk
    if ground_truth in matched:
        return 1.0 / len(matched)
    return 0.0


def fuzz_ratio(a, b) -> int:
    """fuzzywuzzy's fuzz.ratio on its pure-Python path (difflib), decorators included."""
    if a is None or b is None:
        return 0
    if a == b:
        return 100
    if len(a) == 0 or len(b) == 0:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction, ground_truth, **kwargs):
    """fuzz.ratio / 100 between the answer and the first generated line with no ` # or // in it
    (the empty string when every line has one)."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz_ratio(line, ground_truth) / 100


# rouge's _recon recursion: LongBench's eval.py reaches it 9 frames deep, so with Python's default limit of
# 1000 a walk of more than 991 calls raises RecursionError (measured with rouge 1.0.1 on Python 3.11)
RECON_CALLS_MAX = 991


class _RougeFailure(Exception):
    pass


def _rouge_sentences(text: str) -> list[list[str]]:
    """rouge's preprocessing: pieces between '.', non-empty before whitespace is collapsed, as word lists."""
    pieces = [" ".join(p.split()) for p in text.split(".") if len(p) > 0]
    return [p.split(" ") for p in pieces]


def _lcs_words(ref: list[str], hyp: list[str]) -> list[str]:
    """The words of the LCS of ref and hyp as rouge's _recon_lcs walks its table back (a match first, then
    up only when strictly better, else left); its recursion depth is checked against RECON_CALLS_MAX."""
    n, m = len(ref), len(hyp)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, up, x = table[i], table[i - 1], ref[i - 1]
        for j in range(1, m + 1):
            row[j] = up[j - 1] + 1 if x == hyp[j - 1] else max(up[j], row[j - 1])
    words, calls = [], 1
    i, j = n, m
    while i > 0 and j > 0:
        calls += 1
        if ref[i - 1] == hyp[j - 1]:
            words.append(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    if calls > RECON_CALLS_MAX:
        raise _RougeFailure("recursion limit")
    return words


def rouge_l_f(hyp: str, ref: str) -> float:
    """rouge 1.0.1's "rouge-l" F (summary level, word sets); raises _RougeFailure where the package raises."""
    hyp_s, ref_s = _rouge_sentences(hyp), _rouge_sentences(ref)
    if not hyp_s or not ref_s:
        raise _RougeFailure("empty hypothesis or reference")
    m = len({w for s in ref_s for w in s})
    n = len({w for s in hyp_s for w in s})
    union = set()
    for r in ref_s:
        for h in hyp_s:
            union.update(_lcs_words(r, h))
    r_lcs = len(union) / m
    p_lcs = len(union) / n
    return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))


def rouge_score(prediction, ground_truth, **kwargs):
    try:
        return rouge_l_f(prediction, ground_truth)
    except _RougeFailure:
        return 0.0


dataset2metric = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum", "lsht")


def sample_score(dataset, prediction, ground_truths, all_classes) -> float:
    """One prediction's score in [0, 1]: the best over its answers (0 when there are none)."""
    if dataset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    best = 0.0
    for truth in ground_truths:
        best = max(best, dataset2metric[dataset](prediction, truth, all_classes=all_classes))
    return best


def scorer(dataset, predictions, answers, all_classes) -> float:
    """LongBench's task score: mean sample score x 100, rounded to 2 places."""
    total = 0.0
    for prediction, truths in zip(predictions, answers):
        total += sample_score(dataset, prediction, truths, all_classes)
    return round(100 * total / len(predictions), 2)


def length_bucket(length) -> str:
    """LongBench-E's bucket of a sample's `length` field (words, or characters for Chinese)."""
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


def scorer_e(dataset, predictions, answers, lengths, all_classes) -> dict:
    """LongBench-E: the task score per length bucket (nan for an empty bucket, as numpy's mean of nothing)."""
    buckets = {"0-4k": [], "4-8k": [], "8k+": []}
    for prediction, truths, length in zip(predictions, answers, lengths):
        buckets[length_bucket(length)].append(sample_score(dataset, prediction, truths, all_classes))
    return {k: (round(100 * float(np.mean(v)), 2) if v else float("nan")) for k, v in buckets.items()}


# ---------------------------------------------------------------- RULER


def postprocess_pred(predict_str: str) -> str:
    """RULER's cleanup of a prediction: strip, control characters to newlines, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", predict_str.strip()).strip()


def string_match_all(preds, refs) -> float:
    """Mean over samples of the share of the sample's references found (any case) in the prediction."""
    per = [sum(1.0 if r.lower() in p.lower() else 0.0 for r in ref) / len(ref) for p, ref in zip(preds, refs)]
    return round(sum(per) / len(preds) * 100, 2)


def string_match_part(preds, refs) -> float:
    """Mean over samples of 1 when any of the sample's references is found in the prediction."""
    per = [max(1.0 if r.lower() in p.lower() else 0.0 for r in ref) for p, ref in zip(preds, refs)]
    return round(sum(per) / len(preds) * 100, 2)
