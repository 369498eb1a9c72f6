"""The federation loop: stages of rounds, per-site metrics, a checkpoint every round, resume.

Flower's ``Strategy.start`` runs a fixed number of rounds of one configuration and has no hook to
checkpoint or resume, so this loop drives the strategy's own ``configure_train`` /
``aggregate_train`` / ``configure_evaluate`` / ``aggregate_evaluate`` itself; aggregation stays in
the (Flower) strategy.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpir.server.checkpoint import Checkpoint, CheckpointStore, restore_strategy_state, strategy_state
from fedpir.server.secure_train import SecureRound
from fedpir.wire.protocol import ROUND_KEY, STAGE_KEY

log = logging.getLogger("fedpir.server")
#: A train step under secure aggregation: (grid, strategy, round, global arrays, config) -> what the server learnt.
SecureStep = Callable[[Grid, Strategy, int, ArrayRecord, ConfigRecord], SecureRound]


@dataclass
class Stage:
    """One stage of the run: its name, how many rounds, and the config sent to every site."""

    name: str
    rounds: int
    config: dict[str, Any] = field(default_factory=dict)


class MetricsLog:
    """Append-only JSON-lines log of per-round, per-site and aggregated metrics; ``tracker`` (for
    example :class:`fedpir.server.tracking.TensorBoardTracker`) gets every record too."""

    def __init__(self, path: Path, tracker: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tracker = tracker

    def write(self, **record: Any) -> None:
        """Append one record (a timestamp is added)."""
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
        if self.tracker is not None:
            self.tracker(record)

    def read(self) -> list[dict[str, Any]]:
        """All records so far."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def site_name(msg: Message, sent_to: dict[str, int] | None = None) -> str:
    """The site a reply came from: its self-declared name, else the node the instruction went to
    (``sent_to``: message id -> node id; an error the SuperLink writes for an unreachable node comes
    from the SuperLink itself), else the reply's source node id."""
    if not msg.has_error() and "site" in msg.content.config_records:
        return str(msg.content.config_records["site"].get("name", msg.metadata.src_node_id))
    return str((sent_to or {}).get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))


def exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> tuple[list[Message], dict[str, int]]:
    """Send ``messages`` and wait for the replies; also returns message id -> destination node id
    (Flower sets the ids while pushing)."""
    messages = list(messages)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    return replies, {m.metadata.message_id: m.metadata.dst_node_id for m in messages}


def log_replies(metrics_log: MetricsLog, kind: str, stage: str, rnd: int, replies: list[Message],
                 sent_to: dict[str, int]) -> None:
    """Per-site records of a round: metrics, errors, and an error for each node that never replied."""
    silent = set(sent_to) - {m.metadata.reply_to_message_id for m in replies}
    errors = [(site_name(m, sent_to), f"error {m.error.code}: {m.error.reason}") for m in replies if m.has_error()]
    errors += [(str(sent_to[i]), "no reply within round-timeout") for i in sorted(silent)]
    for site, reason in errors:
        metrics_log.write(kind=f"{kind}-error", stage=stage, round=rnd, site=site, error=reason)
        log.warning("round %d %s: site %s failed: %s", rnd, kind, site, reason)
    for msg in replies:
        for record in ([] if msg.has_error() else msg.content.metric_records.values()):
            metrics_log.write(kind=kind, stage=stage, round=rnd, site=site_name(msg), metrics=dict(record))


def _log_rejections(metrics_log: MetricsLog, strategy: Strategy, stage: str, rnd: int) -> None:
    """The replies the strategy screened out in the latest round, with the reasons."""
    for rejection in getattr(strategy, "rejections", []):
        metrics_log.write(kind="rejected", stage=stage, round=rnd, rejection=rejection)


def _log_secure(metrics_log: MetricsLog, stage: str, rnd: int, secure: SecureRound) -> None:
    """Per-site records of a secure train step: each site's released metrics, the failures."""
    for reason in secure.failures:
        metrics_log.write(kind="train-error", stage=stage, round=rnd, site="?", error=reason)
        log.warning("round %d secure train: a site failed: %s", rnd, reason)
    for node, metrics in secure.site_metrics.items():
        metrics_log.write(kind="train", stage=stage, round=rnd, site=str(node), metrics=metrics)


def _secure_round_failed(stage: str, rnd: int, secure: SecureRound) -> RoundFailedError:
    errors = "; ".join(secure.failures)
    return RoundFailedError(
        f"round {rnd} ({stage}): secure aggregation produced no sum ({len(secure.site_metrics)} sites completed"
        f"{', errors: ' + errors if errors else ''}); the run stops after round {rnd - 1}: see metrics.jsonl "
        "(train-error), fix the sites, then `flwr run` again with the same run-dir to resume")


