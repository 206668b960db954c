"""Tensor parallelism on CPU: two gloo ranks spawned from the test must give, for tiny checkpoints of
each family, exactly the single-process tokens and kept counts (fp32) for every policy, with a
batch of different lengths through a small pool; each rank reads only its shard; bad input is one
clear error on rank 0 while the other rank exits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import refreekv
from engine.engine import Engine
from engine.kv import page_bytes
from engine.sampling import Sampling
from engine.tp import free_port, rank_env

ROOT = Path(__file__).resolve().parent.parent
POLICIES = [
    ("full", {}),
    ("refreekv", {"threshold": 0.2, "protected": [0]}),
    ("snapkv", {"budget": 0.4}),
    ("h2o", {"budget": 0.4}),
    # pruning during decoding: the probe gathered over ranks, each rank compacting its own heads
    ("refreekv", {"threshold": 0.2, "protected": [0], "interval": 6}),
    ("snapkv", {"budget": 0.4, "interval": 5, "on_pressure": True}),
    # keys read from the pool (each rank's heads, gathered), at prefill and while decoding
    ("knorm", {"budget": 0.4, "interval": 5}),
    ("adakv", {"budget": 0.4}),
    ("expected-attention", {"budget": 0.4, "interval": 5}),
]
PROMPT_LENS = (37, 12, 60, 25, 44)
RUNNER = """
import json, sys, torch
import refreekv
from engine.engine import Engine
from engine.sampling import Sampling
path, out, gib = sys.argv[1], sys.argv[2], float(sys.argv[3])
prompts, policies = json.loads(sys.argv[4]), json.loads(sys.argv[5])
device, tp = (sys.argv[6], int(sys.argv[7])) if len(sys.argv) > 6 else ("cpu", 2)
eng = Engine(path, device=device, dtype="float32", kv_memory=gib, max_seqs=3, page_size=4, tp=tp)
eng.eos = set()
res = [[dict(tokens=r.tokens, kept=r.stats["kept_per_head"], trace=r.stats.get("budget_trace")) for r in
              eng.generate(prompts, refreekv.make(name, **kw), Sampling(max_new_tokens=20))]
       for name, kw in policies]
m = eng.model
head = dict(rows=m.lm_head.weight.shape[0],
            view=m.lm_head.weight.untyped_storage().data_ptr() == m.embed.weight.untyped_storage().data_ptr())
json.dump(dict(rank=eng.tp.rank, backend=torch.distributed.get_backend(), results=res, head=head,
               bytes_read=eng.model.bytes_read, stats=eng.stats),
          open(out + f".{eng.tp.rank}", "w"))
