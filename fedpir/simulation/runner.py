"""Run fedpir and its baselines on one federation, with the same data, schedule and seeds.

The methods are named in :mod:`fedpir.simulation.methods`. Every method writes ``<out>/<method>/metrics.jsonl``
in the server's record format (see :class:`fedpir.server.rounds.MetricsLog`), so one report reads them all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset

from fedpir.client.site import Site, site_data, summary_metrics
from fedpir.models.groups import objective_for, trainable_groups
from fedpir.run_config import RunSettings
from fedpir.server.rounds import MetricsLog
from fedpir.server.server_app import stages
from fedpir.server.tracking import run_metrics_log
from fedpir.simulation.engine import run_flower
from fedpir.simulation.methods import FEDERATED, METHODS, NODP_RECIPE
from fedpir.training.model import build_model
from fedpir.training.trainer import LocalTrainer

log = logging.getLogger("fedpir.simulation")

def site_names(settings: RunSettings) -> list[str]:
    """The federation's site folders, in order."""
    return sorted(p.name for p in settings.federation_path.glob("site-*") if p.is_dir())


def run_federated(settings: RunSettings) -> None:
    """One Flower simulation of ``settings``: the real ServerApp, one SuperNode per site."""
    from fedpir.client.client_app import make_client_app
    from fedpir.server.server_app import make_server_app

    run_flower(make_server_app(settings), make_client_app(settings), len(site_names(settings)), settings.cpus_per_site)


def _schedule(settings: RunSettings, metrics_log: MetricsLog,
              train: Callable[[str], dict[str, dict[str, float]]],
              evaluate: Callable[[str], dict[str, dict[str, float]]]) -> None:
    """The federated schedule without a server: per round, train then evaluate, log per site."""
    rnd = 0
    for stage in stages(settings):
        for _ in range(stage.rounds):
            rnd += 1
            for kind, step in (("train", train), ("evaluate", evaluate)):
                for site, metrics in step(stage.name).items():
                    metrics_log.write(kind=kind, stage=stage.name, round=rnd, site=site, metrics=metrics)


def run_local(settings: RunSettings) -> None:
    """Local-only baseline: every site runs the same rounds on its own data, sharing nothing."""
    sites = [Site(settings, settings.federation_path / name, settings.run_path / "sites" / name, name)
             for name in site_names(settings)]
    epochs = settings.local_epochs
    _schedule(settings, run_metrics_log(settings),
              lambda stage: {s.name: s.train(stage, epochs) for s in sites},
              lambda stage: {s.name: s.evaluate(stage) for s in sites})


def run_centralized(settings: RunSettings) -> None:
    """Centralized reference: one model trained on the pooled training patients of all sites,
    evaluated on each site's held-out patients."""
    data = {name: site_data(settings, settings.federation_path / name, name) for name in site_names(settings)}
    trainer = LocalTrainer.for_run(settings, build_model(settings), ConcatDataset([d[0] for d in data.values()]),
                                   state_dir=settings.run_path / "pooled", seed=settings.seed)

    def train(stage: str) -> dict[str, dict[str, float]]:
        metrics = trainer.train_round(objective_for(stage, settings.finetune_task), settings.local_epochs,
                                      groups=trainable_groups(settings.trainable_for(stage)), progress=False)
        return {"pooled": metrics}

    def evaluate(stage: str) -> dict[str, dict[str, float]]:
        objective = objective_for(stage, settings.finetune_task)
        return {name: summary_metrics(trainer.evaluate(holdout, objective)) for name, (_, holdout, _) in data.items()}

    _schedule(settings, run_metrics_log(settings), train, evaluate)
    torch.save(trainer.model.state_dict(), settings.run_path / "pooled_model.pt")


def run_public_only(settings: RunSettings) -> None:
    """Public-only reference: the warm start as it is, evaluated at each site at the end of each stage
    without any private round (nothing trains, so one evaluation per stage is the whole curve)."""
    metrics_log = run_metrics_log(settings)
    sites = [Site(settings, settings.federation_path / name, settings.run_path / "sites" / name, name)
             for name in site_names(settings)]
    rnd = 0
    for stage in stages(settings):
        rnd += stage.rounds
        for site in sites if stage.rounds else ():
            metrics_log.write(kind="evaluate", stage=stage.name, round=rnd, site=site.name, metrics=site.evaluate(stage.name))


def method_settings(method: str, settings: RunSettings, run_dir: Path,
                    noinv_warm_start: tuple[str, str] = ("", "")) -> RunSettings:
    """The settings a method runs with: its key policy, invariance weight and warm start."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    changes: dict = {"run_dir": str(run_dir), "federation_dir": str(settings.federation_path),
                     "key_policy": FEDERATED.get(method, "local")}
    if method == "fedpir-noinv":
        changes.update(invariance_weight=0.0, warm_start=noinv_warm_start[0], warm_start_sha256=noinv_warm_start[1])
    elif method == "fedpir-dn":  # every site contributes, so each adds sigma / sqrt(sites)
        changes.update(secure_aggregation=True, distributed_noise=True, min_sites=len(site_names(settings)))
    elif method == "scratch":
        changes.update(warm_start="", warm_start_sha256="")
    elif method.endswith("-nodp"):  # what the sites' data can teach at best: no DP, every group trains
        changes.update(NODP_RECIPE)
    return replace(settings, **changes)


def run_method(method: str, settings: RunSettings, out_dir: Path, noinv_warm_start: tuple[str, str] = ("", "")) -> Path:
    """Run one method into ``out_dir/<method>`` (which must not hold an earlier run) and return it."""
    run_dir = Path(out_dir) / method
    run_settings = method_settings(method, settings, run_dir, noinv_warm_start)
    if (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"{run_dir} already holds a run; choose another --out or remove it")
    start = time.perf_counter()
    runners = {"local": run_local, "local-nodp": run_local, "centralized": run_centralized,
               "pooled-nodp": run_centralized, "public-only": run_public_only}
    runners.get(method, run_federated)(run_settings)
    log.info("%s finished in %.0f s", method, time.perf_counter() - start)
    return run_dir
