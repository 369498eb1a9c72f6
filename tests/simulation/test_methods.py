"""What each method of `fedpir simulate` changes in the run settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpir.run_config import RunSettings
from fedpir.simulation.methods import DEFAULT_METHODS, METHODS
from fedpir.simulation.presets import PRESETS, PRIVATE_PHASE
from fedpir.simulation.runner import method_settings


def test_methods_set_their_privacy_and_what_trains(tmp_path: Path) -> None:
    for s in range(3):
        (tmp_path / "fed" / f"site-{s}").mkdir(parents=True)
    base = RunSettings(federation_dir=str(tmp_path / "fed"), num_sites=5, min_sites=2, **PRIVATE_PHASE)
    dn = method_settings("fedpir-dn", base, tmp_path / "dn")
    # every site of the federation must contribute, so each adds sigma / sqrt(3)
    assert (dn.secure_aggregation, dn.distributed_noise, dn.min_sites, dn.key_policy) == (True, True, 3, "fedpir")
    assert method_settings("fedpir", base, tmp_path / "f").secure_aggregation is False
    for reference in ("local-nodp", "pooled-nodp"):
        ref = method_settings(reference, base, tmp_path / reference)
        assert (ref.dp, ref.finetune_trainable, ref.pretrain_trainable) == (False, "all", "all")
        # their own recipe, not the private phase's (plain SGD at lr 3 on every group would diverge)
        assert (ref.optimizer, ref.lr, ref.batch_size, ref.segment_positive_weight) == ("adam", 1e-3, 4, 0.0)
    for private in ("local", "centralized", "fedpir", "fedavg"):
        run = method_settings(private, base, tmp_path / private)
        assert {k: getattr(run, k) for k in PRIVATE_PHASE} == PRIVATE_PHASE and run.dp
    assert set(DEFAULT_METHODS) <= set(METHODS) and "fedpir-dn" in DEFAULT_METHODS
    with pytest.raises(ValueError, match="unknown method"):
        method_settings("magic", base, tmp_path / "m")


def test_benchmark_presets_run_the_private_phase() -> None:
    for name in ("default", "hospital"):
        assert {k: PRESETS[name][k] for k in PRIVATE_PHASE} == PRIVATE_PHASE
    RunSettings(**{k: v for k, v in PRESETS["default"].items() if k != "methods"})  # valid settings
