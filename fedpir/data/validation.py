"""Check every subject of a site before training: report each bad one with a reason, keep the rest.

Per file: it exists, nibabel reads all of its voxels (a truncated .nii.gz often fails only there),
it is 3D (trailing singleton dimensions are squeezed; a real 4th dimension is rejected) and has no
NaN/Inf voxel. Per subject: at least one modality, only modalities in KNOWN_MODALITIES, all files
(modalities, mask, tissue map) on one voxel grid (same shape, affines equal within AFFINE_TOL), and
a mask, if any, that is a label map, non-empty unless the subject's label is 0 (lesion-free: its
all-zero mask is the ground truth, as the synthetic federation writes it), and every path inside the
site folder or an allowed data root (:mod:`fedpir.data.confinement`; a file outside is not opened).
Per site: subject ids are unique, and exact duplicate scans (identical voxels under two subject ids
or modalities, whatever the file) are reported as warnings; their subjects are then counted as one
patient (:func:`fedpir.data.patients.merge_patients`), so that a patient filed twice is still one
unit of privacy.

A mask must hold 0 and non-negative integer labels. Multi-label segmentations (BraTS -seg: 1, 2,
3/4) are accepted because the dataset binarizes with label > 0 (whole tumour); a mask with
fractional values (a probability map, an interpolated mask) is rejected as non-binary.

Files are only read (nibabel opens them read-only); nothing at the site is modified.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from fedpir.data.confinement import confining_roots, outside_problem
from fedpir.data.layouts import open_site
from fedpir.data.manifest import KNOWN_MODALITIES, SiteManifest, SubjectRecord
from fedpir.data.patients import merge_patients

#: Largest absolute difference allowed between the affines of one subject's files.
AFFINE_TOL = 1e-3


@dataclass(frozen=True)
class SubjectIssue:
    """Why one subject was skipped."""

    subject_id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.subject_id}: {self.reason}"


@dataclass(frozen=True)
class DuplicateScan:
    """One scan (identical voxels) found under several (subject, modality) entries."""

    entries: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        where = ", ".join(f"{subject} {modality}" for subject, modality in self.entries)
        return (f"duplicate scan: identical voxels in {where}; its subjects are counted as one patient "
                "(remove the copy, or give them one patient_id)")


@dataclass
class ValidationReport:
    """Outcome of validating one site: the subjects to train on, the skipped ones (``outside``: those
    skipped for a path outside the site's folders), and the duplicate scans found."""

    site: str
    good: list[SubjectRecord] = field(default_factory=list)
    bad: list[SubjectIssue] = field(default_factory=list)
    outside: list[SubjectIssue] = field(default_factory=list)
    duplicates: list[DuplicateScan] = field(default_factory=list)

    @property
    def n_patients(self) -> int:
        """Distinct patients among the usable subjects."""
        return len({rec.patient_id for rec in self.good})

    def summary(self) -> str:
        """One line: how many subjects (and patients) are usable."""
        total = len(self.good) + len(self.bad)
        return (f"{self.site}: {len(self.good)} of {total} subjects usable ({self.n_patients} patients), "
                f"{len(self.bad)} skipped" + (f", {len(self.duplicates)} duplicate scans" if self.duplicates else ""))

    def to_dict(self) -> dict:
        """Machine-readable form (for `fedpir validate --json`)."""
        return {
            "site": self.site,
            "n_good": len(self.good),
            "n_bad": len(self.bad),
            "n_patients": self.n_patients,
            "good": [rec.subject_id for rec in self.good],
            "patients": {rec.subject_id: rec.patient_id for rec in self.good},
            "bad": [{"subject": i.subject_id, "reason": i.reason} for i in self.bad],
            "outside": [i.subject_id for i in self.outside],
            "duplicates": [[list(e) for e in d.entries] for d in self.duplicates],
        }


class VolumeError(ValueError):
    """One file cannot be used (the message says why)."""


@dataclass(frozen=True)
class Volume:
    """What validation needs of a file: its voxel grid and its values (3D)."""

    affine: np.ndarray
    data: np.ndarray

    @property
    def digest(self) -> str | None:
        """SHA-256 of the voxels (shape included; not of the file, so a re-saved copy matches), or None
        for a constant volume, which says nothing about whose scan it is."""
        if self.data.size == 0 or self.data.min() == self.data.max():
            return None
        return hashlib.sha256(repr(self.data.shape).encode() + self.data.tobytes()).hexdigest()


def read_volume(path: Path | None) -> Volume:
    """Read every voxel of a NIfTI file as a 3D float32 array, or raise VolumeError saying why not."""
    if path is None:
        raise VolumeError("no file given")
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"missing file {path}")
    try:
        img = nib.load(path)
        data = img.get_fdata(dtype=np.float32)
    except Exception as err:  # nibabel raises many types (EOFError, zlib.error, ImageFileError, ...)
        raise VolumeError(f"unreadable or truncated file {path} ({type(err).__name__}: {err})") from err
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"not a 3D volume (shape {tuple(img.shape)}) in {path}")
    if not np.isfinite(data).all():
        raise VolumeError(f"NaN/Inf voxels in {path}")
    return Volume(affine=np.asarray(img.affine), data=data)


