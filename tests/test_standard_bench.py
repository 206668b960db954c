"""The standard benchmarks' pieces (bench/standard/: metrics.py, ruler.py, longbench.py, gsm8k.py),
without a model.

Every metric is checked on worked examples whose values are computed by hand here, the official quirks
included; RULER's generators on the bundled SmolLM2 tokenizer (sizes, placement, determinism, templates);
the loaders on the small made-up files in tests/fixtures/."""

import math
import re
from collections import Counter
from pathlib import Path

import pytest

from bench.standard import gsm8k, longbench, metrics, ruler
from weights.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
NEEDLE_RE = re.compile(r"One of the special magic \w+ for \S+ is: \S+\.")
F_EQUAL = 2 * (1 / (2 + 1e-8))  # rouge's F for P = R = 1 (its 1e-8 in the denominator)


@pytest.fixture(scope="module")
def tok(smollm):
    from engine.tokenizer import Tokenizer

    return Tokenizer(smollm)


# ---------------------------------------------------------------- LongBench metrics


def test_normalize_answer():
    # lower -> punctuation out -> articles out -> whitespace collapsed
    assert metrics.normalize_answer("The  Cat, an Apple!") == "cat apple"
    assert metrics.normalize_answer("Theory of a thing") == "theory of thing"


def test_qa_f1_score():
    # "eiffel tower paris" vs "eiffel tower in paris": 3 shared, P = 1, R = 3/4, F1 = 6/7
    assert metrics.qa_f1_score("The Eiffel Tower, Paris!", "eiffel tower in paris") == pytest.approx(6 / 7)
    # a bag: "paris paris" vs "paris" shares 1: P = 1/2, R = 1, F1 = 2/3
    assert metrics.qa_f1_score("paris paris", "Paris") == pytest.approx(2 / 3)
    nothing = metrics.qa_f1_score("London", "Paris")
    assert nothing == 0 and isinstance(nothing, int)  # the official returns int 0 here


def test_count_and_retrieval_scores():
    # numbers 3, 4, 3: two of three are right
    assert metrics.count_score("3 paragraphs, maybe 4, I say 3", "3") == pytest.approx(2 / 3)
    assert metrics.count_score("no idea", "3") == 0.0
    # numbers 12 and 2, the answer's id is 12
    assert metrics.retrieval_score("Paragraph 12, not Paragraph 2", "Paragraph 12") == 0.5
    assert metrics.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0


def test_classification_score_and_its_skip_quirk():
    classes = ["Location", "Human being", "Date"]
    assert metrics.classification_score("Location", "Location", all_classes=classes) == 1.0
    assert metrics.classification_score("Location or Date", "Location", all_classes=classes) == 0.5
    assert metrics.classification_score("Animal", "Location", all_classes=classes) == 0.0
    # matches c, d, cd; the official drops "c" (a substring of the answer "cd") while iterating, so its
    # next element "d" is never looked at and stays: 1 / len([d, cd]) = 0.5 (1.0 without the quirk)
    assert metrics.classification_score("c d cd", "cd", all_classes=["c", "d", "cd"]) == 0.5


def test_code_sim_score():
    # "x = foo(1)" vs "x = foo(2)": difflib matches "x = foo(" and ")": 2 * 9 / 20 = 0.9
    assert metrics.code_sim_score("x = foo(1)", "x = foo(2)") == 0.9
    # the first line with no ` # // is used ("return a // b" is skipped for its //)
    pred = "\n\n```python\n# comment\nreturn a // b\n    y = 2\n"
    assert metrics.code_sim_score(pred, "    y = 2") == 1.0
    assert metrics.code_sim_score("# only\n`x`", "x") == 0.0  # no line qualifies: "" vs "x" is 0
    assert metrics.code_sim_score("", "") == 1.0  # fuzz.ratio: equal strings are 100 before the empty check
    # one shared character in 16: 100 * 2 / 16 = 12.5, and Python's round goes to even: 12
    assert metrics.fuzz_ratio("abcdefgh", "ijklmnoa") == 12
    assert metrics.code_sim_score("abcdefgh", "ijklmnoa") == 0.12


