"""Run every cost benchmark with its small defaults, one after another, each in a process of its own
(each starts from a clean process: no engine, threads or allocations of the one before), and
append their records (one JSON object each, sharing a run id) to the results file; then print the
cost table.

    python -m benchmarks [--device cpu] [--only overhead,dp_cost] [--results docs/results/benchmarks.jsonl]

``python -m benchmarks.results_page`` puts the table of the committed records on docs/results.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from benchmarks.cost.common import RUN_ID_ENV, parser
from benchmarks.cost.cost_table import table

#: The benchmarks, in the order they run (cheap and independent first).
BENCHMARKS: tuple[str, ...] = ("cli", "secure_aggregation", "data_path", "dp_cost", "overhead", "communication", "scale",
                               "parallel")


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma list of benchmarks to run")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    os.environ[RUN_ID_ENV] = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    start, failed, records = time.perf_counter(), [], []
    for name in names:
        begin = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", f"benchmarks.cost.{name}", "--device", args.device,
                               "--results", args.results], stdout=subprocess.PIPE, text=True)
        if done.returncode == 0:
            records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        else:  # one failed benchmark must not hide the others' figures
            failed.append(name)
            print(f"benchmark {name} failed with exit code {done.returncode} (its output is above)", file=sys.stderr)
        print(f"benchmark {name}: {time.perf_counter() - begin:.0f} s", file=sys.stderr, flush=True)
    print(f"all benchmarks: {time.perf_counter() - start:.0f} s (results in {args.results or 'no file'})",
          file=sys.stderr)
    print(table(records))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
