"""Our model vs transformers on tiny random checkpoints of each family (CPU, fp32)."""
import pytest
import torch

from helpers import hf_model, paged
from weights.loader import load_model

CASES = [(f, s) for f in ("llama", "mistral", "qwen2") for s in (False, True)]


def ours(path):
    model, c = load_model(path)
    model.setup_rope(256)
    return model, c


@pytest.mark.parametrize("family,sharded", CASES)
def test_full_sequence_logits(tiny_ckpts, family, sharded):
    path = tiny_ckpts[family, sharded]
    if sharded:
        assert (path / "model.safetensors.index.json").is_file()
    model, c = ours(path)
    ids = torch.randint(0, c.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = hf_model(path)(ids).logits
    kv, slots = paged(c, [40, 40])
    got, _ = model.prefill(ids, torch.tensor([40, 40]), kv, slots, probe_rows=0, all_logits=True)
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("family,sharded", CASES)
def test_greedy_decode_matches(tiny_ckpts, family, sharded):
    path = tiny_ckpts[family, sharded]
    model, c = ours(path)
    ids = torch.randint(3, c.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = hf_model(path).generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None)[0, 12:].tolist()
    kv, slots = paged(c, [12], cap=12 + 32, page_size=4)  # decode crosses page boundaries
    logits, _ = model.prefill(ids, torch.tensor([12]), kv, slots, probe_rows=0)
    out = []
    for step in range(32):
        tok = logits.argmax(-1)
        out.append(tok.item())
        logits = model.decode(tok, kv)
    assert out == ref
