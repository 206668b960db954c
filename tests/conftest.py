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
