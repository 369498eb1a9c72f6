"""CLI latency: how long `fedpir` takes to answer a question that needs no training (targets: help and
version under 1 s, a rejected simulate flag under 2 s, before any warm start is built).

Each command runs as a new process (``python -m fedpir ...``, the console script's code), several
times; the figure is the fastest run (the least disturbed by other load on a shared machine) and
the median.

    python -m benchmarks.cost.cli [--repeats 5]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from benchmarks.cost.common import emit, parser

#: What is timed, the exit code each must give, and its target in seconds.
CASES: dict[str, tuple[list[str], int, float]] = {
    "help": (["--help"], 0, 1.0),
    "version": (["--version"], 0, 1.0),
    "simulate_help": (["simulate", "--help"], 0, 1.0),
    "train_help": (["train", "--help"], 0, 1.0),
    "bad_strategy": (["simulate", "--strategy", "nonsense"], 2, 2.0),
    "bad_methods": (["simulate", "--methods", "fedpir,bogus"], 2, 2.0),
}


def seconds(argv: list[str], expected: int, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` runs of ``python -m fedpir argv`` (RuntimeError on another exit code)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "fedpir", *argv], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != expected:
            raise RuntimeError(f"fedpir {' '.join(argv)} exited {done.returncode}, expected {expected}: {done.stderr}")
    return times


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="runs of each command")
    args = p.parse_args(argv)
    figures = {}
    for name, (cmd, expected, target) in CASES.items():
        runs = seconds(cmd, expected, args.repeats)
        figures[name] = {"min_s": min(runs), "median_s": statistics.median(runs), "target_s": target,
                         "met": min(runs) <= target}
    emit("cli", argv, args, {"repeats": args.repeats, "commands": {k: v[0] for k, v in CASES.items()}}, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
