"""A run resumes only itself: checkpoints carry the run's settings, and a new run gets a new folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedpir.run_config import RunSettings
from fedpir.server.checkpoint import Checkpoint, CheckpointStore, ResumeError
from fedpir.server.server_app import strategy_for
from fedpir.training.model import build_model


def checkpoint(round_: int) -> Checkpoint:
    return Checkpoint(round_, "finetune", 2, ArrayRecord({"w": Array(np.full(3, float(round_)))}), {})


def test_checkpoint_resumes_only_under_the_same_settings(tmp_path: Path) -> None:
    finished = RunSettings(run_dir=str(tmp_path), pretrain_rounds=3, finetune_rounds=2)
    CheckpointStore(tmp_path, finished.fingerprint()).save(checkpoint(5))
    # the same run (a restart) resumes; what does not change the computation may differ
    same = CheckpointStore(tmp_path, RunSettings(run_dir=str(tmp_path), pretrain_rounds=3, finetune_rounds=2,
                                                 round_timeout=5.0, device="cpu").fingerprint())
    assert same.load_latest().round == 5
    # the README's second command in the same folder: refused, naming what differs
    other = RunSettings(run_dir=str(tmp_path), pretrain_rounds=5, finetune_rounds=2, dp=False)
    with pytest.raises(ResumeError, match=r"other settings \(dp: True -> False, pretrain-rounds: 3 -> 5\)"):
        CheckpointStore(tmp_path, other.fingerprint())


def test_a_run_without_run_dir_gets_a_folder_of_its_own() -> None:
    settings = RunSettings()
    with pytest.raises(ValueError, match="not resolved"):
        _ = settings.run_path
    first, second = settings.with_run_folder(11), settings.with_run_folder(12)
    assert first.run_path != second.run_path and first.run_path.name == "run-11"
    named = RunSettings(run_dir="/somewhere").with_run_folder(11)
    assert named.run_path == Path("/somewhere")


def test_fedprox_strategy_gets_the_configured_mu() -> None:
    settings = RunSettings(strategy="fedprox", proximal_mu=0.25)
    assert strategy_for(settings, build_model(settings)).proximal_mu == 0.25
    with pytest.raises(ValueError, match="proximal-mu is for strategy fedprox"):
        strategy_for(RunSettings(proximal_mu=0.25), build_model(settings))
