"""Our model vs transformers on tiny random checkpoints of each family (CPU, fp32): whole-sequence
logits, a right-padded batch of different lengths, and 32 greedy decode steps logit by logit."""

import pytest
import torch
from helpers import hf_model, paged

from engine.model import load_model
from weights.errors import UserError

FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "llama-bias",
    "qwen2-window",
    "llama-window",
    "qwen2-yarn",
    "llama-linear",
)
CASES = [(f, s) for f in FAMILIES for s in (False, True)]


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


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_each_prompt_alone(tiny_ckpts, family):
    """Right-padded prompts of different lengths in one batch: every real position's logits equal
    transformers' on that prompt alone (padding is never attended)."""
    path = tiny_ckpts[family, False]
    model, c = ours(path)
    hf = hf_model(path)
    g = torch.Generator().manual_seed(4)
    lens = [37, 12, 25]
    ids = torch.randint(3, c.vocab_size, (3, 37), generator=g)
    kv, slots = paged(c, lens, cap=37)
    got, _ = model.prefill(ids, torch.tensor(lens), kv, slots, probe_rows=0, all_logits=True)
    for b, n in enumerate(lens):
        ref = hf(ids[b : b + 1, :n]).logits[0]
        assert (got[b, :n] - ref).abs().max().item() < 1e-4, (family, b)


@pytest.mark.parametrize("family,sharded", CASES)
def test_greedy_decode_logits_step_by_step(tiny_ckpts, family, sharded):
    """32 greedy steps through the paged pool (crossing page boundaries): every step's logits, not
    only its token, equal transformers' (generate with output_logits)."""
    path = tiny_ckpts[family, sharded]
    model, c = ours(path)
    ids = torch.randint(3, c.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    # llama-window: transformers' Llama attends to every key but its generate cache keeps only the
    # config's sliding_window tokens (a Llama has no window: the no-cache forward is the model)
    out = hf_model(path).generate(
        ids,
        max_new_tokens=32,
        do_sample=False,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
        use_cache=family != "llama-window",
    )
    ref_tokens, ref_logits = out.sequences[0, 12:].tolist(), torch.stack(out.logits)[:, 0]  # [32, V]
    kv, slots = paged(c, [12], cap=12 + 32, page_size=4)
    logits, _ = model.prefill(ids, torch.tensor([12]), kv, slots, probe_rows=0)
    toks = []
    for step in range(32):
        assert (logits[0] - ref_logits[step]).abs().max().item() < 1e-4, (family, step)
        tok = logits.argmax(-1)
        toks.append(tok.item())
        logits = model.decode(tok, kv)
    assert toks == ref_tokens


def test_tensors_the_model_does_not_use_are_an_error(tiny_ckpts, tmp_path):
    """A checkpoint tensor the name map does not consume (here an o_proj bias in a config without
    attention_bias) must fail loudly, naming it, not be skipped into different output."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_ckpts["llama", False]
    dst = tmp_path / "extra"
    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    t["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    t["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # a known extra: fine
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        UserError, match=r"tensor model\.layers\.0\.self_attn\.o_proj\.bias is not part of a llama model"
    ):
        load_model(dst)
    del t["model.layers.0.self_attn.o_proj.bias"]
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    load_model(dst)


@pytest.mark.parametrize("chunk,window,N", [(4, 5, 23), (8, 3, 30), (16, 16, 17), (256, 8, 40)])
def test_windowed_attention_equals_masked_attention(chunk, window, N):
    """Query chunks against a plain masked softmax over all keys (GQA: 4 query heads on 2 KV heads)."""
    import math

    from engine.model import windowed_attention

    g = torch.Generator().manual_seed(N)
    q, k, v = (torch.randn(2, h, N, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    got = windowed_attention(q, k, v, window, chunk)
    d = torch.arange(N)[:, None] - torch.arange(N)[None, :]
    visible = (d >= 0) & (d < window)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    p = (q @ kk.transpose(-1, -2) / math.sqrt(8)).masked_fill(~visible, -math.inf).softmax(-1)
    torch.testing.assert_close(got, p @ vv, atol=1e-12, rtol=0)


def test_windowed_prefill_needs_no_n_by_n_memory():
    """8k tokens, a 512 window, 8 query heads: the peak RSS growth of the windowed path stays within
    32 MiB of the plain causal path's, each measured in a fresh process (an N x N boolean mask alone
    is 64 MiB, fp32 scores of the math kernel 2 GiB)."""
    import subprocess
    import sys

    code = """
import resource, sys, torch
torch.set_num_threads(1)
from engine.model import causal_attention, windowed_attention
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, h, 8192, 64, generator=g) for h in (8, 2, 2))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
o = windowed_attention(q, k, v, 512) if sys.argv[1] == "window" else causal_attention(q, k, v)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    grow = {
        m: int(
            subprocess.run(
                [sys.executable, "-c", code, m],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            ).stdout.split()[-1]
        )
        for m in ("window", "causal")
    }
    assert grow["window"] < grow["causal"] + 32 * 2**20, grow
