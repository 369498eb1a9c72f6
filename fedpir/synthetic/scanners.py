"""Per-site scanners: protocol timing, slice thickness, bias field, receiver gain, Rician noise, modalities.

A site acquires a phantom in this order: signal equation with the site's TR/TE/TI -> thick slices
-> multiplicative bias field x receiver gain -> Rician noise. Everything a site does differently is
recorded in its ``to_dict()`` (written to ``federation.json``).

Resolution: a site with ``slice_mm`` thicker than the grid spacing acquires slices that thick along
``SLICE_AXIS`` (z): the image is area-averaged to spacing/slice_mm as many slices and interpolated
back (MONAI ``Resize``). The data stay on the shared model grid (one shape, one affine for every
site) so any model loads any site; the lost through-plane detail is the site effect. Writing a
different spacing into the affine instead would make every loader resample, and is not done.
Thickness is in mm, a property of the scanner, so its effect shrinks on coarse grids.

Heterogeneity ``h`` in [0, 1] (:func:`make_scanners`) scales how far the sites' scanners differ: protocol
jitter, noise level, bias-field strength, receiver gain (in log) and slice thickness are drawn as at
h = 1 and pulled towards one shared scanner (the standard protocols, mid-range noise, no bias field,
gain 1000, thin slices) by the factor h; h = 0 gives every site the same scanner. The same draws are
made at every h, so a sweep over h changes only how far apart the sites are.

Default modality subsets (heterogeneous setting), cycled when there are more than four sites::

    site-0: t1, t2        site-1: t1, flair, pd
    site-2: t2, flair     site-3: t1, t2, flair, pd
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from monai.transforms import Resize

from fedpir.synthetic.mr_signal import Sequence
from fedpir.synthetic.phantoms import Phantom

#: Modality vocabulary of the synthetic federation, in its stable order.
MODALITIES: tuple[str, ...] = ("t1", "t2", "flair", "pd")
#: Standard 1.5 T protocols (ms): spin echo for T1w/T2w/PD-w; FLAIR's TI nulls CSF (T1 2569 ms).
STANDARD_PROTOCOLS: dict[str, Sequence] = {
    "t1": Sequence(tr=500.0, te=15.0),
    "t2": Sequence(tr=4000.0, te=100.0),
    "flair": Sequence(tr=9000.0, te=120.0, ti=1700.0),
    "pd": Sequence(tr=4000.0, te=15.0),
}
DEFAULT_SUBSETS: tuple[tuple[str, ...], ...] = (("t1", "t2"), ("t1", "flair", "pd"), ("t2", "flair"), MODALITIES)
#: Slice thickness (mm) of site i is SLICE_MM[i % 4] (0: as thin as the grid); slices along SLICE_AXIS.
SLICE_MM: tuple[float, ...] = (0.0, 8.0, 0.0, 12.0)
SLICE_AXIS = 2
#: Site i gets a noise level (Rician sigma / mean brain signal) and a bias strength from these ranges,
#: spread evenly over the sites and shuffled by the seed.
NOISE_RANGE, BIAS_RANGE = (0.02, 0.08), (0.03, 0.12)
BIAS_DEGREE = 3
#: Site protocol jitter around STANDARD_PROTOCOLS: TR and TE, TI (relative).
TIMING_JITTER, TI_JITTER = 0.10, 0.04
#: The sites' receiver gains are log-uniform over this range; the shared scanner of h = 0 has its geometric middle.
GAIN_RANGE = (500.0, 2000.0)


def bias_field(shape: tuple[int, ...], terms: list[tuple[int, int, int, float]]) -> np.ndarray:
    """exp(sum_c c P_i(x) P_j(y) P_k(z)) over ``terms`` (i, j, k, c), coordinates in [-1, 1] per axis.

    The smooth Legendre-polynomial field of MONAI's RandBiasField (after Van Leemput et al., IEEE TMI
    1999), evaluated from explicit coefficients so that each site's field is recorded and
    reproducible (RandBiasField draws its coefficients internally and does not expose them).
    """
    coeff = np.zeros((BIAS_DEGREE + 1,) * 3)
    for i, j, k, c in terms:
        coeff[i, j, k] = c
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    return np.exp(np.polynomial.legendre.leggrid3d(*axes, coeff)).astype(np.float32)


def rician(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise of sd ``sigma`` per channel (float32).

    The formula of MONAI's RandRicianNoise (Gudbjartsson & Patz, MRM 1995); written with numpy
    because that transform round-trips through MetaTensors and was ~20x slower on our volumes.
    """
    real = image + rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    return np.hypot(real, imag).astype(np.float32)


