"""A compact inference engine with KV-cache pruning built in. The public API:

    from engine import Engine, Sampling, Result
    eng = Engine("qwen2.5-coder-0.5b-instruct", device="cpu")
    out = eng.generate([eng.encode("Hello")], refreekv.make("refreekv"), Sampling(max_new_tokens=32))

engine/README.md walks one request through the files, top to bottom.
"""


def __getattr__(name):  # lazily: `python -m engine.serve --help` must not pay for torch first
    if name == "Engine":
        from engine.engine import Engine

        return Engine
    if name == "Sampling":
        from engine.sampling import Sampling

        return Sampling
    if name == "Result":
        from engine.sequence import Result

        return Result
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = ["Engine", "Result", "Sampling"]
