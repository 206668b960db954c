"""Real weights: our model's perplexity on real text equals transformers' on the same converted checkpoint."""

import math

import pytest
import torch
from conftest import real_text
from helpers import hf_model, paged

from engine.model import load_model
from engine.tokenizer import Tokenizer


def nll(logits, ids):
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_perplexity_matches_transformers(name):
    from weights.bundled import ensure_bundled

    path = ensure_bundled(name)
    ids = torch.tensor([Tokenizer(path).encode(real_text(12000))[:2048]])
    n = ids.shape[1]
    assert n == 2048
    model, c = load_model(path)
    model.setup_rope(n)
    kv, slots = paged(c, [n])
    logits, _ = model.prefill(ids, torch.tensor([n]), kv, slots, probe_rows=0, all_logits=True)
    ours = math.exp(nll(logits, ids))
    del model, logits
    with torch.no_grad():
        theirs = math.exp(nll(hf_model(path)(ids).logits, ids))
    print(f"{name}: perplexity ours {ours:.4f} transformers {theirs:.4f}")
    assert abs(ours - theirs) / theirs < 0.005
    assert 3 < theirs < 60  # a correct conversion reads real English documentation sensibly


@pytest.mark.slow
def test_loading_keeps_no_second_copy_in_host_memory():
    """Weights stream tensor by tensor into the model: while Qwen2.5-Coder-0.5B (2.5 GB fp32) loads,
    the process's anonymous memory (the mmap'd safetensors pages are file-backed, not counted)
    never rises by more than the model plus its largest tensor (the 0.54 GB embedding table)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from weights.bundled import ensure_bundled

    path = ensure_bundled("qwen2.5-coder-0.5b-instruct")
    code = (
        "import sys, torch; from engine.model import load_model; print('ready', flush=True); "
        "sys.stdin.readline(); "
        f"m, c = load_model({str(path)!r}); "
        "print(sum(p.numel() * p.element_size() for p in m.parameters()), flush=True)"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def anon():
        status = Path(f"/proc/{p.pid}/status").read_text()
        return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("RssAnon:"))) * 1024

    assert p.stdout.readline().strip() == "ready"
    base, peak = anon(), 0
    p.stdin.write("\n")
    p.stdin.flush()
    while p.poll() is None:
        try:
            peak = max(peak, anon())
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            break
        time.sleep(0.005)
    model_bytes = int(p.stdout.read().split()[-1])
    assert p.wait() == 0
    assert 2.3e9 < model_bytes < 2.7e9  # 630 M parameters (untied head)
    assert peak - base < model_bytes + 0.6e9, (peak - base, model_bytes)
    print(f"anonymous memory rose by {(peak - base) / 1e9:.2f} GB for {model_bytes / 1e9:.2f} GB of weights")
