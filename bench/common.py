"""What the speed and throughput benches share: devices and timing, argument types, the engine on a
random-weight model of a real shape, FLOP and byte counts, copy bandwidth, and the policies."""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

import refreekv

ROOT = Path(__file__).resolve().parent.parent

QWEN7B = dict(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    use_sliding_window=False,
    tie_word_embeddings=False,
    hidden_act="silu",
    torch_dtype="bfloat16",
    bos_token_id=151643,
    eos_token_id=151643,
    initializer_range=0.02,
)
TINY = dict(
    QWEN7B,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=2048,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.1,
)
SHAPES = {"qwen2.5-7b": QWEN7B, "tiny": TINY}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def is_cuda(dev) -> bool:
    return torch.device(dev).type == "cuda"


def sync(dev):
    if is_cuda(dev):
        torch.cuda.synchronize(dev)


def free_cache(dev):
    import gc

    gc.collect()
    if is_cuda(dev):
        torch.cuda.empty_cache()


def ints(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def floats(s: str) -> list[float]:
    try:
        out = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not out or any(not 0 < x for x in out):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s!r}")
    return out


def names(choices):
    def parse(s: str) -> list[str]:
        out = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in out if x not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {s!r}")
        return out

    return parse


def dynamo_counts():
    """(unique graphs compiled, cudagraph skips) so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(counters["inductor"]["cudagraph_skips"])


def model_source(arg: str | None) -> str:
    """What a result names as its model: a hub id or bundled name as given, a local directory by
    its name only (no machine paths in results)."""
    if not arg:
        return "bundled smollm2-135m-instruct"
    return f"local dir {Path(arg).name}" if Path(arg).is_dir() else arg


def device_name(g) -> str:
    if str(g.device).startswith("cuda"):
        return f"{g.device} ({torch.cuda.get_device_name(torch.device(g.device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit(override=None) -> str:
    """The commit a result names: `override`, else $REFREEKV_COMMIT (a copy of the tree without its
    .git, as on a lent GPU machine), else git describe."""
    override = override or os.environ.get("REFREEKV_COMMIT")
    if override:
        return override
    try:
        return (
            subprocess.run(
                ["git", "describe", "--always", "--dirty", "--abbrev=10"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- random-weight models


def write_shape_dir(cfg: dict, root: Path) -> Path:
    """config.json and a byte-level tokenizer.json: what the engine needs besides the weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg, indent=1))
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(root / "tokenizer.json"))
    return root


def random_model(path, device, dtype, std: float, seed: int):
    """The engine's Transformer for path/config.json, materialised on `device` and filled with
    N(0, std) (norm weights 1), without ever holding the weights anywhere else."""
    from engine.model import Transformer
    from weights.config import load_config

    c = load_config(Path(path))
    with torch.device("meta"):
        model = Transformer(c).to(dtype)
    model = model.to_empty(device=device)
    if c.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)
    return model.eval(), c


def build_engine(a, **kw):
    """The engine on a real checkpoint (a.model) or on a random model of a.shape (no safetensors are
    written: the loader is swapped for random_model). Returns (engine, label)."""
    from engine.engine import Engine

    kw = dict(kw, compile=a.compile)
    if a.model or not getattr(a, "shape", None):  # no model and no shape: the bundled default
        eng = Engine(a.model, a.device, a.dtype, **kw)
        return eng, f"{eng.path.name} (real weights)"
    cfg = SHAPES[a.shape]
    root = write_shape_dir(cfg, Path(tempfile.mkdtemp(prefix="bench-")) / a.shape)
    std = float(cfg.get("initializer_range", 0.02))

    def load(path, device, dtype, rank=0, world=1, build=None):
        if world > 1:
            raise NotImplementedError("random-weight shapes run on one rank")
        return random_model(path, device, dtype, std, a.seed)

    with mock.patch("weights.loader.load_model", load):
        eng = Engine(str(root), a.device, a.dtype, **kw)
    return eng, f"{a.shape} (random {str(eng.dtype).removeprefix('torch.')} weights)"


def random_prompts(eng, B, n, seed) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(eng.config.vocab_size, 150000), (B, n), generator=g).tolist()


# ------------------------------------------------------------------------------- FLOPs and bytes


