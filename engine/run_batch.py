"""python -m engine.run_batch: OpenAI's Batch format, offline (engine/serve/run_batch.py)."""

import sys

from engine.serve.run_batch import main

if __name__ == "__main__":
    sys.exit(main())
