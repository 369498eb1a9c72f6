"""Manifest paths stay inside the site folder unless a data root allows them: ``..``, absolute paths
and symlinks are resolved and checked; validate names each subject, training refuses the site."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedpir.commands import main
from fedpir.data.confinement import data_roots_from
from fedpir.data.dataset import DataPathError, load_site
from fedpir.data.validation import validate_site


def write(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).uniform(1, 2, (8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A site whose manifest reaches outside in three ways, plus two subjects that stay inside."""
    site, outside = tmp_path / "site", tmp_path / "elsewhere"
    write(site / "in" / "t1.nii.gz", 0)
    write(site / "dots" / "t1.nii.gz", 1)
    write(outside / "a" / "t1.nii.gz", 2)
    write(outside / "b" / "t1.nii.gz", 3)
    write(outside / "c" / "t1.nii.gz", 4)
    (site / "link").mkdir()
    (site / "link" / "t1.nii.gz").symlink_to(outside / "c" / "t1.nii.gz")
    subjects = [
        {"id": "inside", "images": {"t1": "in/t1.nii.gz"}},
        {"id": "dots-inside", "images": {"t1": "dots/../dots/t1.nii.gz"}},
        {"id": "dotdot", "images": {"t1": "../elsewhere/a/t1.nii.gz"}},
        {"id": "absolute", "images": {"t1": str(outside / "b" / "t1.nii.gz")}},
        {"id": "symlink", "images": {"t1": "link/t1.nii.gz"}},
    ]
    (site / "manifest.json").write_text(json.dumps({"site": "site", "subjects": subjects}))
    return site


def test_paths_outside_the_site_are_errors_per_subject(site: Path) -> None:
    report = validate_site(site)
    assert [r.subject_id for r in report.good] == ["inside", "dots-inside"]
    assert [i.subject_id for i in report.outside] == ["dotdot", "absolute", "symlink"]
    for issue in report.outside:
        assert "outside the site folder" in issue.reason and "data-roots" in issue.reason
    assert str((site.parent / "elsewhere" / "c" / "t1.nii.gz").resolve()) in str(report.outside[2])  # link resolved
    allowed = validate_site(site, [site.parent / "elsewhere"])
    assert len(allowed.good) == 5 and not allowed.bad


def test_training_refuses_a_site_that_reaches_outside(site: Path) -> None:
    with pytest.raises(DataPathError, match=r"3 subject\(s\) have files outside the site folder, training refused"):
        load_site(site, ["t1"], (8, 8, 8))
    dataset, _ = load_site(site, ["t1"], (8, 8, 8), data_roots=data_roots_from({"data-roots": f" {site.parent}/elsewhere ,"}))
    assert len(dataset) == 5


def test_cli_validate_names_each_subject_and_takes_data_roots(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(site)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sorted(line.split(":")[0] for line in out if "outside the site folder" in line) == ["absolute", "dotdot",
                                                                                               "symlink"]
    assert main(["validate", str(site), "--data-root", str(site.parent / "elsewhere"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outside"] == []
