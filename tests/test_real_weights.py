"""Real weights: our model's perplexity on real text equals transformers' on the same converted checkpoint."""
import math

import pytest
import torch

from conftest import real_text
from engine.kv import RaggedKV
from engine.tokenizer import Tokenizer
from helpers import hf_model
from weights.loader import load_model


def nll(logits, ids):
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_perplexity_matches_transformers(name):
    from weights.gguf import ensure_bundled

    path = ensure_bundled(name)
    ids = torch.tensor([Tokenizer(path).encode(real_text(12000))[:2048]])
    n = ids.shape[1]
    assert n == 2048
    model, c = load_model(path)
    model.setup_rope(n)
    logits, _ = model.prefill(ids, torch.tensor([n]), RaggedKV(c.n_layers, 1, c.n_kv_heads, n, c.head_dim), probe_rows=0, all_logits=True)
    ours = math.exp(nll(logits, ids))
    del model, logits
    with torch.no_grad():
        theirs = math.exp(nll(hf_model(path)(ids).logits, ids))
    print(f"{name}: perplexity ours {ours:.4f} transformers {theirs:.4f}")
    assert abs(ours - theirs) / theirs < 0.005
    assert 3 < theirs < 60  # a correct conversion reads real English documentation sensibly
