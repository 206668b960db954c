"""LongBench v1's 16 English tasks (THUDM/LongBench), prompted and scored as its pred.py and eval.py do.

    from bench.standard import longbench
    records = longbench.load("hotpotqa", n=50)                       # or data_dir="DIR" (DIR/hotpotqa.jsonl)
    samples = [longbench.build("hotpotqa", r, tokenizer, max_length=3500) for r in records]
    # feed s.prompt through the model's chat template when s.chat (raw otherwise), greedy, s.max_new tokens,
    # stopping at s.stop; then
    longbench.score("hotpotqa", predictions, samples)                 # 0-100, LongBench's scorer

Followed exactly (THUDM/LongBench at 2e00731):
  - LongBench/config/dataset2prompt.json and dataset2maxlen.json: the prompt templates (copied as data,
    typos included: narrativeqa's "asconcisely") and the new-token budgets of the 16 English tasks.
  - LongBench/pred.py: the prompt is template.format(**record); a prompt longer than max_length tokens
    (config/model2maxlen.json: the context window less 500, e.g. 3500 for 4k, 7500 for 8k, 31500 for 32k;
    counted with the tokenizer's special tokens, as `tokenizer(prompt)` does) keeps its first and last
    int(max_length / 2) tokens, decoded without special tokens and joined; trec, triviaqa, samsum, lsht,
    lcc and repobench-p stay raw (no chat template), every other task goes through the chat template;
    samsum also stops at a newline and generates at least one token; decoding is greedy.
  - LongBench/eval.py and metrics.py, in bench/standard/metrics.py: the metric of each task, the
    first-line rule, the best over the answers, x 100 (and LongBench-E's length buckets, `score_e`).

Data: the hub copy `Xnhyacinth/LongBench` (one config per task, split "test"; THUDM/LongBench itself is a
loading script the current `datasets` refuses), or local JSONL files in LongBench's own format:
DIR/<task>.jsonl, one record a line with the fields input, context, answers, length, all_classes (and
dataset, language, _id).
LongBench-E (`e=True`) reads <task>_e from the same places.

The ReFreeKV authors' own harness (Patrick-Ni/ReFreeKV, load_datasets.py) differs from the official in two
ways we do not follow: it puts every task through the chat template, and fixes narrativeqa's typo.
"""

from dataclasses import dataclass, field
from pathlib import Path

from bench.standard.metrics import dataset2metric, scorer, scorer_e
from weights.errors import UserError

HUB_ID = "Xnhyacinth/LongBench"

TASKS = (
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "musique",
    "gov_report",
    "qmsum",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)

# pred.py: "chat models are better off without build prompts on these tasks"
RAW_TASKS = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")

_MULTIDOC = (
    "Answer the question based on the given passages. Only give me the answer and do not output any "
    "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
    "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\n"
    "Answer:"
)

# config/dataset2prompt.json (the English tasks), verbatim
dataset2prompt = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer "
        "the question asconcisely as you can, using a single phrase if possible. Do not provide any "
        "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely "
        "as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: "
        "{input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you "
        "can, using a single phrase or sentence if possible. If the question cannot be answered based "
        'on the information in the article, write "unanswerable". If the question is a yes/no '
        'question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\n'
        "Article: {context}\n\n Answer the question based on the above article as concisely as you "
        "can, using a single phrase or sentence if possible. If the question cannot be answered based "
        'on the information in the article, write "unanswerable". If the question is a yes/no '
        'question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\n'
        "Question: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
        "question based on the above text, only give me the answer and do not output any other "
        "words.\n\nQuestion: {input}\nAnswer:"
    ),
    "hotpotqa": _MULTIDOC,
    "2wikimqa": _MULTIDOC,
    "musique": _MULTIDOC,
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer "
        "the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based "
        "on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
        "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any "
        "other words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
        "{context}\n\n{input}"
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
        "Please carefully read these paragraphs and determine how many unique paragraphs there are "
        "after removing duplicates. In other words, how many non-repeating paragraphs are there in "
        "total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing "
        "duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\n"
        "The final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
        "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\n"
        "Please enter the number of the paragraph that the abstract is from. The answer format must be "
        'like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: '
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# config/dataset2maxlen.json (the English tasks)
dataset2maxlen = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "lcc": 64,
    "repobench-p": 64,
}

REQUIRED = ("input", "context", "answers")


