"""Framework overhead: a federated round on Flower's simulation engine against the same local work
in a plain loop in one process.

Both run the same sites (``fedpir.client.site.Site``: same data, model, trainer, trained groups and
seeds) for the same rounds: per round every site loads the global shared weights, trains, and is
evaluated after a FedAvg of the shared weights. The plain loop calls the sites one after another in
this process (the FedAvg is a weighted mean in torch); the federated run is the real ServerApp and
ClientApp with one simulated SuperNode per site (sites run one at a time, each on every core, as
``fedpir simulate`` runs them). The ratio is taken on the fastest round after the first of each (the
minimum is the figure least disturbed by other jobs on a shared machine; the engine's start-up is
reported on its own) and on the whole run. The plain loop runs before and after the federated run
(the faster of the two counts). Within the federated round itself, ``ratio_round_from_parts`` is
its wall time over its wall time less the parts the plain loop does not have (FRAMEWORK_PARTS):
the overhead as one run measures it, free of load changes between the two runs. Without DP: its cost is benchmarks.cost.dp_cost's.

    python -m benchmarks.cost.overhead [--sites 4 --subjects 8 --size 16 --rounds 4 --device cpu]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.cost.common import emit, parser, ratio
from benchmarks.cost.engine_probe import run_probed
from fedpir.client.site import Site
from fedpir.run_config import RunSettings
from fedpir.simulation.runner import site_names
from fedpir.synthetic.prepare import synthetic_federation

#: The parts of a round that the plain loop does not have (Flower's messaging, the server's screening
#: and aggregation, the engine's queues and polling).
FRAMEWORK_PARTS: tuple[str, ...] = ("serialization", "aggregation", "transport")
#: The round's parts, in the order the table lists them (benchmarks.cost.engine_probe.breakdown).
PARTS: tuple[str, ...] = ("startup", "site_setup", "training", "local_other", "serialization", "aggregation",
                          "transport")


def plain_loop(settings: RunSettings, threads: int) -> dict[str, Any]:
    """The federated schedule in one process without Flower: seconds to build the sites, per round, and
    in the training loops, with ``threads`` torch threads (those the simulated sites had)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _plain_rounds(settings)
    finally:
        torch.set_num_threads(before)


def _plain_rounds(settings: RunSettings) -> dict[str, Any]:
    start = time.perf_counter()
    sites = [Site(settings, settings.federation_path / n, settings.run_path / "sites" / n, n)
             for n in site_names(settings)]
    setup = time.perf_counter() - start
    global_state = sites[0].sent_state()
    rounds, training = [], []
    for _ in range(settings.finetune_rounds):
        start = time.perf_counter()
        replies = []
        for site in sites:
            site.load_global(global_state)
            training.append(site.train("finetune", settings.local_epochs)["seconds"])
            replies.append((site.sent_state(), len(site.train_set)))
        total = sum(n for _, n in replies)
        global_state = {k: sum(state[k].float() * n for state, n in replies) / total for k in global_state}
        for site in sites:
            site.load_global(global_state)
            with torch.no_grad():
                site.evaluate("finetune")
        rounds.append(time.perf_counter() - start)
    return {"setup_s": setup, "round_s": rounds, "training_s": sum(training) / len(rounds), "threads": torch.get_num_threads()}


def measure(settings: RunSettings, work: Path) -> dict[str, Any]:
    """The federated and the plain run of ``settings`` and their ratios."""
    fed = synthetic_federation(replace(settings, run_dir=str(work / "data")))
    before = plain_loop(replace(settings, federation_dir=str(fed), run_dir=str(work / "plain-before")),
                        torch.get_num_threads())
    run = run_probed(replace(settings, federation_dir=str(fed), run_dir=str(work / "flower")), work)
    site_threads = sorted({m["threads"] for m in run.messages})
    after = plain_loop(replace(settings, federation_dir=str(fed), run_dir=str(work / "plain-after")), site_threads[-1])
    # only a loop with the sites' thread count compares (the one before may have had other threads)
    comparable = [p for p in (before, after) if p["threads"] == site_threads[-1]]
    plain = min(comparable, key=lambda p: min(p["round_s"][1:] or p["round_s"]))
    per_round = run.per_round()
    steady = per_round[1:] or per_round
    fastest = min(steady, key=lambda r: r["wall"])
    fed_round = fastest["wall"]
    plain_round = min(plain["round_s"][1:] or plain["round_s"])
    plain_total = plain["setup_s"] + sum(plain["round_s"])
    framework = sum(fastest.get(p, 0.0) for p in FRAMEWORK_PARTS)
    return {
        "ratio_round": ratio(fed_round, plain_round),
        "ratio_round_from_parts": ratio(fed_round, fed_round - framework),
        "ratio_run": ratio(run.wall, plain_total),
        "federated_round_s": fed_round, "plain_round_s": plain_round,
        "federated_run_s": run.wall, "plain_run_s": plain_total, "plain_setup_s": plain["setup_s"],
        "plain_rounds_s": plain["round_s"], "plain_rounds_before_s": before["round_s"],
        "plain_rounds_after_s": after["round_s"], "plain_training_s_per_round": plain["training_s"],
        "plain_torch_threads": plain["threads"], "site_torch_threads": site_threads,
        "first_round": per_round[0],
        "steady_round": {p: fastest.get(p, 0.0) for p in PARTS if p != "startup"},
        "federated_round_median_s": statistics.median(r["wall"] for r in steady),
        "rounds": per_round,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--subjects", type=int, default=8, help="patients per site (a quarter held out)")
    p.add_argument("--size", type=int, default=16, help="volume edge in voxels")
    p.add_argument("--rounds", type=int, default=4, help="fine-tuning rounds (the first includes start-up)")
    args = p.parse_args(argv)
    settings = RunSettings(num_sites=args.sites, subjects_per_site=args.subjects, volume_size=args.size,
                           finetune_rounds=args.rounds, dp=False, device=args.device, min_sites=args.sites)
    with tempfile.TemporaryDirectory(prefix="fedpir-overhead-") as tmp:
        figures = measure(settings, Path(tmp))
    config = {"sites": args.sites, "subjects": args.subjects, "size": args.size, "rounds": args.rounds, "dp": False,
              "target": "ratio_round <= 1.10"}
    return emit("overhead", argv, args, config, figures)


if __name__ == "__main__":
    main()
