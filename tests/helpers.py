"""Shared test helpers: tiny random checkpoints written by transformers (the oracle), a paged pool
for driving the model directly, and the Hypothesis example counts."""

import os

import torch

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
        """Wait until the engine thread has nothing in flight and every page is back."""
        import time

        t0 = time.time()
        while time.time() - t0 < timeout:
            snap = self.worker.snapshot
            if snap["running"] == 0 and snap["waiting"] == 0 and snap["pages_free"] == snap["pages_total"]:
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
