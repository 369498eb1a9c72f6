"""The records of the federated alignment stage, for both sides (like ``fedpir.wire.protocol``).

It sits outside ``fedpir.strategies`` because strategies do not import ``fedpir.models``. The stage
itself: :mod:`fedpir.client.alignment` (site) and :mod:`fedpir.server.alignment` (server).

Site side: :func:`fedpir.alignment.anchors.site_alignment_statistics` computes the statistics of its
anchors; :func:`statistics_record` packs them into an ``ArrayRecord`` for the reply (refusing
fewer than ``min_anchors`` anchors: with one anchor, X^T Y is that patient's x y^T). Server side:
:func:`aggregate_statistics` screens the replies (names, shapes, finite values) and adds them; then
:func:`fedpir.alignment.maps.fit_alignment` solves T, which equals the fit on the pooled anchors,
and :func:`map_records` carries T back to the sites (:func:`map_from_records`).
Only sums cross the wire; they are not differentially private.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedpir.alignment.maps import AlignmentMap, AlignmentStatistics

#: The arrays of a fitted map T (:class:`AlignmentMap`), sent as ``map/<name>``.
MAP_ARRAYS: tuple[str, ...] = ("x_mean", "x_std", "y_mean", "y_std", "matrix")

#: Fewest anchors a site sends statistics of.
MIN_SITE_ANCHORS = 5


def statistics_record(stats: AlignmentStatistics, min_anchors: int = MIN_SITE_ANCHORS) -> ArrayRecord:
    """The site's reply: its anchor statistics as an ``ArrayRecord`` (``alignment/<name>`` arrays)."""
    if stats.n < min_anchors:
        raise ValueError(f"the site has {stats.n} anchors; it sends alignment statistics of at least {min_anchors}")
    return ArrayRecord({f"alignment/{k}": Array(np.ascontiguousarray(v)) for k, v in stats.to_arrays().items()})


def statistics_from_record(record: ArrayRecord) -> AlignmentStatistics:
    """Inverse of :func:`statistics_record`; ValueError for missing, misshapen or non-finite arrays."""
    arrays = {k.removeprefix("alignment/"): v.numpy() for k, v in record.items() if k.startswith("alignment/")}
    bad = [k for k, v in arrays.items() if not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"alignment statistics with NaN/Inf in {', '.join(sorted(bad))}")
    return AlignmentStatistics.from_arrays(arrays)


def aggregate_statistics(replies: Iterable[ArrayRecord], min_sites: int = 1) -> tuple[AlignmentStatistics, list[str]]:
    """Sum of the valid replies' statistics, and one reason per rejected reply (unreadable, or of
    other dimensions than the first valid one). Raises ValueError with fewer than ``min_sites``
    valid replies."""
    total: AlignmentStatistics | None = None
    rejected: list[str] = []
    valid = 0
    for i, record in enumerate(replies):
        try:
            stats = statistics_from_record(record)
            total = stats if total is None else total + stats
            valid += 1
        except ValueError as err:
            rejected.append(f"reply {i}: {err}")
    if total is None or valid < min_sites:
        raise ValueError(f"{valid} valid alignment replies, need {min_sites} (rejected: {rejected or 'none'})")
    return total, rejected


def record_digest(record: ArrayRecord) -> tuple[int, str]:
    """(bytes, SHA-256 hex) of an ArrayRecord's arrays, keys in sorted order (name, then raw bytes)."""
    digest, size = hashlib.sha256(), 0
    for key in sorted(record.keys()):
        data = np.ascontiguousarray(record[key].numpy()).tobytes()
        digest.update(key.encode())
        digest.update(data)
        size += len(data)
    return size, digest.hexdigest()


def map_records(amap: AlignmentMap) -> tuple[ArrayRecord, ConfigRecord]:
    """T as the server broadcasts it: its arrays (``map/<name>``) and its method, scale and anchor count."""
    arrays = ArrayRecord({f"map/{k}": Array(np.ascontiguousarray(getattr(amap, k))) for k in MAP_ARRAYS})
    return arrays, ConfigRecord({"method": amap.method, "scale": float(amap.scale), "n-anchors": int(amap.n_anchors)})


def map_from_records(arrays: ArrayRecord, config: ConfigRecord) -> AlignmentMap:
    """Inverse of :func:`map_records`; ValueError for missing, misshapen or non-finite arrays."""
    values = {k: arrays[f"map/{k}"].numpy().astype(np.float64) for k in MAP_ARRAYS if f"map/{k}" in arrays}
    missing = [k for k in MAP_ARRAYS if k not in values]
    if missing:
        raise ValueError(f"the alignment map lacks {', '.join(missing)}")
    if not all(np.isfinite(v).all() for v in values.values()):
        raise ValueError("the alignment map holds NaN/Inf")
    dx, dy = values["matrix"].shape
    if {values["x_mean"].shape, values["x_std"].shape} != {(dx,)} or {values["y_mean"].shape, values["y_std"].shape} != {(dy,)}:
        raise ValueError(f"the alignment map's moments do not fit its {dx}x{dy} matrix")
    return AlignmentMap(str(config["method"]), values["x_mean"], values["x_std"], values["y_mean"], values["y_std"],
                        values["matrix"], float(config["scale"]), int(config["n-anchors"]))
