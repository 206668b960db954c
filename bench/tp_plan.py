"""`python -m bench.tp_plan`, as bench/RESULTS.md records it: bench/speed/tp_plan.py."""

import sys

from bench.speed.tp_plan import main

if __name__ == "__main__":
    sys.exit(main())
