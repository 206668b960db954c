"""Shared test helpers (the one module tests import from): tiny random checkpoints written by
transformers (the oracle) and as GGUF, engines with a pool of a given size, the CLI in a
subprocess, the server on loopback, a paged pool for driving the model directly, Hypothesis
strategies for probes and budgets, and the example counts."""

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from hypothesis import strategies as st

from engine.engine import Engine
from engine.kv import page_bytes
from refreekv import Probe
from weights.gguf_tokenizer import _bytes_to_unicode

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
)


def hf_config(family):
    import transformers as tf

    if family == "llama":  # Llama 3.1-style frequency scaling, short original context so it bites
        return tf.LlamaConfig(
            **TINY,
            rope_theta=500000.0,
            bos_token_id=1,
            eos_token_id=[2, 3],
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    if family == "llama-bias":  # attention_bias (q/k/v/o) and mlp_bias, plain LlamaConfig options
        return tf.LlamaConfig(**TINY, attention_bias=True, mlp_bias=True, bos_token_id=1, eos_token_id=2)
    if family == "mistral":  # window shorter than the test sequences
        return tf.MistralConfig(**TINY, sliding_window=8, head_dim=24, bos_token_id=1, eos_token_id=2)
    if family == "qwen2":  # q/k/v bias, untied output
        return tf.Qwen2Config(
            **{**TINY, "num_key_value_heads": 1}, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2
        )
    if family == "qwen2-window":  # Qwen2's own sliding window: layer 0 full, layers 1-2 windowed (8)
        return tf.Qwen2Config(
            **TINY,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "qwen2-yarn":  # Qwen2.5's long-context YaRN, with an original context the tests exceed
        return tf.Qwen2Config(
            **{**TINY, "max_position_embeddings": 128},
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        )
    if family == "llama-linear":  # linear position interpolation
        return tf.LlamaConfig(
            **TINY, rope_scaling={"rope_type": "linear", "factor": 2.0}, bos_token_id=1, eos_token_id=2
        )
    if family == "llama-window":  # a sliding_window in a Llama config, which transformers ignores
        return tf.LlamaConfig(**TINY, sliding_window=8, bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


def write_tiny(family, path, sharded=False, seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager").float().eval()
    # biases are zero-initialised: make them matter
    if family in ("qwen2", "qwen2-window", "qwen2-yarn", "llama-bias"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.5)
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "1GB")
    write_byte_tokenizer(path)
    return path


def hf_model(path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(
        path, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()


def write_byte_tokenizer(path):
    """A byte-level tokenizer.json (256 ids, no merges) so tiny checkpoints run end to end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))


def paged(c, lens, cap=None, page_size=16, dtype=torch.float32):
    """A paged pool whose slots 0..B-1 own pages for `cap` tokens each: for driving the model
    directly (prefill into slots arange(B), then decode). Returns (kv, slots)."""
    from engine.kv import PagedKV

    cap = cap or max(lens)
    pages = len(lens) * c.n_layers * c.n_kv_heads * -(-cap // page_size)
    kv = PagedKV(
        c.n_layers, c.n_kv_heads, c.head_dim, pages, page_size, max_seqs=len(lens), max_len=cap, dtype=dtype
    )
    for b in range(len(lens)):
        kv.assign(b, cap)
    kv.set_live([True] * len(lens))
    return kv, torch.arange(len(lens))


def examples(n: int) -> int:
    """Hypothesis examples for a property: n in CI (the `ci` profile, derandomized: a run never
    passes or fails by luck), 50 n with HYPOTHESIS_PROFILE=thorough (random draws, thousands each)."""
    return n * 50 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else n


class Served:
    """engine/serve/app.py's app on a free loopback port, in a thread of this process (a real uvicorn
    server: clients reach it over TCP). Use as a context manager; .url is the /v1 base."""

    def __init__(self, eng, policy, name="m", **kw):
        from engine.serve.app import build_app

        self.eng, self.app = eng, build_app(eng, policy, name, **kw)
        self.worker = self.app.state.worker

    def __enter__(self):
        import socket
        import threading
        import time

        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5)
        )
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[sock]), daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 60 and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    def idle(self, timeout=30.0):
        """Wait until the engine thread has nothing in flight and every page is back (free, or held
        by the prefix cache alone)."""
        import time

        t0 = time.time()
        while time.time() - t0 < timeout:
            snap = self.worker.snapshot
            back = snap["pages_free"] + snap["cache_pages"] == snap["pages_total"]
            if snap["running"] == 0 and snap["waiting"] == 0 and back:
                return snap
            time.sleep(0.05)
        raise AssertionError(f"the engine did not go idle: {self.worker.snapshot}")


CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"


def chat_ready(src, dst):
    """A copy of a tiny checkpoint with a chat template and the tokenizer_config.json that
    transformers' AutoTokenizer needs (the server's tests)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (dst / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return dst


# ------------------------------------------------ moved here from the test modules that shared them
ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "engine.generate", *args],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=600,
    )


def gib(pages, c, page_size, dtype=torch.float32):
    return pages * page_bytes(page_size, c.head_dim, dtype) / 2**30


def small_engine(path, pages_per_row, page_size=4, max_seqs=4, **kw):
    """An engine whose pool holds `pages_per_row` pages for each (layer, KV head) row."""
    from weights.config import load_config

    c = load_config(path)
    pages = pages_per_row * c.n_layers * c.n_kv_heads
    return Engine(
        str(path),
        device="cpu",
        kv_memory=gib(pages, c, page_size),
        max_seqs=max_seqs,
        page_size=page_size,
        **kw,
    )


def _byte_alphabet() -> list[str]:
    return list(_bytes_to_unicode().values())


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (what our converter must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_TINY = dict(hidden=32, heads=4, kv=2, ffn=64, layers=2)


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


MERGES = ["Ġ t", "h e", "Ġt he", "1 2"]


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    *,
    tied: bool = True,
    pre: str = "smollm",
    bad_quant_tensor: str | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a small random model as GGUF; return the HF-layout tensors it should convert back to."""
    rng = np.random.default_rng(seed)
    h, nh, kv, ffn, nl = (GGUF_TINY[k] for k in ("hidden", "heads", "kv", "ffn", "layers"))
    hd = h // nh
    tokens = SPECIALS + _byte_alphabet() + ["Ġt", "he", "Ġthe", "12", "<tool_call>"]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4]
    vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(nl)
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ffn)
    w.add_head_count(nh)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if arch == "llama":
        w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    hf: dict[str, np.ndarray] = {}
    gg: list[tuple[str, np.ndarray]] = []

    def put(gname, hname, arr, stored=None):
        hf[hname] = arr
        gg.append((gname, arr if stored is None else stored))

    put("token_embd.weight", "model.embed_tokens.weight", r(vocab, h))
    for i in range(nl):
        p, q = f"blk.{i}.", f"model.layers.{i}."
        wq, wk = r(nh * hd, h), r(kv * hd, h)
        if arch == "llama":
            put(p + "attn_q.weight", q + "self_attn.q_proj.weight", wq, _llamacpp_permute(wq, nh))
            put(p + "attn_k.weight", q + "self_attn.k_proj.weight", wk, _llamacpp_permute(wk, kv))
        else:
            put(p + "attn_q.weight", q + "self_attn.q_proj.weight", wq)
            put(p + "attn_k.weight", q + "self_attn.k_proj.weight", wk)
            put(p + "attn_q.bias", q + "self_attn.q_proj.bias", r(nh * hd))
            put(p + "attn_k.bias", q + "self_attn.k_proj.bias", r(kv * hd))
            put(p + "attn_v.bias", q + "self_attn.v_proj.bias", r(kv * hd))
        put(p + "attn_v.weight", q + "self_attn.v_proj.weight", r(kv * hd, h))
        put(p + "attn_output.weight", q + "self_attn.o_proj.weight", r(h, nh * hd))
        put(p + "ffn_gate.weight", q + "mlp.gate_proj.weight", r(ffn, h))
        put(p + "ffn_up.weight", q + "mlp.up_proj.weight", r(ffn, h))
        put(p + "ffn_down.weight", q + "mlp.down_proj.weight", r(h, ffn))
        put(p + "attn_norm.weight", q + "input_layernorm.weight", r(h))
        put(p + "ffn_norm.weight", q + "post_attention_layernorm.weight", r(h))
    put("output_norm.weight", "model.norm.weight", r(h))
    if not tied:
        put("output.weight", "lm_head.weight", r(vocab, h))

    for name, arr in gg:
        if name == bad_quant_tensor:
            # raw bytes of a type gguf 0.19 cannot dequantize (Q8_1: 32 values in 40 bytes)
            qt = gguf.GGMLQuantizationType.Q8_1
            block, nbytes = gguf.GGML_QUANT_SIZES[qt]
            raw = np.zeros((arr.shape[0], arr.shape[1] // block * nbytes), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qt)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def probe(attn, lens, n_kv_heads=1):
    attn = torch.as_tensor(attn, dtype=torch.float32)
    L, B, H, w, N = attn.shape
    return Probe(attn, torch.as_tensor(lens), L, n_kv_heads, N)


@st.composite
def probes(draw, w=None, max_n=30):
    """Dyadic attention (multiples of 1/8, so every sum is exact in any order) [L, B, H, w, N]:
    as in the engine, rows before a short prompt's start are 0 and a row is 0 on keys after its own
    position; padding columns hold garbage."""
    L, B = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n_kv, group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    w = w if w is not None else draw(st.integers(1, 5))
    lens = draw(st.lists(st.integers(1, max_n), min_size=B, max_size=B))
    N = max(lens)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    zeros = draw(st.sampled_from([0.0, 0.5]))  # sparse rows make ties (and the tie rule) common
    attn = torch.randint(0, 9, (L, B, n_kv * group, w, N), generator=g).float() / 8
    attn *= torch.rand(attn.shape, generator=g) >= zeros
    if draw(st.booleans()):  # attention piled on the most recent keys, as in real models
        attn += (torch.arange(N) >= torch.tensor(lens)[:, None, None, None] - w - 3) * 2.0
    lt = torch.tensor(lens)
    row_pos = lt[:, None] - w + torch.arange(w)  # [B, w]
    attn *= (row_pos >= 0)[None, :, None, :, None]
    attn *= (torch.arange(N) <= row_pos[..., None])[None, :, None]  # a row sees keys up to its own position
    attn = torch.where(torch.arange(N) < lt[:, None, None, None], attn, 7.0)  # garbage in the padding
    return attn, lens, n_kv


budgets = st.one_of(
    st.sampled_from([0.05, 0.1, 0.2, 0.25, 0.3, 0.33, 0.5, 0.7, 0.9, 1.0]), st.integers(2, 40)
)


SERVE_KEY = "sk-test"


def serve_engine(path, **kw):
    """An engine for the server's tests, as `python -m engine.serve` builds it (the serving token
    budget, the prefix cache on): CPU, a 0.05 GiB pool, 8 sequences at once."""
    eng = Engine(str(path), device="cpu", **{"kv_memory": 0.05, "max_seqs": 8, "prefix_cache": True, **kw})
    if "max_batched_tokens" not in kw and "step_bound" not in kw:
        eng.serve_defaults()
    return eng


def greedy(eng, ids, n, policy=None):
    """One prompt's greedy Result (refreekv T = 0.2 unless a policy is given)."""
    import refreekv
    from engine.sampling import Sampling

    policy = policy or refreekv.make("refreekv", threshold=0.2)
    return eng.generate([ids], policy, Sampling(max_new_tokens=n))[0]


HOSTILE_KEY = "sk-hostile"


def hostile_server(path):
    """The hostile-request tests' server over a tiny checkpoint: full KV by default, key HOSTILE_KEY,
    0.25 MB bodies, and a probe bound a 64-row window over a 400-token prompt exceeds."""
    import refreekv

    eng = serve_engine(path)
    eng.max_probe_bytes = eng.probe_bytes(32, 400)
    return Served(eng, refreekv.make("full"), "tiny", api_key=HOSTILE_KEY, max_body_mb=0.25)


def post(s, body, path="/completions", raw=None, headers=None, timeout=60, key=HOSTILE_KEY):
    """POST a JSON body (or raw bytes) to the server's /v1 route with the key."""
    import httpx

    h = {"Authorization": f"Bearer {key}", **(headers or {})}
    if raw is not None:
        return httpx.post(
            s.url + path, content=raw, headers={**h, "content-type": "application/json"}, timeout=timeout
        )
    return httpx.post(s.url + path, json=body, headers=h, timeout=timeout)
