"""The checkpoint's own tokenizer (tokenizer.json) and chat template (Jinja, rendered as HF does)."""

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
