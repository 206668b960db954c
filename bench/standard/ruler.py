"""RULER's synthetic tasks (NVIDIA/RULER), generated here for any tokenizer, length and seed.

    from bench.standard.ruler import generate, score
    samples = generate("niah_multikey_2", tokenizer, length=4096, n=20, seed=42)
    # feed s.input (RULER's "base" template: no chat template) and decode up to s.max_new tokens, then
    score("niah_multikey_2", predictions, [s.outputs for s in samples])   # 0-100

Tasks: niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery, vt, cwe, fwe (RULER's 13
minus the two QA tasks, which need SQuAD / HotpotQA).

Followed exactly (NVIDIA/RULER at c3f5e3b):
  - scripts/synthetic.yaml: each task's haystack, key / value types and needle counts, vt's chains and
    hops, cwe's frequencies, fwe's alpha.
  - scripts/data/synthetic/constants.py: templates, answer prefixes and tokens_to_generate (Sample.max_new).
    Sample.input is template + answer prefix, as scripts/data/prepare.py builds it and pred/call_api.py
    feeds it (input + answer_prefix).
  - niah.py, variable_tracking.py (its 500-token answered example first, re-randomised per sample),
    common_words_extraction.py (its few-shot example; other frequencies below 4096 tokens) and
    freq_words_extraction.py (6-letter coded words, Zipf counts, alpha 2): how needles, chains and word
    lists are built and placed, the singular template for one needle, the needle depths.
  - the metric of scripts/eval (evaluate.py's postprocess_pred, then string_match_all, x 100).
  - `length` is RULER's max_seq_length: input tokens + max_new <= length, tokens counted without special
    tokens (RULER counts tokenizer.tokenize(text)). Sample.length is the input's own token count.

Substituted (the originals need a download, or packages the project does not ship):
  - haystack "essay" (Paul Graham's essays, which RULER downloads) -> real English prose that ships with
    Python: the documentation topics of pydoc_data.topics, in sorted topic order, cut into words as RULER
    cuts the essays (and repeated the same way when too short). Tasks with the substituted haystack:
    niah_single_2, niah_single_3, niah_multikey_1, niah_multivalue, niah_multiquery. Unaffected:
    niah_single_1 and vt (the "noise" haystack, RULER's own sentences), niah_multikey_2 and niah_multikey_3
    (the "needle" haystack: distractor needles), cwe and fwe (word lists, no haystack).
  - nltk's sent_tokenize (its punkt data is a download) -> a split after . ! or ? followed by whitespace.
  - wonderwords' adjective / noun / verb lists -> WORDS: the lowercase words of 3-10 letters standing alone
    at least twice in the prose lines of pydoc_data.topics (about 1.3k). niah's "words" keys are two of
    them joined by "-" (RULER's are adjective-noun pairs); cwe samples its words from them. Where cwe needs
    more distinct words than that (RULER then samples its larger english_words.json), pseudo-words built
    from syllables with a fixed seed stand in.
  - numpy / scipy (np.random, scipy.special.zeta) -> one random.Random(seed) and a zeta of our own.
Sizing, on purpose unlike RULER: its binary search over the haystack size is kept, but a sample that then
comes out a few tokens too long steps back one haystack unit, where RULER steps back a whole search
increment (up to 500 essay words); and fwe sizes each sample by binary search after RULER's coarse search
(steps of max_len / 32 words, ~10% of the tokens). So every sample lands within a few percent under the
target (one haystack unit: ~6% at 1024 tokens for niah_multikey_3, whose units are two-uuid needles).
"""

import random
import string
import uuid
from dataclasses import dataclass, field

from bench.standard.metrics import postprocess_pred, string_match_all
from bench.standard.ruler_material import essay_words, pseudo_words, sentences, word_list, zeta
from weights.errors import UserError

# scripts/data/synthetic/constants.py: (template, answer prefix, tokens_to_generate)
TEMPLATES = {
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
        "{type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
        128,
    ),
    "variable_tracking": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
        "assigned the value {query}, they are: ",
        30,
    ),
    "common_words_extraction": (
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
        "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
        "list?",
        " Answer: The top 10 words that appear most often in the list are:",
        120,
    ),
    "freq_words_extraction": (
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
        "the dots '....'. What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
        50,
    ),
}


def _niah(hay, k_type, v_type, k=1, v=1, q=1):
    return ("niah", {"hay": hay, "k_type": k_type, "v_type": v_type, "k": k, "v": v, "q": q})


# scripts/synthetic.yaml
CONFIGS = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", q=4),
    "vt": ("variable_tracking", {"num_chains": 1, "num_hops": 4}),
    "cwe": ("common_words_extraction", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    "fwe": ("freq_words_extraction", {"alpha": 2.0}),
}
TASKS = tuple(CONFIGS)
SUBSTITUTED_HAYSTACK = tuple(t for t, (_, c) in CONFIGS.items() if c.get("hay") == "essay")

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)).astype(int)


