"""Patient identity: layouts and manifests name each session's patient, a patient is one DP sample,
validation finds exact duplicate scans. Real NIfTI files, real Opacus, the real PIRNet."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedpir.client.site import split_patients
from fedpir.commands import main
from fedpir.data.dataset import SiteDataset, load_site
from fedpir.data.layouts import open_site
from fedpir.data.manifest import SiteManifest, SubjectRecord, load_manifest, write_manifest
from fedpir.data.patients import PatientDataset, merge_patients, patient_groups, patient_share
from fedpir.data.validation import validate_site
from fedpir.models.pir import PIRConfig, PIRNet
from fedpir.privacy.budget import PrivacyBudget
from fedpir.privacy.dp import DPConfig, PrivateModel, batch_size_of, collate_patients, plan_round
from fedpir.training.trainer import LocalTrainer

SIZE = (16, 16, 16)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
#: BraTS 2023 cases: patient 00001 has two timepoints, 00002 to 00004 one each.
CASES = ["BraTS-GLI-00001-000", "BraTS-GLI-00001-001", "BraTS-GLI-00002-000", "BraTS-GLI-00003-000",
         "BraTS-GLI-00004-000"]


def scan(seed: int) -> np.ndarray:
    """A random positive volume (unique per seed), zero background."""
    data = np.random.default_rng(seed).uniform(50, 150, SIZE).astype(np.float32)
    data[:2] = 0
    return data


def write(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


def brats_site(root: Path, cases: list[str] = CASES) -> Path:
    for k, case in enumerate(cases):
        for i, tag in enumerate(("t1n", "t2w")):
            write(root / case / f"{case}-{tag}.nii.gz", scan(10 * k + i))
    return root


@pytest.fixture(scope="module")
def brats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return brats_site(tmp_path_factory.mktemp("brats") / "site")


def test_layouts_name_each_sessions_patient(brats: Path, tmp_path: Path) -> None:
    manifest = open_site(brats)
    assert [(r.subject_id, r.patient_id) for r in manifest.subjects] == [
        ("BraTS-GLI-00001-000", "BraTS-GLI-00001"), ("BraTS-GLI-00001-001", "BraTS-GLI-00001"),
        ("BraTS-GLI-00002-000", "BraTS-GLI-00002"), ("BraTS-GLI-00003-000", "BraTS-GLI-00003"),
        ("BraTS-GLI-00004-000", "BraTS-GLI-00004")]
    for k, case in enumerate(("BraTS20_Training_001", "BraTS20_Training_002")):  # older naming: one patient each
        write(tmp_path / "old" / case / f"{case}_t1.nii.gz", scan(50 + k))
    assert [r.patient_id for r in open_site(tmp_path / "old").subjects] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    for i, name in enumerate(("IXI002-Guys-0828-T1", "IXI012-HH-1211-T1")):
        write(tmp_path / "ixi" / f"{name}.nii.gz", scan(100 + i))
    assert [(r.subject_id, r.patient_id) for r in open_site(tmp_path / "ixi").subjects] == [
        ("IXI002-Guys-0828", "IXI002-Guys-0828"), ("IXI012-HH-1211", "IXI012-HH-1211")]


def test_manifests_carry_patient_id(tmp_path: Path) -> None:
    """JSON field and CSV column ``patient_id``, defaulting to the subject id; not a modality."""
    site = tmp_path / "site"
    files = {s: write(site / s / "t1.nii.gz", scan(i)) for i, s in enumerate(("s1", "s2", "s3"))}
    records = [SubjectRecord("s1", {"t1": files["s1"]}, patient_id="p1"),
               SubjectRecord("s2", {"t1": files["s2"]}, patient_id="p1"), SubjectRecord("s3", {"t1": files["s3"]})]
    assert records[2].patient_id == "s3"
    written = write_manifest(SiteManifest("site", records), site / "manifest.json")
    doc = json.loads(written.read_text())
    assert [s.get("patient_id") for s in doc["subjects"]] == ["p1", "p1", None]  # default left implicit
    from_json = load_manifest(written)
    with (site / "manifest.csv").open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerows([["subject", "patient_id", "t1"], ["s1", "p1", "s1/t1.nii.gz"], ["s2", "p1", "s2/t1.nii.gz"],
                       ["s3", "", "s3/t1.nii.gz"]])
    from_csv = load_manifest(site / "manifest.csv")
    for manifest in (from_json, from_csv):
        assert [(r.subject_id, r.patient_id, sorted(r.images)) for r in manifest.subjects] == [
            ("s1", "p1", ["t1"]), ("s2", "p1", ["t1"]), ("s3", "s3", ["t1"])]
    assert validate_site(from_csv).n_patients == 2


class TinyNet(nn.Module):
    """One scalar per patient from its first modality, batch dim = patients."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3)
        self.head = nn.Linear(2, 1)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.conv(batch["image"][:, :1]).mean(dim=(2, 3, 4))).pow(2).mean()


