"""`python -m bench.decode`, as bench/RESULTS.md records it: bench/quality/decode.py."""

import sys

from bench.quality.decode import main

if __name__ == "__main__":
    sys.exit(main())
