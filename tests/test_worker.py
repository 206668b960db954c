"""The server's engine thread (engine/serve/worker.py): work handed to it runs on it, in queue order."""

import threading

import pytest

from engine.engine import Engine
from engine.serve.worker import Worker


def test_call_runs_on_the_engine_thread_and_returns_or_raises(tiny_ckpts):
    """The compile warm-up goes through Worker.call: CUDA graph trees are per thread, so graphs
    recorded on the caller's thread would be recorded again on the thread that serves."""
    eng = Engine(str(tiny_ckpts["llama", False]), device="cpu", kv_memory=0.01, max_seqs=2)
    worker = Worker(eng)
    assert worker.call(lambda: threading.current_thread().name) == "engine"
    assert worker.call(lambda: threading.current_thread() is worker.thread)

    def boom():
        raise ValueError("warm-up failed")

    with pytest.raises(ValueError, match="warm-up failed"):
        worker.call(boom)
    assert worker.alive  # a failing call leaves the thread serving
    worker.stop()
    assert not worker.thread.is_alive()
