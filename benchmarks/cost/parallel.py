"""Parallel sites: the seconds of a round of the default simulation (``fedpir simulate``'s preset: 8 sites of
4-20 patients, 24^3, its private phase) when the sites train one after another, each on every core (serial:
``cpus-per-site`` = cores, fedpir's behaviour before), and when as many train side by side as there are cores
(``cpus-per-site`` 0, the default: one core each on 2 cores), with the same on one core; a plot of seconds
per site and round against cores. Target: the parallel round <= 0.6 x the serial one.

Each case runs in a process of its own, pinned to its cores (so Ray and torch see only them), from random
weights (a warm start changes the weights, not the cost); the figure is the median of the rounds after the
first (the first also builds every site).

    python -m benchmarks.cost.parallel [--preset default --sites 8 --size 24 --rounds 3]
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.cost.common import emit, in_child, parser, ratio, save_figure
from benchmarks.cost.engine_probe import run_probed
from fedpir.run_config import RunSettings
from fedpir.simulation.presets import PRESET_KNOBS, PRESETS
from fedpir.synthetic.prepare import synthetic_federation

PLOT = Path(__file__).resolve().parents[2] / "docs" / "results" / "parallel_sites.png"
TARGET = 0.6


def run_pinned(cores: int, settings: RunSettings, work: str) -> dict[str, Any]:
    """The rounds of ``settings`` on a synthetic federation, in this process pinned to its first ``cores`` CPUs."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    settings = replace(settings, run_dir=str(Path(work) / "run"), federation_dir=str(Path(work) / "federation"))
    synthetic_federation(settings)
    run = run_probed(settings, Path(work))
    rounds = run.round_seconds()
    replies = sum(1 for r in run.server_log if r["kind"] == "train")
    return {"cores": cores, "sites": settings.num_sites, "round_s": rounds,
            "completed": len(rounds) == settings.finetune_rounds and replies == settings.num_sites * len(rounds),
            "later_round_s": statistics.median(rounds[1:]) if len(rounds) > 1 else None,
            "training_s": sum(m["train_s"] for m in run.messages),
            "threads": sorted({m["threads"] for m in run.messages})}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Seconds per site and round against cores, serial and parallel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode, marker in (("serial", "s-"), ("parallel", "o-")):
        done = sorted((r["cores"], r["later_round_s"] / r["sites"]) for r in rows
                      if r.get("completed") and r["mode"] in (mode, "one core"))
        ax.plot([c for c, _ in done], [s for _, s in done], marker, label=mode)
    ax.set(xlabel="cores", ylabel="seconds per site and round", title=f"{rows[0]['sites']} simulated sites")
    ax.set_xticks(sorted({r["cores"] for r in rows}))
    ax.legend()
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", choices=sorted(PRESETS), help="the simulation preset whose round is timed")
    p.add_argument("--sites", type=int, help="simulated sites (default: the preset's)")
    p.add_argument("--size", type=int, help="volume edge in voxels (default: the preset's)")
    p.add_argument("--rounds", type=int, default=3, help="fine-tuning rounds per case (the first is not timed)")
    p.add_argument("--plot", default=str(PLOT), help="PNG of seconds per site against cores ('' for none)")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    preset = {k: v for k, v in PRESETS[args.preset].items() if k in PRESET_KNOBS}
    base = replace(RunSettings(**preset), finetune_rounds=args.rounds, device=args.device, warm_start="",
                   warm_start_sha256="", **{k: v for k, v in (("num_sites", args.sites), ("volume_size", args.size)) if v})
    cases = [("one core", 1, 0.0), ("serial", cores, float(cores)), ("parallel", cores, 0.0)]
    rows = []
    for mode, n, cpus in cases:
        settings = replace(base, cpus_per_site=cpus, min_sites=base.num_sites)
        with tempfile.TemporaryDirectory(prefix="fedpir-parallel-") as tmp:
            row = in_child(run_pinned, start="spawn", cores=n, settings=settings, work=tmp)
        rows.append({"mode": mode, "cpus_per_site": cpus or "auto", **row})
        print(f"{mode} ({n} cores): round {row.get('later_round_s')} s", flush=True)
    by = {r["mode"]: r for r in rows if r.get("completed")}
    parallel_over_serial = ratio(by["parallel"]["later_round_s"], by["serial"]["later_round_s"]) \
        if {"parallel", "serial"} <= set(by) else float("nan")
    if args.plot and by:
        plot(rows, Path(args.plot))
    config = {"preset": args.preset, "sites": base.num_sites, "subjects": base.subjects_per_site,
              "size": base.volume_size, "rounds": args.rounds, "trainable": base.finetune_trainable,
              "dp": base.dp, "epsilon": base.epsilon_budget, "cores": cores}
    return emit("parallel", argv, args, config, {
        "parallel_over_serial": parallel_over_serial, "target": TARGET, "met": parallel_over_serial <= TARGET,
        "seconds_per_site_round": {r["mode"]: r["later_round_s"] / r["sites"] for r in by.values()},
        "rows": rows, "plot": args.plot})


if __name__ == "__main__":
    main()
