"""The fedpir ServerApp: builds the model and strategy from the run config, runs the stages.

The learning logic is elsewhere: the round loop in :mod:`fedpir.server.rounds`, aggregation in
:mod:`fedpir.strategies`, the model in :mod:`fedpir.models`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedpir.client.site import build_model
from fedpir.run_config import RunSettings
from fedpir.server.rounds import Stage, run_federation
from fedpir.strategies import make_strategy

log = logging.getLogger("fedpir.server")


def ensure_federation(settings: RunSettings) -> Path:
    """The run's federation folder. A run that names none gets the synthetic federation of its
    settings, generated under the run folder on first use; a named one must exist."""
    path = settings.federation_path
    if settings.federation_dir:
        if not path.is_dir():
            raise FileNotFoundError(f"federation-dir {path} does not exist")
    elif not (path / "federation.json").is_file():
        from fedpir.simulation.federation import generate_for_run

        generate_for_run(settings, path)
    return path


def stages(settings: RunSettings) -> list[Stage]:
    """Federated pretraining rounds, then federated fine-tuning rounds."""
    common = {"local-epochs": settings.local_epochs}
    return [Stage("pretrain", settings.pretrain_rounds, common),
            Stage("finetune", settings.finetune_rounds, common)]


def strategy_for(settings: RunSettings, model) -> object:
    """The configured Flower strategy (shared-only, validating replies)."""
    kwargs = dict(min_train_nodes=settings.min_sites, min_evaluate_nodes=settings.min_sites,
                  min_available_nodes=settings.min_sites)
    if settings.strategy == "modality":
        kwargs["modality_of_key"] = model.modality_of_key
    return make_strategy(settings.strategy, **kwargs)


def serve(grid: Grid, settings: RunSettings) -> ArrayRecord:
    """Run the whole federation for ``settings`` and export the final global model."""
    ensure_federation(settings)
    model = build_model(settings)
    initial = ArrayRecord({k: v for k, v in model.state_dict().items()
                           if k in set(model.federated_keys(settings.key_policy))})
    run_dir = settings.run_path
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_config.json").write_text(json.dumps(settings.to_run_config(), indent=1))
    final = run_federation(grid, strategy_for(settings, model), initial, stages(settings), run_dir,
                           timeout=settings.round_timeout)
    torch.save(final.to_torch_state_dict(), run_dir / "global_model.pt")
    log.info("final global model (%d tensors) written to %s", len(final), run_dir / "global_model.pt")
    return final


def make_server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp; ``settings`` fixes the run settings (else they come from Flower's run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, settings or RunSettings.from_run_config(dict(context.run_config)))

    return app


app = make_server_app()
