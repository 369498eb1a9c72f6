"""Screening of client replies before aggregation: reject bad updates with a reason.

A train reply is accepted only if it carries no error, exactly one ArrayRecord (under the
strategy's ``arrayrecord_key``) and exactly one MetricRecord, a positive finite weight
(``num-examples``), finite metrics, and arrays that match the current global arrays exactly:
the same keys (a missing key is an incomplete model; an extra key may be a site-local layer or a
per-patient tensor leaking), the same shape and dtype, and only finite values. Its update norm
``||update - global||_2`` (over all shared keys together) must not exceed ``max_update_norm``
(absolute bound) nor ``norm_ratio`` times the median update norm of the round's otherwise-valid
replies (relative bound, applied only with at least ``MIN_REPLIES_FOR_RATIO`` such replies and a
positive median, since a median of one or two replies is not a robust reference). Replies whose
metric keys differ from the round's most common key set are rejected too, because Flower's
aggregation requires identical keys and would otherwise fail the whole round.

Flower's own checks (``validate_message_reply_consistency``) raise on the first inconsistency and
abort the round; these checks drop only the offending replies, so one faulty hospital cannot stop
the federation. ConfigRecords in a reply (e.g. a site name) are ignored: they are never aggregated.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TypedDict

import numpy as np
from flwr.app import ArrayRecord, Message

log = logging.getLogger("fedpir.strategies")

#: The relative norm bound needs at least this many otherwise-valid replies in the round.
MIN_REPLIES_FOR_RATIO = 3


class Rejection(TypedDict):
    """One rejected reply: a plain dict, so the server can write it to its JSON metrics log."""

    server_round: int
    message_type: str  # "train" or "evaluate"
    node_id: int
    reason: str


def _names(keys: Iterable[str], limit: int = 5) -> str:
    """A short, sorted listing of keys for a rejection reason."""
    ordered = sorted(keys)
    shown = ", ".join(repr(k) for k in ordered[:limit])
    return shown + (f" and {len(ordered) - limit} more" if len(ordered) > limit else "")


def metrics_problem(message: Message, weighted_by_key: str, check_values: bool) -> str | None:
    """Why a reply's MetricRecord cannot be used (None if it can).

    Requires exactly one MetricRecord whose ``weighted_by_key`` is a finite number > 0; with
    ``check_values`` every metric value (scalars and list entries) must also be finite.
    """
    if message.has_error():
        return f"client error (code {message.error.code}): {message.error.reason}"
    records = message.content.metric_records
    if len(records) != 1:
        return f"expected exactly one MetricRecord, found {len(records)}: {_names(records.keys())}"
    metrics = next(iter(records.values()))
    weight = metrics.get(weighted_by_key)
    if weight is None:
        return f"metric {weighted_by_key!r} (the aggregation weight) is missing"
    if isinstance(weight, list) or not math.isfinite(weight) or weight <= 0:
        return f"metric {weighted_by_key!r} must be a finite number > 0, got {weight!r}"
    if check_values:
        bad = [k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v, dtype=float)))]
        if bad:
            return f"non-finite (NaN/Inf) metric values: {_names(bad)}"
    return None


def arrays_problem(
    message: Message, arrayrecord_key: str, global_arrays: Mapping[str, np.ndarray]
) -> str | None:
    """Why a reply's ArrayRecord does not match the global shared arrays (None if it does)."""
    records = message.content.array_records
    if set(records.keys()) != {arrayrecord_key}:
        return f"expected exactly one ArrayRecord {arrayrecord_key!r}, found: {_names(records.keys())}"
    arrays: ArrayRecord = records[arrayrecord_key]
    keys, expected = set(arrays.keys()), set(global_arrays.keys())
    if extra := keys - expected:
        return f"unexpected keys (not shared parameters; possible leak of local state): {_names(extra)}"
    if missing := expected - keys:
        return f"missing shared keys: {_names(missing)}"
    for key, array in arrays.items():
        ref = global_arrays[key]
        if tuple(array.shape) != ref.shape:
            return f"key {key!r}: shape {tuple(array.shape)} != global shape {ref.shape}"
        if np.dtype(array.dtype) != ref.dtype:
            return f"key {key!r}: dtype {array.dtype} != global dtype {ref.dtype}"
    for key, array in arrays.items():
        value = array.numpy()
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            count = int(value.size - np.count_nonzero(np.isfinite(value)))
            return f"key {key!r}: {count} non-finite (NaN/Inf) values"
    return None