def test_rouge_score_worked_examples():
    assert metrics.rouge_score("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(F_EQUAL)
    # "." cuts sentences: ["3", "5 million people"] vs ["3 million people"]; distinct words n = 4, m = 3;
    # LCS words {3} and {million, people}: 3 of them, R = 1, P = 3/4
    want = 2 * (0.75 / (1.75 + 1e-8))
    assert metrics.rouge_score("3.5 million people", "3 million people") == pytest.approx(want)
    # words are counted as sets: LCS "a b" covers both distinct words: P = R = 1 (textbook ROUGE-L: 0.5)
    assert metrics.rouge_score("a a a b", "a b b b") == pytest.approx(F_EQUAL)
    # the table walk picks "b" for ("a b", "b a") and "b" again for ("b", "b a"): union {b} of m = n = 2
    assert metrics.rouge_score("b a", "a b. b") == pytest.approx(2 * (0.25 / (1 + 1e-8)))
    assert metrics.rouge_score("", "the cat") == 0.0  # empty hypothesis: the package raises, LongBench: 0
    assert metrics.rouge_score("...", "the cat") == 0.0


def test_rouge_score_recursion_limit_quirk():
    # rouge's recursive LCS walk takes (words + 1) calls on identical sentences; under LongBench's eval.py
    # more than 991 overflow Python's default limit and score 0
    ok = " ".join(f"w{i}" for i in range(990))
    too_long = " ".join(f"w{i}" for i in range(991))
    assert metrics.rouge_score(ok, ok) == pytest.approx(F_EQUAL)
    assert metrics.rouge_score(too_long, too_long) == 0.0


def test_dataset2metric_and_scorers():
    assert set(metrics.dataset2metric) == set(longbench.TASKS)
    assert metrics.dataset2metric["lcc"] is metrics.code_sim_score
    assert metrics.dataset2metric["samsum"] is metrics.rouge_score
    assert metrics.dataset2metric["trec"] is metrics.classification_score
    # first line only for triviaqa: "Paris" -> F1 1; not for hotpotqa: "paris london" vs "paris" -> 2/3
    assert metrics.scorer("triviaqa", ["\nParis\nLondon"], [["Paris"]], None) == 100.0
    assert metrics.scorer("hotpotqa", ["Paris\nLondon"], [["Paris"]], None) == 66.67
    # the best over the answers, then the mean x 100: (1 + 0) / 2
    assert metrics.scorer("hotpotqa", ["Paris", "Rome"], [["London", "Paris"], ["Oslo"]], None) == 50.0
    got = metrics.scorer_e("passage_count", ["3", "4", "3"], [["3"], ["3"], ["3"]], [100, 5000, 3999], None)
    assert got["0-4k"] == 100.0 and got["4-8k"] == 0.0 and math.isnan(got["8k+"])
    assert [metrics.length_bucket(x) for x in (3999, 4000, 7999, 8000)] == ["0-4k", "4-8k", "4-8k", "8k+"]


def test_against_the_reference_packages_when_installed():
    """Only where `rouge` (pltrdy) and `fuzzywuzzy` are installed (not a dependency of this project)."""
    rouge = pytest.importorskip("rouge")
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    try:
        import Levenshtein  # noqa: F401  (with it fuzzywuzzy leaves difflib; LongBench does not list it)

        pytest.skip("python-Levenshtein is installed")
    except ImportError:
        pass
    import random

    rng = random.Random(0)
    vocab = ["the", "cat", "sat", "a", "3", "mat", ".", " ", "  ", "x", "//", "#"]
    for _ in range(300):
        a = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12)))
        b = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12)))
        try:
            want = rouge.Rouge().get_scores([a], [b], avg=True)["rouge-l"]["f"]
        except Exception:
            want = 0.0
        assert metrics.rouge_score(a, b) == want
        assert metrics.fuzz_ratio(a, b) == fuzz.ratio(a, b)


# ---------------------------------------------------------------- RULER metrics


def test_ruler_metrics():
    preds, refs = ["A b", "x"], [["a", "c"], ["X"]]
    assert metrics.string_match_all(preds, refs) == 75.0  # (1/2 + 1) / 2
    assert metrics.string_match_part(preds, refs) == 100.0  # (1 + 1) / 2
    assert metrics.string_match_all(["a"], [["a", "b", "c"]]) == 33.33
    assert metrics.postprocess_pred("  ab\x01cd \n") == "ab\ncd"


