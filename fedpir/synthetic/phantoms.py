"""One synthetic patient: partial-volume tissue maps (with an optional lesion) and own tissue parameters.

A phantom renders any pulse sequence as the fraction-weighted sum of each tissue's signal
(``mr_signal``); the scanner (``scanners``) then adds resolution, bias field and noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpir.synthetic.anatomy import Anatomy, Grid, random_warp
from fedpir.synthetic.mr_signal import LITERATURE_1P5T, TISSUES, Sequence, TissueParams

#: Tissue label values of ``tissue.nii.gz``.
TISSUE_LABELS: dict[str, int] = {"background": 0, "csf": 1, "gm": 2, "wm": 3, "lesion": 4}
#: Between-subject spread (log-normal sd) of normal tissue's T1, T2 and PD (a lesion class has its own).
TISSUE_CV = 0.05


@dataclass(frozen=True)
class LesionClass:
    """A kind of lesion: its tissue values and their between-patient spread (log-normal sd), its mean
    radius range (mm; each semi-axis is that times 0.7-1.3) and how many a patient has (inclusive)."""

    name: str
    params: TissueParams
    cv: float
    radius_mm: tuple[float, float]
    count: tuple[int, int]


#: The lesion classes (their names, for the flags, are ``sizes.LESION_CLASS_NAMES``).
#: "A" is the public one: a tumour-sized mass (40-70 mm across, several voxels
#: even on the 8 mm voxels of 24^3 CPU runs) with oedema, dark on T1w and bright on T2w, FLAIR and
#: PD-w (``mr_signal``). Public data may hold it, with masks. "B" is the sites' private target, which
#: no public scan holds: one or two smaller lesions with the opposite signature, short T1 and very
#: short T2 (as the blood products of a haemorrhagic lesion), so bright on T1w (x1.3 white matter) and
#: dark on T2w and FLAIR (x0.4 and x0.3) and a little on PD-w; a model that learnt A does not find it.
LESION_CLASSES: dict[str, LesionClass] = {
    "A": LesionClass("A", LITERATURE_1P5T["lesion"], cv=0.10, radius_mm=(20.0, 35.0), count=(1, 1)),
    "B": LesionClass("B", TissueParams(t1=250.0, t2=40.0, pd=0.85), cv=0.10, radius_mm=(15.0, 25.0), count=(1, 2)),
}


@dataclass
class Phantom:
    """Partial-volume fractions (4, X, Y, Z) of CSF, GM, WM, lesion on a grid of ``spacing`` mm voxels,
    and the subject's tissue values."""

    fractions: np.ndarray
    params: dict[str, TissueParams]
    spacing: float

    @property
    def brain_mask(self) -> np.ndarray:
        """Voxels at least half tissue (bool)."""
        return self.fractions.sum(0) >= 0.5

    @property
    def lesion_mask(self) -> np.ndarray:
        """Voxels at least half lesion (uint8, 0/1)."""
        return (self.fractions[3] >= 0.5).astype(np.uint8)

    @property
    def has_lesion(self) -> bool:
        """Whether the lesion mask is non-empty."""
        return bool(self.lesion_mask.any())

    def tissue_labels(self) -> np.ndarray:
        """Labels (uint8): 0 background, 1 CSF, 2 GM, 3 WM (largest fraction), 4 lesion (mask)."""
        labels = (np.argmax(self.fractions[:3], axis=0) + 1).astype(np.uint8)
        labels[~self.brain_mask] = TISSUE_LABELS["background"]
        labels[self.lesion_mask > 0] = TISSUE_LABELS["lesion"]
        return labels

    def render(self, sequence: Sequence) -> np.ndarray:
        """Noise-free image (float32): sum over tissues of fraction x that tissue's signal."""
        weights = np.array([sequence.signal(self.params[t]) for t in TISSUES], dtype=np.float32)
        return np.tensordot(weights, self.fractions, axes=1).astype(np.float32)


def lesion_fraction(parenchyma: np.ndarray, wm: np.ndarray, grid: Grid, rng: np.random.Generator,
                    radius_mm: tuple[float, float] = LESION_CLASSES["A"].radius_mm) -> np.ndarray:
    """A soft ellipsoidal lesion centred in deep white matter, confined to parenchyma (GM + WM).

    The centre is drawn among voxels that are >= 80% WM (the most-WM voxel if none is), so the
    centre voxel is always lesion and the mask is never empty.
    """
    candidates = np.argwhere(wm >= 0.8)
    if len(candidates) == 0:
        candidates = np.argwhere(wm == wm.max())
    centre = candidates[rng.integers(len(candidates))]
    radius = rng.uniform(*radius_mm)
    semi_axes = np.maximum(radius * rng.uniform(0.7, 1.3, size=3), 0.75 * grid.spacing)
    idx = np.indices(grid.shape, dtype=np.float32)
    offset = (idx - centre.reshape(3, 1, 1, 1)) * grid.spacing / semi_axes.reshape(3, 1, 1, 1)
    r = np.sqrt((offset**2).sum(0))
    soft = np.clip(0.5 + (1.0 - r) * semi_axes.mean() / grid.spacing, 0.0, 1.0)
    return (soft * parenchyma).astype(np.float32)


def sample_phantom(anatomy: Anatomy, grid: Grid, rng: np.random.Generator, *, with_lesion: bool,
                   lesion_class: LesionClass = LESION_CLASSES["A"]) -> Phantom:
    """A random subject: warped anatomy, lesions of ``lesion_class`` if asked, and tissue values
    varied around literature (the lesion's around its class's)."""
    csf, gm, wm = anatomy.fractions(random_warp(grid, rng)).astype(np.float32)
    lesion = np.zeros_like(wm)
    if with_lesion:
        parenchyma = gm + wm
        low, high = lesion_class.count
        for _ in range(low if low == high else int(rng.integers(low, high + 1))):
            lesion = np.maximum(lesion, lesion_fraction(parenchyma, wm, grid, rng, lesion_class.radius_mm))
        keep = 1.0 - np.divide(lesion, parenchyma, out=np.zeros_like(lesion), where=parenchyma > 0)
        gm, wm = gm * keep, wm * keep
    base = {**LITERATURE_1P5T, "lesion": lesion_class.params}
    params = {t: p.varied(rng, lesion_class.cv if t == "lesion" else TISSUE_CV) for t, p in base.items()}
    return Phantom(fractions=np.stack([csf, gm, wm, lesion]), params=params, spacing=grid.spacing)
