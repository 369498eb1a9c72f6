"""Read a site folder into a SiteManifest: a manifest file, or a BraTS-style or IXI-style layout.

BraTS-style: one folder per case, one file per modality, the modality as the name's last part::

    site/BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz   (2023: -t1n -t1c -t2w -t2f -seg)
    site/BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz  (older: _t1 _t1ce _t2 _flair _seg)

The segmentation becomes the subject's mask (its labels are kept; the dataset uses label > 0, i.e.
the whole tumour). Files with other suffixes in a case folder are ignored. A BraTS 2023 case id is
``BraTS-<cohort>-<patient>-<timepoint>``: the cases ``BraTS-GLI-00000-000`` and ``-001`` are two
timepoints of patient ``BraTS-GLI-00000``. Older case ids (``BraTS20_Training_001``) are one
patient each.

IXI-style: files named ``IXI<number>-<Site>-<number>-<MOD>.nii.gz`` with MOD in T1, T2, PD, either
all in the site folder or in one sub-folder per modality (``T1/``, ``IXI-T1/``, ...; there the
``-<MOD>`` suffix may be left out and the folder name gives the modality). The subject id is the
``IXI###-Site-####`` prefix, and each subject is its own patient. Other IXI modalities (MRA, DTI)
are ignored. Note that the raw IXI T1 is not co-registered with T2/PD: validation rejects such
subjects until they are registered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from fedpir.data.manifest import FEDERATION_FILE, MANIFEST_NAMES, ManifestError, SiteManifest, SubjectRecord, load_manifest

NIFTI_SUFFIX = r"\.nii(?:\.gz)?$"

#: BraTS file suffix -> fedpir modality name ("mask" for the segmentation).
BRATS_NAMES: dict[str, str] = {
    "t1n": "t1", "t1c": "t1c", "t2w": "t2", "t2f": "flair", "seg": "mask",  # BraTS 2023
    "t1": "t1", "t1ce": "t1c", "t2": "t2", "flair": "flair",  # BraTS 2018-2021
}
#: IXI modality tag -> fedpir modality name.
IXI_NAMES: dict[str, str] = {"t1": "t1", "t2": "t2", "pd": "pd"}

_BRATS_FILE = re.compile(r"^.+[-_](?P<tag>" + "|".join(sorted(BRATS_NAMES, key=len, reverse=True))
                         + ")" + NIFTI_SUFFIX, re.IGNORECASE)
_IXI_FILE = re.compile(r"^(?P<subject>IXI\d+-[A-Za-z]+-\d+)(?:-(?P<tag>[A-Za-z0-9]+))?" + NIFTI_SUFFIX)
_BRATS_TIMEPOINT = re.compile(r"^(?P<patient>BraTS-[A-Za-z]+-\d+)-\d+$")
_IXI_FOLDER = re.compile(r"^(?:IXI-)?(?P<tag>[A-Za-z0-9]+)$", re.IGNORECASE)


def _niftis(folder: Path) -> Iterator[Path]:
    return (p for p in sorted(folder.iterdir()) if p.is_file() and re.search(NIFTI_SUFFIX, p.name))


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def _ixi_files(site_dir: Path) -> Iterator[tuple[str, str, Path]]:
    """(subject, modality tag, path) of every IXI-named file in the site folder or one level below."""
    for folder in (site_dir, *_subfolders(site_dir)):
        folder_tag = _IXI_FOLDER.match(folder.name) if folder != site_dir else None
        for path in _niftis(folder):
            match = _IXI_FILE.match(path.name)
            tag = match and (match["tag"] or (folder_tag and folder_tag["tag"]))
            if match and tag:
                yield match["subject"], tag.lower(), path


def read_ixi(site_dir: Path) -> SiteManifest:
    """SiteManifest of an IXI-style folder (flat files, or one sub-folder per modality)."""
    site_dir = Path(site_dir)
    subjects: dict[str, SubjectRecord] = {}
    for subject, tag, path in _ixi_files(site_dir):
        if tag in IXI_NAMES:
            rec = subjects.setdefault(subject, SubjectRecord(subject_id=subject, images={}))
            rec.images[IXI_NAMES[tag]] = path
    if not subjects:
        raise ManifestError(f"{site_dir}: no IXI-style files (IXI###-Site-####-T1/T2/PD.nii.gz)")
    return SiteManifest(site=site_dir.name, subjects=[subjects[k] for k in sorted(subjects)], root=site_dir)


def _brats_cases(site_dir: Path) -> Iterator[tuple[Path, list[tuple[str, Path]]]]:
    """(case folder, [(BraTS tag, path)]) of every sub-folder that holds NIfTI files."""
    for case in _subfolders(site_dir):
        files = list(_niftis(case))
        if files:
            tagged = [(m["tag"].lower(), p) for p in files if (m := _BRATS_FILE.match(p.name))]
            yield case, tagged


def brats_patient(case: str) -> str:
    """The patient of a BraTS case id: ``BraTS-GLI-00000-001`` -> ``BraTS-GLI-00000``; other ids are
    their own patient."""
    match = _BRATS_TIMEPOINT.match(case)
    return match["patient"] if match else case


def read_brats(site_dir: Path) -> SiteManifest:
    """SiteManifest of a BraTS-style folder (one sub-folder per case; 2023 or older file naming).

    A case folder holding NIfTI files none of which has a BraTS suffix becomes a subject without
    modalities, so that validation reports it instead of it vanishing silently.
    """
    site_dir = Path(site_dir)
    subjects = []
    for case, tagged in _brats_cases(site_dir):
        rec = SubjectRecord(subject_id=case.name, images={}, patient_id=brats_patient(case.name))
        for tag, path in tagged:
            name = BRATS_NAMES[tag]
            if name == "mask":
                rec.mask = path
            else:
                rec.images[name] = path
        subjects.append(rec)
    if not subjects:
        raise ManifestError(f"{site_dir}: no BraTS-style case folders (<case>/<case>-t1n.nii.gz, ...)")
    return SiteManifest(site=site_dir.name, subjects=subjects, root=site_dir)


def _is_ixi(site_dir: Path) -> bool:
    return any(tag in IXI_NAMES for _, tag, _ in _ixi_files(site_dir))


def _is_brats(site_dir: Path) -> bool:
    return any(tagged for _, tagged in _brats_cases(site_dir))


def open_site(path: Path | str) -> SiteManifest:
    """SiteManifest of a manifest file, a folder holding manifest.json/.csv, or a BraTS/IXI folder.

    Raises ManifestError when the path does not exist or matches none of these.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: no such file or folder")
    if path.is_file() or any((path / name).is_file() for name in MANIFEST_NAMES):
        return load_manifest(path)
    if _is_ixi(path):  # first: IXI names would also match BraTS's suffixes
        return read_ixi(path)
    if _is_brats(path):
        return read_brats(path)
    raise ManifestError(
        f"{path}: not a site folder: no {' or '.join(MANIFEST_NAMES)}, no BraTS-style case folders "
        "(<case>/<case>-t1n.nii.gz or <case>/<case>_t1.nii.gz), no IXI-style files "
        "(IXI###-Site-####-T1.nii.gz)"
    )


def site_vocabulary(site: Path, given: str | None = None) -> list[str]:
    """The modality vocabulary of a site: ``given`` (a comma list), else its federation's
    (:data:`~fedpir.data.manifest.FEDERATION_FILE` beside the site folder), else the site's own."""
    if given:
        return [m.strip() for m in given.split(",") if m.strip()]
    federation = (site if site.is_dir() else site.parent).parent / FEDERATION_FILE
    if federation.is_file():
        return list(json.loads(federation.read_text())["modalities"])
    return open_site(site).modalities