def update_norm(arrays: ArrayRecord, global_arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``arrays - global_arrays`` over all keys together (computed in float64)."""
    total = 0.0
    for key, array in arrays.items():
        delta = array.numpy().astype(np.float64) - global_arrays[key]
        total += float(np.dot(delta.ravel(), delta.ravel()))
    return math.sqrt(total)


def _majority_metric_keys(
    accepted: list[Message], server_round: int, message_type: str
) -> tuple[list[Message], list[Rejection]]:
    """Keep replies whose metric keys equal the most common key set (ties: the first seen)."""
    key_sets = [frozenset(next(iter(m.content.metric_records.values())).keys()) for m in accepted]
    if not key_sets:
        return [], []
    majority = Counter(key_sets).most_common(1)[0][0]
    kept, rejected = [], []
    for message, keys in zip(accepted, key_sets):
        if keys == majority:
            kept.append(message)
            continue
        parts = []
        if missing := majority - keys:
            parts.append(f"missing {_names(missing)}")
        if extra := keys - majority:
            parts.append(f"extra {_names(extra)}")
        reason = "metric keys differ from the round's majority: " + "; ".join(parts)
        rejected.append(_reject(server_round, message_type, message, reason))
    return kept, rejected


def _reject(server_round: int, message_type: str, message: Message, reason: str) -> Rejection:
    """Build one rejection and log it on the ``fedpir.strategies`` logger."""
    node_id = int(message.metadata.src_node_id)
    log.warning("round %d %s: rejected reply from node %d: %s", server_round, message_type, node_id, reason)
    return Rejection(server_round=server_round, message_type=message_type, node_id=node_id, reason=reason)


def screen_train_replies(
    server_round: int,
    replies: Sequence[Message],
    global_arrays: Mapping[str, np.ndarray],
    *,
    weighted_by_key: str,
    arrayrecord_key: str,
    max_update_norm: float,
    norm_ratio: float,
) -> tuple[list[Message], list[Rejection]]:
    """Split train replies into accepted ones and rejections (see the module docstring)."""
    rejections: list[Rejection] = []
    consistent: list[Message] = []
    for message in replies:
        reason = metrics_problem(message, weighted_by_key, check_values=True)
        reason = reason or arrays_problem(message, arrayrecord_key, global_arrays)
        if reason is None:
            consistent.append(message)
        else:
            rejections.append(_reject(server_round, "train", message, reason))
    consistent, key_rejections = _majority_metric_keys(consistent, server_round, "train")
    rejections += key_rejections

    norms = [update_norm(m.content[arrayrecord_key], global_arrays) for m in consistent]
    ratio_bound = math.inf
    if len(norms) >= MIN_REPLIES_FOR_RATIO and (median := float(np.median(norms))) > 0:
        ratio_bound = norm_ratio * median
    accepted: list[Message] = []
    for message, norm in zip(consistent, norms):
        if norm > max_update_norm:
            reason = f"update norm {norm:.4g} exceeds max_update_norm {max_update_norm:.4g}"
        elif norm > ratio_bound:
            reason = (f"update norm {norm:.4g} exceeds norm_ratio {norm_ratio:g} x the round's "
                      f"median update norm {median:.4g}")
        else:
            accepted.append(message)
            continue
        rejections.append(_reject(server_round, "train", message, reason))
    return accepted, rejections


def screen_evaluate_replies(
    server_round: int, replies: Sequence[Message], *, weighted_by_key: str
) -> tuple[list[Message], list[Rejection]]:
    """Split evaluate replies into accepted ones and rejections.

    Only what Flower's metric aggregation needs is checked (no error, one MetricRecord, a valid
    weight, the majority key set); non-finite evaluation metrics are kept, as they are results.
    """
    rejections: list[Rejection] = []
    accepted: list[Message] = []
    for message in replies:
        reason = metrics_problem(message, weighted_by_key, check_values=False)
        if reason is None:
            accepted.append(message)
        else:
            rejections.append(_reject(server_round, "evaluate", message, reason))
    accepted, key_rejections = _majority_metric_keys(accepted, server_round, "evaluate")
    return accepted, rejections + key_rejections


def site_metrics(replies: Sequence[Message]) -> list[tuple[int, dict[str, float | list]]]:
    """(node id, metrics) of every reply that carries content, its MetricRecords merged."""
    out = []
    for message in replies:
        if message.has_error():
            continue
        merged: dict[str, float | list] = {}
        for record in message.content.metric_records.values():
            merged.update(record)
        out.append((int(message.metadata.src_node_id), merged))
    return out
