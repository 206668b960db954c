"""The layout's one rule: imports run one way, down the layers a request travels. Every module of
engine/, refreekv/ and weights/ is read as source (its syntax tree, function-level imports
included) and may import only modules of its own layer or of a layer below."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# top to bottom: the way a request travels, from what a user runs down to the weights on disk
LAYERS = [
    (
        "drivers",
        [
            "engine.generate",
            "engine.display",
            "engine.chat",
            "engine.cli",
            "engine.run_batch",
            "engine.serve",
        ],
    ),
    ("engine", ["engine", "engine.engine", "engine.limits"]),
    ("core", ["engine.core", "engine.scheduler", "engine.budget", "engine.admission", "engine.pruning"]),
    ("runner", ["engine.runner"]),
    ("model", ["engine.model", "engine.rope", "engine.tp"]),
    ("kv", ["engine.kv", "engine.prefix"]),
    ("kernels", ["engine.kernels"]),
    # what every layer above may read: the state, the text side, the sampler, the policies
    ("shared", ["engine.sequence", "engine.sampling", "engine.tokenizer", "refreekv"]),
    ("weights", ["weights"]),
]


def layer_of(module: str) -> int:
    """The index of the most specific layer entry that is `module` or a package above it."""
    best, depth = None, -1
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
                best, depth = i, name.count(".")
    return best


def modules():
    for top in ("engine", "refreekv", "weights"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path


def imports(path: Path, name: str):
    """Every project module the file imports (absolute or relative, at any depth of the file)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from engine import pruning` imports the module engine.pruning (the package's
            # __init__ runs too, but it imports nothing eagerly); `from engine.kv import PagedKV`
            # imports engine.kv
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in NAMES]
            targets = subs or [base]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in ("engine", "refreekv", "weights"):
                yield node.lineno, t


NAMES = {name for name, _ in modules()}


def test_every_module_has_a_layer():
    assert [name for name, _ in modules() if layer_of(name) is None] == []


@pytest.mark.parametrize("name,path", list(modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_imports_run_down_the_layers(name, path):
    mine = layer_of(name)
    up = []
    for line, target in imports(path, name):
        theirs = layer_of(target)
        if theirs is not None and theirs < mine:
            where = f"{path.relative_to(ROOT)}:{line}"
            up.append(f"{where} imports {target} ({LAYERS[theirs][0]} is above {LAYERS[mine][0]})")
    assert up == []


def test_the_inference_path_never_imports_the_http_side_or_the_cli():
    drivers = [n for n in LAYERS[0][1]]
    bad = [
        (name, t)
        for name, path in modules()
        if layer_of(name) > 0
        for _, t in imports(path, name)
        if any(t == d or t.startswith(d + ".") for d in drivers)
    ]
    assert bad == []


def test_a_broken_rule_is_caught(tmp_path):
    """The walk sees a function-level import that goes up (the check can fail)."""
    path = tmp_path / "kv.py"
    path.write_text("def f():\n    from engine.serve import app\n")
    assert [t for _, t in imports(path, "engine.kv")] == ["engine.serve.app"]
    assert layer_of("engine.serve.app") < layer_of("engine.kv")


def test_the_commands_and_the_public_api_survive_the_layout():
    """`python -m` of each command, the console scripts' targets, and `from engine import ...`."""
    import importlib
    import re
    import subprocess
    import sys

    for module in ("engine.generate", "engine.serve", "engine.run_batch", "bench.speed", "bench.throughput"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout, (module, r.stderr[-2000:])
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"', section, re.M))
    assert set(scripts) == {"refreekv-generate", "refreekv-serve", "refreekv-run-batch"}
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
    from engine import Engine, Result, Sampling

    assert Engine.generate and Result.__dataclass_fields__ and Sampling().check() is None
