"""The fedpir ServerApp: builds the model and strategy from the run config, runs the stages.

The learning logic is elsewhere: the round loop in :mod:`fedpir.server.rounds`, aggregation in
:mod:`fedpir.strategies`, the model in :mod:`fedpir.models`.
"""

from __future__ import annotations

import json
import logging

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedpir.run_config import RunSettings
from fedpir.server.alignment import run_alignment
from fedpir.server.rounds import SecureStep, Stage, run_federation
from fedpir.server.secure_train import SecureRound, secure_train
from fedpir.server.tracking import tracker_for
from fedpir.strategies import make_strategy
from fedpir.training.model import build_model
from fedpir.wire.protocol import EPOCHS_KEY, STAGES

log = logging.getLogger("fedpir.server")


def stages(settings: RunSettings) -> list[Stage]:
    """Federated pretraining rounds, then federated fine-tuning rounds."""
    rounds = {"pretrain": settings.pretrain_rounds, "finetune": settings.finetune_rounds}
    return [Stage(name, rounds[name], {EPOCHS_KEY: settings.local_epochs}) for name in STAGES]


def strategy_for(settings: RunSettings, model) -> object:
    """The configured Flower strategy (shared-only, validating replies)."""
    kwargs = dict(min_train_nodes=settings.min_sites, min_evaluate_nodes=settings.min_sites,
                  min_available_nodes=settings.min_sites, transfer_dtype=settings.transfer_dtype)
    if settings.strategy == "modality":
        kwargs["modality_of_key"] = model.modality_of_key
    if settings.strategy == "fedprox":
        kwargs["proximal_mu"] = settings.proximal_mu
    elif settings.proximal_mu:
        raise ValueError(f"proximal-mu is for strategy fedprox, not {settings.strategy!r}")
    return make_strategy(settings.strategy, **kwargs)


def secure_step_for(settings: RunSettings) -> SecureStep | None:
    """The secure-aggregation train step of the run (None: plain aggregation)."""
    if not settings.secure_aggregation:
        return None

    def step(grid: Grid, strategy, server_round: int, arrays: ArrayRecord, config) -> SecureRound:
        return secure_train(grid, strategy, server_round, arrays, config, clipping_range=settings.secagg_clipping_range,
                            max_weight=settings.secagg_max_weight, min_sites=settings.min_sites,
                            timeout=settings.round_timeout)[0]

    return step


def serve(grid: Grid, settings: RunSettings) -> ArrayRecord:
    """Run the whole federation for ``settings`` (run folder resolved), export the final global
    model and, with ``align``, run the alignment stage on it (:mod:`fedpir.server.alignment`).
    The server reads no site data: it only sends weights and aggregates replies."""
    model = build_model(settings)
    initial = ArrayRecord({k: v for k, v in model.state_dict().items()
                           if k in set(model.federated_keys(settings.key_policy))})
    run_dir = settings.run_path
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_config.json").write_text(json.dumps(settings.to_run_config(), indent=1))
    strategy = strategy_for(settings, model)
    run_stages = stages(settings)
    final = run_federation(grid, strategy, initial, run_stages, run_dir,
                           timeout=settings.round_timeout, fingerprint=settings.fingerprint(),
                           secure_step=secure_step_for(settings), tracker=tracker_for(settings.tracking, run_dir))
    torch.save(final.to_torch_state_dict(), run_dir / "global_model.pt")
    log.info("final global model (%d tensors) written to %s", len(final), run_dir / "global_model.pt")
    if settings.align:
        run_alignment(grid, strategy, final, settings, sum(stage.rounds for stage in run_stages))
    return final


def make_server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp; ``settings`` fixes the run settings (else they come from Flower's run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_settings = settings or RunSettings.from_run_config(dict(context.run_config))
        serve(grid, run_settings.with_run_folder(context.run_id))

    return app


app = make_server_app()
