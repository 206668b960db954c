"""`python -m bench.gpu_diag`, as bench/RESULTS.md records it: bench/speed/gpu_diag.py."""

import sys

from bench.speed.gpu_diag import main

if __name__ == "__main__":
    sys.exit(main())