class RoundFailedError(RuntimeError):
    """A round produced no aggregate (too few usable updates): the run stops at its last checkpoint."""


def _round_failed(stage: str, rnd: int, replies: list[Message], sent_to: dict[str, int]) -> RoundFailedError:
    errors = "; ".join(f"site {site_name(m, sent_to)}: {m.error.reason}" for m in replies if m.has_error())
    return RoundFailedError(
        f"round {rnd} ({stage}): too few usable updates to aggregate ({len(replies)} replies from {len(sent_to)} sites"
        f"{', errors: ' + errors if errors else ''}); the run stops after round {rnd - 1}: see metrics.jsonl (train-error, "
        "rejected), fix the sites, then `flwr run` again with the same run-dir to resume")


def run_federation(
    grid: Grid,
    strategy: Strategy,
    initial_arrays: ArrayRecord,
    stages: Iterable[Stage],
    run_dir: Path,
    timeout: float = 3600.0,
    fingerprint: dict[str, Any] | None = None,
    secure_step: SecureStep | None = None,
    tracker: Callable[[dict[str, Any]], None] | None = None,
) -> ArrayRecord:
    """Run all stages, checkpointing after every round; resume from ``run_dir`` if it holds a
    checkpoint of this same run (``fingerprint``: the settings that define it; a checkpoint of
    other settings raises :class:`~fedpir.server.checkpoint.ResumeError`). ``secure_step`` (secure
    aggregation, :func:`fedpir.server.secure_train.secure_train`) replaces the train step: the server
    then holds only the weighted mean of the updates; evaluation and checkpoints stay as they are.

    A round whose updates cannot be aggregated (fewer than the strategy's minimum usable, e.g. every
    site refused) stops the run with :class:`RoundFailedError` rather than finish with a model nobody
    trained. Returns the final global shared arrays.
    """
    store = CheckpointStore(run_dir, fingerprint or {})
    metrics_log = MetricsLog(Path(run_dir) / "metrics.jsonl", tracker)
    arrays, done = initial_arrays, 0
    if (ckpt := store.load_latest()) is not None:
        arrays, done = ckpt.arrays, ckpt.round
        restore_strategy_state(strategy, ckpt.strategy_state)
        log.info("resuming after round %d (stage %s)", done, ckpt.stage)
        metrics_log.write(kind="resume", round=done, stage=ckpt.stage)

    global_round = 0
    for stage in stages:
        for stage_round in range(1, stage.rounds + 1):
            global_round += 1
            if global_round <= done:
                continue
            config = ConfigRecord({**stage.config, STAGE_KEY: stage.name, ROUND_KEY: global_round})
            log.info("[%s round %d/%d] (global round %d)", stage.name, stage_round, stage.rounds, global_round)

            if secure_step is None:
                replies, sent_to = exchange(grid, strategy.configure_train(global_round, arrays, config, grid), timeout)
                log_replies(metrics_log, "train", stage.name, global_round, replies, sent_to)
                new_arrays, train_metrics = strategy.aggregate_train(global_round, replies)
            else:
                secure = secure_step(grid, strategy, global_round, arrays, config)
                _log_secure(metrics_log, stage.name, global_round, secure)
                new_arrays, train_metrics = secure.arrays, secure.metrics
            if new_arrays is None:
                error = (_round_failed(stage.name, global_round, replies, sent_to) if secure_step is None
                         else _secure_round_failed(stage.name, global_round, secure))
                _log_rejections(metrics_log, strategy, stage.name, global_round)
                metrics_log.write(kind="round-failed", stage=stage.name, round=global_round, error=str(error))
                raise error
            arrays = new_arrays
            metrics_log.write(kind="train-aggregate", stage=stage.name, round=global_round,
                              metrics=dict(train_metrics or {}))

            replies, sent_to = exchange(grid, strategy.configure_evaluate(global_round, arrays, config, grid), timeout)
            log_replies(metrics_log, "evaluate", stage.name, global_round, replies, sent_to)
            eval_metrics = strategy.aggregate_evaluate(global_round, replies)
            metrics_log.write(kind="evaluate-aggregate", stage=stage.name, round=global_round,
                              metrics=dict(eval_metrics or {}))
            _log_rejections(metrics_log, strategy, stage.name, global_round)

            store.save(Checkpoint(global_round, stage.name, stage_round, arrays, strategy_state(strategy)))
    return arrays