# ---------------------------------------------------------------- RULER generators

MAX_NEW = {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120, "freq_words_extraction": 50}
ENDINGS = {  # RULER's answer prefixes, as formatted
    "niah": re.compile(r" The special magic \w+ for .+ mentioned in the provided text (is|are)$"),
    "variable_tracking": re.compile(
        r" Answer: According to the chain\(s\) of variable assignment in the text above, 5 variables are "
        r"assigned the value \d{5}, they are: $"
    ),
    "common_words_extraction": re.compile(
        r" Answer: The top 10 words that appear most often in the list are:$"
    ),
    "freq_words_extraction": re.compile(
        r" Answer: According to the coded text above, the three most frequently appeared words are:$"
    ),
}


@pytest.mark.parametrize("length", [1024, 2048])
@pytest.mark.parametrize("task", ruler.TASKS)
def test_ruler_sizes_answers_and_depths(tok, task, length):
    family = ruler.CONFIGS[task][0]
    samples = ruler.generate(task, tok, length, n=2, seed=0)
    assert len(samples) == 2
    # one haystack unit of niah_multikey_3 (a needle with two uuids) is ~6% of 1024 tokens
    tol = 0.065 if task == "niah_multikey_3" else 0.04
    for s in samples:
        assert s.length == len(tok.encode(s.input, special=False))
        assert s.max_new == MAX_NEW[family]
        assert length * (1 - tol) <= s.length + s.max_new <= length
        assert ENDINGS[family].search(s.input)
        assert all(o in s.input for o in s.outputs)
        _check_depths(task, s)
    gold = [" ".join(s.outputs) for s in samples]
    assert ruler.score(task, gold, [s.outputs for s in samples]) == 100.0
    assert ruler.score(task, ["I do not know.", "-"], [s.outputs for s in samples]) == 0.0


def _check_depths(task, s):
    if s.depth is None:
        assert task in ("cwe", "fwe")
        return
    assert s.depth == s.meta["depths"][0]
    a, b = s.meta["context"]
    context = s.input[a:b]
    essay = task in ruler.SUBSTITUTED_HAYSTACK
    for out, depth in zip(s.outputs, s.meta["depths"]):
        if task == "vt":
            start = context.index(f"VAR {out} = ")
        else:
            start = next(m.start() for m in NEEDLE_RE.finditer(context) if m.group().endswith(f"is: {out}."))
        if essay:
            # RULER's grid depth: the needle follows int(sentences * depth / 100) haystack sentences
            assert depth in ruler.DEPTHS
            before = NEEDLE_RE.sub("", context[:start])
            assert len(ruler.sentences(before)) == int(s.meta["sentences"] * depth / 100)
            haystack = NEEDLE_RE.sub("", context)
            assert abs(len(before.strip()) / len(haystack) - depth / 100) < 0.15  # sentences vary in length
        else:
            lines = context.split("\n")
            assert len(lines) == s.meta["sentences"]
            index = context[:start].count("\n")
            assert 100 * index / len(lines) == pytest.approx(depth)
            assert abs(start / len(context) - depth / 100) < 0.07


@pytest.mark.parametrize("task", ruler.TASKS)
def test_ruler_is_deterministic_for_a_seed(tok, task):
    first = ruler.generate(task, tok, 1024, n=2, seed=5)
    again = ruler.generate(task, tok, 1024, n=2, seed=5)
    other = ruler.generate(task, tok, 1024, n=2, seed=6)
    assert [(s.input, s.outputs) for s in first] == [(s.input, s.outputs) for s in again]
    assert [s.input for s in first] != [s.input for s in other]


