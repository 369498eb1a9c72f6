"""A federated alignment stage on Flower records (a sketch, not yet wired into the ServerApp).

Site and server both use this module (like ``fedpir.protocol``); it sits outside
``fedpir.strategies`` because strategies do not import ``fedpir.models``.

Site side: :func:`fedpir.models.anchors.site_alignment_statistics` computes the statistics of its
anchors; :func:`statistics_record` packs them into an ``ArrayRecord`` for the reply (refusing
fewer than ``min_anchors`` anchors: with one anchor, X^T Y is that patient's x y^T). Server side:
:func:`aggregate_statistics` screens the replies (names, shapes, finite values) and adds them; then
:func:`fedpir.models.alignment.fit_alignment` solves T, which equals the fit on the pooled anchors.
Only sums cross the wire; they are not differentially private.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord

from fedpir.models.alignment import AlignmentStatistics

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
