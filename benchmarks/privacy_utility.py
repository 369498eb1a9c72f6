"""Privacy-utility curve: held-out lesion Dice against the sites' epsilon, one line per method.

Runs `fedpir simulate` on one synthetic federation once per budget (each epsilon, and without DP),
then plots the mean held-out Dice of each method against epsilon and writes the figures as JSON.

    python benchmarks/privacy_utility.py --out privacy-utility --epsilons 1,3,8 --methods fedpir,fedavg,local

Writes ``OUT/privacy_utility.json`` (with this command) and ``OUT/privacy_utility.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedpir.cli import main as fedpir  # noqa: E402
from fedpir.run_config import RunSettings  # noqa: E402
from fedpir.simulation.prepare import synthetic_federation  # noqa: E402


def mean_dice(summary: dict, method: str) -> float:
    """Mean over sites of the final held-out Dice of ``method`` in a run's summary.json."""
    values = [m.get("dice", math.nan) for m in summary["final"][method].values()]
    return float(np.nanmean(values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--methods", default="fedpir,fedavg,local")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("extra", nargs="*", help="further `fedpir simulate` flags, after --")
    args = parser.parse_args(argv)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    methods = args.methods.split(",")
    federation = synthetic_federation(RunSettings(federation_dir=str(args.out / "federation"), seed=args.seed))
    budgets: list[float | None] = [*epsilons, None]
    results: dict[str, dict[str, float]] = {}
    for eps in budgets:
        name = "no-dp" if eps is None else f"eps-{eps:g}"
        flags = ["--no-dp"] if eps is None else ["--epsilon", str(eps)]
        code = fedpir(["simulate", "--out", str(args.out / name), "--federation", str(federation), "--methods",
                       args.methods, "--seed", str(args.seed), *flags, *args.extra])
        if code:
            return code
        summary = json.loads((args.out / name / "summary.json").read_text())
        results[name] = {m: mean_dice(summary, m) for m in methods}
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [*epsilons, max(epsilons) * 2]
    for method in methods:
        ax.plot(xs, [results[n][method] for n in results], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{e:g}" for e in epsilons] + ["no DP"])
    ax.set_xlabel("epsilon per site")
    ax.set_ylabel("held-out lesion Dice (mean over sites)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "privacy_utility.png", dpi=100)
    command = shlex.join(["python", "benchmarks/privacy_utility.py", *(sys.argv[1:] if argv is None else argv)])
    (args.out / "privacy_utility.json").write_text(json.dumps({"command": command, "dice": results}, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
