"""The lesion classes: public data holds class A only; the sites' class B looks otherwise in every modality."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fedpir.data.manifest import FEDERATION_FILE, MANIFEST_FILE, load_manifest
from fedpir.synthetic.anatomy import Grid, ProceduralAnatomy
from fedpir.synthetic.federation import generate_federation, generate_public_corpus
from fedpir.synthetic.phantoms import LESION_CLASSES, TISSUE_LABELS, sample_phantom
from fedpir.synthetic.report_text import LESION_TEMPLATES
from fedpir.synthetic.scanners import MODALITIES
from fedpir.synthetic.sizes import LESION_CLASS_NAMES

#: Expected sign of (lesion - white matter) per modality: A bright on T2/FLAIR and dark on T1; B the opposite.
SIGNATURE = {"A": {"t1": -1, "t2": 1, "flair": 1}, "B": {"t1": 1, "t2": -1, "flair": -1}}


def _contrast(folder: Path) -> dict[str, float]:
    """Mean lesion intensity over mean white-matter intensity, per modality, over a folder's patients."""
    ratios: dict[str, list[float]] = {m: [] for m in MODALITIES}
    for rec in load_manifest(folder / MANIFEST_FILE).subjects:
        tissue = np.asarray(nib.load(rec.tissue).dataobj)
        if not (tissue == TISSUE_LABELS["lesion"]).any():
            continue
        for m, path in rec.images.items():
            image = np.asarray(nib.load(path).dataobj)
            ratios[m].append(image[tissue == TISSUE_LABELS["lesion"]].mean() / image[tissue == TISSUE_LABELS["wm"]].mean())
    return {m: float(np.mean(r)) for m, r in ratios.items() if r}


@pytest.mark.parametrize("lesion_class", LESION_CLASS_NAMES)
def test_sites_lesions_have_their_class_signature(tmp_path: Path, lesion_class: str) -> None:
    root = generate_federation(tmp_path / lesion_class, n_sites=1, subjects_per_site=4, shape=(24, 24, 24), seed=1,
                               modality_subsets=[list(MODALITIES)], lesion_class=lesion_class)
    assert json.loads((root / FEDERATION_FILE).read_text())["lesion_class"]["name"] == lesion_class
    contrast = _contrast(root / "site-0")
    for modality, sign in SIGNATURE[lesion_class].items():
        assert (contrast[modality] - 1.0) * sign > 0.1, (lesion_class, contrast)
    reports = [rec.report for rec in load_manifest(root / "site-0" / MANIFEST_FILE).subjects if rec.label]
    wordings = [re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(t)), re.IGNORECASE) for t in LESION_TEMPLATES[lesion_class]]
    assert reports and all(any(w.match(r) for w in wordings) for r in reports), reports


def test_public_corpus_holds_class_a_only(tmp_path: Path) -> None:
    contrast = _contrast(generate_public_corpus(tmp_path / "public", subjects=4, shape=(24, 24, 24), seed=1))
    for modality, sign in SIGNATURE["A"].items():
        assert (contrast[modality] - 1.0) * sign > 0.1, contrast


def test_class_b_patients_have_one_or_two_lesions_and_unknown_classes_are_refused(tmp_path: Path) -> None:
    grid = Grid.covering_brain((32, 32, 32))
    counts = {ndimage.label(sample_phantom(ProceduralAnatomy(grid.spacing), grid, np.random.default_rng(s), with_lesion=True,
                                           lesion_class=LESION_CLASSES["B"]).lesion_mask)[1] for s in range(12)}
    assert counts <= {1, 2} and 2 in counts
    with pytest.raises(ValueError, match="lesion_class must be one of A, B"):
        generate_federation(tmp_path / "x", lesion_class="C")
    assert tuple(LESION_TEMPLATES) == tuple(LESION_CLASSES) == LESION_CLASS_NAMES  # one list of classes