@dataclass
class Sample:
    input: str  # the whole prompt: template + answer prefix
    outputs: list[str]  # the gold answers (string_match_all wants all of them)
    length: int  # tokens of input (no special tokens)
    depth: float | None  # where the needle holding outputs[0] sits, see below (None: cwe, fwe)
    max_new: int  # RULER's tokens_to_generate
    meta: dict = field(default_factory=dict)  # task, context (start, end) in input, all outputs' depths, ...


# Depth: the percent of the haystack's sentences before the needle. Essay haystacks: RULER's grid value d
# (0, 3, 5, ..., 100), the needle following int(sentences x d / 100) of them; line haystacks (noise,
# needle, vt's chains): 100 x the needle's line index / the context's lines, RULER drawing the index.
# The stand-in essay's sentences vary a lot in length (a code block reads as one), so there the needle's
# character position can be ~10% away from its depth at 1-2k tokens.


# ---------------------------------------------------------------- material: bench/standard/ruler_material.py


# ---------------------------------------------------------------- sizing


def _largest(fits, lo: int, hi: int) -> int | None:
    """The largest n in [lo, hi] with fits(n), by binary search (fits is assumed monotone), else None."""
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


class _Gen:
    """What every task needs: the tokenizer's count, the seeded RNG, the target and the template parts."""

    def __init__(self, task, tokenizer, length, seed):
        self.task, self.tok, self.length, self.seed = task, tokenizer, length, seed
        self.family, self.cfg = CONFIGS[task]
        tmpl, prefix, self.max_new = TEMPLATES[self.family]
        self.template = tmpl + prefix
        self.rng = random.Random(seed)  # RULER's global random (and np.random) seeded with random_seed

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, special=False))

    def fits(self, text: str) -> bool:
        return self.count(text) + self.max_new <= self.length

    def shuffle(self, items: list):
        random.Random(self.seed).shuffle(items)  # RULER's random.Random(args.random_seed).shuffle

    def fill(self, template: str, context: str, **kw) -> tuple[str, tuple[int, int]]:
        """template.format(context=context, **kw) and the span of the context in it."""
        pre, post = template.split("{context}")
        pre = pre.format(**kw)
        return pre + context + post.format(**kw), (len(pre), len(pre) + len(context))

    def sized(self, make, unit_lo: int, search_hi: int, n: int) -> list:
        """RULER's binary search for the largest haystack that fits, then n samples, each stepping back one
        unit while it is too long. make(units) -> (input, outputs, span, depths, sentences)."""
        best = _largest(lambda u: self.fits(make(u)[0]), unit_lo, search_hi)
        if best is None:
            room = f"{self.length} tokens is too short for its prompt and {self.max_new} new tokens"
            raise UserError(f"RULER {self.task}: {room}")
        out = []
        for _ in range(n):
            units = best
            while True:
                sample = make(units)
                if self.fits(sample[0]):
                    break
                if units <= unit_lo:
                    raise UserError(f"RULER {self.task}: could not fit a sample into {self.length} tokens")
                units -= 1
            out.append((units, *sample))
        return out

    def upper(self, make, inc: int) -> int:
        """RULER's upper bound: (target / tokens per unit measured at `inc` units) x 3, at least 2 x inc."""
        per = self.count(make(inc)[0]) / inc
        return max(int(self.length / per * 3), inc * 2)

    def samples(self, rows) -> list[Sample]:
        out = []
        for units, text, outputs, span, depths, n_sents in rows:
            meta = {"task": self.task, "context": span, "depths": depths, "units": units}
            meta["sentences"] = n_sents  # of the haystack (essay) or lines of the context
            depth = depths[0] if depths else None
            out.append(Sample(text, outputs, self.count(text), depth, self.max_new, meta))
        return out


# ---------------------------------------------------------------- niah


