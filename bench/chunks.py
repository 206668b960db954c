"""`python -m bench.chunks`, as bench/RESULTS.md records it: bench/speed/chunks.py."""

import sys

from bench.speed.chunks import main

if __name__ == "__main__":
    sys.exit(main())
