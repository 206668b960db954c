"""GSM8K (openai/gsm8k, config "main", split "test"), prompted and scored as the ReFreeKV authors do.

    from bench.standard import gsm8k
    records = gsm8k.load(n=100)                 # or data="DIR" (DIR/test.jsonl) / data="file.jsonl"
    samples = [gsm8k.build(r) for r in records]
    # feed s.prompt through the chat template with s.system as the system message, greedy, s.max_new tokens
    gsm8k.accuracy(predictions, [s.gold for s in samples])   # percent

Followed exactly (Patrick-Ni/ReFreeKV at cc68486, the authors' code for arXiv 2502.16886):
  - load_datasets.py: the prompt "{question}\\n\\nAfter completing all necessary analysis and calculations,
    output the final numerical result in the format: The answer is: [insert the numerical answer here]. "
    (trailing space included), as the user turn of the chat template under the system message "As an
    expert problem solver, solve the following mathematical questions."; zero-shot.
  - main.py: 500 new tokens for gsm8k, greedy.
  - metrics.py / eval.py (eval_gsm8k): gold = the number after "#### " in the answer (commas dropped);
    prediction = lower-case it, keep the text after its last ":", drop commas, find the numbers
    ([-+]?\\d*\\.\\d+ or [-+]?\\d+), take the last, turn it into an int or a float, and compare str() of
    that with the gold string. Quirks kept: "18.0" is a float and reads "18.0", so it does not equal a
    gold "18"; "+7" reads "7"; "007" reads "7". A prediction with no number is wrong. Accuracy = correct /
    all, reported here in percent.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from weights.errors import UserError

HUB_ID, CONFIG, SPLIT = "openai/gsm8k", "main", "test"
SYSTEM = "As an expert problem solver, solve the following mathematical questions."
PROMPT = (
    "{question}\n\nAfter completing all necessary analysis and calculations, output the final numerical "
    "result in the format: The answer is: [insert the numerical answer here]. "
)
MAX_NEW = 500

_GOLD = re.compile(r"#### (-?[0-9.,]+)")
_NUMBER = re.compile(r"[-+]?\d*\.\d+|[-+]?\d+")


@dataclass
class GSMSample:
    prompt: str  # the user turn
    system: str
    max_new: int
    gold: str  # the number after ####, commas dropped
    question: str


def _how_to_pass() -> str:
    return "pass --data-dir DIR with test.jsonl (one JSON object a line with the fields question and answer)"


def _from_file(path: Path) -> list[dict]:
    from bench.common import read_records

    return read_records(path, ("question", "answer"), "GSM8K", _how_to_pass())


def _from_hub() -> list[dict]:
    import datasets  # heavy, and optional: imported only here

    return [dict(r) for r in datasets.load_dataset(HUB_ID, CONFIG, split=SPLIT)]


def load(data=None, n: int | None = None) -> list[dict]:
    """The test problems (the first n): from a JSONL file, or DIR/test.jsonl, when data is given, else from
    the hub. A source that cannot be read is one UserError line saying how to pass a local file."""
    if data is not None:
        path = Path(data)
        rows = _from_file(path / "test.jsonl" if path.is_dir() else path)
    else:
        try:
            rows = _from_hub()
        except ImportError:
            raise UserError(f"GSM8K: the `datasets` package is not installed; {_how_to_pass()}") from None
        except Exception as ex:  # offline or hub errors: the same advice
            why = (str(ex).strip().splitlines() or [type(ex).__name__])[0][:200]
            raise UserError(f"GSM8K: could not load {HUB_ID} ({why}); {_how_to_pass()}") from None
    return rows[:n] if n is not None else rows


def gold(answer: str) -> str:
    """The reference number: what follows "#### " (after dropping commas), commas dropped."""
    found = _GOLD.search(answer.replace(",", ""))
    if found is None:
        raise UserError(f"GSM8K: an answer without '#### N': {answer[-80:]!r}")
    return found.group(1).strip().replace(",", "")


def extract(prediction: str) -> str | None:
    """The predicted number as the authors read it (None when there is none), see the module docstring."""
    tail = prediction.lower().split(":")[-1].replace(",", "")
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    last = numbers[-1]
    return str(float(last) if "." in last else int(last))


def is_correct(prediction: str, gold_number: str) -> bool:
    return extract(prediction) == gold_number


def accuracy(predictions: list[str], golds: list[str]) -> float:
    """Percent of predictions whose extracted number equals the gold string."""
    if not predictions or len(predictions) != len(golds):
        raise UserError(f"GSM8K: {len(predictions)} predictions for {len(golds)} problems")
    return 100 * sum(is_correct(p, g) for p, g in zip(predictions, golds)) / len(predictions)


def build(record: dict) -> GSMSample:
    q = record["question"]
    return GSMSample(PROMPT.format(question=q), SYSTEM, MAX_NEW, gold(record["answer"]), q)
