"""The worked example in refreekv/README.md (a new method in one file, and its test) runs as written."""

import re
import types
from pathlib import Path

import refreekv
from engine.engine import Engine
from engine.sampling import Sampling

README = Path(__file__).resolve().parents[1] / "refreekv" / "README.md"


def test_readme_worked_example(tiny_ckpts):
    policy_src, test_src = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[:2]
    try:
        exec(compile(policy_src, "refreekv/recent.py", "exec"), types.ModuleType("recent").__dict__)
        ns = types.ModuleType("test_recent").__dict__
        exec(compile(test_src, "tests/test_recent.py", "exec"), ns)
        ns["test_recent"]()
        g = Engine(str(tiny_ckpts["mistral", False]), device="cpu")  # and through the engine
        r = g.generate(
            [list(range(10, 50))], refreekv.make("recent", budget=0.25), Sampling(max_new_tokens=4)
        )[0]
        assert r.stats["kept_per_layer"] == [10] * g.config.n_layers
    finally:
        refreekv.POLICIES.pop("recent", None)
