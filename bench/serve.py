"""`python -m bench.serve`, as bench/RESULTS.md records it: bench/load/serve.py."""

import sys

from bench.load.serve import main

if __name__ == "__main__":
    sys.exit(main())
