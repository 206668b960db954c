"""`python -m bench.hostile`, as bench/RESULTS.md records it: bench/load/hostile.py."""

import sys

from bench.load.hostile import main

if __name__ == "__main__":
    sys.exit(main())
