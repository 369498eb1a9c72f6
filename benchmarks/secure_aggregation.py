"""Secure aggregation cost: round time with and without it at 4 and 10 sites (target <= 1.2 at 10).

fedpir has no secure aggregation yet: the server sees each site's update. Flower's SecAgg+
(``SecAggPlusWorkflow`` with ``secaggplus_mod``) runs under Flower's legacy ``DefaultWorkflow`` and
its ``Strategy`` classes, not under fedpir's Message-API round loop (fedpir.server.rounds). This
benchmark therefore measures nothing: it records the skip and its reason, so the cost table shows
the gap instead of a number.

    python -m benchmarks.secure_aggregation
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from benchmarks.common import emit, parser

#: Where fedpir's secure aggregation will live; while it is absent the benchmark is skipped.
MODULE = "fedpir.privacy.secure_aggregation"
REASON = ("not available: fedpir has no secure aggregation (the server sees each site's update); Flower's SecAgg+ "
          "workflow is not wired into fedpir's round loop yet")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    available = importlib.util.find_spec(MODULE) is not None
    figures = {"available": available,
               "skipped": REASON if not available else f"{MODULE} exists but this benchmark does not measure it yet"}
    return emit("secure_aggregation", argv, args, {"sites": [4, 10], "target": "ratio at 10 sites <= 1.2"}, figures)


if __name__ == "__main__":
    main()
