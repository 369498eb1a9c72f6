"""Which DP recipe learns at hospital scale: a sweep of private-training choices on one federation.

Each configuration runs the default federated schedule (fedpir key policy, DP at the site budget)
on the default synthetic federation, with the sites' own code (:class:`fedpir.client.site.Site`:
data split, warm start, trainer, ledger) and FedAvg of the exchanged keys done in-process (the
weighted mean that the Flower strategy computes), so that a sweep of many configurations runs
in minutes; `fedpir simulate` then measures the chosen recipe through Flower. Per configuration
and seed it records the held-out Dice of every site after every round, epsilon, the noise/signal
forecast and the time.

    python benchmarks/experiments/dp_recipe.py --seeds 0,1,2 --out docs/results/dp_recipe.json

The ``v2-*`` configurations (``RECIPES``: each recipe under fedpir's key policy, local-only, FedAvg
and fedpir-noinv) also score every site on its evaluation set (own modalities, and one modality at
a time); their command is in docs/results/dp_recipe_v2/COMMANDS.md. ``--resume`` keeps the runs
--out already holds that started from the warm start they would use now. ``--public-seed-per-run``
builds each seed's warm starts from a public corpus of that seed, so that the seeds sample the warm
start too (docs/results/warm_start_recipe/); the ``v3-*`` configurations start from warm starts
whose segmentation epochs saw FLAIR only.

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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedpir.client.site import Site
from fedpir.data.dataset import load_site
from fedpir.models.evaluation import evaluate
from fedpir.privacy.dp import collate_patients
from fedpir.run_config import RunSettings
from fedpir.simulation.cross_modal import site_cross_modal
from fedpir.simulation.warm_starts import cached_warm_start
from fedpir.synthetic.federation import EVAL_DIR
from fedpir.synthetic.prepare import synthetic_federation
from fedpir.training.recipe import RECIPE
from fedpir.wire.protocol import STAGES

#: Configurations: overrides of the default RunSettings ("warm": start from the public warm start,
#: "noinv": from the one pretrained without the invariance term; "public_masks": the input modalities
#: of the warm start's segmentation epochs, default all).
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
#: The sweep on the current default federation (sites of 6, 9, 12 and 21 patients, evaluation sets in
#: every modality): each recipe under fedpir's key policy, local-only and FedAvg of the same groups.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "lr1e-2": {"lr": 1e-2},
    "fusion-lr3e-3": {"lr": 3e-3, "finetune_trainable": "norms,adapters,fusion,task_out"},
    "all-e5-lr3e-3": {"lr": 3e-3, "local_epochs": 5, "finetune_trainable": "all"},
    "all-e5-lr3e-3-nodp": {"lr": 3e-3, "local_epochs": 5, "finetune_trainable": "all", "dp": False},
}
for _recipe, _overrides in RECIPES.items():
    CONFIGS[f"v2-{_recipe}"] = {"warm": True, **_overrides}
    for _policy in ("local", "fedavg"):
        CONFIGS[f"v2-{_recipe}-{_policy}"] = {"warm": True, "key_policy": _policy, **_overrides}
    CONFIGS[f"v2-{_recipe}-noinv"] = {"warm": "noinv", "invariance_weight": 0.0, **_overrides}
#: The default recipe from warm starts whose public lesion masks came with FLAIR only (the invariant
#: encoder must carry the segmentation to the other modalities): fedpir and fedpir-noinv.
CONFIGS["v3-flair-masks"] = {"warm": True, "public_masks": "flair"}
CONFIGS["v3-flair-masks-noinv"] = {"warm": "noinv", "public_masks": "flair", "invariance_weight": 0.0}


def warm_key(kind: bool | str, public_masks: str) -> str:
    """Which warm start a configuration starts from (see CONFIGS)."""
    return f"{'noinv' if kind == 'noinv' else 'warm'}:{public_masks}"


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
    return {"dice": sum(finite) / max(len(finite), 1), "rounds": rounds, "seconds": time.perf_counter() - start,
            **evaluation_set_scores(settings, sites)}


def evaluation_set_scores(settings: RunSettings, sites: list[Site]) -> dict[str, Any]:
    """Each site's final model on its evaluation set (more patients than its held-out split): Dice
    with the site's own modalities as input ("eval_dice"), and with each single modality, split
    into modalities the site trains on ("seen") and the others ("unseen"). Empty without eval sets."""
    root = settings.federation_path / EVAL_DIR
    if not root.is_dir():
        return {}
    own, seen, unseen = [], [], []
    for site in sites:
        loader = DataLoader(load_site(root / site.name, settings.vocabulary, (settings.volume_size,) * 3)[0],
                            batch_size=4, collate_fn=collate_patients)
        model = site.model.eval()
        with torch.no_grad():
            own.append(float(evaluate(model, loader, modalities=site.modalities)["dice"]))
        for modality, dice in site_cross_modal(model, loader, settings.vocabulary).items():
            (seen if modality in site.modalities else unseen).append(dice)
    return {"eval_dice_sites": own, "eval_dice": float(np.nanmean(own)), "seen": float(np.nanmean(seen)),
            "unseen": float(np.nanmean(unseen))}


def run_one(job: tuple[str, RunSettings, dict[str, tuple[str, str]], int]) -> dict[str, Any]:
    """One configuration on ``base`` (seed, federation, device) in its own process; ``warm`` maps
    "warm"/"noinv" to (file, SHA-256)."""
    name, base, warm, threads = job
    seed = base.seed
    torch.set_num_threads(threads)
    overrides = dict(CONFIGS[name])
    use_warm, public_masks = overrides.pop("warm"), overrides.pop("public_masks", "all")
    settings = replace(base, **overrides)
    if use_warm:
        path, sha = warm[warm_key(use_warm, public_masks)]
        settings = replace(settings, warm_start=path, warm_start_sha256=sha)
    with tempfile.TemporaryDirectory(prefix=f"fedpir-{name}-") as tmp:
        result = federated_run(settings, Path(tmp))
    print(json.dumps({"config": name, "seed": seed, "dice": result["dice"], "eval_dice": result.get("eval_dice"),
                      "unseen": result.get("unseen"), "seconds": round(result["seconds"])}), file=sys.stderr, flush=True)
    return {"config": name, "seed": seed, "warm_start_sha256": settings.warm_start_sha256, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--workers", type=int, default=1, help="configurations run in parallel processes")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores / workers)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--public-seed-per-run", action="store_true",
                        help="build each seed's warm starts from a public corpus of that seed (default: seed 0 "
                             "for all), so that the seeds also sample the warm start")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs --out already holds that started from the warm start they would use now; "
                             "run the others")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    d = RunSettings(device=args.device)
    needed = {(CONFIGS[c]["warm"], CONFIGS[c].get("public_masks", "all")) for c in configs if CONFIGS[c]["warm"]}
    built: dict[int, dict[str, tuple[str, str]]] = {}

    def warm_starts(seed: int) -> dict[str, tuple[str, str]]:
        """The warm starts of a seed's runs, by warm_key (built once per public seed, then cached)."""
        public_seed = seed if args.public_seed_per_run else 0
        if public_seed not in built:
            built[public_seed] = {
                warm_key(kind, masks): cached_warm_start(d, 0.0 if kind == "noinv" else 1.0, segment_modalities=masks,
                                                         public_seed=public_seed) for kind, masks in needed}
        return built[public_seed]

    def expected_sha(config: str, seed: int) -> str:
        c = CONFIGS[config]
        return warm_starts(seed)[warm_key(c["warm"], c.get("public_masks", "all"))][1] if c["warm"] else d.warm_start_sha256

    results: list[dict[str, Any]] = []
    if args.resume:
        results, stale = kept_runs(args.out, {(c, s): expected_sha(c, s) for c in configs for s in seeds})
        print(f"resume: {len(results)} runs kept, {stale} made from another warm start run again", file=sys.stderr)
    done = {(r["config"], r["seed"]) for r in results}
    with tempfile.TemporaryDirectory(prefix="fedpir-recipe-") as tmp:
        jobs = []
        for seed in seeds:
            todo = [c for c in configs if (c, seed) not in done]
            if todo:
                fed = synthetic_federation(replace(d, seed=seed, federation_dir=str(Path(tmp) / f"fed-{seed}")))
                base = replace(d, seed=seed, federation_dir=str(fed), run_dir=str(fed))
                jobs += [(c, base, warm_starts(seed), threads) for c in todo]
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(run_one, jobs):
                results.append(result)
                write(args, built, configs, results, argv)
    print(json.dumps(write(args, built, configs, results, argv), indent=1))
    return 0


