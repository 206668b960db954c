"""The HTTP side: an OpenAI-compatible server and the offline batch runner, over the engine's
public API. The inference path never imports this package.

    cli.py        python -m engine.serve: flags, binding, tensor-parallel ranks, signals
    app.py        the FastAPI routes, streams (Outbox) and their errors
    worker.py     the engine thread: the only code that touches the engine once it serves
    schema.py     OpenAI request bodies checked into Jobs (400s naming the field)
    responses.py  Results shaped into bodies and stream chunks
    metrics.py    /metrics in Prometheus text
    run_batch.py  python -m engine.run_batch: OpenAI's Batch format, offline
"""


def main(argv=None):
    from engine.serve.cli import main as serve_main

    return serve_main(argv)
