"""Flower strategies that aggregate only the model's shared keys and drop bad replies.

The server's global ArrayRecord holds exactly the shared state-dict keys declared on the model,
and every client replies with exactly those keys. :class:`SharedOnlyMixin` validates each reply
against the current global arrays (see :mod:`fedpir.strategies.validation`), logs and records
the rejections, and hands only the accepted replies to the Flower parent strategy, so Flower's
own aggregation (weighted mean, FedProx, FedAdam/FedYogi, trimmed mean, median) runs unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
)

from fedpir.strategies.validation import (
    Rejection,
    screen_evaluate_replies,
    screen_train_replies,
    site_metrics,
)
from fedpir.wire.protocol import check_transfer_dtype
from fedpir.wire.transfer import decode_reply

log = logging.getLogger("fedpir.strategies")


def _cast_like(arrays: ArrayRecord, global_arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Cast aggregated arrays back to the global dtypes.

    Flower's aggregation can widen dtypes (FedAdam/FedYogi add float64 scalars; averaging
    integer buffers yields floats); the global model must keep its dtypes so that the next
    round's replies still match them. Integer arrays are rounded, not truncated.
    """
    out = ArrayRecord()
    for key, array in arrays.items():
        value, dtype = array.numpy(), global_arrays[key].dtype
        if np.issubdtype(dtype, np.integer) and not np.issubdtype(value.dtype, np.integer):
            value = np.rint(value)
        out[key] = Array(np.ascontiguousarray(value.astype(dtype, copy=False)))
    return out


class SharedOnlyMixin:
    """Validate replies against the global shared arrays before Flower aggregates them.

    Put it first in the bases: ``class SharedFedAvg(SharedOnlyMixin, FedAvg)``.

    Parameters (keyword-only, the rest go to the Flower parent):
        max_update_norm: reject a reply whose ``||update - global||_2`` exceeds this (absolute).
        norm_ratio: reject a reply whose update norm exceeds ``norm_ratio`` x the median update
            norm of the round's valid replies (applied with >= 3 such replies).
        transfer_dtype: how sites encode their replies (run config ``transfer-dtype``,
            :mod:`fedpir.wire.transfer`); replies are decoded to the global dtypes before screening.

    Attributes, refreshed every round:
        global_arrays: the global shared arrays sent in the last ``configure_train``.
        rejections: the :class:`Rejection` s of the latest round (train and evaluate).
        last_train_replies / last_evaluate_replies: ``(node_id, metrics)`` of every reply with
            content in the latest aggregation (rejected ones included), for per-site logging.

    If fewer than ``min_train_nodes`` replies are accepted, ``aggregate_train`` returns
    ``(None, None)``; Flower's ``Strategy.start`` then keeps the previous global model, fedpir's
    server loop stops the run at its last checkpoint (:mod:`fedpir.server.rounds`).
    """

    # Provided by the Flower parent strategy.
    weighted_by_key: str
    arrayrecord_key: str
    min_train_nodes: int

    def __init__(self, *, max_update_norm: float = 1e3, norm_ratio: float = 10.0, transfer_dtype: str = "float32",
                 **kwargs) -> None:
        if not max_update_norm > 0:
            raise ValueError(f"max_update_norm must be > 0, got {max_update_norm}")
        if not norm_ratio > 1:
            raise ValueError(f"norm_ratio must be > 1, got {norm_ratio}")
        super().__init__(**kwargs)
        self.max_update_norm = max_update_norm
        self.norm_ratio = norm_ratio
        self.transfer_dtype = check_transfer_dtype(transfer_dtype)
        self.global_arrays: dict[str, np.ndarray] | None = None
        self.rejections: list[Rejection] = []
        self.last_train_replies: list[tuple[int, dict[str, float | list]]] = []
        self.last_evaluate_replies: list[tuple[int, dict[str, float | list]]] = []
        self._rejections_round: int | None = None

    def _record(self, server_round: int, rejections: list[Rejection]) -> None:
        """Keep the rejections of the latest round only."""
        if self._rejections_round != server_round:
            self.rejections, self._rejections_round = [], server_round
        self.rejections.extend(rejections)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global shared arrays, then let the Flower parent build the messages."""
        self.global_arrays = {key: array.numpy() for key, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop invalid replies (logged, recorded in ``rejections``), aggregate the rest."""
        if self.global_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train: no global arrays")
        replies = list(replies)
        self._decode(replies)
        self.last_train_replies = site_metrics(replies)
        accepted, rejections = screen_train_replies(
            server_round,
            replies,
            self.global_arrays,
            weighted_by_key=self.weighted_by_key,
            arrayrecord_key=self.arrayrecord_key,
            max_update_norm=self.max_update_norm,
            norm_ratio=self.norm_ratio,
        )
        self._record(server_round, rejections)
        if not accepted or len(accepted) < self.min_train_nodes:
            log.warning(
                "round %d: %d of %d replies accepted, fewer than min_train_nodes=%d; "
                "keeping the previous global model", server_round, len(accepted), len(replies),
                self.min_train_nodes)
            return None, None
        arrays, metrics = self._aggregate_accepted(server_round, accepted)
        return (None if arrays is None else _cast_like(arrays, self.global_arrays)), metrics

    def _decode(self, replies: list[Message]) -> None:
        """Replace each reply's encoded arrays by the weights they stand for (fedpir.wire.transfer); a
        reply that does not decode keeps its arrays, and the screening says what is wrong with them."""
        assert self.global_arrays is not None
        for msg in replies:
            if msg.has_error() or self.arrayrecord_key not in msg.content.array_records:
                continue
            try:
                msg.content[self.arrayrecord_key] = decode_reply(
                    msg.content.array_records[self.arrayrecord_key], self.global_arrays, self.transfer_dtype)
            except (ValueError, KeyError):
                continue

    def _aggregate_accepted(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate screened replies; by default with the Flower parent's ``aggregate_train``."""
        return super().aggregate_train(server_round, accepted)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Drop unusable evaluate replies, then Flower's weighted metric aggregation."""
        replies = list(replies)
        self.last_evaluate_replies = site_metrics(replies)
        accepted, rejections = screen_evaluate_replies(
            server_round, replies, weighted_by_key=self.weighted_by_key)
        self._record(server_round, rejections)
        return super().aggregate_evaluate(server_round, accepted)


class SharedFedAvg(SharedOnlyMixin, FedAvg):
    """Weighted FedAvg (weights: ``num-examples``, the site's patient count) of the shared keys."""


class SharedFedProx(SharedOnlyMixin, FedProx):
    """FedProx on the shared keys: FedAvg plus ``proximal-mu`` sent to clients in the config."""


class SharedFedAdam(SharedOnlyMixin, FedAdam):
    """FedAdam server optimizer on the shared keys."""


class SharedFedYogi(SharedOnlyMixin, FedYogi):
    """FedYogi server optimizer on the shared keys."""


class SharedFedTrimmedAvg(SharedOnlyMixin, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (unweighted, cut ``beta`` per tail) of the shared keys."""


class SharedFedMedian(SharedOnlyMixin, FedMedian):
    """Coordinate-wise median (unweighted) of the shared keys."""
