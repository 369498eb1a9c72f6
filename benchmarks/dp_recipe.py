"""Which DP recipe learns at hospital scale: a sweep of private-training choices on one federation.

Each configuration runs the default federated schedule (fedpir key policy, DP at the site budget)
on the default synthetic federation, with the sites' own code (:class:`fedpir.client.site.Site`:
data split, warm start, trainer, ledger) and FedAvg of the exchanged keys done in-process (the
weighted mean that the Flower strategy computes), so that a sweep of many configurations runs
in minutes; `fedpir simulate` then measures the chosen recipe through Flower. Per configuration
and seed it records the held-out Dice of every site after every round, epsilon, the noise/signal
forecast and the time.

    python benchmarks/dp_recipe.py --seeds 0,1,2 --out docs/results/dp_recipe.json

Prints one JSON object (and writes it to --out); ``--configs`` picks configurations by name.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedpir.client.pretrain_public_cli import RECIPE, build_warm_start
from fedpir.client.site import Site
from fedpir.protocol import STAGES
from fedpir.run_config import RunSettings
from fedpir.synthetic.federation import generate_federation

#: Configurations: overrides of the default RunSettings ("warm": start from the public warm start).
CONFIGS: dict[str, dict[str, Any]] = {
    "default-scratch": {"warm": False},
    "default-warm": {"warm": True},
    "warm-head": {"warm": True, "pretrain_rounds": 0, "finetune_rounds": 5, "finetune_trainable": "head"},
    "warm-light": {"warm": True, "pretrain_rounds": 0, "finetune_rounds": 5,
                   "finetune_trainable": "norms,adapters,task_head"},
    "warm-light-e3": {"warm": True, "pretrain_rounds": 0, "finetune_rounds": 5, "local_epochs": 3,
                      "finetune_trainable": "norms,adapters,task_head"},
    "warm-light-e3-k2": {"warm": True, "pretrain_rounds": 0, "finetune_rounds": 5, "local_epochs": 3,
                         "augment_views": 2, "finetune_trainable": "norms,adapters,task_head"},
    "warm-small-e3": {"warm": True, "pretrain_rounds": 0, "finetune_rounds": 5, "local_epochs": 3,
                      "finetune_trainable": "norms,adapters,task_out"},
    "warm-small-e3-k2": {"warm": True, "pretrain_rounds": 0, "finetune_rounds": 5, "local_epochs": 3,
                         "augment_views": 2, "finetune_trainable": "norms,adapters,task_out"},
    "warm-norms-e3": {"warm": True, "pretrain_rounds": 0, "finetune_rounds": 5, "local_epochs": 3,
                      "finetune_trainable": "norms,adapters"},
    "warm-none": {"warm": True, "pretrain_rounds": 0, "finetune_rounds": 1, "lr": 1e-12},
    "warm-all-e3": {"warm": True, "pretrain_rounds": 0, "finetune_rounds": 5, "local_epochs": 3},
    "warm-light-e3-nodp": {"warm": True, "pretrain_rounds": 0, "finetune_rounds": 5, "local_epochs": 3,
                           "finetune_trainable": "norms,adapters,task_head", "dp": False},
    "warm-all-e3-nodp": {"warm": True, "pretrain_rounds": 0, "finetune_rounds": 5, "local_epochs": 3, "dp": False},
    "warm-light-e3-prv": {"warm": True, "pretrain_rounds": 0, "finetune_rounds": 5, "local_epochs": 3,
                          "finetune_trainable": "norms,adapters,task_head", "accountant": "prv"},
    "warm-light-e3-lr3": {"warm": True, "pretrain_rounds": 0, "finetune_rounds": 5, "local_epochs": 3,
                          "finetune_trainable": "norms,adapters,task_head", "lr": 3e-3},
}


def federated_run(settings: RunSettings, work: Path) -> dict[str, Any]:
    """The federated schedule of ``settings`` with in-process FedAvg; held-out metrics per round."""
    names = sorted(p.name for p in settings.federation_path.glob("site-*"))
    sites = [Site(settings, settings.federation_path / n, work / "state" / n, n) for n in names]
    keys = sites[0].sent_keys
    global_state = {k: v.clone() for k, v in sites[0].sent_state().items()}
    rounds, start = [], time.perf_counter()
    for stage, count in zip(STAGES, (settings.pretrain_rounds, settings.finetune_rounds)):
        for _ in range(count):
            states, weights, train = [], [], []
            for site in sites:
                site.load_global(global_state)
                train.append(site.train(stage, settings.local_epochs))
                states.append(site.sent_state())
                weights.append(len(site.train_set))
            total = sum(weights)
            global_state = {k: sum(w * s[k].float() for w, s in zip(weights, states)) / total for k in keys}
            global_state = {k: v.to(states[0][k].dtype) for k, v in global_state.items()}
            evals = []
            for site in sites:
                site.load_global(global_state)
                evals.append(site.evaluate(stage))
            rounds.append({"stage": stage, "dice": [e["dice"] for e in evals],
                           "epsilon": [t.get("epsilon", 0.0) for t in train],
                           "noise_to_signal": [t.get("noise_to_signal", math.nan) for t in train],
                           "loss": [t["loss_total"] for t in train]})
    last = rounds[-1]
    finite = [d for d in last["dice"] if d == d]
    return {"dice": sum(finite) / max(len(finite), 1), "rounds": rounds, "seconds": time.perf_counter() - start}


def run_one(job: tuple[str, int, str, str, str, int]) -> dict[str, Any]:
    """One (configuration, seed) in its own process."""
    name, seed, fed_dir, warm, warm_sha, threads = job
    torch.set_num_threads(threads)
    overrides = dict(CONFIGS[name])
    use_warm = overrides.pop("warm")
    settings = replace(RunSettings(seed=seed, federation_dir=fed_dir, run_dir=fed_dir), **overrides)
    if use_warm:
        settings = replace(settings, warm_start=warm, warm_start_sha256=warm_sha)
    with tempfile.TemporaryDirectory(prefix=f"fedpir-{name}-") as tmp:
        result = federated_run(settings, Path(tmp))
    print(json.dumps({"config": name, "seed": seed, "dice": result["dice"], "seconds": round(result["seconds"])}),
          file=sys.stderr, flush=True)
    return {"config": name, "seed": seed, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--workers", type=int, default=1, help="configurations run in parallel processes")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores / workers)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    d = RunSettings()
    with tempfile.TemporaryDirectory(prefix="fedpir-recipe-") as tmp:
        warm = Path(tmp) / "warm.pt"
        sha = build_warm_start(warm, size=d.volume_size, modalities=d.modalities, device=args.device, progress=False,
                               **RECIPE)  # type: ignore[arg-type]
        jobs = []
        for seed in seeds:
            fed = generate_federation(Path(tmp) / f"fed-{seed}", n_sites=d.num_sites, subjects_per_site=d.subjects_per_site,
                                      shape=(d.volume_size,) * 3, seed=seed)
            jobs += [(c, seed, str(fed), str(warm), sha, threads) for c in configs]
        results: list[dict[str, Any]] = []
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(run_one, jobs):
                results.append(result)
                write(args, sha, configs, results, argv)
    print(json.dumps(write(args, sha, configs, results, argv), indent=1))
    return 0


def write(args: argparse.Namespace, sha: str, configs: list[str], results: list[dict[str, Any]],
          argv: list[str] | None) -> dict[str, Any]:
    """Summarise the results so far (mean and sd of the final Dice over seeds) and write --out."""
    summary = {}
    for c in configs:
        values = [r["dice"] for r in results if r["config"] == c]
        if not values:
            continue
        mean = sum(values) / len(values)
        sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        summary[c] = {"dice_mean": mean, "dice_sd": sd, "seeds": len(values), **CONFIGS[c]}
    out = {"command": shlex.join(["python", "benchmarks/dp_recipe.py", *(sys.argv[1:] if argv is None else argv)]),
           "defaults": RunSettings().to_run_config(), "warm_start_recipe": RECIPE, "warm_start_sha256": sha,
           "device": args.device, "summary": summary, "runs": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=float) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(main())
