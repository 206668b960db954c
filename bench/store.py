"""`python -m bench.store`, as bench/RESULTS.md records it: bench/speed/store.py."""

import sys

from bench.speed.store import main

if __name__ == "__main__":
    sys.exit(main())
