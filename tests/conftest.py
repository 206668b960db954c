import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# `ci` (default): derandomized, so the suite is the same run every time; `thorough`: fresh random
# draws and 50x the examples (tests/helpers.py: examples), for a long run before a release.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("thorough", derandomize=False, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers.py
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
# Triton kernels run on the CPU through the interpreter (set before triton loads)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """Tiny random checkpoints of each family written by transformers, plain and sharded."""
    from helpers import write_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {
        (fam, sharded): write_tiny(fam, root / f"{fam}{'-sharded' if sharded else ''}", sharded)
        for fam in (
            "llama",
            "mistral",
            "qwen2",
            "llama-bias",
            "qwen2-window",
            "llama-window",
            "qwen2-yarn",
            "llama-linear",
        )
        for sharded in (False, True)
    }


@pytest.fixture(scope="session")
def chat_tiny(tiny_ckpts, tmp_path_factory):
    """The tiny Llama with a chat template and the tokenizer_config.json transformers' AutoTokenizer
    needs (the server's tests)."""
    from helpers import chat_ready

    return chat_ready(tiny_ckpts["llama", False], tmp_path_factory.mktemp("chat") / "llama")


@pytest.fixture(scope="module")
def offline(chat_tiny):
    """An engine on chat_tiny, the server tests' oracle (one per module): the prefix cache off, so
    the server (on) is checked against the engine without it."""
    from helpers import serve_engine

    return serve_engine(chat_tiny, prefix_cache=False)


@pytest.fixture(scope="module")
def served(chat_tiny):
    """engine/serve's app over chat_tiny on loopback (refreekv T = 0.2, key SERVE_KEY, 0.25 MB bodies)."""
    from helpers import SERVE_KEY, Served, serve_engine

    import refreekv

    policy = refreekv.make("refreekv", threshold=0.2)
    with Served(serve_engine(chat_tiny), policy, "tiny", api_key=SERVE_KEY, max_body_mb=0.25) as s:
        yield s


@pytest.fixture(scope="session")
def smollm():
    """The bundled default real model (SmolLM2-135M-Instruct), converted once into the cache."""
    from weights.bundled import ensure_bundled

    return ensure_bundled("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm_gen(smollm):
    from engine.engine import Engine

    return Engine(str(smollm), device="cpu")


def real_text(n_chars: int, start: str = "assignment") -> str:
    """Real English technical prose nobody here wrote: CPython's bundled documentation topics."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    text = ""
    for k in keys[keys.index(start) :] + keys:
        text += topics[k]
        if len(text) >= n_chars:
            return text[:n_chars]
    return text


def pytest_runtest_logreport(report):
    """REFREEKV_INSTAFAIL=1 (bench/gpu_all.sh): each failure's traceback as it happens, so a run cut
    off at its time limit still shows why the tests before the cut failed."""
    if report.failed and os.environ.get("REFREEKV_INSTAFAIL"):
        print(f"\nFAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n", file=sys.stderr)
        sys.stderr.flush()
