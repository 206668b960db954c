"""`python -m bench.throughput`, as bench/RESULTS.md records it: bench/load/throughput.py."""

import sys

from bench.load.throughput import main

if __name__ == "__main__":
    sys.exit(main())
