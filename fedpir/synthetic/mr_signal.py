"""MR physics of the phantoms: literature tissue parameters and the signal equations.

Tissue values are those of the BrainWeb simulator at 1.5 T (relaxation times in ms, proton density
relative to CSF), from

- R.K.-S. Kwan, A.C. Evans, G.B. Pike, "MRI simulation-based evaluation of image-processing and
  classification methods", IEEE Trans. Med. Imaging 18(11):1085-1097, 1999;
- D.L. Collins, A.P. Zijdenbos, V. Kollokian, J.G. Sled, N.J. Kabani, C.J. Holmes, A.C. Evans,
  "Design and construction of a realistic digital brain phantom", IEEE Trans. Med. Imaging
  17(3):463-468, 1998;
- the BrainWeb tissue table (brainweb.bic.mni.mcgill.ca, "tissue_mr_parameters"): CSF 2569/329/1.0,
  grey matter 833/83/0.86, white matter 500/70/0.77, MS lesion 752/237/0.76 (T1/T2/PD).

The lesion is tumour-like (a mass with vasogenic oedema): much longer T1 and T2 than white matter
and a raised proton density (T1 1600 ms, T2 400 ms, PD 0.95; BrainWeb's MS-lesion values, 752/237/0.76,
are close to white matter on T1w and PD-w). So it shows in every modality with a different contrast:
darker than grey matter on T1w, bright on T2w, FLAIR and PD-w. That is what lets a representation
learnt to be invariant across modalities carry the lesion from one modality to another. (At T1
1200 ms / T2 200 ms the lesion matched grey matter on T1w; a T1 much longer than 1600 ms would
approach CSF's and be nulled by FLAIR.)

Each modality is a fixed function of (PD, T1, T2): the paper's population-static mapping g_m.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: Tissue classes of a phantom, in the order of its fraction maps.
TISSUES: tuple[str, ...] = ("csf", "gm", "wm", "lesion")


@dataclass(frozen=True)
class TissueParams:
    """Relaxation times (ms) and relative proton density of one tissue."""

    t1: float
    t2: float
    pd: float

    def varied(self, rng: np.random.Generator, cv: float) -> TissueParams:
        """A subject's own values: each parameter times a log-normal factor with spread ``cv``."""
        f = np.exp(rng.normal(0.0, cv, size=3))
        return TissueParams(t1=self.t1 * f[0], t2=self.t2 * f[1], pd=self.pd * f[2])


#: BrainWeb 1.5 T values (see the module docstring for the sources).
LITERATURE_1P5T: dict[str, TissueParams] = {
    "csf": TissueParams(t1=2569.0, t2=329.0, pd=1.00),
    "gm": TissueParams(t1=833.0, t2=83.0, pd=0.86),
    "wm": TissueParams(t1=500.0, t2=70.0, pd=0.77),
    "lesion": TissueParams(t1=1600.0, t2=400.0, pd=0.95),
}


def spin_echo(pd: float, t1: float, t2: float, tr: float, te: float) -> float:
    """Spin-echo magnitude: S = PD (1 - exp(-TR/T1)) exp(-TE/T2)."""
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def inversion_recovery(pd: float, t1: float, t2: float, tr: float, te: float, ti: float) -> float:
    """Inversion-recovery magnitude: S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)."""
    return pd * abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


@dataclass(frozen=True)
class Sequence:
    """A pulse sequence: spin echo, or inversion recovery when ``ti`` is set (times in ms)."""

    tr: float
    te: float
    ti: float | None = None

    def __post_init__(self) -> None:
        if self.tr <= 0 or self.te <= 0 or (self.ti is not None and not 0 < self.ti < self.tr):
            raise ValueError(f"invalid sequence timing {self}: need TR, TE > 0 and 0 < TI < TR")

    def signal(self, tissue: TissueParams) -> float:
        """Noise-free signal of a pure voxel of ``tissue``."""
        if self.ti is None:
            return float(spin_echo(tissue.pd, tissue.t1, tissue.t2, self.tr, self.te))
        return float(inversion_recovery(tissue.pd, tissue.t1, tissue.t2, self.tr, self.te, self.ti))

    def jittered(self, rng: np.random.Generator, rel: float, ti_rel: float) -> Sequence:
        """This protocol as one site runs it: TR and TE within +-rel, TI within +-ti_rel."""
        tr, te = self.tr * rng.uniform(1 - rel, 1 + rel), self.te * rng.uniform(1 - rel, 1 + rel)
        ti = None if self.ti is None else self.ti * rng.uniform(1 - ti_rel, 1 + ti_rel)
        return Sequence(tr=round(tr, 1), te=round(te, 1), ti=None if ti is None else round(ti, 1))

    def to_dict(self) -> dict[str, float]:
        """JSON form (TI omitted for spin echo)."""
        return {k: v for k, v in asdict(self).items() if v is not None}
