"""Write a synthetic hospital federation to disk: NIfTI per subject, a manifest per site, federation.json.

Layout::

    OUT/federation.json                 seed, grid, modality vocabulary, anatomy, per-site scanners
    OUT/site-0/manifest.json            fedpir.data.manifest format
    OUT/site-0/sub-000/t1.nii.gz        float32, one file per modality the site acquires
    OUT/site-0/sub-000/lesion.nii.gz    uint8 binary lesion mask (all zero when absent)
    OUT/site-0/sub-000/tissue.nii.gz    uint8 labels 0 background, 1 CSF, 2 GM, 3 WM, 4 lesion

Subject ids are unique across the federation. round(n/3) of a site's n subjects have no lesion
(label 0); the rest have one (label 1). Everything is a function of the seed: subject anatomy and
noise depend only on (seed, site, subject, modality), so the homogeneous and heterogeneous settings
with one seed hold the same patients, and files are byte-identical between runs (gzip mtime 0).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from fedpir.data.manifest import FEDERATION_FILE, MANIFEST_FILE, SiteManifest, SubjectRecord, write_manifest
from fedpir.synthetic.anatomy import Anatomy, Grid, make_anatomy
from fedpir.synthetic.mr_signal import LITERATURE_1P5T
from fedpir.synthetic.phantoms import LESION_CLASSES, TISSUE_LABELS, LesionClass, sample_phantom
from fedpir.synthetic.report_text import describe
from fedpir.synthetic.scanners import (
    DEFAULT_SUBSETS,
    MODALITIES,
    Scanner,
    check_subsets,
    make_scanners,
    random_scanner,
)
from fedpir.synthetic.sizes import site_sizes

FORMAT_VERSION = 1
#: Share of each site's subjects without a lesion.
NO_LESION_SHARE = 1.0 / 3.0


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write ``data`` (its dtype kept) as .nii.gz in mm, scanner-anatomical space, gzip mtime 0."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
    return path


def _lesion_flags(seed: int, site: int, n: int) -> np.ndarray:
    """Which of a site's n subjects get a lesion: exactly round(n * NO_LESION_SHARE) do not, shuffled."""
    flags = np.arange(n) >= round(n * NO_LESION_SHARE)
    return np.random.default_rng([seed, site, 2_000_003]).permutation(flags)


def _check_args(seed: int, out_dir: Path) -> None:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; choose a new output folder")


def _parenchyma(fractions: np.ndarray) -> float:
    """Sum over voxels of the non-CSF tissue fractions (GM, WM and lesion, when present)."""
    return float(fractions[1:].sum())


def _write_subject(
    scanner: Scanner, body: Anatomy, grid: Grid, with_lesion: bool, keys: tuple[int, int, int], sub_dir: Path,
    template_parenchyma: float | None = None, lesion_class: LesionClass = LESION_CLASSES["A"],
) -> SubjectRecord:
    """Simulate and write one subject; ``keys`` = (seed, site, global subject index) seed its streams."""
    rng = np.random.default_rng(keys)
    phantom = sample_phantom(body, grid, rng, with_lesion=with_lesion, lesion_class=lesion_class)
    sub_dir.mkdir(parents=True)
    images = {}
    for m in scanner.modalities:
        noise_rng = np.random.default_rng([*keys, 100 + MODALITIES.index(m)])
        images[m] = save_nifti(scanner.acquire(phantom, m, noise_rng), grid.affine, sub_dir / f"{m}.nii.gz")
    mask = phantom.lesion_mask
    return SubjectRecord(
        subject_id=sub_dir.name,
        images=images,
        mask=save_nifti(mask, grid.affine, sub_dir / "lesion.nii.gz"),
        tissue=save_nifti(phantom.tissue_labels(), grid.affine, sub_dir / "tissue.nii.gz"),
        label=int(mask.any()),
        report=describe(mask, grid, rng, volume_ratio=None if template_parenchyma is None
                        else _parenchyma(phantom.fractions) / template_parenchyma, lesion_class=lesion_class.name),
    )


#: Seed-space tag of the public corpus: its anatomy and noise streams are disjoint from every site's.
PUBLIC_STREAM = 7_000_001


def generate_public_corpus(
    out_dir: Path, *, subjects: int = 48, shape: tuple[int, int, int] = (24, 24, 24), seed: int = 0,
    anatomy: str = "auto", progress: bool = False,
) -> Path:
    """A public corpus for warm starts: one folder of ``subjects`` patients in every modality, each
    volume set from a scanner of its own (:func:`random_scanner`, domain randomization), anatomy
    and noise from random streams disjoint from every site's, masks of the public lesion class "A"
    as labels (never the sites' private class "B", see ``phantoms.LESION_CLASSES``). Written like a
    site (``manifest.json``), so any loader reads it; returns ``out_dir``."""
    out_dir = Path(out_dir)
    site_sizes(subjects, 1)
    _check_args(seed, out_dir)
    grid = Grid.covering_brain(tuple(shape))  # type: ignore[arg-type]
    body = make_anatomy(anatomy, grid)
    records = []
    for j, lesion in enumerate(tqdm(_lesion_flags(seed, PUBLIC_STREAM, subjects), desc="public corpus",
                                    unit="subject", disable=not progress)):
        keys = (seed, PUBLIC_STREAM, j)
        scanner = random_scanner(f"public-{j:03d}", np.random.default_rng([*keys, 1]))
        records.append(_write_subject(scanner, body, grid, bool(lesion), keys, out_dir / f"pub-{j:03d}"))
    write_manifest(SiteManifest(site="public", subjects=records), out_dir / MANIFEST_FILE)
    return out_dir


