"""Latent space alignment: an at-most-affine map T from one embedding space to another, fitted on
anchors (pairs of corresponding samples), as in Di Folco et al. (arXiv 2503.04478) and
Maiorca et al. (latent space translation; reference code Flegyas/latentis).

Both spaces are standardized per dimension (mean 0, standard deviation 1 over the anchors), then T
is one of

- ``procrustes``: orthogonal Procrustes, R = U V^T from the SVD of Xs^T Ys (semi-orthogonal when
  the dimensions differ, which equals zero-padding the smaller space), with an optional isotropic
  scale; with fewer anchors than dimensions, only the singular directions that the anchors
  determine are kept;
- ``lstsq``: least squares, W = (Xs^T Xs)^+ Xs^T Ys (the minimum-norm solution when anchors are
  fewer than dimensions);
- ``ridge``: ridge regression, W = (Xs^T Xs + alpha n I)^-1 Xs^T Ys;
- ``identity``: no alignment at all (the first min(dx, dy) standardized dimensions copied, the
  rest zero), the "naive stitching" baseline.

With the standardization, every map is affine in the original coordinates.

**Federated form.** Everything above is a function of a few sums over the anchors:
n, sum x, sum y, sum y^2 (per dimension), X^T X and X^T Y (sum x^2 is the diagonal of X^T X).
A site computes them on its own anchors (:meth:`AlignmentStatistics.from_pairs`), the server adds
the sites' statistics (``+``) and solves in closed form (:func:`fit_alignment`); the result equals
fitting on the pooled anchors, up to floating point. No anchor leaves a site, but the statistics
are not differentially private: X^T Y of a site with few anchors reveals a lot about them.

Written here because no library we know of offers these estimators in sufficient-statistics form:
latentis and scipy (``scipy.linalg.orthogonal_procrustes``) take the anchor matrices themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedpir.alignment.choices import METHODS

#: Standard deviations below this (relative to the largest of the space) count as constant
#: dimensions; they are divided by 1 instead of ~0.
STD_FLOOR = 1e-8


def _as_matrix(name: str, a: Any) -> np.ndarray:
    """A 2-D float64 array of finite values (torch tensors accepted)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    m = np.asarray(a, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [samples, dimensions], got shape {m.shape}")
    if m.shape[1] < 1:
        raise ValueError(f"{name} has no dimensions (shape {m.shape})")
    if not np.isfinite(m).all():
        raise ValueError(f"{name} holds NaN or Inf values")
    return m


@dataclass(frozen=True)
class AlignmentStatistics:
    """Sufficient statistics of anchor pairs (x_i, y_i), i = 1..n, for every estimator of this module.

    Fields: ``n``; ``sum_x`` [dx], ``sum_y`` [dy]; ``sumsq_y`` [dy] (per-dimension sums of
    squares of y); ``xtx`` [dx, dx] = X^T X; ``xty`` [dx, dy] = X^T Y (all uncentered). Add two
    with ``+`` to pool their anchors.
    """

    n: int
    sum_x: np.ndarray
    sum_y: np.ndarray
    sumsq_y: np.ndarray
    xtx: np.ndarray
    xty: np.ndarray

    def __post_init__(self) -> None:
        dx, dy = self.sum_x.shape[0], self.sum_y.shape[0]
        shapes = {
            "sum_x": (self.sum_x.shape, (dx,)), "sum_y": (self.sum_y.shape, (dy,)),
            "sumsq_y": (self.sumsq_y.shape, (dy,)), "xtx": (self.xtx.shape, (dx, dx)), "xty": (self.xty.shape, (dx, dy)),
        }
        bad = [f"{k} {got} (expected {want})" for k, (got, want) in shapes.items() if got != want]
        if bad:
            raise ValueError("inconsistent alignment statistics: " + ", ".join(bad))
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")

    @classmethod
    def from_pairs(cls, x: Any, y: Any) -> AlignmentStatistics:
        """Statistics of anchors: row i of ``x`` [n, dx] corresponds to row i of ``y`` [n, dy]."""
        xm, ym = _as_matrix("x", x), _as_matrix("y", y)
        if xm.shape[0] != ym.shape[0]:
            raise ValueError(f"anchors must pair up: x has {xm.shape[0]} rows, y has {ym.shape[0]}")
        return cls(n=int(xm.shape[0]), sum_x=xm.sum(0), sum_y=ym.sum(0), sumsq_y=(ym**2).sum(0),
                   xtx=xm.T @ xm, xty=xm.T @ ym)

    @classmethod
    def zeros(cls, dx: int, dy: int) -> AlignmentStatistics:
        """Statistics of no anchors (the neutral element of ``+``)."""
        return cls(0, np.zeros(dx), np.zeros(dy), np.zeros(dy), np.zeros((dx, dx)), np.zeros((dx, dy)))

    @property
    def dims(self) -> tuple[int, int]:
        """(dx, dy)."""
        return self.sum_x.shape[0], self.sum_y.shape[0]

    @property
    def sumsq_x(self) -> np.ndarray:
        """Per-dimension sums of squares of x (the diagonal of X^T X)."""
        return np.diag(self.xtx).copy()

    def __add__(self, other: AlignmentStatistics) -> AlignmentStatistics:
        if not isinstance(other, AlignmentStatistics):
            return NotImplemented
        if other.dims != self.dims:
            raise ValueError(f"cannot add alignment statistics of dimensions {self.dims} and {other.dims}")
        return AlignmentStatistics(self.n + other.n, self.sum_x + other.sum_x, self.sum_y + other.sum_y,
                                   self.sumsq_y + other.sumsq_y, self.xtx + other.xtx, self.xty + other.xty)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The statistics as named float64 arrays (``n`` as a 1-element array), e.g. for a Flower message."""
        return {"n": np.array([self.n], dtype=np.float64), "sum_x": self.sum_x, "sum_y": self.sum_y,
                "sumsq_y": self.sumsq_y, "xtx": self.xtx, "xty": self.xty}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> AlignmentStatistics:
        """Inverse of :meth:`to_arrays`; raises ValueError naming missing or inconsistent arrays."""
        missing = [k for k in ("n", "sum_x", "sum_y", "sumsq_y", "xtx", "xty") if k not in arrays]
        if missing:
            raise ValueError(f"alignment statistics lack {', '.join(missing)}")
        n = float(np.asarray(arrays["n"]).reshape(-1)[0])
        if n != int(n):
            raise ValueError(f"n must be a whole number, got {n}")
        return cls(int(n), *(np.asarray(arrays[k], dtype=np.float64) for k in ("sum_x", "sum_y", "sumsq_y", "xtx", "xty")))

    # ---- standardized moments --------------------------------------------------------------
    def moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(mean_x, std_x, mean_y, std_y) of the anchors (population standard deviation; constant
        dimensions get std 1)."""
        if self.n < 2:
            raise ValueError(f"need at least 2 anchors to standardize, got {self.n}")
        mx, my = self.sum_x / self.n, self.sum_y / self.n
        sx = _std(self.sumsq_x / self.n - mx**2)
        sy = _std(self.sumsq_y / self.n - my**2)
        return mx, sx, my, sy

    def standardized(self) -> tuple[np.ndarray, np.ndarray]:
        """(Xs^T Xs, Xs^T Ys) of the standardized anchors, from the sums alone."""
        mx, sx, my, sy = self.moments()
        cxx = (self.xtx - self.n * np.outer(mx, mx)) / np.outer(sx, sx)
        cxy = (self.xty - self.n * np.outer(mx, my)) / np.outer(sx, sy)
        return (cxx + cxx.T) / 2, cxy


def _std(var: np.ndarray) -> np.ndarray:
    std = np.sqrt(np.clip(var, 0.0, None))
    floor = STD_FLOOR * max(float(std.max(initial=0.0)), 1.0)
    return np.where(std > floor, std, 1.0)


@dataclass(frozen=True)
class AlignmentMap:
    """T(x) = y_mean + y_std * (scale * ((x - x_mean) / x_std) @ matrix): a fitted alignment.

    ``transform`` returns the target's own coordinates; ``transform(x, standardized=True)`` the
    standardized target space (where cosine comparisons ignore the anchors' common mean).
    """

    method: str
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray
    matrix: np.ndarray
    scale: float = 1.0
    n_anchors: int = 0

    @property
    def dims(self) -> tuple[int, int]:
        """(dx, dy)."""
        return self.matrix.shape  # type: ignore[return-value]

    def transform(self, x: Any, standardized: bool = False) -> np.ndarray:
        """Map source embeddings [n, dx] (or one [dx]) into the target space."""
        one = np.ndim(x) == 1
        xm = _as_matrix("x", np.atleast_2d(x.detach().cpu().numpy() if hasattr(x, "detach") else x))
        if xm.shape[1] != self.dims[0]:
            raise ValueError(f"this map takes {self.dims[0]}-dimensional embeddings, got {xm.shape[1]}")
        ys = self.scale * ((xm - self.x_mean) / self.x_std) @ self.matrix
        out = ys if standardized else ys * self.y_std + self.y_mean
        return out[0] if one else out

    __call__ = transform

    def standardize_target(self, y: Any) -> np.ndarray:
        """Target-space embeddings [n, dy] in the standardized target space (the anchors' moments)."""
        one = np.ndim(y) == 1
        ym = _as_matrix("y", np.atleast_2d(y.detach().cpu().numpy() if hasattr(y, "detach") else y))
        if ym.shape[1] != self.dims[1]:
            raise ValueError(f"the target space of this map is {self.dims[1]}-dimensional, got {ym.shape[1]}")
        out = (ym - self.y_mean) / self.y_std
        return out[0] if one else out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (lists of floats)."""
        return {"method": self.method, "scale": self.scale, "n_anchors": self.n_anchors,
                **{k: getattr(self, k).tolist() for k in ("x_mean", "x_std", "y_mean", "y_std", "matrix")}}


def fit_alignment(stats: AlignmentStatistics, method: str = "procrustes", *, alpha: float = 1.0,
                  scale: bool = True, rcond: float = 1e-10) -> AlignmentMap:
    """Solve T in closed form from (possibly summed) anchor statistics.

    ``method``: one of :data:`METHODS`. ``alpha``: ridge strength per anchor (``ridge``).
    ``scale``: fit the least-squares isotropic scale of the Procrustes rotation (``procrustes``).
    ``rcond``: relative cut-off of small singular values: of Xs^T Xs in the pseudo-inverse
    (``lstsq``), and of Xs^T Ys (``procrustes``), whose singular directions without anchor evidence
    (fewer anchors than dimensions) are arbitrary; the map is zero on them, which makes the
    solution unique, so that summed and pooled statistics give the same map.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    dx, dy = stats.dims
    mx, sx, my, sy = stats.moments()
    cxx, cxy = stats.standardized()
    s = 1.0
    if method == "procrustes":
        u, sv, vt = np.linalg.svd(cxy, full_matrices=False)
        keep = sv > rcond * max(float(sv.max(initial=0.0)), 1e-300)
        matrix = u[:, keep] @ vt[keep]
        if scale:
            s = float(sv.sum() / max(np.trace(cxx), 1e-300))
    elif method == "lstsq":
        matrix = np.linalg.pinv(cxx, rcond=rcond, hermitian=True) @ cxy
    elif method == "ridge":
        if alpha <= 0:
            raise ValueError(f"ridge needs alpha > 0, got {alpha}")
        matrix = np.linalg.solve(cxx + alpha * stats.n * np.eye(dx), cxy)
    else:
        matrix = np.eye(dx, dy)
    return AlignmentMap(method, mx, sx, my, sy, matrix, s, stats.n)


def fit_pairs(x: Any, y: Any, method: str = "procrustes", **kwargs: Any) -> AlignmentMap:
    """:func:`fit_alignment` on anchors held in one place (the pooled fit)."""
    return fit_alignment(AlignmentStatistics.from_pairs(x, y), method, **kwargs)