def mask_problem(data: np.ndarray, allow_empty: bool) -> str | None:
    """Why a mask array is unusable (empty unless allowed, negative or fractional values), or None."""
    if not data.any():
        return None if allow_empty else "empty mask (no nonzero voxel; allowed only with label 0)"
    if data.min() < 0:
        return f"non-binary mask (negative value {data.min():g})"
    fractional = data[data != np.round(data)]
    if fractional.size:
        return f"non-binary mask (non-integer values such as {fractional.flat[0]:g})"
    return None


def _grid_problem(name: str, vol: Volume, ref_name: str, ref: Volume) -> str | None:
    hint = "(co-register the modalities)"
    if vol.data.shape != ref.data.shape:
        return f"{name}: shape {vol.data.shape} differs from {ref_name} {ref.data.shape} {hint}"
    diff = float(np.abs(vol.affine - ref.affine).max())
    if diff > AFFINE_TOL:
        return f"{name}: affine differs from {ref_name}'s by {diff:.3g} > {AFFINE_TOL:g} {hint}"
    return None


@dataclass
class SubjectCheck:
    """What validating one subject found: its problems, whether a path lies outside the site's
    folders, and the voxel digest of each modality image (for duplicate detection)."""

    problems: list[str] = field(default_factory=list)
    outside: bool = False
    digests: dict[str, str] = field(default_factory=dict)


def check_subject(rec: SubjectRecord, roots: Sequence[Path] = ()) -> SubjectCheck:
    """Every problem of one subject (no problem: usable). Files are named by their modality/role; a
    file outside ``roots`` (see :func:`fedpir.data.confinement.confining_roots`) is not opened."""
    if not rec.images:
        return SubjectCheck(["no modality images"])
    check = SubjectCheck([
        f"unknown modality {m!r} (known: {', '.join(KNOWN_MODALITIES)})"
        for m in rec.images if m not in KNOWN_MODALITIES
    ])
    labels = {"mask": rec.mask, "tissue": rec.tissue}
    files = {**rec.images, **{name: path for name, path in labels.items() if path is not None}}
    volumes: dict[str, Volume] = {}
    for name, path in files.items():
        if path is not None and (why := outside_problem(path, roots)):
            check.problems.append(f"{name}: {why}")
            check.outside = True
            continue
        try:
            volumes[name] = read_volume(path)
        except VolumeError as err:
            check.problems.append(f"{name}: {err}")
    if "mask" in volumes and (why := mask_problem(volumes["mask"].data, allow_empty=rec.label == 0)):
        check.problems.append(f"mask: {why} in {rec.mask}")
    if volumes:
        ref_name, ref = next(iter(volumes.items()))
        check.problems += [p for n, v in volumes.items() if (p := _grid_problem(n, v, ref_name, ref))]
    check.digests = {m: d for m in rec.images if m in volumes and (d := volumes[m].digest)}
    return check


def _duplicates(digests: dict[str, dict[str, str]]) -> list[DuplicateScan]:
    """Scans whose voxel digest appears under more than one (subject, modality)."""
    seen: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for subject, by_modality in digests.items():
        for modality, digest in by_modality.items():
            seen[digest].append((subject, modality))
    return [DuplicateScan(tuple(entries)) for entries in seen.values() if len(entries) > 1]


def validate_site(source: Path | str | SiteManifest, data_roots: Sequence[Path | str] = ()) -> ValidationReport:
    """Validate a site (anything open_site accepts, or a SiteManifest); never raises for a bad subject.

    Files must lie in the site's folder (``manifest.root``) or one of ``data_roots``. Raises
    ManifestError only when the site itself (its manifest or layout) cannot be read.
    """
    manifest = source if isinstance(source, SiteManifest) else open_site(source)
    roots = confining_roots(manifest.root, data_roots)
    counts = Counter(rec.subject_id for rec in manifest.subjects)
    report = ValidationReport(site=manifest.site)
    digests: dict[str, dict[str, str]] = {}
    for rec in manifest.subjects:
        try:
            check = check_subject(rec, roots)
        except Exception as err:  # a subject must never stop the site: report anything unforeseen
            check = SubjectCheck([f"unexpected error while checking ({type(err).__name__}: {err})"])
        if counts[rec.subject_id] > 1:
            check.problems.insert(0, f"duplicate subject id ({counts[rec.subject_id]} entries)")
        else:
            digests[rec.subject_id] = check.digests
        if check.problems:
            issue = SubjectIssue(rec.subject_id, "; ".join(check.problems))
            report.bad.append(issue)
            if check.outside:
                report.outside.append(issue)
        else:
            report.good.append(rec)
    report.duplicates = _duplicates(digests)
    report.good = merge_patients(report.good, ([s for s, _ in d.entries] for d in report.duplicates))
    return report
