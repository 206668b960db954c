"""`python -m bench.attention`, as bench/RESULTS.md records it: bench/speed/attention.py."""

import sys

from bench.speed.attention import main

if __name__ == "__main__":
    sys.exit(main())
