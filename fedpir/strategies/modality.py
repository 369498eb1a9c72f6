"""Modality-aware FedAvg: a modality-specific parameter is averaged only over the sites that
hold that modality.

In the heterogeneous setting a site without, say, FLAIR still sends the FLAIR output head of the
decoder (it is a shared key), but that head never saw FLAIR data there; averaging it in would pull
the head back towards its initial value. Each train reply therefore reports, per vocabulary
modality, ``has-modality.<name>`` = 1.0/0.0 in its MetricRecord (see :func:`fedpir.wire.protocol.has_modality_key`).
A key is modality-specific when ``modality_of_key(key)`` (provided by the model) returns a modality
name; its weighted mean runs over the replies with ``has-modality.<name>`` = 1 (a reply without
that entry counts as not holding it), and if no accepted reply holds the modality the global value
is kept. Keys for which ``modality_of_key`` returns None get the ordinary weighted mean over all
accepted replies, i.e. exactly FedAvg. Flower has no per-key participation mask, hence this code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedpir.strategies.shared import SharedOnlyMixin
from fedpir.wire.protocol import has_modality_key

log = logging.getLogger("fedpir.strategies")

def _metrics(record: RecordDict) -> MetricRecord:
    return next(iter(record.metric_records.values()))


def aggregate_by_modality(
    records: Sequence[RecordDict],
    global_arrays: Mapping[str, np.ndarray],
    modality_of_key: Callable[[str], str | None],
    *,
    weighted_by_key: str,
    arrayrecord_key: str,
) -> ArrayRecord:
    """Per-key weighted mean over the records that hold the key's modality (see module doc).

    ``records`` must already be screened: each holds ``arrayrecord_key`` with exactly the keys of
    ``global_arrays`` and one MetricRecord with a positive ``weighted_by_key``.
    """
    weights = np.array([float(_metrics(r)[weighted_by_key]) for r in records])
    out = ArrayRecord()
    for key, global_value in global_arrays.items():
        modality = modality_of_key(key)
        if modality is None:
            holders = np.ones(len(records), dtype=bool)
        else:
            flag = has_modality_key(modality)
            if not any(flag in _metrics(r) for r in records):
                log.warning("key %r: no reply reports %r (modality vocabulary mismatch?)", key, flag)
            holders = np.array([float(_metrics(r).get(flag, 0.0)) >= 0.5 for r in records])
        if not holders.any():
            log.info("key %r: no site in the round holds modality %r; keeping the global value",
                     key, modality)
            out[key] = Array(np.ascontiguousarray(global_value))
            continue
        w = weights[holders] / weights[holders].sum()
        values = [r[arrayrecord_key][key].numpy() for r, held in zip(records, holders) if held]
        mean = sum(wi * v.astype(np.float64) for wi, v in zip(w, values))
        out[key] = Array(np.ascontiguousarray(np.asarray(mean)))
    return out


class ModalityAwareFedAvg(SharedOnlyMixin, FedAvg):
    """Shared-only weighted FedAvg with modality-aware averaging of modality-specific keys.

    ``modality_of_key`` maps a shared state-dict key to its modality name, or None for keys that
    all modalities share; the model provides it. Other keyword arguments as for
    :class:`~fedpir.strategies.shared.SharedOnlyMixin` and Flower's ``FedAvg``.
    """

    def __init__(self, *, modality_of_key: Callable[[str], str | None], **kwargs) -> None:
        if not callable(modality_of_key):
            raise TypeError(f"modality_of_key must be callable, got {type(modality_of_key).__name__}")
        super().__init__(**kwargs)
        self.modality_of_key = modality_of_key

    def _aggregate_accepted(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Modality-aware mean of the arrays; Flower's weighted mean of the metrics."""
        valid, _ = self._check_and_log_replies(accepted, is_train=True)
        records = [message.content for message in valid]
        assert self.global_arrays is not None  # set by configure_train; checked by the mixin
        arrays = aggregate_by_modality(
            records,
            self.global_arrays,
            self.modality_of_key,
            weighted_by_key=self.weighted_by_key,
            arrayrecord_key=self.arrayrecord_key,
        )
        return arrays, self.train_metrics_aggr_fn(records, self.weighted_by_key)
