"""Secure aggregation cost: round time with and without it at 4 and 10 sites (target <= 1.2 at 10).

The same synthetic federation runs on Flower's simulation engine twice per site count: plain
aggregation, then ``secure-aggregation = true`` (Flower's SecAgg+: three more message exchanges per
round, key agreement, masking and unmasking; fedpir.privacy.secure_aggregation). The figure is the
fastest round after the first (the first includes the engine's start-up) of each run; the ratio is
secure over plain. Without DP (its cost is benchmarks.cost.dp_cost's; SecAgg+ does not change it), or
with ``--preset NAME`` a simulation preset's round (its sizes cycled over the sites, its private phase
under DP): SecAgg+'s cost is fixed per round, so what counts is its share of a real round.

    python -m benchmarks.cost.secure_aggregation [--sites 4,10 --subjects 4 --size 16 --rounds 3 --device cpu]
    python -m benchmarks.cost.secure_aggregation --preset default --sites 10
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.cost.common import emit, parser, ratio
from benchmarks.cost.engine_probe import run_probed
from fedpir.run_config import RunSettings
from fedpir.simulation.presets import PRESET_KNOBS, PRESETS
from fedpir.synthetic.prepare import synthetic_federation


def round_seconds(settings: RunSettings, work: Path) -> list[float]:
    """Wall seconds of each round of ``settings`` (federation set) on the simulation engine."""
    return run_probed(replace(settings, run_dir=str(work)), work).round_seconds()


def measure(settings: RunSettings, work: Path) -> dict[str, Any]:
    """Plain and secure rounds of one federation, and their ratio."""
    fed = synthetic_federation(replace(settings, run_dir=str(work / "data")))
    settings = replace(settings, federation_dir=str(fed))
    plain = round_seconds(settings, work / "plain")
    secure = round_seconds(replace(settings, secure_aggregation=True), work / "secure")
    plain_round, secure_round = min(plain[1:] or plain), min(secure[1:] or secure)
    return {"ratio_round": ratio(secure_round, plain_round), "plain_round_s": plain_round,
            "secure_round_s": secure_round, "plain_rounds_s": plain, "secure_rounds_s": secure}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sites", default="4,10", help="comma list of site counts")
    p.add_argument("--subjects", type=int, default=4, help="patients per site (a quarter held out)")
    p.add_argument("--size", type=int, default=16, help="volume edge in voxels")
    p.add_argument("--rounds", type=int, default=3, help="fine-tuning rounds (the first includes start-up)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="time this simulation preset's round instead (sizes, "
                                                            "grid, private phase under DP; --subjects and --size ignored)")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.sites.split(",") if n]
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedpir-secagg-") as tmp:
        for n in counts:
            if args.preset:
                knobs = {k: v for k, v in PRESETS[args.preset].items() if k in PRESET_KNOBS}
                settings = replace(RunSettings(**knobs), num_sites=n, finetune_rounds=args.rounds, device=args.device,
                                   min_sites=n)
            else:
                settings = RunSettings(num_sites=n, subjects_per_site=str(args.subjects), volume_size=args.size,
                                       finetune_rounds=args.rounds, dp=False, device=args.device, min_sites=n)
            figures[f"sites_{n}"] = measure(settings, Path(tmp) / str(n))
    figures["ratio_at_max_sites"] = figures[f"sites_{max(counts)}"]["ratio_round"]
    config = {"sites": counts, "subjects": settings.subjects_per_site, "size": settings.volume_size,
              "rounds": args.rounds, "dp": settings.dp, "preset": args.preset or "", "target": "ratio at 10 sites <= 1.2"}
    return emit("secure_aggregation", argv, args, config, figures)


if __name__ == "__main__":
    main()