def kept_runs(out: Path | None, expected: dict[tuple[str, int], str]) -> tuple[list[dict[str, Any]], int]:
    """The runs of an earlier ``out`` that this sweep asks for (``expected``: (config, seed) -> the
    SHA-256 of the warm start it starts from now), and how many of those were made from another
    warm start (or recorded none) and so must run again."""
    if out is None or not out.is_file():
        return [], 0
    asked = [r for r in json.loads(out.read_text())["runs"] if (r["config"], r["seed"]) in expected]
    kept = [r for r in asked if r.get("warm_start_sha256") == expected[r["config"], r["seed"]]]
    return kept, len(asked) - len(kept)


def write(args: argparse.Namespace, built: dict[int, dict[str, tuple[str, str]]], configs: list[str],
          results: list[dict[str, Any]], argv: list[str] | None) -> dict[str, Any]:
    """Summarise the results so far (mean and sd of the final Dice over seeds) and write --out."""
    summary = {}
    for c in configs:
        runs = [r for r in results if r["config"] == c]
        if not runs:
            continue
        summary[c] = {"seeds": len(runs), **CONFIGS[c]}
        for key in ("dice", "eval_dice", "seen", "unseen"):
            values = np.array([r[key] for r in runs if key in r], dtype=float)
            if values.size:
                summary[c] |= {f"{key}_mean": float(np.nanmean(values)),
                               f"{key}_sd": float(np.nanstd(values, ddof=1)) if values.size > 1 else 0.0}
    out = {"command": shlex.join(["python", "benchmarks/experiments/dp_recipe.py", *(sys.argv[1:] if argv is None else argv)]),
           "defaults": RunSettings().to_run_config(), "warm_start_recipe": asdict(RECIPE),
           "warm_starts": {str(seed): {key: sha for key, (_, sha) in ws.items()} for seed, ws in built.items()},
           "device": args.device, "public_seed_per_run": args.public_seed_per_run, "summary": summary, "runs": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=float) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(main())