def test_ruler_niah_templates(tok):
    one = ruler.generate("niah_single_1", tok, 1024, n=1, seed=1)[0]
    head = (
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n"
    )
    assert one.input.startswith(head)
    key = re.search(r"for (\S+) mentioned", one.input).group(1)
    assert f"One of the special magic numbers for {key} is: {one.outputs[0]}." in one.input
    assert re.fullmatch(r"\d{7}", one.outputs[0])
    noise = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    a, b = one.meta["context"]
    assert {line for line in one.input[a:b].split("\n") if not line.startswith("One of")} == {noise}

    multi = ruler.generate("niah_multiquery", tok, 1024, n=1, seed=1)[0]
    assert multi.input.startswith("Some special magic numbers are hidden within the following text.")
    assert re.search(r"for \S+, \S+, \S+, and \S+ mentioned in the provided text are$", multi.input)
    assert len(multi.outputs) == 4

    values = ruler.generate("niah_multivalue", tok, 1024, n=1, seed=1)[0]
    key = re.search(r"for (\S+) mentioned", values.input).group(1)
    assert sorted(values.outputs) == sorted(re.findall(rf"for {re.escape(key)} is: (\d+)\.", values.input))

    uuids = ruler.generate("niah_multikey_3", tok, 1024, n=1, seed=1)[0]
    uuid4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid4, uuids.outputs[0])
    a, b = uuids.meta["context"]
    assert all(NEEDLE_RE.fullmatch(line) for line in uuids.input[a:b].split("\n"))  # all needles


def test_ruler_essay_haystack_is_the_documentation_prose(tok):
    s = ruler.generate("niah_single_2", tok, 2048, n=1, seed=2)[0]
    a, b = s.meta["context"]
    haystack = " ".join(NEEDLE_RE.sub("", s.input[a:b]).split())
    assert haystack == " ".join(ruler.essay_words()[: s.meta["units"]]).strip()
    from pydoc_data.topics import topics

    assert " ".join(topics[sorted(topics)[0]].split()[:8]) in haystack  # the first topic, sorted


def test_ruler_vt_chain_and_example(tok):
    s = ruler.generate("vt", tok, 2048, n=1, seed=3)[0]
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    assert s.input.startswith(head) and s.input.count(head) == 2  # the answered example, then the task
    example, task = s.input[: s.meta["context"][0]], s.input[s.meta["context"][0] :]
    # RULER appends " " + the answer to an input that ends in "they are: ", then "\n", then "\n" + the task
    shown = re.search(r"they are:  ((?:[A-Z]{3} ){4}[A-Z]{3})\n\nMemorize and", example).group(1).split()
    assert len(set(shown)) == 5  # the example's 3-letter chain, answered
    value = re.search(r"assigned the value (\d{5}), they are: $", s.input).group(1)
    v = s.outputs
    assert len(v) == 5 and all(re.fullmatch(r"[A-Z]{5}", x) for x in v)
    assert f"VAR {v[0]} = {value}\n" in task
    for x, y in zip(v, v[1:]):
        assert f"VAR {y} = VAR {x} \n" in task  # RULER's trailing space


def test_ruler_cwe_and_fwe_counts(tok):
    s = ruler.generate("cwe", tok, 1024, n=1, seed=4)[0]
    a, b = s.meta["context"]
    numbered = re.findall(r"(\d+)\. (\S+)", s.input[a:b])
    assert [int(i) for i, _ in numbered] == list(range(1, len(numbered) + 1))
    counts = Counter(w for _, w in numbered)
    # below 4096 tokens RULER repeats the 10 common words 6 times and the others once
    assert {counts[w] for w in s.outputs} == {6} and len(s.outputs) == 10
    assert set(counts.values()) == {1, 6}

    f = ruler.generate("fwe", tok, 2048, n=1, seed=4)[0]
    a, b = f.meta["context"]
    counts = Counter(f.input[a:b].split(" "))
    units = f.meta["units"]
    # Zipf counts floor(units * k^-2 / zeta(2)), zeta(2) = pi^2 / 6; "..." takes rank 1
    want = [int(units * k**-2.0 / (math.pi**2 / 6)) for k in range(1, 5)]
    assert [counts["..."]] + [counts[w] for w in f.outputs] == want
    assert ruler.zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=1e-15)
    assert ruler.zeta(4.0) == pytest.approx(math.pi**4 / 90, rel=1e-15)


