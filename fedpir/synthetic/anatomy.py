"""Normal brain anatomy for the phantoms: the model grid, CSF/GM/WM partial-volume maps, subject warps.

An anatomy maps template points (mm, RAS, origin at the centre of the brain's bounding box) to the
partial-volume fractions of CSF, GM and WM there. A subject is the anatomy sampled through its own
random warp (head size, position, smooth nonlinear displacement), so subjects differ while staying
roughly in correspondence on the shared grid (volumes are "registered to a common space").

- ``IcbmAnatomy``: the ICBM 2009a nonlinear symmetric template shipped inside nilearn's wheel
  (V. Fonov et al., NeuroImage 54(1):313-327, 2011). GM and WM are its probability maps; the brain
  mask is the skull-stripped T1 template above 0.2 of its maximum (as nilearn's
  ``load_mni152_brain_mask``) grown by OUTER_CSF_MM, because skull stripping removed most of the
  subarachnoid CSF; CSF = mask - GM - WM, clipped to [0, 1].
- ``ProceduralAnatomy``: nested ellipsoids (outer CSF, cortical ribbon, WM core, lateral ventricles,
  deep grey nuclei). No data needed: the fallback when nilearn's files are missing, and fast tests.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

#: Field of view (mm, x/y/z = left-right, posterior-anterior, inferior-superior) that the grid covers:
#: the ICBM brain's bounding box (145 x 181 x 155 mm) plus a margin for subject warps.
BRAIN_FOV_MM: tuple[float, float, float] = (165.0, 200.0, 175.0)
#: Thickness (mm) of the CSF shell added around the skull-stripped ICBM brain.
OUTER_CSF_MM = 3
ANATOMIES: tuple[str, ...] = ("auto", "icbm", "procedural")
_ICBM_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


@dataclass(frozen=True)
class Grid:
    """The one voxel grid all sites share: isotropic spacing, RAS axes, world origin at its centre."""

    shape: tuple[int, int, int]
    spacing: float

    @classmethod
    def covering_brain(cls, shape: tuple[int, int, int]) -> Grid:
        """The grid of ``shape`` whose isotropic spacing makes it cover BRAIN_FOV_MM."""
        if len(shape) != 3 or any(int(n) < 16 for n in shape):
            raise ValueError(f"shape must be three sizes >= 16, got {shape}")
        shape = tuple(int(n) for n in shape)  # type: ignore[assignment]
        spacing = max(fov / n for fov, n in zip(BRAIN_FOV_MM, shape))
        return cls(shape=shape, spacing=round(spacing, 4))

    @property
    def affine(self) -> np.ndarray:
        """Voxel-to-world (mm) affine: diagonal spacing, voxel centre of the grid at (0, 0, 0)."""
        aff = np.diag([self.spacing] * 3 + [1.0])
        aff[:3, 3] = [-self.spacing * (n - 1) / 2.0 for n in self.shape]
        return aff

    def world_coordinates(self) -> np.ndarray:
        """World position (mm) of every voxel, shape (3, X, Y, Z)."""
        axes = [self.spacing * (np.arange(n) - (n - 1) / 2.0) for n in self.shape]
        return np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)


class Anatomy(Protocol):
    """Tissue fractions at template points."""

    name: str

    def fractions(self, points: np.ndarray) -> np.ndarray:
        """CSF, GM, WM fractions, shape (3, *points.shape[1:]), at points (3, ...) in mm."""
        ...


def icbm_data_dir() -> Path | None:
    """nilearn's bundled data folder if it holds the three ICBM files, else None (nilearn not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    ok = all((folder / _ICBM_FILE.format(k)).is_file() for k in ("t1", "gm", "wm"))
    return folder if ok else None


