"""Build a fedpir strategy by name (the names used in run configs and on the command line)."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy

from fedpir.strategies.modality import ModalityAwareFedAvg
from fedpir.strategies.shared import (
    SharedFedAdam,
    SharedFedAvg,
    SharedFedMedian,
    SharedFedProx,
    SharedFedTrimmedAvg,
    SharedFedYogi,
)

#: The class of each strategy name of the run settings (fedpir.run_config.STRATEGIES; a test keeps them equal).
STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    "fedavg": SharedFedAvg,
    "fedprox": SharedFedProx,
    "fedadam": SharedFedAdam,
    "fedyogi": SharedFedYogi,
    "trimmed": SharedFedTrimmedAvg,
    "median": SharedFedMedian,
    "modality": ModalityAwareFedAvg,
}


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """The strategy called ``name`` (see :data:`STRATEGY_CLASSES`), built with ``kwargs``.

    ``kwargs`` go to the class: e.g. ``proximal_mu`` for "fedprox", ``eta`` for "fedadam",
    ``beta`` for "trimmed", ``modality_of_key`` (required) for "modality", and
    ``max_update_norm`` / ``norm_ratio`` / Flower's ``min_train_nodes`` etc. for all.
    """
    try:
        cls = STRATEGY_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; valid names: {', '.join(STRATEGY_CLASSES)}") from None
    return cls(**kwargs)
