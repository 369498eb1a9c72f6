"""``python -m benchmarks``: every cost benchmark (benchmarks/cost), then the cost table."""

import sys

from benchmarks.cost.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
