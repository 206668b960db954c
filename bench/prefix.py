"""`python -m bench.prefix`, as bench/RESULTS.md records it: bench/load/prefix.py."""

import sys

from bench.load.prefix import main

if __name__ == "__main__":
    sys.exit(main())
