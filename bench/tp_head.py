"""`python -m bench.tp_head`, as bench/RESULTS.md records it: bench/speed/tp_head.py."""

import sys

from bench.speed.tp_head import main

if __name__ == "__main__":
    sys.exit(main())
