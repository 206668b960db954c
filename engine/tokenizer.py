"""Text in and out: the checkpoint's own tokenizer (tokenizer.json) and chat template (Jinja,
rendered as HF does), incremental detokenisation and stop strings."""

import json
from datetime import datetime
from pathlib import Path

from weights.errors import UserError


def _token_str(v):
    v = v.get("content") if isinstance(v, dict) else v
    return v if isinstance(v, str) else None


def _json_object(path: Path) -> dict:
    """A JSON object from an optional file ({} when absent); anything else is one clear error."""
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(cfg).__name__}")
    return cfg


def _unicode_to_byte() -> dict:
    """GPT-2's byte-level alphabet, inverted: each of the 256 characters to the byte it stands for."""
    global _U2B
    if _U2B is None:
        keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1)]
        keep += range(ord("\u00ae"), ord("\u00ff") + 1)
        chars, extra = {}, 0
        for b in range(256):
            if b in keep:
                chars[chr(b)] = b
            else:
                chars[chr(256 + extra)] = b
                extra += 1
        _U2B = chars
    return _U2B


_U2B = None


class Tokenizer:
    def __init__(self, model_dir):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"no tokenizer.json in {model_dir} (the engine needs the fast-tokenizer file)")
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exceptions
            raise UserError(f"{path} is not a valid tokenizer file: {str(e).splitlines()[0]}") from None
        where = model_dir / "tokenizer_config.json"
        cfg = _json_object(where)
        # as transformers 5 reads them: special_tokens_map.json only for a legacy tokenizer_config.json (one
        # without added_tokens_decoder), and then it wins; otherwise tokenizer_config.json alone
        special = {} if "added_tokens_decoder" in cfg else _json_object(model_dir / "special_tokens_map.json")
        self.bos = _token_str(special.get("bos_token")) or _token_str(cfg.get("bos_token"))
        self.eos = _token_str(special.get("eos_token")) or _token_str(cfg.get("eos_token"))
        tmpl = cfg.get("chat_template")
        if isinstance(tmpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
            if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in tmpl):
                raise UserError(
                    f"{where}: chat_template as a list must hold {{'name': ..., 'template': ...}} objects"
                )
            tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
        if (
            model_dir / "chat_template.jinja"
        ).is_file():  # the file wins over the config's field (transformers 5)
            tmpl = (model_dir / "chat_template.jinja").read_text()
        if tmpl is not None and not isinstance(tmpl, str):
            raise UserError(f"{where}: chat_template must be a string, not {type(tmpl).__name__}")
        self.chat_template = tmpl
        self._byte_level = None  # token_bytes: read from the decoder on first use

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (part of a character, for a byte-level token that splits
        one): byte-level BPE maps each character of the token back to its byte; SentencePiece-style
        vocabularies spell bytes as <0xNN> and spaces as U+2581; added tokens are their text."""
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level is None:
            import json

            decoder = json.loads(self.tok.to_str()).get("decoder") or {}
            kinds = [d.get("type") for d in decoder.get("decoders", [decoder])]
            self._byte_level = "ByteLevel" in kinds
            self._added = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        if piece in self._added:
            return piece.encode()
        if self._byte_level:
            table = _unicode_to_byte()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
            return piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode()

    def encode(self, text: str, special: bool = True) -> list[int]:
        """special: add the tokenizer's own BOS/EOS framing (off for chat-templated text, which has it)."""
        return self.tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_id(self, text: str | None):
        return None if text is None else self.tok.token_to_id(text)

    def apply_chat(self, prompt: str, system: str | None = None) -> str:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": prompt}
        ]
        return self.apply_messages(messages)

    def apply_messages(self, messages: list[dict]) -> str:
        """A conversation through the checkpoint's chat template, ready for the assistant's turn."""
        if not self.chat_template:
            raise UserError("this checkpoint has no chat template; use --raw")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos or "",
                eos_token=self.eos or "",
            )
        except Exception as e:  # noqa: BLE001 - a template is the checkpoint's code: any failure is its error
            raise UserError(f"chat template failed: {type(e).__name__}: {e}") from None


class Detok:
    """Incremental detokenisation: each new token re-decodes only a short window of recent ids
    (the text of ids[prefix:] minus that of ids[prefix:read]), never the whole output, and text
    only grows once its bytes form whole characters (no trailing U+FFFD)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.text = tokenizer, [], ""
        self.prefix = self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        done = self.tok.decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        now = self.tok.decode(self.ids[self.prefix :])
        if len(now) > len(done) and not now.endswith("\ufffd"):
            self.text += now[len(done) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self.text


def find_stop(text: str, stops: list[str], since: int = 0) -> int:
    """Index of the first stop string in text (searching from where text was at `since` chars,
    minus what a stop could straddle), or -1. Costs the new text plus the stops' lengths, never
    the whole output."""
    hits = [i for st in stops if (i := text.find(st, max(0, since - len(st) + 1))) >= 0]
    return min(hits, default=-1)


def stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that could still grow into a stop string (held back from
    streaming). Only the last len(stop) - 1 characters are read: each candidate start is found with
    str.find of the stop's first character, so the cost is bounded by the stops' lengths."""
    best = 0
    for st in stops:
        span = min(len(text), len(st) - 1)
        if span <= best:
            continue
        tail = text[len(text) - span :]
        i = tail.find(st[0])
        while 0 <= i < span - best:  # the first (leftmost) match is the longest tail
            if st.startswith(tail[i:]):
                best = span - i
                break
            i = tail.find(st[0], i + 1)
    return best
