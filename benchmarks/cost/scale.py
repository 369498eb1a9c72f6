"""Scale: how many simulated hospitals complete two rounds on this machine, with the peak memory and
the seconds per round against the number of sites (a plot).

Each number of sites runs in a process of its own: a synthetic federation (``--subjects`` patients
per site, ``--size``^3 volumes; the volume size is what makes the model small, as the encoder's
widths are the default ones; beyond ``--distinct`` sites, a site's folder is a link to one of those,
as the cost of a site does not depend on its images; every site keeps its own state and ledger),
then two private fine-tuning rounds of the default recipe on Flower's simulation engine (a fixed
noise multiplier, so that no site spends seconds searching for one). Peak memory is the resident
memory of that process and of everything it starts (Ray's processes and workers). A number of
sites that fails or exceeds ``--memory-limit`` ends the sweep.

    python -m benchmarks.cost.scale [--sites 4,16,64 --subjects 3 --size 16 --plot docs/results/scale.png]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.cost.common import emit, in_child, parser, peak_memory, save_figure
from benchmarks.cost.engine_probe import run_probed
from fedpir.run_config import RunSettings
from fedpir.synthetic.federation import generate_federation

GIB = 2**30
PLOT = Path(__file__).resolve().parents[2] / "docs" / "results" / "scale.png"


def run_sites(settings: RunSettings, work: str, distinct: int) -> dict[str, Any]:
    """Two rounds of ``settings`` in this process: peak memory, wall seconds, seconds per round."""
    size = settings.volume_size
    start = time.perf_counter()
    fed = generate_federation(Path(work) / "federation", n_sites=min(distinct, settings.num_sites),
                              subjects_per_site=settings.subjects_per_site, shape=(size,) * 3, seed=settings.seed)
    for k in range(distinct, settings.num_sites):
        (fed / f"site-{k}").symlink_to(f"site-{k % distinct}", target_is_directory=True)
    generate_s = time.perf_counter() - start
    run_settings = replace(settings, federation_dir=str(fed), run_dir=str(Path(work) / "run"))
    with peak_memory("cpu") as peak:
        run = run_probed(run_settings, Path(work))
    rounds = run.round_seconds()
    replies = sum(1 for r in run.server_log if r["kind"] == "train")
    completed = len(rounds) == settings.finetune_rounds and replies == settings.num_sites * settings.finetune_rounds
    setup = sum(m["setup_s"] for m in run.messages)
    return {"sites": settings.num_sites, "completed": completed, "rounds_done": len(rounds),
            "peak_bytes": peak.bytes, "peak_gib": peak.bytes / GIB, "wall_s": run.wall, "round_s": rounds,
            "first_round_s": rounds[0] if rounds else None,
            "later_round_s": statistics.median(rounds[1:]) if len(rounds) > 1 else None,
            "first_round_parts": run.per_round()[0] if rounds else {},
            "site_setup_s": setup, "training_s": sum(m["train_s"] for m in run.messages),
            "generate_s": generate_s, "train_replies": replies}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Peak memory and seconds per round against the number of sites."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("completed")]
    fig, (mem, sec) = plt.subplots(1, 2, figsize=(9, 3.5))
    n = [r["sites"] for r in done]
    mem.plot(n, [r["peak_gib"] for r in done], "o-")
    mem.set(xlabel="simulated sites", ylabel="peak memory (GiB)", xscale="log", title="peak resident memory")
    sec.plot(n, [r["first_round_s"] for r in done], "o-", label="round 1 (with start-up)")
    sec.plot(n, [r["later_round_s"] for r in done], "s-", label="round 2")
    sec.set(xlabel="simulated sites", ylabel="seconds", xscale="log", yscale="log", title="seconds per round")
    sec.legend()
    for ax in (mem, sec):
        ax.minorticks_off()
        ax.set_xticks(n, [str(x) for x in n])
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sites", default="4,16,64", help="comma list of numbers of simulated sites, increasing")
    p.add_argument("--subjects", type=int, default=3, help="patients per site (one held out)")
    p.add_argument("--size", type=int, default=16, help="volume edge in voxels")
    p.add_argument("--distinct", type=int, default=4, help="sites with data of their own; the others link to them")
    p.add_argument("--memory-limit", type=float, default=24.0, help="GiB; a run above it ends the sweep")
    p.add_argument("--plot", default=str(PLOT), help="PNG of memory and time against sites ('' for none)")
    args = p.parse_args(argv)
    rows = []
    for n in (int(s) for s in args.sites.split(",")):
        settings = RunSettings(num_sites=n, subjects_per_site=args.subjects, volume_size=args.size, finetune_rounds=2,
                               noise_multiplier=1.0, epsilon_budget=1e3, device=args.device, min_sites=n)
        with tempfile.TemporaryDirectory(prefix="fedpir-scale-") as tmp:
            row = in_child(run_sites, start="spawn", settings=settings, work=tmp, distinct=args.distinct)
        rows.append(row)
        if not row.get("completed") or row.get("peak_gib", 0) > args.memory_limit:
            break
    done = [r["sites"] for r in rows if r.get("completed") and r["peak_gib"] <= args.memory_limit]
    if args.plot:
        plot(rows, Path(args.plot))
    config = {"sites": args.sites, "subjects": args.subjects, "size": args.size, "distinct": args.distinct, "rounds": 2,
              "dp": True,
              "noise_multiplier": 1.0, "memory_limit_gib": args.memory_limit, "cores": os.cpu_count(),
              "target": "largest number of sites >= 64"}
    return emit("scale", argv, args, config, {"largest_completed": max(done, default=0), "rows": rows,
                                              "plot": args.plot})


if __name__ == "__main__":
    main()
