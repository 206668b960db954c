import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers.py
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """Tiny random checkpoints of each family written by transformers, plain and sharded."""
    from helpers import write_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {(fam, sharded): write_tiny(fam, root / f"{fam}{'-sharded' if sharded else ''}", sharded)
            for fam in ("llama", "mistral", "qwen2") for sharded in (False, True)}