def _niah_samples(g: _Gen, n: int) -> list[Sample]:
    c = g.cfg
    k, v, q = max(c["k"], c["q"]), c["v"], c["q"]
    tv, tv_query = c["v_type"], c["v_type"]
    template = g.template
    if q * v == 1:  # one answer: RULER's singular template
        for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(a, b)
        tv_query = tv[:-1]
    words = word_list()

    def rand(kind):
        if kind == "numbers":
            return str(g.rng.randint(10**6, 10**7 - 1))
        if kind == "words":
            return f"{g.rng.choice(words)}-{g.rng.choice(words)}"
        return str(uuid.UUID(int=g.rng.getrandbits(128), version=4))

    def make(units):
        keys, values, needles = [], [], []
        for _ in range(k):
            keys.append(rand(c["k_type"]))
            values.append([])
            for _ in range(v):
                values[-1].append(rand(tv))
                needles.append(NEEDLE.format(type_needle_v=tv, key=keys[-1], value=values[-1][-1]))
        g.shuffle(needles)
        depth_of = {}
        if c["hay"] == "essay":
            hay = essay_words()
            reps = -(-units // len(hay))
            sents = sentences(" ".join((hay * reps)[:units]))
            depths = sorted(g.rng.sample(DEPTHS, len(needles)))
            cuts = [0] + [int(len(sents) * d / 100) for d in depths] + [len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1] : cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
                    depth_of[needles[i - 1]] = depths[i - 1]
            context = " ".join(parts)
            n_sents = len(sents)
        else:
            if c["hay"] == "noise":
                sents = [NOISE] * units
            else:
                sents = []
                for _ in range(units):  # distractor needles
                    sents.append(NEEDLE.format(type_needle_v=tv, key=rand(c["k_type"]), value=rand(tv)))
            where = sorted(g.rng.sample(range(units), len(needles)), reverse=True)
            for at, needle in zip(where, needles):
                sents.insert(at, needle)
            for needle in needles:
                depth_of[needle] = 100 * sents.index(needle) / len(sents)
            context = "\n".join(sents)
            n_sents = len(sents)
        picked = g.rng.sample(range(k), q)
        queries = [keys[i] for i in picked]
        answers = [a for i in picked for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        text, span = g.fill(template, context, type_needle_v=tv_query, query=query)
        by_value = {nd.rsplit(" is: ", 1)[1][:-1]: d for nd, d in depth_of.items()}
        return text, answers, span, [by_value[a] for a in answers], n_sents

    if c["hay"] == "essay":
        inc, lo = 500, 1
    else:
        inc, lo = (5 if g.length < 4096 else 25), k * v
    rows = g.sized(make, lo, g.upper(make, inc), n)
    return g.samples(rows)


# ---------------------------------------------------------------- vt


def _vt_samples(g: _Gen, n: int) -> list[Sample]:
    hops, n_chains = g.cfg["num_hops"], g.cfg["num_chains"]
    upper = string.ascii_uppercase

    def chains(icl: bool):
        letters, h = (3, min(10, hops)) if icl else (5, hops)
        names = ["".join(g.rng.choices(upper, k=letters)) for _ in range((h + 1) * n_chains)]
        while len(set(names)) < n_chains * (h + 1):  # RULER appends and keeps going over all of them
            names.append("".join(g.rng.choices(upper, k=letters)))
        groups, lines = [], []
        for i in range(0, len(names), h + 1):
            group = names[i : i + h + 1]
            groups.append(group)
            head = 12345 if icl else g.rng.randint(10000, 99998)  # np.random.randint(10000, 99999)
            hop_lines = [f"VAR {group[j + 1]} = VAR {group[j]} " for j in range(h)]  # trailing space: RULER's
            lines.append([f"VAR {group[0]} = {head}"] + hop_lines)
        return groups, lines

    def make(units, icl=False):
        groups, lines = chains(icl)
        value = lines[0][0].split("=")[-1].strip()
        sents = [NOISE] * units
        for chain in lines:
            at = sorted(g.rng.sample(range(len(sents)), len(chain)))
            for j, pos in enumerate(at):
                sents.insert(pos + j, chain[j])
        depths = [100 * sents.index(line) / len(sents) for line in lines[0]]
        context = "\n".join(sents).replace(". \n", ".\n")
        text, span = g.fill(g.template, context, query=value, num_v=hops + 1)
        return text, groups[0], span, depths, len(sents)

    # the in-context example: RULER sizes it to 500 tokens with nothing to generate, then shows it answered
    target, g.length, g.max_new = g.length, 500, 0
    icl_rows = g.sized(lambda u: make(u, icl=True), hops + 1, g.upper(lambda u: make(u, icl=True), 5), 1)
    g.length, g.max_new = target, TEMPLATES["variable_tracking"][2]
    icl_text, icl_vars = icl_rows[0][1], icl_rows[0][2]
    example = icl_text + " " + " ".join(icl_vars) + "\n"

    def randomized(ex: str) -> str:
        for item in ex.strip().split()[-hops - 1 :]:
            ex = ex.replace(item, "".join(g.rng.choices(upper, k=len(item))))
        return ex.replace("12345", str(g.rng.randint(10000, 99998)))

    def make_with_example(units):
        text, outputs, (a, b), depths, lines = make(units)
        head = randomized(example) + "\n"
        return head + text, outputs, (a + len(head), b + len(head)), depths, lines

    inc = 5 if g.length < 4096 else 10
    return g.samples(g.sized(make_with_example, hops + 1, g.upper(make, inc), n))


# ---------------------------------------------------------------- cwe


def _cwe_samples(g: _Gen, n: int) -> list[Sample]:
    c = g.cfg
    words = list(word_list())
    g.shuffle(words)  # RULER: sorted(set(words)), then shuffled with the seed

    def numbered(ws):
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(ws))

    def example(num_words, common_repeats, uncommon_repeats, common_nums):
        pool = words if num_words <= len(words) else pseudo_words(max(num_words, 30000))
        chosen = g.rng.sample(pool, num_words)
        common, uncommon = chosen[:common_nums], chosen[common_nums:]
        listed = common * common_repeats + uncommon * uncommon_repeats
        g.shuffle(listed)
        return numbered(listed), common

    def make(num_words):
        if g.length < 4096:
            shot = example(20, 3, 1, c["num_cw"])
            context, answer = example(num_words, 6, 1, c["num_cw"])
        else:
            shot = example(40, 10, 3, c["num_cw"])
            context, answer = example(num_words, c["freq_cw"], c["freq_ucw"], c["num_cw"])
        shot_text = g.fill(g.template, shot[0], query="")[0] + " " + numbered(shot[1])
        text, (a, b) = g.fill(g.template, context, query="")
        head = shot_text + "\n"
        return head + text, answer, (a + len(head), b + len(head)), None, None

    per = g.count(make(4096)[0]) / 4096
    inc = 10
    rows = g.sized(make, inc, max(int(g.length // per) * 2, inc * 2), n)
    return g.samples(rows)


# ---------------------------------------------------------------- fwe


def _fwe_samples(g: _Gen, n: int) -> list[Sample]:
    alpha, word_len = g.cfg["alpha"], 6
    max_len = g.length - g.max_new
    vocab_size = max_len // 50
    z = zeta(alpha)

    def vocab():
        v = ["".join(g.rng.choices(string.ascii_lowercase, k=word_len)) for _ in range(vocab_size)]
        while len(set(v)) < vocab_size:
            v.append("".join(g.rng.choices(string.ascii_lowercase, k=word_len)))
        v = sorted(set(v))
        g.shuffle(v)
        v[0] = "..."  # the top-ranked word is noise
        return v

    def text(v, num_words):
        counts = [int(num_words * (k**-alpha) / z) for k in range(1, len(v) + 1)]
        coded = [w for w, cnt in zip(v, counts) for _ in range(cnt)]
        g.shuffle(coded)
        body, span = g.fill(g.template, " ".join(coded), query="")
        return body, v[1:4], span

    def fits(v, num_words):
        return g.count(text(v, num_words)[0]) <= max_len

    if vocab_size < 4:
        raise UserError(f"RULER fwe: {g.length} tokens is too short (its vocabulary needs 4 words at least)")
    inc = max(1, max_len // 32)
    v = vocab()
    num = max_len // word_len
    while g.count(text(v, num)[0]) < max_len:  # RULER's coarse search
        num += inc
    rows = []
    for _ in range(n):
        v = vocab()  # each sample's vocabulary tokenizes differently: its own size, by binary search
        units = _largest(lambda u: fits(v, u), 1, 2 * num)
        if units is None:
            raise UserError(f"RULER fwe: could not fit a sample into {g.length} tokens")
        body, outputs, span = text(v, units)
        rows.append((units, body, outputs, span, None, None))
    return g.samples(rows)


# ---------------------------------------------------------------- API


_FAMILIES = {
    "niah": _niah_samples,
    "variable_tracking": _vt_samples,
    "common_words_extraction": _cwe_samples,
    "freq_words_extraction": _fwe_samples,
}


def generate(task: str, tokenizer, length: int, n: int, seed: int = 42) -> list[Sample]:
    """n samples of a RULER task whose input + max_new tokens fit in `length` tokens of this tokenizer
    (anything with encode(text, special=False) -> ids, e.g. engine.tokenizer.Tokenizer)."""
    if task not in CONFIGS:
        raise UserError(f"unknown RULER task {task!r} (known: {', '.join(TASKS)})")
    if n < 1:
        raise UserError(f"RULER {task}: n must be at least 1, not {n}")
    g = _Gen(task, tokenizer, length, seed)
    if length <= g.max_new:
        raise UserError(f"RULER {task}: length {length} leaves no room beside {g.max_new} new tokens")
    return _FAMILIES[g.family](g, n)


def score(task: str, predictions: list[str], outputs: list[list[str]]) -> float:
    """RULER's score of the task (0-100): every task here is string_match_all after postprocess_pred."""
    if task not in CONFIGS:
        raise UserError(f"unknown RULER task {task!r} (known: {', '.join(TASKS)})")
    if not predictions or len(predictions) != len(outputs):
        raise UserError(f"RULER {task}: {len(predictions)} predictions for {len(outputs)} samples")
    return string_match_all([postprocess_pred(p) for p in predictions], outputs)
