"""The brain volume sentence of synthetic reports (opt-in), and prompts that are not report templates."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from fedpir.alignment.zeroshot import LESION_PROMPTS, VOLUME_PROMPTS
from fedpir.data.manifest import load_manifest
from fedpir.synthetic.anatomy import Grid
from fedpir.synthetic.federation import generate_federation
from fedpir.synthetic.report_text import (
    LESION_TEMPLATES,
    NORMAL_TEMPLATES,
    VOLUME_NORMAL_TEMPLATES,
    VOLUME_REDUCED_TEMPLATES,
    describe,
    reported_volume_reduced,
)


def test_volume_sentence_follows_the_ratio_and_is_off_by_default() -> None:
    grid = Grid.covering_brain((16, 16, 16))
    empty = np.zeros(grid.shape, dtype=np.uint8)
    plain = describe(empty, grid, np.random.default_rng(0))
    assert plain in NORMAL_TEMPLATES and reported_volume_reduced(plain) is None
    reduced = describe(empty, grid, np.random.default_rng(0), volume_ratio=0.9)
    normal = describe(empty, grid, np.random.default_rng(0), volume_ratio=1.02)
    assert reduced.startswith(plain) and normal.startswith(plain)  # the lesion sentence is unchanged
    assert reported_volume_reduced(reduced) is True and reported_volume_reduced(normal) is False


def test_prompts_are_not_copies_of_report_templates() -> None:
    lesion_templates = [t for wordings in LESION_TEMPLATES.values() for t in wordings]
    templates = [*lesion_templates, *NORMAL_TEMPLATES, *VOLUME_NORMAL_TEMPLATES, *VOLUME_REDUCED_TEMPLATES]
    for prompts in (LESION_PROMPTS, VOLUME_PROMPTS):
        for wordings in prompts.values():
            for prompt in wordings:
                assert prompt.lower() not in {t.lower() for t in templates}, prompt


def test_generated_reports_state_a_smaller_brain_as_reduced(tmp_path: Path) -> None:
    root = generate_federation(tmp_path / "fed", n_sites=1, subjects_per_site=16, shape=(16, 16, 16), seed=2,
                               modality_subsets=[["t1"]], report_brain_volume=True)
    subjects = load_manifest(root / "site-0").subjects
    flags = [reported_volume_reduced(rec.report or "") for rec in subjects]
    assert None not in flags and 0 < sum(flags) < len(flags)
    brain = [float((np.asarray(nib.load(rec.tissue).dataobj) >= 2).sum()) for rec in subjects]  # GM, WM, lesion voxels
    reduced = np.mean([b for b, f in zip(brain, flags, strict=True) if f])
    normal = np.mean([b for b, f in zip(brain, flags, strict=True) if not f])
    assert reduced < 0.95 * normal
    default = generate_federation(tmp_path / "plain", n_sites=1, subjects_per_site=2, shape=(16, 16, 16), seed=2,
                                  modality_subsets=[["t1"]])
    assert all(reported_volume_reduced(r.report or "") is None for r in load_manifest(default / "site-0").subjects)
