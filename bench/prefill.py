"""`python -m bench.prefill`, as bench/RESULTS.md records it: bench/speed/prefill.py."""

import sys

from bench.speed.prefill import main

if __name__ == "__main__":
    sys.exit(main())
