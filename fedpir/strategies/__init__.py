"""Shared-only aggregation strategies, robust and modality-aware aggregation, baselines."""

from fedpir.strategies.factory import STRATEGY_CLASSES, make_strategy
from fedpir.strategies.modality import ModalityAwareFedAvg, aggregate_by_modality
from fedpir.strategies.shared import (
    SharedFedAdam,
    SharedFedAvg,
    SharedFedMedian,
    SharedFedProx,
    SharedFedTrimmedAvg,
    SharedFedYogi,
    SharedOnlyMixin,
)
from fedpir.strategies.validation import Rejection

__all__ = [
    "STRATEGY_CLASSES",
    "ModalityAwareFedAvg",
    "Rejection",
    "SharedFedAdam",
    "SharedFedAvg",
    "SharedFedMedian",
    "SharedFedProx",
    "SharedFedTrimmedAvg",
    "SharedFedYogi",
    "SharedOnlyMixin",
    "aggregate_by_modality",
    "make_strategy",
]