@dataclass
class LBSample:
    task: str
    prompt: str  # template.format(**record), middle-truncated to max_length tokens
    chat: bool  # through the model's chat template (False for the RAW_TASKS)
    max_new: int  # dataset2maxlen
    answers: list[str]
    all_classes: list[str] | None
    length: int  # the record's own `length` (words; LongBench-E buckets by it)
    stop: list[str] = field(default_factory=list)  # samsum: a newline ends the answer
    min_new: int = 0  # samsum: at least one token (pred.py's min_length = context + 1)
    id: str | None = None


def _check(task: str):
    if task not in TASKS:
        raise UserError(f"unknown LongBench task {task!r} (the English tasks: {', '.join(TASKS)})")


def _how_to_pass(name: str) -> str:
    return (
        f"pass --data-dir DIR with {name}.jsonl in LongBench's own format (one JSON object a line: "
        "input, context, answers, length, all_classes)"
    )


def _from_dir(data_dir: Path, name: str) -> list[dict]:
    from bench.common import read_records

    return read_records(Path(data_dir) / f"{name}.jsonl", REQUIRED, f"LongBench {name}", _how_to_pass(name))


def _from_hub(name: str) -> list[dict]:
    import datasets  # heavy, and optional: imported only here

    return [dict(r) for r in datasets.load_dataset(HUB_ID, name, split="test")]


def load(task: str, data_dir=None, n: int | None = None, e: bool = False) -> list[dict]:
    """The task's test records (the first n): from DIR/<task>.jsonl when data_dir is given, else from the hub.
    A source that cannot be read is one UserError line saying how to pass local files."""
    _check(task)
    name = f"{task}_e" if e else task
    if data_dir is not None:
        rows = _from_dir(Path(data_dir), name)
    else:
        try:
            rows = _from_hub(name)
        except ImportError:
            why = "the `datasets` package is not installed"
            raise UserError(f"LongBench {name}: {why}; {_how_to_pass(name)}") from None
        except Exception as ex:  # offline, unknown config, hub errors: all the same advice
            why = (str(ex).strip().splitlines() or [type(ex).__name__])[0][:200]
            why = f"could not load {HUB_ID} ({why})"
            raise UserError(f"LongBench {name}: {why}; {_how_to_pass(name)}") from None
    return rows[:n] if n is not None else rows


def truncate_middle(prompt: str, tokenizer, max_length: int) -> str:
    """pred.py's truncation: over max_length tokens (special tokens counted), keep the first and the last
    int(max_length / 2), each decoded without special tokens, and join them."""
    ids = tokenizer.encode(prompt, special=True)
    if len(ids) <= max_length:
        return prompt
    half = int(max_length / 2)
    return tokenizer.decode(ids[:half]) + tokenizer.decode(ids[-half:])


def build(task: str, record: dict, tokenizer, max_length: int) -> LBSample:
    """One record as pred.py prompts it (before the chat template, which the caller applies when .chat)."""
    _check(task)
    prompt = truncate_middle(dataset2prompt[task].format(**record), tokenizer, max_length)
    return LBSample(
        task=task,
        prompt=prompt,
        chat=task not in RAW_TASKS,
        max_new=dataset2maxlen[task],
        answers=list(record["answers"]),
        all_classes=record.get("all_classes"),
        length=int(record.get("length") or 0),
        stop=["\n"] if task == "samsum" else [],
        min_new=1 if task == "samsum" else 0,
        id=record.get("_id"),
    )


def score(task: str, predictions: list[str], samples: list[LBSample]) -> float:
    """LongBench's task score (0-100). all_classes is one list per task; eval.py takes the last record's."""
    _check(task)
    if not predictions or len(predictions) != len(samples):
        raise UserError(f"LongBench {task}: {len(predictions)} predictions for {len(samples)} samples")
    return scorer(task, predictions, [s.answers for s in samples], samples[-1].all_classes)


def score_e(task: str, predictions: list[str], samples: list[LBSample]) -> dict:
    """LongBench-E's scores by length bucket ({"0-4k": ..., "4-8k": ..., "8k+": ...}, nan when empty)."""
    _check(task)
    if not predictions or len(predictions) != len(samples):
        raise UserError(f"LongBench {task}: {len(predictions)} predictions for {len(samples)} samples")
    answers = [s.answers for s in samples]
    return scorer_e(task, predictions, answers, [s.length for s in samples], samples[-1].all_classes)


assert set(dataset2prompt) == set(TASKS) == set(dataset2maxlen) == set(dataset2metric)
