"""One-line radiology-style report of a phantom, generated from its ground-truth lesion mask.

Side comes from the lesion centroid's x (RAS: x < 0 is left); the lobe-ish region from its y/z in
the brain-centred grid frame, whose origin sits about at MNI (0, -17, 5): frontal anterior of
MNI y = -10, occipital posterior of MNI y = -65, otherwise temporal below MNI z = 0, else parietal.
Size is the lesion's largest extent along the grid axes, in mm.

With ``volume_ratio`` (the subject's parenchyma volume, grey + white matter + lesion, over the
unwarped template's) a second sentence reports the brain volume: reduced below
REDUCED_VOLUME_RATIO (about a third of subjects under the default head-scale spread of
``fedpir.synthetic.anatomy.random_warp``), else normal. It is a global finding that a pooled image
embedding can carry (unlike a small lesion), used by the zero-shot benchmark.
"""

from __future__ import annotations

import numpy as np

from fedpir.synthetic.anatomy import Grid

FRONTAL_Y_MM, OCCIPITAL_Y_MM, TEMPORAL_Z_MM = 7.0, -48.0, -5.0
#: Report wordings by lesion class (the keys of ``fedpir.synthetic.phantoms.LESION_CLASSES``).
LESION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "A": (
        "Hyperintense lesion in the {side} {region} white matter, {size} mm.",
        "{size} mm T2/FLAIR hyperintense lesion, {side} {region} white matter.",
        "Focal white matter lesion, {side} {region}, {size} mm, hyperintense on fluid-sensitive images.",
    ),
    "B": (
        "T1 hyperintense, T2 hypointense lesion in the {side} {region} white matter, {size} mm.",
        "{size} mm focus of blood products, {side} {region} white matter, dark on T2/FLAIR.",
        "Haemorrhagic white matter lesion, {side} {region}, {size} mm, bright on T1-weighted images.",
    ),
}
NORMAL_TEMPLATES: tuple[str, ...] = (
    "No focal lesion.",
    "No focal lesion; normal appearance of the white matter.",
    "No abnormality detected.",
)
REDUCED_VOLUME_RATIO = 0.95
VOLUME_REDUCED_TEMPLATES: tuple[str, ...] = (
    "Generalized parenchymal volume loss.",
    "Brain volume is reduced, with global atrophy.",
    "Diffuse cerebral atrophy.",
)
VOLUME_NORMAL_TEMPLATES: tuple[str, ...] = (
    "Brain volume is normal.",
    "No atrophy; normal brain volume.",
    "Parenchymal volume within normal limits.",
)


def lesion_region(centroid_mm: np.ndarray) -> tuple[str, str]:
    """(side, region) of a world point (mm) in the grid frame."""
    x, y, z = (float(v) for v in centroid_mm)
    side = "left" if x < 0 else "right"
    if y > FRONTAL_Y_MM:
        region = "frontal"
    elif y < OCCIPITAL_Y_MM:
        region = "occipital"
    elif z < TEMPORAL_Z_MM:
        region = "temporal"
    else:
        region = "parietal"
    return side, region


def lesion_size_mm(mask: np.ndarray, grid: Grid) -> int:
    """Largest extent of the mask along a grid axis (mm, rounded)."""
    idx = np.argwhere(mask > 0)
    return int(round(float((idx.max(0) - idx.min(0) + 1).max()) * grid.spacing))


def volume_reduced(volume_ratio: float) -> bool:
    """Whether a parenchyma volume ratio (subject / template) is reported as reduced."""
    return volume_ratio < REDUCED_VOLUME_RATIO


def reported_volume_reduced(report: str) -> bool | None:
    """Whether a report of :func:`describe` states a reduced brain volume (None: it says nothing about it)."""
    if any(t in report for t in VOLUME_REDUCED_TEMPLATES):
        return True
    if any(t in report for t in VOLUME_NORMAL_TEMPLATES):
        return False
    return None


def describe(mask: np.ndarray, grid: Grid, rng: np.random.Generator, volume_ratio: float | None = None,
             lesion_class: str = "A") -> str:
    """Report text for a subject with lesion ``mask`` (all zero: a normal study) of ``lesion_class``,
    plus a brain volume sentence when ``volume_ratio`` is given (see the module docstring); wording
    varies by ``rng``."""
    if not mask.any():
        text = NORMAL_TEMPLATES[rng.integers(len(NORMAL_TEMPLATES))]
    else:
        centroid_vox = np.argwhere(mask > 0).mean(0)
        centroid_mm = grid.affine[:3, :3] @ centroid_vox + grid.affine[:3, 3]
        side, region = lesion_region(centroid_mm)
        templates = LESION_TEMPLATES[lesion_class]
        text = templates[rng.integers(len(templates))]
        text = text.format(side=side, region=region, size=lesion_size_mm(mask, grid))
        text = text[0].upper() + text[1:]
    if volume_ratio is not None:
        volume = VOLUME_REDUCED_TEMPLATES if volume_reduced(volume_ratio) else VOLUME_NORMAL_TEMPLATES
        text = f"{text} {volume[rng.integers(len(volume))]}"
    return text