@lru_cache(maxsize=4)
def _icbm_maps(folder: Path, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """CSF/GM/WM maps (3, ...) cropped to the brain and smoothed to ``spacing``, and their centre voxel.

    The Gaussian (FWHM = spacing) stands in for the partial-volume averaging of a voxel that size, so
    sampling the 1 mm maps at the coarse grid does not alias. Cached: done once per federation.
    """
    imgs = {k: nib.load(folder / _ICBM_FILE.format(k)) for k in ("t1", "gm", "wm")}
    if not np.allclose(imgs["t1"].affine[:3, :3], np.eye(3)):
        raise ValueError("expected the 1 mm RAS ICBM 2009a template")
    t1 = np.asarray(imgs["t1"].dataobj, dtype=np.float32)
    brain = t1 > 0.2 * t1.max()
    idx = np.argwhere(brain)
    lo, hi = np.maximum(idx.min(0) - 8, 0), np.minimum(idx.max(0) + 9, brain.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    mask = ndimage.binary_dilation(brain[crop], iterations=OUTER_CSF_MM).astype(np.float32)
    gm, wm = (np.asarray(imgs[k].dataobj, dtype=np.float32)[crop] / 255.0 * mask for k in ("gm", "wm"))
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    sigma = max(spacing - 1.0, 0.0) / 2.355
    maps = np.stack([ndimage.gaussian_filter(m, sigma) if sigma else m for m in (csf, gm, wm)])
    centre = (idx.min(0) + idx.max(0)) / 2.0 - lo
    return maps.astype(np.float32), centre


class IcbmAnatomy:
    """ICBM 2009a template anatomy (see the module docstring)."""

    name = "icbm"

    def __init__(self, spacing: float, folder: Path | None = None) -> None:
        folder = folder or icbm_data_dir()
        if folder is None:
            raise FileNotFoundError("nilearn's bundled ICBM152 2009a files were not found; use anatomy='procedural'")
        self._maps, self._centre = _icbm_maps(Path(folder), float(spacing))

    def fractions(self, points: np.ndarray) -> np.ndarray:
        """Trilinear samples of the smoothed maps (1 mm template voxels = template mm), zero outside.

        torch's grid_sample samples the three maps in one pass (about 2x faster than three scipy
        map_coordinates calls); its grid is (x, y, z) -> (W, H, D) in [-1, 1], hence the flip.
        """
        voxels = points.reshape(3, -1) + self._centre[:, None]
        extent = np.asarray(self._maps.shape[1:], dtype=np.float32)[:, None] - 1.0
        grid = np.ascontiguousarray((2.0 * voxels / extent - 1.0)[::-1].T, dtype=np.float32)
        out = torch.nn.functional.grid_sample(
            torch.from_numpy(self._maps)[None], torch.from_numpy(grid).reshape(1, 1, 1, -1, 3),
            mode="bilinear", padding_mode="zeros", align_corners=True,
        )
        return out.reshape(3, *points.shape[1:]).numpy()


def _ellipsoid(points: np.ndarray, centre: tuple[float, ...], semi_axes: tuple[float, ...], ramp: float) -> np.ndarray:
    """Partial-volume fraction of a soft ellipsoid: a linear ramp one ``ramp`` (mm) wide at its surface."""
    c = np.asarray(centre, dtype=np.float32).reshape(3, *([1] * (points.ndim - 1)))
    a = np.asarray(semi_axes, dtype=np.float32).reshape(c.shape)
    r = np.sqrt((((points - c) / a) ** 2).sum(0))
    return np.clip(0.5 + (1.0 - r) * min(semi_axes) / ramp, 0.0, 1.0)


class ProceduralAnatomy:
    """Ellipsoid brain (see the module docstring); ``spacing`` sets the partial-volume ramp width."""

    name = "procedural"
    semi_axes: tuple[float, float, float] = (68.0, 86.0, 72.0)

    def __init__(self, spacing: float) -> None:
        self._ramp = float(spacing)

    def fractions(self, points: np.ndarray) -> np.ndarray:
        """CSF/GM/WM from nested ellipsoids, ventricles carved into WM, nuclei set into WM."""
        ax, r = np.asarray(self.semi_axes), self._ramp
        brain = _ellipsoid(points, (0, 0, 0), tuple(ax), r)
        inner = np.minimum(_ellipsoid(points, (0, 0, 0), tuple(0.95 * ax), r), brain)
        core = np.minimum(_ellipsoid(points, (0, 0, 0), tuple(0.78 * ax), r), inner)
        vent = np.maximum(*(_ellipsoid(points, (s * 10.0, 0.0, 12.0), (7.0, 24.0, 10.0), r) for s in (-1, 1)))
        nuclei = np.maximum(*(_ellipsoid(points, (s * 20.0, -5.0, -2.0), (9.0, 15.0, 10.0), r) for s in (-1, 1)))
        vent = vent * core
        nuclei = nuclei * (core - vent)
        return np.stack([brain - inner + vent, inner - core + nuclei, core - vent - nuclei])


def make_anatomy(kind: str, grid: Grid) -> Anatomy:
    """The anatomy named ``kind``; "auto" is ICBM when nilearn's files are present, else procedural."""
    if kind not in ANATOMIES:
        raise ValueError(f"anatomy must be one of {ANATOMIES}, got {kind!r}")
    if kind == "procedural" or (kind == "auto" and icbm_data_dir() is None):
        return ProceduralAnatomy(grid.spacing)
    return IcbmAnatomy(grid.spacing)


def random_warp(
    grid: Grid,
    rng: np.random.Generator,
    *,
    scale_sd: float = 0.04,
    shift_sd_mm: float = 2.0,
    displacement_sd_mm: float = 3.0,
    control_spacing_mm: float = 40.0,
) -> np.ndarray:
    """Template point (mm) seen by each voxel of a random subject, shape (3, X, Y, Z).

    Global head scale and shift, plus a smooth displacement: Gaussian displacements at control
    points ``control_spacing_mm`` apart, interpolated with cubic splines (a free-form deformation).
    Written here rather than with MONAI's Rand3DElastic because that one's magnitude is in voxels of
    a Gaussian-smoothed noise field, so the same settings would warp by different millimetres on
    different grid sizes; here every size is in mm.
    """
    world = grid.world_coordinates()
    scale = math.exp(rng.normal(0.0, scale_sd))
    shift = rng.normal(0.0, shift_sd_mm, size=3).astype(np.float32).reshape(3, 1, 1, 1)
    n_ctrl = [max(2, math.ceil(n * grid.spacing / control_spacing_mm) + 1) for n in grid.shape]
    ctrl = rng.normal(0.0, displacement_sd_mm, size=(3, *n_ctrl))
    # Spline interpolation is linear and separable: zooming the identity along one axis gives that
    # axis's (n, m) interpolation matrix, and three small matrix products replace a 3D zoom (10x faster).
    basis = [ndimage.zoom(np.eye(m), (n / m, 1), order=3, mode="nearest") for n, m in zip(grid.shape, n_ctrl)]
    disp = np.einsum("ia,jb,kc,dabc->dijk", *basis, ctrl, optimize=True).astype(np.float32)
    return (world - shift) / scale + disp
