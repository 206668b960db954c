"""Where the compiled CUDA path breaks or spends its time (a first-GPU-run diagnostic): a tiny
compiled engine generates once (full traceback on failure), then Qwen2.5-7B-shaped random models
with 2 and 4 layers time their compile warm-up, so the full model's can be read off per layer.

    PYTHONPATH=. python -m bench.gpu_diag [--layers 2,4]
"""

import argparse
import tempfile
import time
import traceback
from pathlib import Path

import torch

import refreekv
from engine.sampling import Sampling


def tiny():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from helpers import write_tiny

    from engine.engine import Engine

    path = write_tiny("qwen2", Path(tempfile.mkdtemp()) / "qwen2")
    for compiled in (False, True):
        t0 = time.perf_counter()
        try:
            eng = Engine(
                str(path), device="cuda", dtype="bfloat16", compile=compiled, max_seqs=8, page_size=4
            )
            eng.eos = set()
            out = eng.generate([[5] * 37, [7] * 12], refreekv.make("refreekv", threshold=0.2), Sampling(8))
            print(f"tiny compiled={compiled}: ok in {time.perf_counter() - t0:.1f} s, tokens {out[0].tokens}")
        except Exception:  # noqa: BLE001 - the point is the traceback
            print(f"tiny compiled={compiled}: FAILED after {time.perf_counter() - t0:.1f} s")
            traceback.print_exc()


def layers(n: int):
    from bench.common import QWEN7B, SHAPES, build_engine

    SHAPES["diag"] = dict(QWEN7B, num_hidden_layers=n)
    a = argparse.Namespace(model=None, shape="diag", device="cuda", dtype="bfloat16", compile=True, seed=0)
    t0 = time.perf_counter()
    eng, _ = build_engine(a, max_length=1024, kv_memory=2.0, max_seqs=16)
    built = time.perf_counter() - t0
    try:
        warm = eng.warmup(refreekv.make("full"))
        eng.eos = set()
        t1 = time.perf_counter()
        eng.generate([[5] * 512], refreekv.make("full"), Sampling(max_new_tokens=32))
        med = sorted(eng.stats["step_ms"])[len(eng.stats["step_ms"]) // 2]
        print(
            f"7B shape, {n} layers: built {built:.1f} s, warm-up {warm:.1f} s, then 512 + 32 tok in "
            f"{time.perf_counter() - t1:.2f} s, decode step median {med:.2f} ms"
        )
    except Exception:  # noqa: BLE001
        print(f"7B shape, {n} layers: FAILED after {time.perf_counter() - t0:.1f} s")
        traceback.print_exc()
    from torch._dynamo.utils import counters

    print("  dynamo stats", dict(counters["stats"]), "recompiles", dict(counters["recompiles"]))
    del eng
    torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--layers", default="2,4")
    a = p.parse_args(argv)
    tiny()
    for n in a.layers.split(","):
        layers(int(n))


if __name__ == "__main__":
    main()