def test_ruler_word_lists():
    words = ruler.word_list()
    assert len(words) > 1000 and list(words) == sorted(set(words))
    assert all(re.fullmatch(r"[a-z]{3,10}", w) for w in words)
    more = ruler.pseudo_words(5000)
    assert len(set(more)) == 5000 and not set(more) & set(words)
    assert ruler.pseudo_words(10) == more[:10]  # one fixed sequence


def test_ruler_errors(tok):
    with pytest.raises(UserError, match="unknown RULER task"):
        ruler.generate("qa_1", tok, 1024, 1, 0)
    with pytest.raises(UserError, match="too short"):
        ruler.generate("vt", tok, 400, 1, 0)
    with pytest.raises(UserError, match="no room"):
        ruler.generate("niah_single_1", tok, 128, 1, 0)


# ---------------------------------------------------------------- LongBench loader

LB = FIXTURES / "longbench"


def test_longbench_load_and_build(tok):
    records = longbench.load("hotpotqa", data_dir=LB)
    assert len(records) == 2 and longbench.load("hotpotqa", data_dir=LB, n=1) == records[:1]
    s = longbench.build("hotpotqa", records[0], tok, max_length=3500)
    r = records[0]
    assert s.prompt == (
        "Answer the question based on the given passages. Only give me the answer and do not output any "
        "other words.\n\nThe following are given passages.\n" + r["context"] + "\n\nAnswer the question "
        "based on the given passages. Only give me the answer and do not output any other words.\n\n"
        "Question: " + r["input"] + "\nAnswer:"
    )
    assert s.chat and s.max_new == 32 and s.answers == r["answers"] and s.stop == []

    code = longbench.build("lcc", longbench.load("lcc", data_dir=LB)[0], tok, 3500)
    assert not code.chat and code.max_new == 64
    assert code.prompt.startswith("Please complete the code given below. \ndef area(")
    assert code.prompt.endswith("def perimeter(width, height):\nNext line of code:\n")

    trec = longbench.build("trec", longbench.load("trec", data_dir=LB)[0], tok, 3500)
    assert not trec.chat and "Location" in trec.all_classes
    assert longbench.dataset2prompt["narrativeqa"].count("asconcisely") == 2  # the official typo, kept


def test_longbench_middle_truncation(tok):
    r = longbench.load("hotpotqa", data_dir=LB)[0]
    full = longbench.dataset2prompt["hotpotqa"].format(**r)
    ids = tok.encode(full, special=True)
    assert len(ids) > 40
    s = longbench.build("hotpotqa", r, tok, max_length=40)
    assert s.prompt == tok.decode(ids[:20]) + tok.decode(ids[-20:])
    assert s.prompt.startswith("Answer the question") and s.prompt.endswith("Answer:")
    assert longbench.truncate_middle(full, tok, len(ids)) == full  # fits: untouched


def test_longbench_scores_on_the_fixtures(tok):
    gold_pred = {"hotpotqa": None, "trec": None, "passage_retrieval_en": None, "lcc": None}
    for task in gold_pred:
        samples = [longbench.build(task, r, tok, 3500) for r in longbench.load(task, data_dir=LB)]
        preds = [x.answers[0] for x in samples]
        assert longbench.score(task, preds, samples) == 100.0
        by_len = longbench.score_e(task, preds, samples)
        assert by_len["0-4k"] == 100.0 and math.isnan(by_len["8k+"])
    samples = [longbench.build("trec", r, tok, 3500) for r in longbench.load("trec", data_dir=LB)]
    assert longbench.score("trec", ["Human being or Location\n", "Date"], samples) == 25.0  # (1/2 + 0) / 2


def test_longbench_errors(monkeypatch, tmp_path):
    with pytest.raises(UserError, match=r"qasper\.jsonl.*--data-dir"):
        longbench.load("qasper", data_dir=LB)
    with pytest.raises(UserError, match="unknown LongBench task"):
        longbench.load("dureader", data_dir=LB)
    (tmp_path / "musique.jsonl").write_text('{"input": "q", "context": "c", "answers": ["a"]}\nnot json\n')
    with pytest.raises(UserError, match=r"musique\.jsonl:2: not valid JSON"):
        longbench.load("musique", data_dir=tmp_path)

    def offline(name):
        raise ConnectionError("Couldn't reach 'Xnhyacinth/LongBench' on the Hub (LocalEntryNotFound)\nmore")

    monkeypatch.setattr(longbench, "_from_hub", offline)
    with pytest.raises(UserError) as e:
        longbench.load("hotpotqa")
    line = str(e.value)
    assert "\n" not in line and "Couldn't reach" in line
    assert "--data-dir" in line and "hotpotqa.jsonl" in line and "answers" in line

    def missing(name):
        raise ImportError("No module named 'datasets'")

    monkeypatch.setattr(longbench, "_from_hub", missing)
    with pytest.raises(UserError, match="`datasets` package is not installed.*--data-dir"):
        longbench.load("hotpotqa")


