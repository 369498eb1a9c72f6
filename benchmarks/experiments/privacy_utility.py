"""Privacy-utility curve: held-out lesion Dice against the sites' epsilon, one line per method.

Runs `fedpir simulate` once per seed and budget (each epsilon, and without DP) on the seed's synthetic
federation (the same federation for every budget), then plots the mean over seeds of each method's
held-out Dice (mean over sites) against epsilon, with the seeds' standard deviation as error bars.

    python benchmarks/experiments/privacy_utility.py --out privacy-utility --epsilons 1,3,8 \
        --methods fedpir,fedavg,local --seeds 0,1,2

A budget whose run folder already holds a summary is read, not rerun (an interrupted sweep goes on).
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

from fedpir.commands import main as fedpir  # noqa: E402
from fedpir.run_config import RunSettings  # noqa: E402
from fedpir.synthetic.prepare import synthetic_federation  # noqa: E402


def mean_dice(summary: dict, method: str) -> float:
    """Mean over sites of the final held-out Dice of ``method`` in a run's summary.json."""
    values = [m.get("dice", math.nan) for m in summary["final"][method].values()]
    return float(np.nanmean(values))


def run_budget(out: Path, federation: Path, methods: str, seed: int, eps: float | None, extra: list[str]) -> dict:
    """The summary of one `fedpir simulate` run at budget ``eps`` (None: without DP), run if not there."""
    if not (out / "summary.json").is_file():
        flags = ["--no-dp"] if eps is None else ["--epsilon", str(eps)]
        code = fedpir(["simulate", "--out", str(out), "--federation", str(federation), "--methods", methods,
                       "--seed", str(seed), *flags, *extra])
        if code:
            raise SystemExit(code)
    return json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--methods", default="fedpir,fedavg,local")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("extra", nargs="*", help="further `fedpir simulate` flags, after --")
    args = parser.parse_args(argv)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    methods = args.methods.split(",")
    budgets: dict[str, float | None] = {**{f"eps-{e:g}": e for e in epsilons}, "no-dp": None}
    per_seed: dict[str, dict[str, list[float]]] = {name: {m: [] for m in methods} for name in budgets}
    for seed in (int(s) for s in args.seeds.split(",")):
        federation = synthetic_federation(RunSettings(federation_dir=str(args.out / f"seed-{seed}" / "federation"),
                                                      seed=seed))
        for name, eps in budgets.items():
            summary = run_budget(args.out / f"seed-{seed}" / name, federation, args.methods, seed, eps, args.extra)
            for method in methods:
                per_seed[name][method].append(mean_dice(summary, method))
    results = {name: {m: {"mean": float(np.mean(v)), "sd": float(np.std(v)), "seeds": v} for m, v in row.items()}
               for name, row in per_seed.items()}
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [*epsilons, max(epsilons) * 2]
    for method in methods:
        ax.errorbar(xs, [results[n][method]["mean"] for n in budgets], yerr=[results[n][method]["sd"] for n in budgets],
                    marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{e:g}" for e in epsilons] + ["no DP"])
    ax.set_xlabel("epsilon per site")
    ax.set_ylabel("held-out lesion Dice (mean over sites)")
    ax.set_title(f"mean +- sd over {len(args.seeds.split(','))} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "privacy_utility.png", dpi=100)
    command = shlex.join(["python", "benchmarks/experiments/privacy_utility.py", *(sys.argv[1:] if argv is None else argv)])
    (args.out / "privacy_utility.json").write_text(json.dumps({"command": command, "dice": results}, indent=1) + "\n")
    print(json.dumps({n: {m: round(r["mean"], 3) for m, r in row.items()} for n, row in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
