"""Round metrics to TensorBoard (fedpir.server.tracking): what a record becomes, and the choice of tracker.
A whole simulation read back from its event files: tests/commands/test_simulate.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from tracking_events import tensorboard_scalars

from fedpir.server.rounds import MetricsLog
from fedpir.server.tracking import TENSORBOARD_DIR, TensorBoardTracker, tracker_for


def test_records_become_tagged_scalars_at_their_round(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl", TensorBoardTracker(tmp_path / TENSORBOARD_DIR))
    log.write(kind="evaluate", stage="finetune", round=2, site="site-1", metrics={"dice": 0.5, "ok": True})
    log.write(kind="train-aggregate", stage="finetune", round=2, metrics={"epsilon": 3.25, "loss": float("nan")})
    log.write(kind="resume", round=1, stage="finetune")  # no metrics: nothing to plot
    log.write(kind="train-error", stage="finetune", round=2, site="site-0", error="refused")
    assert tensorboard_scalars(tmp_path / TENSORBOARD_DIR) == {"finetune/evaluate/site-1/dice": {2: 0.5},
                                                    "finetune/train-aggregate/epsilon": {2: 3.25}}
    assert len(log.read()) == 4  # metrics.jsonl keeps every record


def test_the_run_config_picks_the_tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracker_for("none", tmp_path) is None
    assert isinstance(tracker_for("auto", tmp_path), TensorBoardTracker)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert tracker_for("auto", tmp_path) is None  # a machine without tensorboard: metrics.jsonl only
    with pytest.raises(ValueError, match=r"pip install 'fedpir\[tracking\]'"):
        tracker_for("tensorboard", tmp_path)