def test_two_timepoints_of_one_patient_are_one_dp_sample(brats: Path) -> None:
    """Four patients, five sessions: the sampler's rate, the accountant's history and the per-sample
    gradients all count patients; every step holds exactly one of patient 00001's two sessions."""
    sessions, _ = load_site(brats, ["t1", "t2"], SIZE)
    assert len(sessions) == 5
    patients = PatientDataset(sessions, patient_groups(sessions.records), seed=0)
    assert len(patients) == 4
    budget = PrivacyBudget(100.0, 1e-5)
    plan = plan_round(DPConfig(noise_multiplier=1.0), n_patients=len(patients), batch_size=len(patients), epochs=1,
                      delta=1e-5)
    assert plan.sample_rate == 1.0  # 4 patients, batches of 4 (5 sessions would give 1/2)
    model = TinyNet()
    loader = DataLoader(patients, batch_size=len(patients), collate_fn=collate_patients)
    private = PrivateModel(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, accountant=budget.accountant,
                           plan=plan, noise_generator=torch.Generator().manual_seed(0))
    seen: set[str] = set()
    for _ in range(12):
        batch = next(iter(private.loader))
        assert batch_size_of(batch) == 4
        first_patient = [s for s in batch["subject"] if s.startswith("BraTS-GLI-00001")]
        assert len(first_patient) == 1  # one session of the patient per step, never both
        seen.update(first_patient)
        model(batch).backward()
        assert all(p.grad_sample.shape[0] == 4 for p in private.optimizer.params)  # one gradient per patient
        private.step(4)
    assert seen == {"BraTS-GLI-00001-000", "BraTS-GLI-00001-001"}  # both timepoints are drawn over the steps
    assert budget.accountant.history == [(1.0, 1.0, 12)]
    private.close()


def test_trainer_and_holdout_count_patients(brats: Path, tmp_path: Path) -> None:
    """The real PIRNet under DP on the patient dataset: the ledger records 4 patients and their
    sampling rate; the held-out split keeps both sessions of a patient on one side."""
    sessions, _ = load_site(brats, ["t1", "t2"], SIZE)
    train, holdout = split_patients(sessions, seed=0)
    train_sessions = {sessions.records[i].patient_id for group in train.groups for i in group}
    held_out = {sessions.records[i].patient_id for i in holdout.indices}
    assert not train_sessions & held_out and len(train_sessions | held_out) == 4 and len(train) + len(held_out) == 4
    torch.manual_seed(0)
    model = PIRNet(PIRConfig(["t1", "t2"], spatial_size=SIZE, channels=(4, 8, 16), prior_tokens=4, num_heads=2,
                             proj_dim=8))
    patients = PatientDataset(sessions, patient_groups(sessions.records))
    trainer = LocalTrainer(model, patients, dp=DPConfig(noise_multiplier=1.0), batch_size=2, state_dir=tmp_path)
    trainer.train_round("pretrain", progress=False)
    entry = json.loads((tmp_path / "privacy_ledger.jsonl").read_text().splitlines()[-1])
    assert entry["n_patients"] == 4 and entry["sample_rate"] == 0.5  # 5 sessions would give 1/3


def test_validate_reports_duplicate_scans_and_merges_their_patients(tmp_path: Path, capsys) -> None:
    """The same scan under two ids (re-saved under another name) is reported and counted as one patient."""
    site = tmp_path / "site"
    a = SubjectRecord("sub-a", {"t1": write(site / "a" / "t1.nii.gz", scan(1)), "t2": write(site / "a" / "t2.nii.gz",
                                                                                           scan(2))})
    copy = write(site / "b" / "t1.nii", scan(1))  # uncompressed: other bytes, same voxels
    b = SubjectRecord("sub-b", {"t1": copy}, patient_id="other-person")
    c = SubjectRecord("sub-c", {"t1": write(site / "c" / "t1.nii.gz", scan(3))})
    write_manifest(SiteManifest("site", [a, b, c]), site / "manifest.json")
    report = validate_site(site)
    assert [d.entries for d in report.duplicates] == [(("sub-a", "t1"), ("sub-b", "t1"))]
    assert [(r.subject_id, r.patient_id) for r in report.good] == [("sub-a", "sub-a"), ("sub-b", "sub-a"),
                                                                   ("sub-c", "sub-c")]
    assert report.n_patients == 2
    assert main(["validate", str(site)]) == 0
    err = capsys.readouterr().err
    assert "warning: duplicate scan: identical voxels in sub-a t1, sub-b t1" in err


def test_merge_patients_is_transitive() -> None:
    records = [SubjectRecord(s, {}, patient_id=p) for s, p in (("s1", "p1"), ("s2", "p2"), ("s3", "p3"), ("s4", "p4"))]
    merged = merge_patients(records, [["s2", "s3"], ["s3", "s1"]])
    assert [r.patient_id for r in merged] == ["p1", "p1", "p1", "p4"]
    assert [r.patient_id for r in records] == ["p1", "p2", "p3", "p4"]  # the input is not modified


def test_patient_dataset_rejects_a_patient_without_sessions() -> None:
    with pytest.raises(ValueError, match="at least one session"):
        PatientDataset(SiteDataset([], ["t1"], cache=False), [[]])


def test_a_released_average_counts_the_patient_with_most_sessions(brats: Path) -> None:
    """The n of a held-out average's sensitivity: one patient with two of the sessions counts as the
    share it can move, never as two patients (which would halve the noise of a released metric)."""
    sessions, _ = load_site(brats, ["t1", "t2"], SIZE)
    records = sessions.records
    both = [i for i, r in enumerate(records) if r.patient_id == records[0].patient_id]
    assert len(both) == 2 and patient_share(records, both) == 1.0
    assert patient_share(records, range(len(records))) == 2.5  # 5 sessions, 2 of one patient
    singles = [i for i in range(len(records)) if i not in both]
    assert patient_share(records, singles) == 3.0 and patient_share(records, []) == 0.0
    seed = next(s for s in range(100) if len(split_patients(sessions, s)[1]) == 2)  # that patient held out
    _, holdout = split_patients(sessions, seed)
    assert patient_share(records, holdout.indices) == 1.0
