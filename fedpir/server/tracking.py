"""Round metrics to an experiment tracker, besides the run's ``metrics.jsonl``.

TensorBoard: every record of :class:`fedpir.server.rounds.MetricsLog` that carries a round and
metrics becomes scalars in the run folder's ``tensorboard/``, tagged ``STAGE/KIND/SITE/METRIC`` (a
site's own records: train, evaluate) or ``STAGE/KIND/METRIC`` (the aggregates: train-aggregate with
epsilon, evaluate-aggregate), at the global round as the step. ``tensorboard --logdir OUT`` shows
every method of a ``fedpir simulate`` side by side. The run config's ``tracking`` picks it (``auto``:
when the ``tensorboard`` package is installed: ``pip install 'fedpir[tracking]'``). Written with
torch's own ``SummaryWriter``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpir.run_config import RunSettings
from fedpir.server.rounds import MetricsLog

#: The folder of the event files, inside the run folder.
TENSORBOARD_DIR = "tensorboard"


class TensorBoardTracker:
    """Writes each metrics record as TensorBoard scalars (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def __call__(self, record: dict[str, Any]) -> None:
        """Add the record's finite numeric metrics at its round; other records are left out."""
        metrics, step = record.get("metrics"), record.get("round")
        if not isinstance(metrics, dict) or not isinstance(step, int):
            return
        tag = "/".join(str(p) for p in (record.get("stage", ""), record.get("kind", ""), record.get("site")) if p)
        for name, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"{tag}/{name}", value, step)
        self.writer.flush()


def tracker_for(choice: str, run_path: Path) -> Callable[[dict[str, Any]], None] | None:
    """The tracker the run config's ``tracking`` names for the run folder ``run_path``, or None."""
    if choice == "none":
        return None
    if importlib.util.find_spec("tensorboard") is None:
        if choice == "tensorboard":
            raise ValueError("tracking 'tensorboard' needs the tensorboard package: pip install 'fedpir[tracking]' "
                             "(or set tracking to auto or none)")
        return None
    return TensorBoardTracker(Path(run_path) / TENSORBOARD_DIR)


def run_metrics_log(settings: RunSettings) -> MetricsLog:
    """The run folder's ``metrics.jsonl``, with the tracker ``settings.tracking`` names."""
    return MetricsLog(settings.run_path / "metrics.jsonl", tracker_for(settings.tracking, settings.run_path))
