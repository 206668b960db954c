"""`python -m bench.gemv`, as bench/RESULTS.md records it: bench/speed/gemv.py."""

import sys

from bench.speed.gemv import main

if __name__ == "__main__":
    sys.exit(main())
