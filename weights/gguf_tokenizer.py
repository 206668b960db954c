"""The byte-level BPE tokenizer of a GGUF file (llama.cpp's tokenizer.ggml.* metadata) rebuilt as a
`tokenizers` Tokenizer, spelled and split the way the models' own tokenizer.json files are:
SmolLM2 (digits alone, then GPT-2 byte-level), Qwen2 (NFC, its split regex) and Llama 3 (its split
regex, merges ignored where a whole word is a token)."""

from pathlib import Path

from .errors import UserError

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # llama.cpp token types (1 normal, 5 unused, 6 byte)


def _pre_tokenizer(pre: str | None, path: Path):
    """(normalizer, pre_tokenizer, ignore_merges, trim_offsets) for llama.cpp's `tokenizer.ggml.pre`."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    if pre in (None, "default", "gpt2", "gpt-2"):
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False, True
    if pre == "smollm":  # SmolLM/SmolLM2: every digit alone, then GPT-2 byte-level splitting
        return (
            None,
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            ),
            False,
            True,
        )
    split = {
        "qwen2": _QWEN2_SPLIT,
        "deepseek-r1-qwen": _QWEN2_SPLIT,
        "llama-bpe": _LLAMA3_SPLIT,
        "llama3": _LLAMA3_SPLIT,
        "llama-v3": _LLAMA3_SPLIT,
    }.get(pre)
    if split is None:
        raise UserError(f"GGUF {path}: unsupported tokenizer pre-tokenizer {pre!r}")
    pt = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    if split is _QWEN2_SPLIT:
        return normalizers.NFC(), pt, False, False
    return None, pt, True, True  # llama-3: ignore_merges, as its tokenizer.json says


def _bytes_to_unicode() -> dict[int, str]:
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(path: Path, meta: dict):
    """The tokenizers.Tokenizer for a GGUF's tokenizer.ggml.* metadata (`meta`: those keys without
    the prefix: model, tokens, token_type, merges, pre, bos_token_id, add_bos_token)."""
    from tokenizers import AddedToken, Tokenizer, decoders, processors
    from tokenizers.models import BPE

    tokens = meta["tokens"]
    model = meta.get("model")
    if model != "gpt2":
        raise UserError(
            f"GGUF {path}: tokenizer type {model!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    merges_raw = meta.get("merges")
    if not merges_raw:
        raise UserError(f"GGUF {path}: byte-level BPE tokenizer has no tokenizer.ggml.merges")
    types = meta.get("token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise UserError(f"GGUF {path}: {len(tokens)} tokens but {len(types)} token types")
    normalizer, pre_tok, ignore_merges, trim_offsets = _pre_tokenizer(meta.get("pre"), path)

    # Ordinary tokens are already spelled in the byte-level alphabet; re-spell any that are not
    # (as transformers does). Control/user-defined tokens stay literal: they are matched as added tokens.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty not in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED) and not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)  # a duplicate spelling keeps its first id (never seen in practice)
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise UserError(f"GGUF {path}: malformed merge {m!r}")
        merges.append((parts[0], parts[1]))

    tk = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=ignore_merges,
        )
    )
    if normalizer is not None:
        tk.normalizer = normalizer
    tk.pre_tokenizer = pre_tok
    tk.decoder = decoders.ByteLevel()
    bos = meta.get("bos_token_id")
    if meta.get("add_bos_token") and bos is not None:
        b = tokens[bos]
        tk.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=trim_offsets),
                processors.TemplateProcessing(
                    single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, bos)]
                ),
            ]
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    # Control tokens (<|im_start|>, <|endoftext|>...) are special: matched whole, dropped by
    # skip_special_tokens. User-defined ones (Qwen's <tool_call>) are matched whole but are not
    # special, as in the models' own tokenizer.json.
    tk.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _TOKEN_CONTROL
        ]
    )
    tk.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _TOKEN_USER_DEFINED
        ]
    )
    return tk