@dataclass(frozen=True)
class Scanner:
    """One site's scanner and the modalities it acquires."""

    name: str
    modalities: tuple[str, ...]
    protocols: dict[str, Sequence]
    noise: float
    bias_terms: tuple[tuple[int, int, int, float], ...]
    slice_mm: float
    gain: float

    def acquire(self, phantom: Phantom, modality: str, rng: np.random.Generator) -> np.ndarray:
        """The image (float32) this scanner records of ``phantom`` for ``modality``."""
        if modality not in self.modalities:
            raise ValueError(f"{self.name} does not acquire {modality!r} (has {', '.join(self.modalities)})")
        image = self._thick_slices(phantom.render(self.protocols[modality]), phantom.spacing)
        image = image * bias_field(image.shape, list(self.bias_terms)) * self.gain
        sigma = self.noise * float(image[phantom.brain_mask].mean())
        return rician(image, sigma, rng)

    def _thick_slices(self, image: np.ndarray, spacing: float) -> np.ndarray:
        """Area-average into slices ``slice_mm`` thick along SLICE_AXIS, then interpolate back to the grid."""
        low = list(image.shape)
        low[SLICE_AXIS] = max(1, round(image.shape[SLICE_AXIS] * spacing / max(self.slice_mm, spacing)))
        if low[SLICE_AXIS] == image.shape[SLICE_AXIS]:
            return image
        thick = Resize(spatial_size=low, mode="area")(image[None])
        back = Resize(spatial_size=image.shape, mode="trilinear", align_corners=False)(thick)
        return np.asarray(back)[0].astype(np.float32)

    def to_dict(self) -> dict[str, object]:
        """JSON form, as written to federation.json."""
        return {
            "name": self.name,
            "modalities": list(self.modalities),
            "protocols": {m: self.protocols[m].to_dict() for m in self.modalities},
            "noise": self.noise,
            "bias_terms": [list(t) for t in self.bias_terms],
            "slice_mm": self.slice_mm,
            "slice_axis": SLICE_AXIS,
            "gain": self.gain,
        }


def check_subsets(subsets: list[list[str]], n_sites: int) -> list[tuple[str, ...]]:
    """Validate per-site modality lists (one per site, non-empty, known, no repeats); stable order."""
    if len(subsets) != n_sites:
        raise ValueError(f"modality_subsets has {len(subsets)} entries for {n_sites} sites")
    out = []
    for i, subset in enumerate(subsets):
        unknown = sorted(set(subset) - set(MODALITIES))
        if not subset or unknown or len(set(subset)) != len(subset):
            raise ValueError(
                f"site {i}: modalities must be a non-empty list without repeats from {MODALITIES}, got {subset}"
            )
        out.append(tuple(m for m in MODALITIES if m in subset))
    return out


#: Domain randomization of the public corpus: protocol timing within these factors of the standard
#: protocol, TI within TI_SPREAD, slice thickness drawn from PUBLIC_SLICE_MM, noise and bias over
#: twice the sites' ranges (a public scanner is none of the sites').
PUBLIC_TIMING_SPREAD, PUBLIC_TI_SPREAD = 0.35, 0.12
PUBLIC_SLICE_MM: tuple[float, ...] = (0.0, 0.0, 5.0, 8.0, 12.0)


def random_scanner(name: str, rng: np.random.Generator) -> Scanner:
    """A scanner of its own for one public volume: every modality, randomized protocols, noise,
    bias, resolution and gain (domain randomization)."""
    degrees = _bias_degrees()
    return Scanner(
        name=name,
        modalities=MODALITIES,
        protocols={m: STANDARD_PROTOCOLS[m].jittered(rng, PUBLIC_TIMING_SPREAD, PUBLIC_TI_SPREAD) for m in MODALITIES},
        noise=round(float(rng.uniform(0.5 * NOISE_RANGE[0], 2 * NOISE_RANGE[1])), 4),
        bias_terms=tuple((i, j, k, round(float(c), 4)) for (i, j, k), c in
                         zip(degrees, rng.normal(0.0, rng.uniform(0.0, 2 * BIAS_RANGE[1]), size=len(degrees)))),
        slice_mm=float(rng.choice(PUBLIC_SLICE_MM)),
        gain=round(float(np.exp(rng.uniform(np.log(300.0), np.log(3000.0)))), 1),
    )


def _bias_degrees() -> list[tuple[int, int, int]]:
    return [(i, j, k) for i in range(BIAS_DEGREE + 1) for j in range(BIAS_DEGREE + 1 - i)
            for k in range(BIAS_DEGREE + 1 - i - j) if i + j + k > 0]


def _toward(shared: float, value: float, h: float) -> float:
    """``value`` pulled towards ``shared`` by the heterogeneity ``h`` (itself at h = 1)."""
    return value if h == 1.0 else shared + h * (value - shared)


def make_scanners(n_sites: int, subsets: list[tuple[str, ...]], seed: int, heterogeneity: float = 1.0) -> list[Scanner]:
    """``n_sites`` scanners with distinct noise, bias, slice thickness, gain and jittered protocols, as far
    apart as ``heterogeneity`` in [0, 1] says (0: one shared scanner; module docstring)."""
    h = float(heterogeneity)
    if not 0.0 <= h <= 1.0:
        raise ValueError(f"heterogeneity must be in [0, 1], got {heterogeneity}")
    rng = np.random.default_rng([seed, 1_000_003])
    mid_noise, mid_gain = sum(NOISE_RANGE) / 2, float(np.log(GAIN_RANGE).mean())
    noises = rng.permutation(np.linspace(*NOISE_RANGE, n_sites))
    biases = rng.permutation(np.linspace(*BIAS_RANGE, n_sites))
    degrees = _bias_degrees()
    scanners = []
    for s in range(n_sites):
        coeffs = rng.normal(0.0, biases[s], size=len(degrees)) * h
        scanners.append(
            Scanner(
                name=f"site-{s}",
                modalities=subsets[s],
                protocols={m: STANDARD_PROTOCOLS[m].jittered(rng, TIMING_JITTER * h, TI_JITTER * h) for m in MODALITIES},
                noise=round(_toward(mid_noise, float(noises[s]), h), 4),
                bias_terms=tuple((i, j, k, round(float(c), 4) + 0.0) for (i, j, k), c in zip(degrees, coeffs)),
                slice_mm=SLICE_MM[s % len(SLICE_MM)] * h,
                gain=round(float(np.exp(_toward(mid_gain, float(rng.uniform(*np.log(GAIN_RANGE))), h))), 1),
            )
        )
    return scanners
