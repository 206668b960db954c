"""The words RULER's tasks are made of, where the originals need a download (bench/standard/ruler.py's
docstring says what stands in for what): the stand-in essay (Python's bundled documentation prose) and
its sentences, the word list (for wonderwords' lists), pseudo-words past it, and a zeta of our own (for
scipy's, in fwe's Zipf counts)."""

import math
import random
import re
from collections import Counter
from functools import lru_cache


@lru_cache(maxsize=1)
def _doc_text() -> str:
    from pydoc_data.topics import topics

    return " ".join(topics[k] for k in sorted(topics))


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The stand-in essay, cut as RULER cuts the essays: whitespace runs to one space, split at spaces."""
    return tuple(re.sub(r"\s+", " ", _doc_text()).split(" "))


def sentences(text: str) -> list[str]:
    """Stand-in for nltk's sent_tokenize: split after . ! ? (and closing quotes / brackets) + whitespace."""
    return [s for s in re.split(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+", text.strip()) if s]


@lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    """WORDS: sorted lowercase words of 3-10 letters, with a vowel, standing alone at least twice in the prose
    lines of pydoc_data.topics (not indented, no >>> or ::=, so code examples and grammar rules stay out)."""
    from pydoc_data.topics import topics

    lines = [line for k in sorted(topics) for line in topics[k].split("\n")]
    prose = "\n".join(x for x in lines if x and not x.startswith(" ") and ">>>" not in x and "::=" not in x)
    counts = Counter(re.findall(r"(?<![\w.\"'])[a-z]{3,10}(?![\w(\"'])", prose))
    return tuple(sorted(w for w, c in counts.items() if c >= 2 and re.search("[aeiouy]", w)))


_ONSETS = "b bl br c ch cl cr d dr f fl fr g gl gr h j k l m n p pl pr r s sh sl sp st t th tr v w z".split()
_VOWELS = "a e i o u ai ea ee oa oo ou".split()
_CODAS = ["", "", "", "n", "r", "s", "l", "m", "t", "nd", "st"]
_PSEUDO: list[str] = []
_PSEUDO_RNG = random.Random("ruler-pseudo-words")


def pseudo_words(n: int) -> list[str]:
    """The first n of one fixed sequence of distinct pseudo-words (two or three syllables, fixed seed)."""
    if len(_PSEUDO) < n:
        seen = set(_PSEUDO) | set(word_list())
        while len(_PSEUDO) < n:
            syllables = _PSEUDO_RNG.choice((2, 3))
            w = "".join(
                _PSEUDO_RNG.choice(_ONSETS) + _PSEUDO_RNG.choice(_VOWELS) + _PSEUDO_RNG.choice(_CODAS)
                for _ in range(syllables)
            )
            if w not in seen:
                seen.add(w)
                _PSEUDO.append(w)
    return _PSEUDO[:n]


def zeta(s: float) -> float:
    """Riemann zeta for s > 1: 19 terms, then Euler-Maclaurin (error far below a float's precision)."""
    n = 20
    total = sum(k**-s for k in range(1, n)) + n ** (1 - s) / (s - 1) + 0.5 * n**-s
    rising, power = s, n ** (-s - 1)
    for j, bernoulli in enumerate((1 / 6, -1 / 30, 1 / 42, -1 / 30), start=1):
        total += bernoulli / math.factorial(2 * j) * rising * power
        rising *= (s + 2 * j - 1) * (s + 2 * j)
        power /= n * n
    return total