# ---------------------------------------------------------------- GSM8K


def test_gsm8k_load_and_build():
    rows = gsm8k.load(FIXTURES / "gsm8k")
    assert len(rows) == 3 and gsm8k.load(FIXTURES / "gsm8k" / "test.jsonl", n=2) == rows[:2]
    assert [gsm8k.gold(r["answer"]) for r in rows] == ["6", "1500", "-7"]
    s = gsm8k.build(rows[0])
    assert s.prompt == (
        rows[0]["question"] + "\n\nAfter completing all necessary analysis and calculations, output the "
        "final numerical result in the format: The answer is: [insert the numerical answer here]. "
    )
    assert s.system == "As an expert problem solver, solve the following mathematical questions."
    assert s.max_new == 500 and s.gold == "6"


def test_gsm8k_extraction():
    ex = gsm8k.extract
    assert ex("Step 1: 14 + 9 = 23. Step 2: 23 - 17 = 6. The answer is: 6") == "6"
    assert ex("The answer is: 1,500 books") == "1500"
    assert ex("So 7 apples, then: total 12 and 5") == "5"  # the last number after the last ':'
    assert ex("The answer is: 18.0") == "18.0"  # a float stays a float: not equal to "18"
    assert ex("Temperature: -7 degrees") == "-7"
    assert ex("answer: +7") == "7" and ex("answer: 007") == "7" and ex("ratio: .5") == "0.5"
    assert ex("3: 4 and 5:") is None  # nothing after the last ':'
    assert ex("no digits here") is None
    assert ex("12 eggs") == "12"  # no ':' at all: the whole text
    preds, golds = ["answer is: 6", "The answer is: 1,500.", "It is: -7.0"], ["6", "1500", "-7"]
    assert gsm8k.accuracy(preds, golds) == pytest.approx(200 / 3)  # -7.0 reads "-7.0", not "-7"


def test_gsm8k_errors(monkeypatch, tmp_path):
    with pytest.raises(UserError, match=r"no file .*--data-dir"):
        gsm8k.load(tmp_path)

    def offline():
        raise OSError("Connection refused\nTraceback")

    monkeypatch.setattr(gsm8k, "_from_hub", offline)
    with pytest.raises(UserError) as e:
        gsm8k.load()
    assert "\n" not in str(e.value) and "openai/gsm8k" in str(e.value) and "--data-dir" in str(e.value)


def test_policies_flag_names_every_method():
    from bench.standard.cli import DEFAULT_POLICIES, label, parse_policies

    pols = parse_policies(
        "full,snapkv:0.2,snapkv:budget=0.2/pooling=avg,pyramidkv:0.5,adakv:budget=0.2/scorer=tova,twilight"
    )
    assert [label(p) for p in pols] == [
        "full",
        "snapkv 20%",
        "snapkv 20% avg",
        "pyramidkv 50%",
        "adakv 20% tova",
        "twilight T=0.01",
    ]
    assert [label(p) for p in parse_policies(DEFAULT_POLICIES)][:3] == [
        "full",
        "refreekv T=0.01",
        "refreekv T=0.01 mass",
    ]


def test_a_bad_policy_is_one_line_before_the_model_loads(capsys):
    from bench.standard.cli import main

    assert (
        main(
            [
                "--suite",
                "ruler",
                "--out",
                "/nonexistent/x.jsonl",
                "--model",
                "/nonexistent",
                "--policies",
                "snapkv:pooling=mean",
            ]
        )
        != 0
    )
    err = capsys.readouterr().err
    assert "pooling must be one of" in err and "Traceback" not in err
