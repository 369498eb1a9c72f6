"""Site data layer on real NIfTI files written here: layouts, validation of a broken corpus, dataset, CLI."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fedpir.commands import main
from fedpir.data.dataset import SiteDataset, load_site
from fedpir.data.layouts import open_site
from fedpir.data.manifest import KNOWN_MODALITIES, ManifestError, SiteManifest, SubjectRecord, write_manifest
from fedpir.data.validation import validate_site

SHAPE = (20, 20, 20)
GRID = (16, 16, 16)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
MODALITIES = ["t1", "t2", "flair"]


def brain(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Boolean ellipsoid filling most of the volume, background outside."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    return (grid**2).sum(0) < 0.7


def lesion(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Boolean ball off-centre inside the brain."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    return ((grid - 0.25) ** 2).sum(0) < 0.1


def phantom(seed: int, scale: float, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """MR-like image: noisy positive tissue signal in the brain, exact zeros outside."""
    rng = np.random.default_rng(seed)
    img = scale * (1.0 + 0.5 * lesion(shape) + 0.1 * rng.standard_normal(shape))
    return (img * brain(shape)).astype(np.float32)


def write(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """Save a NIfTI file (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def write_subject(folder: Path, seed: int, modalities: Sequence[str], with_mask: bool) -> SubjectRecord:
    """A good subject: one file per modality (different contrast each) and optionally a lesion mask."""
    images = {
        m: write(folder / f"{m}.nii.gz", phantom(seed + i, 100.0 * (i + 1))) for i, m in enumerate(modalities)
    }
    mask = write(folder / "mask.nii.gz", lesion().astype(np.uint8)) if with_mask else None
    return SubjectRecord(subject_id=folder.name, images=images, mask=mask, label=seed % 2)


# ---------------------------------------------------------------- broken corpus

GOOD = ["sub-000", "sub-001", "sub-002", "sub-003"]
#: bad subject -> text its reason must contain
EXPECTED_BAD = {
    "sub-truncated": "t2: unreadable or truncated file",
    "sub-garbage": "t1: unreadable or truncated file",
    "sub-4d": "t1: not a 3D volume (shape (20, 20, 20, 3))",
    "sub-nan": "t2: NaN/Inf voxels in",
    "sub-inf": "flair: NaN/Inf voxels in",
    "sub-shape": "t2: shape (18, 18, 18) differs from t1 (20, 20, 20)",
    "sub-affine": "t2: affine differs from t1's by 1",
    "sub-emptymask": "mask: empty mask (no nonzero voxel; allowed only with label 0)",
    "sub-fracmask": "mask: non-binary mask (non-integer values",
    "sub-unknown": "unknown modality 'dwi'",
    "sub-missing": "t2: missing file",
    "sub-nopath": "t2: no file given",
    "sub-nomod": "no modality images",
    "sub-dup": "duplicate subject id (2 entries)",
}


def build_corpus(site: Path) -> None:
    """A site with four good subjects and one bad subject per failure kind; manifest.json written."""
    subs = [
        write_subject(site / "sub-000", 0, MODALITIES, with_mask=True),
        write_subject(site / "sub-001", 1, ["t1", "t2"], with_mask=False),
        write_subject(site / "sub-002", 2, ["t1", "flair"], with_mask=True),
        write_subject(site / "sub-003", 3, MODALITIES, with_mask=True),
    ]
    # a lesion-free subject (label 0) may have an all-zero mask
    write(subs[3].mask, np.zeros(SHAPE, np.uint8))
    subs[3].label = 0
    # a trailing singleton 4th dimension is acceptable (squeezed)
    write(subs[1].images["t2"], phantom(9, 200.0)[..., None])
    subs[1].label = None

    def bad(name: str, modalities: tuple[str, ...] = ("t1", "t2"), with_mask: bool = False) -> SubjectRecord:
        rec = write_subject(site / name, 10 + len(subs), modalities, with_mask)
        subs.append(rec)
        return rec

    rec = bad("sub-truncated")
    raw = rec.images["t2"].read_bytes()
    rec.images["t2"].write_bytes(raw[: len(raw) // 2])
    bad("sub-garbage").images["t1"].write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    write(bad("sub-4d").images["t1"], np.repeat(phantom(3, 100.0)[..., None], 3, axis=-1))
    nan = phantom(4, 200.0)
    nan[10, 10, 10] = np.nan
    write(bad("sub-nan").images["t2"], nan)
    inf = phantom(5, 300.0)
    inf[9, 9, 9] = np.inf
    write(bad("sub-inf", MODALITIES).images["flair"], inf)
    write(bad("sub-shape").images["t2"], phantom(6, 200.0, (18, 18, 18)))
    shifted = AFFINE.copy()
    shifted[0, 3] = 1.0
    write(bad("sub-affine").images["t2"], phantom(7, 200.0), shifted)
    rec = bad("sub-emptymask", with_mask=True)
    rec.label = 1
    write(rec.mask, np.zeros(SHAPE, np.uint8))
    write(bad("sub-fracmask", with_mask=True).mask, (0.5 * lesion()).astype(np.float32))
    rec = bad("sub-unknown")
    rec.images["dwi"] = rec.images.pop("t2")
    rec = bad("sub-missing")
    rec.images["t2"].unlink()
    bad("sub-nopath").images["t2"] = None  # JSON null / empty cell in the manifest
    bad("sub-nomod").images.clear()
    bad("sub-dup")
    subs.append(subs[-1])
    write_manifest(SiteManifest(site="hospital-a", subjects=subs), site / "manifest.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("hospital-a")
    build_corpus(site)
    return site


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under a folder."""
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_corpus_reports_each_bad_subject_and_loads_the_rest(corpus: Path) -> None:
    before = snapshot(corpus)
    dataset, report = load_site(corpus, MODALITIES, GRID)

    assert [rec.subject_id for rec in report.good] == GOOD
    reasons = {}
    for issue in report.bad:
        reasons.setdefault(issue.subject_id, []).append(issue.reason)
    assert sorted(reasons) == sorted(EXPECTED_BAD)
    for subject, expected in EXPECTED_BAD.items():
        assert any(expected in r for r in reasons[subject]), (subject, reasons[subject])
    assert len(reasons["sub-dup"]) == 2  # both entries are skipped: which one is right is unknown
    assert "sub-nan" in str(next(i for i in report.bad if i.subject_id == "sub-nan"))
    assert report.summary() == "hospital-a: 4 of 19 subjects usable (4 patients), 15 skipped"
    assert report.duplicates == [] and report.outside == []

    assert len(dataset) == 4
    items = [dataset[i] for i in range(4)]
    assert [it["subject"] for it in items] == GOOD
    present = [[True, True, True], [True, True, False], [True, False, True], [True, True, True]]
    assert [it["present"].tolist() for it in items] == present
    assert [bool(it["has_mask"]) for it in items] == [True, False, True, True]
    assert [int(it["label"]) for it in items] == [0, -1, 0, 0]
    for it in items:
        assert it["image"].shape == (3, *GRID) and it["image"].dtype == torch.float32
        assert it["mask"].shape == (1, *GRID) and it["mask"].dtype == torch.float32
        assert it["present"].dtype == torch.bool and it["label"].dtype == torch.int64
        for channel, present in zip(it["image"], it["present"]):
            if not present:
                assert not channel.any()
                continue
            inside = channel[channel != 0]
            assert abs(float(inside.mean())) < 1e-4 and abs(float(inside.std()) - 1) < 1e-2
            assert channel[0, 0, 0] == 0  # background outside the brain stays exactly 0
    assert items[0]["mask"].any() and not items[1]["mask"].any() and not items[3]["mask"].any()
    assert snapshot(corpus) == before


def test_mask_is_resampled_nearest_and_binarized(tmp_path: Path) -> None:
    rec = write_subject(tmp_path / "sub-0", 0, ["t1"], with_mask=True)
    labels = 2 * lesion().astype(np.uint8)
    labels[(labels > 0) & (np.indices(SHAPE)[0] > 12)] = 4  # BraTS-like labels {0, 2, 4}
    write(rec.mask, labels)
    item = SiteDataset([rec], ["t1"], (10, 10, 10), cache=False)[0]
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    expected = (labels > 0)[1::2, 1::2, 1::2]  # nearest neighbour (voxel centres) of a factor-2 downsampling
    assert torch.equal(item["mask"][0].bool(), torch.from_numpy(expected))


def test_orientation_is_normalized_to_ras(tmp_path: Path) -> None:
    data = phantom(0, 100.0) * (np.indices(SHAPE)[0] + 1)  # left-right asymmetric
    flip_x = AFFINE @ np.array([[-1, 0, 0, SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    ras = SubjectRecord("ras", {"t1": write(tmp_path / "ras.nii.gz", data)})
    las = SubjectRecord("las", {"t1": write(tmp_path / "las.nii.gz", data[::-1].copy(), flip_x)})
    dataset = SiteDataset([ras, las], ["t1"], GRID)
    assert torch.allclose(dataset[0]["image"], dataset[1]["image"], atol=1e-5)
    assert not torch.allclose(dataset[0]["image"], dataset[0]["image"].flip(1), atol=1e-2)


def test_batches_collate_with_default_collate(corpus: Path) -> None:
    dataset, _ = load_site(corpus, MODALITIES, GRID, cache=False)
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["image"].shape == (2, 3, *GRID) and batch["present"].shape == (2, 3)
    assert batch["subject"] == GOOD[:2]


# ---------------------------------------------------------------- layouts and manifests

def load_through_open_site(site: Path, modalities: list[str]) -> list[dict]:
    """open_site -> validate_site -> SiteDataset; asserts nothing was rejected."""
    report = validate_site(open_site(site))
    assert report.bad == []
    dataset = SiteDataset(report.good, modalities, GRID, cache=False)
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize(
    ("case", "sep", "tags"),
    [
        ("BraTS-GLI-00000-000", "-", {"t1n": "t1", "t1c": "t1c", "t2w": "t2", "t2f": "flair"}),
        ("BraTS20_Training_001", "_", {"t1": "t1", "t1ce": "t1c", "t2": "t2", "flair": "flair"}),
    ],
)
def test_brats_layout(tmp_path: Path, case: str, sep: str, tags: dict[str, str]) -> None:
    site = tmp_path / "brats"
    for k in range(2):
        name = case[:-1] + str(k)
        for i, tag in enumerate(tags):
            write(site / name / f"{name}{sep}{tag}.nii.gz", phantom(k + i, 100.0 * (i + 1)))
        seg = lesion().astype(np.uint8) * np.uint8(2 + k)  # labels 2 or 3: multi-label segmentations
        write(site / name / f"{name}{sep}seg.nii.gz", seg)
    manifest = open_site(site)
    assert manifest.site == "brats"
    assert [rec.subject_id for rec in manifest.subjects] == [case[:-1] + "0", case[:-1] + "1"]
    rec = manifest.subjects[0]
    assert sorted(rec.images) == sorted(tags.values())
    assert rec.images["flair"].name.endswith(f"{sep}{'t2f' if sep == '-' else 'flair'}.nii.gz")
    assert rec.mask is not None and rec.mask.name.endswith("seg.nii.gz")
    items = load_through_open_site(site, ["t1", "t1c", "t2", "flair", "pd"])
    assert [it["present"].tolist() for it in items] == [[True, True, True, True, False]] * 2
    assert all(bool(it["has_mask"]) and it["mask"].sum() > 0 for it in items)


def test_ixi_layout_flat_and_folder_per_modality(tmp_path: Path) -> None:
    flat = tmp_path / "ixi-flat"
    for i, mod in enumerate(["T1", "T2", "PD"]):
        write(flat / f"IXI002-Guys-0828-{mod}.nii.gz", phantom(i, 100.0 * (i + 1)))
    write(flat / "IXI012-HH-1211-T2.nii.gz", phantom(5, 200.0))
    write(flat / "IXI002-Guys-0828-MRA.nii.gz", phantom(6, 50.0))  # not a fedpir modality: ignored
    manifest = open_site(flat)
    assert [(r.subject_id, sorted(r.images)) for r in manifest.subjects] == [
        ("IXI002-Guys-0828", ["pd", "t1", "t2"]),
        ("IXI012-HH-1211", ["t2"]),
    ]
    items = load_through_open_site(flat, ["t1", "t2", "pd"])
    assert [it["present"].tolist() for it in items] == [[True, True, True], [False, True, False]]

    folders = tmp_path / "ixi-folders"
    write(folders / "IXI-T1" / "IXI002-Guys-0828-T1.nii.gz", phantom(0, 100.0))
    write(folders / "T2" / "IXI002-Guys-0828.nii.gz", phantom(1, 200.0))  # modality from the folder
    manifest = open_site(folders)
    assert [(r.subject_id, sorted(r.images)) for r in manifest.subjects] == [
        ("IXI002-Guys-0828", ["t1", "t2"])
    ]
    items = load_through_open_site(folders, ["t1", "t2"])
    assert [it["present"].tolist() for it in items] == [[True, True]]


def test_csv_and_json_manifests_give_the_same_site(tmp_path: Path) -> None:
    site = tmp_path / "site"
    recs = [write_subject(site / f"sub-{k}", k, ["t1", "t2"], with_mask=k == 0) for k in range(2)]
    recs[1].report = "No lesion."
    write_manifest(SiteManifest("site", recs), site / "manifest.json")
    with (site / "manifest.csv").open("w", newline="") as fh:  # absolute paths, inside the site folder
        writer = csv.DictWriter(fh, ["subject", "t1", "t2", "mask", "label", "report"])
        writer.writeheader()
        for rec in recs:
            writer.writerow({"subject": rec.subject_id, **{m: str(p) for m, p in rec.images.items()},
                             "mask": rec.mask or "", "label": rec.label, "report": rec.report or ""})
    from_json = open_site(site / "manifest.json")
    from_csv = open_site(site / "manifest.csv")
    assert [(r.subject_id, r.images, r.mask, r.label, r.report) for r in from_json.subjects] == [
        (r.subject_id, r.images, r.mask, r.label, r.report) for r in from_csv.subjects
    ]
    for source in (site, site / "manifest.csv"):
        items = load_through_open_site(source, ["t1", "t2"])
        assert [bool(it["has_mask"]) for it in items] == [True, False]


def test_open_site_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such file or folder"):
        open_site(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="not a site folder.*BraTS.*IXI"):
        validate_site(tmp_path / "empty")
    (tmp_path / "bad" / "manifest.json").parent.mkdir()
    (tmp_path / "bad" / "manifest.json").write_bytes(b'{"subjects": [{"images": ')
    with pytest.raises(ManifestError, match="malformed manifest"):
        open_site(tmp_path / "bad")


def test_small_federation_loads_cleanly(small_federation: Path) -> None:
    manifests = [open_site(p.parent) for p in sorted(small_federation.glob("*/manifest.json"))]
    assert len(manifests) == 4
    vocabulary = [m for m in KNOWN_MODALITIES if any(m in site.modalities for site in manifests)]
    for manifest in manifests:
        dataset, report = load_site(manifest, vocabulary, (32, 32, 32))  # the native grid
        assert report.bad == [] and len(dataset) == len(manifest.subjects) == 8
        for item in dataset:
            assert item["image"].shape == (len(vocabulary), 32, 32, 32)
            assert item["present"].tolist() == [m in manifest.modalities for m in vocabulary]
            assert bool(item["mask"].any()) == (int(item["label"]) == 1)  # lesion-free subjects: empty mask


# ---------------------------------------------------------------- CLI

def test_cli_validate_lists_bad_subjects(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(corpus)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "hospital-a: 4 of 19 subjects usable (4 patients), 15 skipped"
    assert len(lines) == 16
    nan_line = next(line for line in lines if line.startswith("sub-nan: "))
    assert nan_line.startswith("sub-nan: t2: NaN/Inf voxels in ") and nan_line.endswith("sub-nan/t2.nii.gz")
    for subject, expected in EXPECTED_BAD.items():
        assert any(line.startswith(f"{subject}: ") and expected in line for line in lines), subject

    assert main(["validate", str(corpus), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["good"] == GOOD and doc["n_bad"] == 15
    assert {b["subject"] for b in doc["bad"]} == set(EXPECTED_BAD)


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    all_bad = tmp_path / "all-bad"
    rec = write_subject(all_bad / "sub-0", 0, ["t1"], with_mask=False)
    rec.images["t1"].write_bytes(b"")
    write_manifest(SiteManifest("all-bad", [rec]), all_bad / "manifest.json")
    assert main(["validate", str(all_bad)]) == 1
    assert "sub-0: t1: unreadable or truncated file" in capsys.readouterr().out

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.csv").write_text("id,t1\nsub-0,a.nii.gz\n")
    assert main(["validate", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpir validate: error: ") and "needs a 'subject' column" in err
    assert main(["validate", str(tmp_path / "nowhere"), "--json"]) == 2
    assert "no such file or folder" in json.loads(capsys.readouterr().out)["error"]


def test_a_site_that_cannot_serve_says_why_in_one_line(tmp_path: Path) -> None:
    """What a deployed node answers when its data folder is missing or holds no usable subject (an
    unreadable folder: tests/deployment/test_deploy_faults.py)."""
    from fedpir.client.site import SiteDataError, site_data
    from fedpir.run_config import RunSettings

    settings = RunSettings(volume_size=16, modalities="t1")
    with pytest.raises(SiteDataError, match=r"^site h: .*nowhere: no such file or folder; check data-dir in the node co"):
        site_data(settings, tmp_path / "nowhere", "h")
    all_bad = tmp_path / "all-bad"
    rec = write_subject(all_bad / "sub-0", 0, ["t1"], with_mask=False)
    rec.images["t1"].write_bytes(b"")
    write_manifest(SiteManifest("all-bad", [rec]), all_bad / "manifest.json")
    with pytest.raises(SiteDataError, match=r"^site h: no usable subject in .*all-bad, 1 refused \(first: sub-0: t1: "
                                            r"unreadable or truncated file.*\); run `fedpir validate .*all-bad`"):
        site_data(settings, all_bad, "h")


def test_a_cache_larger_than_half_the_machine_is_refused_in_one_line() -> None:
    from fedpir.data.dataset import cache_bytes, check_cache_fits, machine_memory

    assert cache_bytes(2, 4, (16, 16, 16)) == 2 * 5 * 16**3 * 4  # four modalities and the mask, float32
    check_cache_fits(cache_bytes(60, 5, (64,) * 3), 16 * 2**30, "a hospital of 60 at 64^3")
    with pytest.raises(ValueError, match=r"would take 18\.8 GiB in memory, more than 50% of this machine's 16\.0 GiB"):
        check_cache_fits(cache_bytes(60, 4, (256,) * 3), 16 * 2**30, "caching 60 subjects")
    assert machine_memory() > 2**28
