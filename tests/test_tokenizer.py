"""engine/tokenizer.py against transformers' own tokenizer on the same files: BOS/EOS from
special_tokens_map.json when tokenizer_config.json lacks them, an empty system message kept, and
malformed tokenizer files as one clear error."""

import json

import pytest
from helpers import write_byte_tokenizer

from engine.tokenizer import Tokenizer
from weights.errors import UserError

MISTRAL_LIKE = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
QWEN_LIKE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def checkpoint(tmp_path, config: dict | list | None, special: dict | None = None):
    write_byte_tokenizer(tmp_path)
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if special is not None:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    return tmp_path


def hf_render(path, messages):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_bos_and_eos_from_special_tokens_map(tmp_path):
    path = checkpoint(
        tmp_path,
        {"chat_template": MISTRAL_LIKE, "tokenizer_class": "PreTrainedTokenizerFast"},
        {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}},
    )
    tok = Tokenizer(path)
    assert (tok.bos, tok.eos) == ("<s>", "</s>")
    want = hf_render(path, [{"role": "user", "content": "hi"}])
    assert want.startswith("<s>[INST]") and tok.apply_chat("hi") == want


@pytest.mark.parametrize("modern,want", [(False, ("<s>", "</s>")), (True, ("<A>", "</e>"))])
def test_which_file_names_bos_and_eos(tmp_path, modern, want):
    """A legacy tokenizer_config.json (no added_tokens_decoder): special_tokens_map.json wins; a modern
    one (Llama 3, Mistral, Qwen2.5 all carry added_tokens_decoder): the map is not read."""
    cfg = {
        "chat_template": MISTRAL_LIKE + "{{ eos_token }}",
        "bos_token": "<A>",
        "eos_token": "</e>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if modern:
        cfg["added_tokens_decoder"] = {
            "300": {
                "content": "<x>",
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
        }
    path = checkpoint(tmp_path, cfg, {"bos_token": "<s>", "eos_token": "</s>"})
    tok = Tokenizer(path)
    assert (tok.bos, tok.eos) == want
    assert tok.apply_chat("hi") == hf_render(path, [{"role": "user", "content": "hi"}])


def test_an_empty_system_message_is_a_system_message(tmp_path):
    path = checkpoint(tmp_path, {"chat_template": QWEN_LIKE, "tokenizer_class": "PreTrainedTokenizerFast"})
    tok = Tokenizer(path)
    got = tok.apply_chat("hi", system="")
    assert got == hf_render(path, [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}])
    assert "You are Qwen" not in got and "You are Qwen" in tok.apply_chat("hi")


@pytest.mark.parametrize(
    "config,message",
    [
        ([1, 2], "must hold a JSON object, not list"),
        ({"chat_template": ["just a string"]}, "chat_template as a list must hold"),
        ({"chat_template": 5}, "chat_template must be a string, not int"),
    ],
)
def test_malformed_tokenizer_config_is_one_error(tmp_path, config, message):
    with pytest.raises(UserError, match=message):
        Tokenizer(checkpoint(tmp_path, config))


def test_a_template_that_fails_while_rendering_is_one_error(tmp_path):
    tok = Tokenizer(checkpoint(tmp_path, {"chat_template": "{{ messages[0]['content'] + 1 }}"}))
    with pytest.raises(UserError, match="chat template failed: TypeError"):
        tok.apply_chat("hi")
    tok = Tokenizer(checkpoint(tmp_path, {"chat_template": "{{ raise_exception('no system role') }}"}))
    with pytest.raises(UserError, match="chat template failed: .*no system role"):
        tok.apply_chat("hi")


def test_chat_template_file_wins_over_the_config_field(tmp_path):
    path = checkpoint(
        tmp_path,
        {
            "chat_template": "CONFIG {{ messages[0]['content'] }}",
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    (path / "chat_template.jinja").write_text("FILE {{ messages[0]['content'] }}")
    assert Tokenizer(path).apply_chat("x") == hf_render(path, [{"role": "user", "content": "x"}]) == "FILE x"
