"""Site manifests: which subjects a site has, and which file holds each modality.

A manifest is JSON or CSV and lives in (or points into) a site folder; relative paths are resolved
against the manifest's folder.

JSON::

    {"site": "site-0",
     "subjects": [{"id": "sub-000", "patient_id": "pat-000",
                   "images": {"t1": "sub-000/t1.nii.gz", "t2": "..."},
                   "mask": "sub-000/lesion.nii.gz", "tissue": "sub-000/tissue.nii.gz",
                   "label": 1, "report": "Small hyperintense lesion, left frontal."}]}

CSV: one row per subject, columns ``subject`` plus one column per modality name, and the optional
columns ``patient_id``, ``mask``, ``tissue``, ``label``, ``report`` (empty cell = absent).

A subject is one scan session (a case); ``patient_id`` names the person it belongs to, so that two
sessions of one patient (follow-up timepoints) are one patient for the privacy accounting and the
held-out split. It defaults to the subject id (one session per patient).

Paths may be relative (to the manifest's folder) or absolute, but must resolve, symlinks followed,
inside the site folder or an allowed data root (see :mod:`fedpir.data.confinement`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

#: Modality names fedpir knows. Manifests naming anything else are reported by validation.
KNOWN_MODALITIES: tuple[str, ...] = ("t1", "t1c", "t2", "flair", "pd", "ct")
OPTIONAL_COLUMNS: tuple[str, ...] = ("patient_id", "mask", "tissue", "label", "report")
#: The manifest a site folder holds (JSON, as fedpir writes it; CSV also read).
MANIFEST_FILE = "manifest.json"
MANIFEST_NAMES: tuple[str, ...] = (MANIFEST_FILE, "manifest.csv")
#: The file beside a federation's site folders that names its modality vocabulary (and, for a synthetic
#: federation, its seed, grid and scanners).
FEDERATION_FILE = "federation.json"


@dataclass
class SubjectRecord:
    """One scan session (case) at one site: a file per modality, optional labels, and its patient.

    ``patient_id`` is the person the session belongs to (default: the subject id); all sessions of
    one patient are one unit of privacy (see :mod:`fedpir.data.patients`).
    """

    subject_id: str
    images: dict[str, Path]
    mask: Path | None = None
    tissue: Path | None = None
    label: int | None = None
    report: str | None = None
    patient_id: str = ""

    def __post_init__(self) -> None:
        self.patient_id = self.patient_id or self.subject_id


@dataclass
class SiteManifest:
    """All subjects of one site."""

    site: str
    subjects: list[SubjectRecord] = field(default_factory=list)
    #: The folder the site's files must lie in (the manifest's or the layout's folder; None for a
    #: manifest built in code, whose paths are not confined).
    root: Path | None = None

    @property
    def modalities(self) -> list[str]:
        """Modalities present for at least one subject, in first-seen order."""
        seen: dict[str, None] = {}
        for rec in self.subjects:
            seen.update(dict.fromkeys(rec.images))
        return list(seen)


class ManifestError(ValueError):
    """The manifest itself cannot be read (as opposed to one bad subject in it)."""


def find_manifest(site_dir: Path) -> Path:
    """Return the manifest file of a site folder, or raise ManifestError naming what was looked for."""
    site_dir = Path(site_dir)
    if site_dir.is_file():
        return site_dir
    for name in MANIFEST_NAMES:
        if (site_dir / name).is_file():
            return site_dir / name
    raise ManifestError(f"no manifest in {site_dir} (looked for {', '.join(MANIFEST_NAMES)})")


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None or str(value).strip() == "":
        return None
    path = Path(value)
    return path if path.is_absolute() else base / path


def _label(value: object) -> int | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        return int(value)  # type: ignore[arg-type]
    except ValueError as err:
        raise ManifestError(f"label {value!r} is not an integer") from err


def load_manifest(path: Path) -> SiteManifest:
    """Read a JSON or CSV manifest (a file, or a site folder holding one)."""
    path = find_manifest(Path(path))
    base = path.parent
    try:
        if path.suffix == ".json":
            doc = json.loads(path.read_text())
            rows = doc["subjects"]
            site = str(doc.get("site", base.name))
            subjects = [
                SubjectRecord(
                    subject_id=str(row["id"]),
                    images={m: _resolve(base, p) for m, p in row["images"].items()},  # type: ignore[misc]
                    mask=_resolve(base, row.get("mask")),
                    tissue=_resolve(base, row.get("tissue")),
                    label=_label(row.get("label")),
                    report=row.get("report") or None,
                    patient_id=str(row.get("patient_id") or ""),
                )
                for row in rows
            ]
        elif path.suffix == ".csv":
            with path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                if not reader.fieldnames or "subject" not in reader.fieldnames:
                    raise ManifestError(f"{path}: CSV manifest needs a 'subject' column")
                modality_cols = [c for c in reader.fieldnames if c not in ("subject", *OPTIONAL_COLUMNS)]
                subjects = [
                    SubjectRecord(
                        subject_id=row["subject"],
                        images={m: _resolve(base, row[m]) for m in modality_cols if row.get(m)},  # type: ignore[misc]
                        mask=_resolve(base, row.get("mask")),
                        tissue=_resolve(base, row.get("tissue")),
                        label=_label(row.get("label")),
                        report=row.get("report") or None,
                        patient_id=row.get("patient_id") or "",
                    )
                    for row in reader
                ]
            site = base.name
        else:
            raise ManifestError(f"{path}: manifest must be .json or .csv")
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise ManifestError(f"{path}: malformed manifest ({type(err).__name__}: {err})") from err
    return SiteManifest(site=site, subjects=subjects, root=base)


def write_manifest(manifest: SiteManifest, path: Path) -> Path:
    """Write a JSON manifest with paths relative to its folder where possible."""
    path = Path(path)
    base = path.parent

    def rel(p: Path | None) -> str | None:
        if p is None:
            return None
        try:
            return str(Path(p).relative_to(base))
        except ValueError:
            return str(p)

    doc = {
        "site": manifest.site,
        "subjects": [
            {
                k: v
                for k, v in {
                    "id": rec.subject_id,
                    "patient_id": rec.patient_id if rec.patient_id != rec.subject_id else None,
                    "images": {m: rel(p) for m, p in rec.images.items()},
                    "mask": rel(rec.mask),
                    "tissue": rel(rec.tissue),
                    "label": rec.label,
                    "report": rec.report,
                }.items()
                if v is not None
            }
            for rec in manifest.subjects
        ],
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path