#: Folder (under a federation) of the per-site evaluation sets in every modality.
EVAL_DIR = "eval"
#: Seed-space tag of the evaluation sets: patients disjoint from every site's own.
EVAL_STREAM = 9_000_011


def _write_eval_set(folder: Path, scanner: Scanner, body: Anatomy, grid: Grid, keys: tuple[int, int], n: int,
                    lesion_class: LesionClass) -> None:
    """``n`` further patients of a site, rendered in every modality by its scanner."""
    seed, site = keys
    records = [_write_subject(scanner, body, grid, bool(lesion), (seed, EVAL_STREAM + site, j), folder / f"eval-{j:03d}",
                              lesion_class=lesion_class)
               for j, lesion in enumerate(_lesion_flags(seed, EVAL_STREAM + site, n))]
    write_manifest(SiteManifest(site=f"{scanner.name}-eval", subjects=records), folder / MANIFEST_FILE)


def generate_federation(
    out_dir: Path,
    *,
    n_sites: int = 4,
    subjects_per_site: int | Sequence[int] = 24,
    shape: tuple[int, int, int] = (48, 48, 48),
    seed: int = 0,
    anatomy: str = "auto",
    modality_subsets: list[list[str]] | None = None,
    eval_subjects: int = 0,
    progress: bool = False,
    report_brain_volume: bool = False,
    lesion_class: str = "A",
    heterogeneity: float = 1.0,
) -> Path:
    """Simulate ``n_sites`` hospitals of ``subjects_per_site`` patients each (a list: the sizes of the
    sites, cycled; see :func:`fedpir.run_config.site_sizes`) and write them under ``out_dir``.

    ``eval_subjects`` > 0 also writes, per site, a simulation-only evaluation set
    ``out_dir/eval/<site>``: that many further patients rendered in *every* modality of the
    vocabulary by the site's scanner, so that a site's model can be scored on modalities it never
    trained on. No site reads it.

    ``anatomy``: "icbm" (nilearn's ICBM152 2009a maps), "procedural" (ellipsoids) or "auto" (ICBM when
    available). ``modality_subsets``: one modality list per site (default: DEFAULT_SUBSETS cycled);
    give every site all of MODALITIES for the homogeneous setting. ``report_brain_volume``: reports
    also state whether the brain volume is reduced (``fedpir.synthetic.report_text``; off by
    default, which keeps the reports of earlier versions). ``lesion_class``: the sites' lesions, a
    key of ``phantoms.LESION_CLASSES``: "A" (the class public data holds) or "B" (the private
    target that `fedpir simulate` uses). ``heterogeneity`` in [0, 1]: how far the sites' scanners differ
    (:func:`fedpir.synthetic.scanners.make_scanners`; 0: one shared scanner). Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    sizes = site_sizes(subjects_per_site, n_sites)
    if lesion_class not in LESION_CLASSES:
        raise ValueError(f"lesion_class must be one of {', '.join(LESION_CLASSES)}, got {lesion_class!r}")
    lesions = LESION_CLASSES[lesion_class]
    _check_args(seed, out_dir)
    grid = Grid.covering_brain(tuple(shape))  # type: ignore[arg-type]
    if modality_subsets is None:
        modality_subsets = [list(DEFAULT_SUBSETS[s % len(DEFAULT_SUBSETS)]) for s in range(n_sites)]
    scanners = make_scanners(n_sites, check_subsets(modality_subsets, n_sites), seed, heterogeneity)
    body = make_anatomy(anatomy, grid)
    template_parenchyma = _parenchyma(body.fractions(grid.world_coordinates())) if report_brain_volume else None
    out_dir.mkdir(parents=True, exist_ok=True)

    bar = tqdm(total=sum(sizes), desc="synth", unit="subject", disable=not progress)
    for s, scanner in enumerate(scanners):
        site_dir = out_dir / scanner.name
        records = []
        for j, lesion in enumerate(_lesion_flags(seed, s, sizes[s])):
            index = sum(sizes[:s]) + j
            sub_dir = site_dir / f"sub-{index:03d}"
            records.append(_write_subject(scanner, body, grid, bool(lesion), (seed, s, index), sub_dir, template_parenchyma,
                                          lesions))
            bar.update()
        write_manifest(SiteManifest(site=scanner.name, subjects=records), site_dir / MANIFEST_FILE)
        if eval_subjects:
            _write_eval_set(out_dir / EVAL_DIR / scanner.name, replace(scanner, modalities=MODALITIES), body, grid,
                            (seed, s), eval_subjects, lesions)
    bar.close()

    meta = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "heterogeneity": heterogeneity,
        "shape": list(grid.shape),
        "spacing_mm": grid.spacing,
        "affine": np.round(grid.affine, 6).tolist(),
        "anatomy": body.name,
        "lesion_class": asdict(lesions),
        "modalities": [m for m in MODALITIES if any(m in sc.modalities for sc in scanners)],
        "subjects_per_site": sizes,
        "tissue_labels": TISSUE_LABELS,
        "tissue_params_1p5t": {t: asdict(p) for t, p in LITERATURE_1P5T.items()},
        "sites": [sc.to_dict() for sc in scanners],
    }
    (out_dir / FEDERATION_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out_dir
