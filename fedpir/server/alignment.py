"""The server's side of the alignment stage (run config ``align``; docs/alignment.md).

After the last round, with the final global shared weights:

1. every site is asked for the sufficient statistics of its anchors
   (:data:`fedpir.wire.protocol.ALIGN_STATISTICS`); a site whose policy forbids them refuses;
2. the server keeps the replies of the text encoder most sites used, sums them
   (:func:`fedpir.alignment.records.aggregate_statistics`, at least ``min-sites``) and solves T in
   closed form (``align-method``): the fit on all contributing sites' anchors pooled;
3. T is written to ``alignment.json`` in the run folder and broadcast
   (:data:`fedpir.wire.protocol.ALIGN_ZEROSHOT`); each site replies the zero-shot accuracy and AUROC of
   its held-out patients, which the strategy aggregates like evaluation metrics.

Per-site replies, refusals and the aggregate go to ``metrics.jsonl`` (kinds ``align-statistics``,
``align-zeroshot``, ``align-zeroshot-aggregate``, and ``...-error``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedpir.alignment.maps import AlignmentMap, fit_alignment
from fedpir.alignment.records import aggregate_statistics, map_records
from fedpir.privacy.at_rest import write_private
from fedpir.run_config import RunSettings
from fedpir.server.rounds import MetricsLog, exchange, log_replies, site_name
from fedpir.wire.protocol import ALIGN_STAGE, ALIGN_STATISTICS, ALIGN_ZEROSHOT, ALIGNMENT_RECORD, MAP_RECORD, STAGE_KEY

log = logging.getLogger("fedpir.server")

ALIGNMENT_FILE = "alignment.json"


def _request(arrays: ArrayRecord, nodes: list[int], message_type: str, **records: ArrayRecord | ConfigRecord) -> list[Message]:
    content = {"arrays": arrays, "config": ConfigRecord({STAGE_KEY: ALIGN_STAGE}), **records}
    return [Message(RecordDict(content), dst_node_id=node, message_type=message_type) for node in nodes]


def _same_encoder(replies: list[Message]) -> tuple[list[Message], str, list[str]]:
    """The replies of the text encoder and pooling most replies name, that name, and the others' reasons."""
    described = {id(m): dict(m.content.config_records.get(ALIGNMENT_RECORD, {})) for m in replies}
    names = Counter((d.get("text-encoder", "?"), d.get("pooling", "?")) for d in described.values())
    if not names:
        return [], "", []
    (encoder, pooling), _ = names.most_common(1)[0]
    keep, rejected = [], []
    for m in replies:
        named = (described[id(m)].get("text-encoder"), described[id(m)].get("pooling"))
        if named == (encoder, pooling):
            keep.append(m)
        else:
            rejected.append(f"site {site_name(m)}: text encoder {named[0]!r}, pooling {named[1]!r}, "
                            f"not {encoder!r}, {pooling!r}")
    return keep, f"{encoder} ({pooling} pooling)", rejected


def _write(path: Path, document: dict[str, Any]) -> None:
    write_private(path, (json.dumps(document, indent=1) + "\n").encode())


def run_alignment(grid: Grid, strategy: Strategy, arrays: ArrayRecord, settings: RunSettings, rnd: int) -> AlignmentMap:
    """The alignment stage with the final global ``arrays`` (after global round ``rnd``): returns T,
    written with the zero-shot results to ``alignment.json`` in the run folder. ValueError (and a
    record in ``metrics.jsonl``) when fewer than ``min-sites`` sites send usable statistics."""
    run_dir = settings.run_path
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    _, nodes = sample_nodes(grid, settings.min_sites, 0)
    replies, sent_to = exchange(grid, _request(arrays, nodes, ALIGN_STATISTICS), settings.round_timeout)
    log_replies(metrics_log, "align-statistics", ALIGN_STAGE, rnd, replies, sent_to)
    usable, encoder, rejected = _same_encoder([m for m in replies if not m.has_error() and "arrays" in m.content])
    try:
        stats, unreadable = aggregate_statistics([m.content["arrays"] for m in usable], min_sites=settings.min_sites)
    except ValueError as err:
        metrics_log.write(kind="align-failed", stage=ALIGN_STAGE, round=rnd, error=str(err), rejected=rejected)
        raise ValueError(f"alignment stage: {err}; see metrics.jsonl (align-statistics-error) for the sites' "
                         "replies; a site sends statistics only if its privacy-policy sets alignment-statistics") from err
    amap = fit_alignment(stats, settings.align_method)
    document: dict[str, Any] = {
        "method": settings.align_method, "text_encoder": encoder, "anchors": stats.n,
        "sites": sorted(site_name(m) for m in usable), "rejected": rejected + unreadable, "map": amap.to_dict()}
    _write(run_dir / ALIGNMENT_FILE, document)
    log.info("alignment: T (%s, %dx%d) fitted on %d anchors of %d sites, written to %s", amap.method, *amap.dims,
             stats.n, len(usable), run_dir / ALIGNMENT_FILE)

    map_arrays, map_config = map_records(amap)
    replies, sent_to = exchange(grid, _request(arrays, nodes, ALIGN_ZEROSHOT, **{MAP_RECORD: map_arrays,
                                                                                ALIGNMENT_RECORD: map_config}),
                                settings.round_timeout)
    log_replies(metrics_log, "align-zeroshot", ALIGN_STAGE, rnd, replies, sent_to)
    aggregate = dict(strategy.aggregate_evaluate(rnd, replies) or {})
    metrics_log.write(kind="align-zeroshot-aggregate", stage=ALIGN_STAGE, round=rnd, metrics=aggregate)
    _write(run_dir / ALIGNMENT_FILE, {**document, "zero_shot": aggregate})
    return amap
