"""The run settings: one set of defaults, mirrored in pyproject.toml for `flwr run`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedpir.run_config import RunSettings

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_run_config_matches_defaults() -> None:
    flower = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert flower == RunSettings().to_run_config()


def test_from_run_config_parses_and_rejects() -> None:
    settings = RunSettings.from_run_config({"pretrain-rounds": "5", "dp": "false", "lr": 0.01})
    assert settings.pretrain_rounds == 5 and settings.dp is False and settings.lr == 0.01
    with pytest.raises(ValueError, match="unknown run-config key 'pretrain-round'"):
        RunSettings.from_run_config({"pretrain-round": 5})
    with pytest.raises(ValueError, match="key-policy"):
        RunSettings(key_policy="everything")
    with pytest.raises(ValueError, match="seed must be >= 0"):  # before any warm start or corpus is built
        RunSettings.from_run_config({"seed": -1})
    for size in (4, 1000):  # a server cannot make a site allocate without bound
        with pytest.raises(ValueError, match=r"volume-size must be in \[8, 256\] voxels"):
            RunSettings.from_run_config({"volume-size": size})


def test_paths_default_under_run_dir(tmp_path: Path) -> None:
    settings = RunSettings(run_dir=str(tmp_path / "run"))
    assert settings.federation_path == tmp_path / "run" / "federation"
    assert settings.vocabulary == ["t1", "t2", "flair", "pd"]


def test_site_sizes_cycle_over_sites_and_reject_bad_lists() -> None:
    assert RunSettings(num_sites=6, subjects_per_site="6,9,12,21").site_sizes == [6, 9, 12, 21, 6, 9]
    assert RunSettings(num_sites=3, subjects_per_site="5").site_sizes == [5, 5, 5]
    for bad in ("", "6,x", "4,0"):
        with pytest.raises(ValueError, match="subjects per site|at least one patient"):
            RunSettings(subjects_per_site=bad)
