"""The default simulation's tables, from `fedpir simulate` outputs over several seeds (docs/results.md).

    python benchmarks/experiments/results_table.py docs/results/default_simulation/seed-*/summary.json \
        --no-dp docs/results/default_simulation/no-dp/seed-*.json

Prints Markdown: per method, the mean held-out lesion Dice over sites (mean ± sd over the runs) and
Dice on seen / unseen single input modalities; then each site's held-out Dice (sites differ in size);
then the targets of the issue tracker checked against the measured means, with each gap per seed.
``python -m benchmarks.results_page`` puts the same tables on docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

#: Methods that start from the same public warm start as fedpir (fedpir-noinv has its own; scratch none).
SAME_START = ("fedavg", "fedbn", "local", "centralized")


def per_run(summary: dict) -> dict[str, dict[str, float]]:
    """{method: {"dice", "seen", "unseen"}} of one run's summary.json."""
    out = {}
    for method, sites in summary["final"].items():
        cross = summary.get("cross_modal", {}).get(method, {})
        out[method] = {"dice": float(np.nanmean([m.get("dice", math.nan) for m in sites.values()])),
                       "seen": cross.get("seen", math.nan), "unseen": cross.get("unseen", math.nan)}
    return out


def fmt(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {sd:.3f}"


def paired(runs: list[dict[str, dict[str, float]]], other: str, key: str) -> str:
    """fedpir minus ``other`` on ``key`` in each run (same federation, same seed): the comparison
    without the spread between federations, which is larger than the gaps."""
    return ", ".join(f"{r['fedpir'][key] - r[other][key]:+.3f}" for r in runs if other in r and "fedpir" in r)


def tables(summaries: list[dict], no_dp: list[dict]) -> list[str]:
    """The three tables (methods, sites, targets) of runs over seeds, with fedpir's no-DP runs beside them."""
    runs = [per_run(s) for s in summaries]
    fedpir_no_dp = [per_run(s)["fedpir"]["dice"] for s in no_dp]
    methods = list(runs[0])
    lines = [f"Mean over {len(runs)} seeds (± sd); Dice is the mean over sites of held-out lesion Dice.", "",
             "| method | held-out Dice | Dice, seen input modality | Dice, unseen input modality |", "|---|---|---|---|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(fmt([r[m][k] for r in runs if m in r]) for k in ("dice", "seen", "unseen"))
                     + " |")
    sites = sorted(summaries[0]["final"][methods[0]])
    sizes = summaries[0].get("settings", {}).get("subjects-per-site", "")
    lines += ["", f"Held-out Dice per site (patients per site: {sizes}; mean over the seeds):", "",
              "| method | " + " | ".join(sites) + " |", "|---|" + "---|" * len(sites)]
    for m in methods:
        cells = [float(np.nanmean([s["final"][m][site].get("dice", math.nan) for s in summaries if m in s["final"]]))
                 for site in sites]
        lines.append(f"| {m} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    mean = {m: {k: float(np.nanmean([r[m][k] for r in runs if m in r])) for k in ("dice", "seen", "unseen")}
            for m in methods}
    checks = []
    if "fedpir" in mean:
        f = mean["fedpir"]
        checks.append(("fedpir Dice >= 0.5", f["dice"], f["dice"] >= 0.5, ""))
        if fedpir_no_dp:
            gap = float(np.mean(fedpir_no_dp)) - f["dice"]
            checks.append((f"fedpir without DP ({np.mean(fedpir_no_dp):.3f}) - fedpir at epsilon 8 <= 0.05", gap, gap <= 0.05,
                           ""))
        for other, key, margin in (("local", "dice", 0.05), ("fedavg", "dice", 0.03), ("fedpir-noinv", "unseen", 0.05)):
            if other in mean:
                gap = f[key] - mean[other][key]
                what = "fedpir" if key == "dice" else "fedpir unseen"
                checks.append((f"{what} >= {other}{'' if key == 'dice' else ' unseen'} + {margin}", gap, gap >= margin,
                               paired(runs, other, key)))
        if f["seen"] == f["seen"]:
            checks.append(("fedpir unseen / seen >= 0.8", f["unseen"] / f["seen"], f["unseen"] / f["seen"] >= 0.8, ""))
    lines += ["", "| target | measured | met | fedpir minus it, per seed |", "|---|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {'yes' if ok else 'no'} | {seeds} |" for name, value, ok, seeds in checks]
    return lines


def largest_tie_gap(summaries: list[dict], no_dp: list[dict]) -> float:
    """The largest |method - fedpir| of held-out Dice on any seed, over the methods that start from fedpir's
    warm start (:data:`SAME_START`) and the no-DP runs of the same seed."""
    gaps = []
    for private, public in zip(summaries, no_dp or [{}] * len(summaries), strict=True):
        runs = per_run(private)
        others = [runs[m]["dice"] for m in SAME_START if m in runs]
        others += [r["dice"] for r in per_run(public).values()] if public else []
        gaps += [abs(d - runs["fedpir"]["dice"]) for d in others]
    return max(gaps)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", type=Path, help="summary.json of each seed's `fedpir simulate` run")
    parser.add_argument("--no-dp", nargs="*", type=Path, default=[], help="fedpir's runs without DP, one JSON per seed")
    args = parser.parse_args(argv)
    try:
        load = [json.loads(p.read_text()) for p in args.summaries], [json.loads(p.read_text()) for p in args.no_dp]
    except (OSError, ValueError) as err:  # a missing or unreadable file: one line, no traceback
        print(f"results_table.py: {err}", file=sys.stderr)
        return 2
    print("\n".join(tables(*load)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