def param_counts(model):
    """(all params except the input embedding table, same minus the output head, head params)."""
    tied = model.lm_head.weight is model.embed.weight
    total = sum(p.numel() for p in model.parameters())  # a tied table is counted once
    emb, head = model.embed.weight.numel(), model.lm_head.weight.numel()
    no_embed = total if tied else total - emb
    return no_embed, no_embed - head, head


def prefill_flops(model, c, B, n):
    """(anchor formula: head counted for every token, exact: head at each last token only)."""
    no_embed, body, head = param_counts(model)
    attn = 4 * c.n_layers * c.n_heads * c.head_dim * n * n / 2 * B
    return 2 * no_embed * B * n + attn, 2 * body * B * n + 2 * head * B + attn


def weight_bytes_per_token(model) -> int:
    """Bytes of every parameter but the input table, plus one row of it (a tied table counts whole)."""
    tied = model.lm_head.weight is model.embed.weight
    emb = model.embed.weight
    return sum(
        emb.shape[1] * emb.element_size() if p is emb and not tied else p.numel() * p.element_size()
        for p in model.parameters()
    )


def gptfast_model_bytes(model) -> int:
    """gpt-fast's _get_model_size: params + buffers of every top-level child that is not an Embedding."""
    import itertools

    return sum(
        p.numel() * p.element_size()
        for _, child in model.named_children()
        if not isinstance(child, torch.nn.Embedding)
        for p in itertools.chain(child.parameters(), child.buffers())
    )


def copy_bandwidth(dev, mib: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, (read + write) / time, as the anchor measures it."""
    n = mib * 2**20 // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(dev)
    dt = (time.perf_counter() - t0) / 10
    bw = 2 * a.numel() * a.element_size() / dt
    del a, b
    free_cache(dev)
    return bw


# -------------------------------------------------------------------------------------- policies


def make_policy(name: str, threshold: float = 0.01, budget: float | None = None) -> refreekv.Policy:
    """full / refreekv at T / any registered policy; `budget` forces a fixed budget (streaming)."""
    if budget is not None:
        return refreekv.make("streaming", budget=budget)
    if name == "refreekv":
        return refreekv.make("refreekv", threshold=threshold)
    return refreekv.make(name)


def policy_label(p: refreekv.Policy) -> str:
    if getattr(p, "budget", None) is not None:
        b = p.budget
        return f"{p.name} {100 * b:g}%" if b <= 1 else f"{p.name} {int(b)} tok"
    if getattr(p, "threshold", None) is not None:
        return f"{p.name} T={p.threshold:g}"
    return p.name


def read_records(path, fields, what: str, missing: str) -> list[dict]:
    """JSON objects, one a line, each with `fields`; one UserError line for a missing file (with
    `missing`: how to pass one), bad JSON or a record without a field."""
    import json
    from pathlib import Path

    from weights.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: no file {path}; {missing}")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or any(k not in row for k in fields):
            raise UserError(
                f"{path}:{i}: a {what.split(' ')[0]} record needs the fields {fields_text(fields)}"
            )
        rows.append(row)
    return rows


def fields_text(fields) -> str:
    return " and ".join(fields) if len(fields) == 2 else ", ".join(fields)


def run_meta(eng, model: str, commit: str, module: str, argv: list[str], pool_gib: float) -> dict:
    """What every workload result names first: when, which model on which device and dtype, the
    code (its commit at the start of the run), the command, and the KV pool."""
    import datetime
    import platform
    import shlex

    dev = eng.device
    device = (
        torch.cuda.get_device_name(dev)
        if is_cuda(dev)
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        model=model,
        device=device,
        dtype=str(eng.dtype).removeprefix("torch."),
        commit=commit,
        command=f"python -m {module} " + shlex.join(argv),
        pool_pages=eng.kv.n_pages,
        page_size=eng.page_size,
        pool_gib=pool_gib,
    )


# -------------------------------------------------------------------------------- RESULTS.md
HEADER = """# Benchmark results

Sections are appended by the bench scripts (`python -m bench.quality`, ...), newest last; a
section is never rewritten. Each names its device, date, git commit, model and exact command.

"""


def append_results(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write(HEADER)
        f.write("\n" + text)