"""


def ranks(
    args: list[str], n: int = 2, timeout: int = 600, code: str | None = None
) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for r in range(n):
        env = rank_env(r, n, port, OMP_NUM_THREADS="1", REFREEKV_TP_TIMEOUT="120")
        cmd = (
            [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "engine.generate", *args]
        )
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return [subprocess.CompletedProcess(p.args, p.wait(timeout), *p.communicate()) for p in procs]


def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]


def tied(src: Path, dst: Path) -> Path:
    """src with tie_word_embeddings: no lm_head tensor, the head is the embedding (SmolLM2, Qwen2.5-0.5B)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    t = load_file(src / "model.safetensors")
    del t["lm_head.weight"]
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "llama-bias", "llama-tied"])
def test_two_ranks_equal_one_process(tiny_ckpts, tmp_path, family):
    """llama: llama3 rope scaling; mistral: sliding window, head_dim 24; qwen2: q/k/v bias and one KV
    head for two ranks (replicated); llama-bias: o_proj and down_proj biases added once; llama-tied:
    each rank's half of the LM head is a view of its whole embedding. The LM head splits over the
    vocabulary (its logits all-gathered)."""
    from weights.config import load_config

    path = (
        tied(tiny_ckpts["llama", False], tmp_path / "tied")
        if family == "llama-tied"
        else tiny_ckpts[family, False]
    )
    c = load_config(path)
    per_rank_kv = max(1, c.n_kv_heads // 2)
    # 30 pages per row and rank
    gib = 30 * c.n_layers * per_rank_kv * page_bytes(4, c.head_dim, torch.float32) / 2**30
    out = tmp_path / "r"
    done = ranks([str(path), str(out), str(gib), json.dumps(prompts()), json.dumps(POLICIES)], code=RUNNER)
    assert all(p.returncode == 0 for p in done), [p.stderr[-3000:] for p in done]
    got = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert got[0]["results"] == got[1]["results"]  # every rank holds the same tokens and plans
    assert [g["head"] for g in got] == [dict(rows=c.vocab_size // 2, view=family == "llama-tied")] * 2

    single = Engine(
        str(path),
        device="cpu",
        max_seqs=3,
        page_size=4,
        kv_memory=30 * c.n_layers * c.n_kv_heads * page_bytes(4, c.head_dim, torch.float32) / 2**30,
    )
    single.eos = set()
    for j, (name, kw) in enumerate(POLICIES):
        ref = single.generate(prompts(), refreekv.make(name, **kw), Sampling(max_new_tokens=20))
        for i, r in enumerate(ref):
            assert got[0]["results"][j][i]["tokens"] == r.tokens, (family, name, i)
            assert got[0]["results"][j][i]["kept"] == r.stats["kept_per_head"], (family, name, i)
            assert got[0]["results"][j][i]["trace"] == r.stats.get("budget_trace"), (family, name, i)
    assert got[0]["stats"]["admission_waits"] > 0  # the pool held fewer than all five at once

    # each rank read its shard: the replicated tensors (embeddings, norms; a KV head shared by both
    # ranks) whole, everything else half
    from safetensors import safe_open

    whole = half = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for k in f.keys():
            n = f.get_slice(k).get_shape()
            size = 4 * int(torch.tensor(n).prod())
            shared = (
                "embed" in k
                or "norm" in k  # the LM head splits over the vocabulary (256 / 2)
                or (c.n_kv_heads < 2 and ("k_proj" in k or "v_proj" in k))
                or k.endswith(("o_proj.bias", "down_proj.bias"))
            )
            whole += size if shared else 0
            half += 0 if shared else size
    for g in got:  # rank 0 reads the row-parallel biases, rank 1 holds zeros
        bias = (
            sum(4 * c.dim * c.n_layers for b in ("o_proj", "down_proj") if family == "llama-bias")
            if g["rank"]
            else 0
        )
        assert g["bytes_read"] == whole - bias + half // 2, (g["rank"], g["bytes_read"], whole, half)


def test_cli_tp_prints_once_and_matches_one_process(tiny_ckpts):
    path = str(tiny_ckpts["llama", False])
    args = [
        "--model",
        path,
        "--device",
        "cpu",
        "--raw",
        "--prompt",
        "Tensor parallel",
        "--prompt",
        "two",
        "--max-new-tokens",
        "6",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "engine.generate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    two = subprocess.run(
        [sys.executable, "-m", "engine.generate", *args, "--tp", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and "tensor parallel over 2 rank(s)" in two.stderr
    assert two.stderr.count("workload:") == 1 and "FutureWarning" not in two.stderr
    # rank 0's pages
    assert two.stderr.count(" per rank | prefill") == 2 and " per rank | prefill" not in one.stderr
    # torchrun with one rank: the process group and its collectives, one shard = the model
    solo = ranks(args, n=1)[0]
    assert (
        solo.returncode == 0 and solo.stdout == one.stdout and "tensor parallel over 1 rank(s)" in solo.stderr
    )


@pytest.mark.slow
def test_a_rank_holds_about_its_share_of_host_memory():
    """Qwen2.5-Coder-0.5B fp32, rank 0 of 2: the anonymous memory the loaded shard holds, against the
    whole model's. The embedding (0.54 GB) is whole on every rank; the layers (1.43 GB) and the LM
    head (0.54 GB, untied in this checkpoint) split in two, so a rank holds 1.5 GB of 2.5."""
    from weights.bundled import ensure_bundled

    path = ensure_bundled("qwen2.5-coder-0.5b-instruct")

    def peak(world):
        code = (
            "from pathlib import Path; from engine.model import load_model; "
            "anon = lambda: int(next(l.split()[1] "
            "for l in Path('/proc/self/status').read_text().splitlines() "
            "if l.startswith('RssAnon:'))) * 1024; b = anon(); "
            f"m, c = load_model({str(path)!r}, rank=0, world={world}); "
            "print(anon() - b, m.bytes_read)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600, check=True
        )
        return [int(x) for x in out.stdout.split()[-2:]]

    (whole, read1), (half, read2) = peak(1), peak(2)
    head = 151936 * 896 * 4
    layers = read1 - 2 * head - (2 * 24 + 1) * 896 * 4  # all but the embedding, the LM head and the norms
    split = layers // 2 + head // 2
    assert read2 == read1 - split  # bytes read from the checkpoint: the replicated part plus half of the rest
    assert abs(half - (whole - split)) < 0.1e9, (half, whole, split)  # resident: the same split
    print(f"rank 0 of 2: {half / 1e9:.2f} GB of anonymous memory, one process {whole / 1e9:.2f} GB")


def test_bad_tensor_parallel_input_is_one_error_and_no_rank_hangs(tiny_ckpts, tmp_path):
    path = str(tiny_ckpts["llama", False])  # 4 query heads, 2 KV heads, ffn 96
    base = ["--model", path, "--device", "cpu", "--prompt", "hi", "--max-new-tokens", "2"]
    bad = subprocess.run(
        [sys.executable, "-m", "engine.generate", *base, "--tp", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip().splitlines()[-1] == "error: --tp 3 does not divide the model's 4 query heads"
    )
    done = ranks([*base, "--tp", "4"])  # torchrun started 2, --tp says 4
    assert [p.returncode for p in done] == [2, 2]
    assert (
        done[0].stderr.strip().splitlines()[-1] == "error: --tp 4 but 2 ranks were started (WORLD_SIZE)"
        and not done[1].stderr.strip()
    )
    if torch.cuda.device_count() < 2:  # more ranks than GPUs: every rank exits before waiting for the others
        done = ranks(["--model", path, "--device", "cuda", "--prompt", "hi", "--max-new-tokens", "2"], n=2)
        assert [p.returncode for p in done] == [2, 2] and not done[1].stderr.strip()
        err = done[0].stderr
        assert "error: 2 ranks on this machine need a GPU each, but it has" in err, err[-2000:]
    # rank 1's shard cannot be read (a truncated file seen by rank 1 only is hard to stage: a checkpoint whose
    # ffn width does not split evenly is refused before loading on every rank, and rank 0 reports it)
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(path, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["intermediate_size"] = 95
    (odd / "config.json").write_text(json.dumps(cfg))
    done = ranks(["--model", str(odd), "--device", "cpu", "--prompt", "hi", "--max-new-tokens", "2"])
    assert [p.returncode for p in done] == [2, 2]
    assert "--tp 2 does not divide the model's ffn width 95" in done[0].stderr and not done[1].stderr.strip()
    # a shard that cannot be read: every rank reports, rank 0 prints them all, nobody waits forever
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:1000])
    done = ranks(["--model", str(bad), "--device", "cpu", "--prompt", "hi", "--max-new-tokens", "2"])
    assert [p.returncode for p in done] == [2, 2]
    err = done[0].stderr.strip().splitlines()[-1]
    assert err.startswith("error: rank 0: ") and "; rank 1: " in err and "corrupt or truncated" in err, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_nccl_rank_equals_one_process_on_cuda(tiny_ckpts, tmp_path):
    """torchrun with one rank on a GPU: the NCCL process group, its all-reduces, broadcasts and the
    gathered probe around the compiled CUDA path, against the same model without a group (fp32)."""
    path = tiny_ckpts["qwen2", False]
    from weights.config import load_config

    c = load_config(path)
    gib = 30 * c.n_layers * c.n_kv_heads * page_bytes(4, c.head_dim, torch.float32) / 2**30
    out = tmp_path / "r"
    (done,) = ranks(
        [str(path), str(out), str(gib), json.dumps(prompts()), json.dumps(POLICIES), "cuda", "1"],
        n=1,
        code=RUNNER,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(Path(f"{out}.0").read_text())
    assert got["backend"] == "nccl"
    single = Engine(str(path), device="cuda", dtype="float32", max_seqs=3, page_size=4, kv_memory=gib)
    single.eos = set()
    for j, (name, kw) in enumerate(POLICIES):
        for i, r in enumerate(
            single.generate(prompts(), refreekv.make(name, **kw), Sampling(max_new_tokens=20))
        ):
            assert got["results"][j][i]["tokens"] == r.tokens, (name, i)
            assert got["results"][j][i]["kept"] == r.stats["kept_per_head"], (name, i)
