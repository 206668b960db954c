import sys

from bench.standard.cli import main

sys.exit(main())
