"""Alignment estimators: federated statistics equal the pooled fit; known maps are recovered;
bad inputs fail with clear messages."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

from fedpir.alignment.choices import METHODS
from fedpir.alignment.maps import AlignmentMap, AlignmentStatistics, fit_alignment, fit_pairs


def _standardize(a: np.ndarray) -> np.ndarray:
    return (a - a.mean(0)) / a.std(0)


def _sites(rng: np.random.Generator, sizes: list[int], dx: int, dy: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Anchor pairs of several sites, each site with its own offset and scale (non-iid)."""
    mix = rng.normal(size=(dx, dy))
    out = []
    for k, n in enumerate(sizes):
        x = rng.normal(loc=k, scale=1 + k, size=(n, dx)) * rng.uniform(0.5, 3, size=dx)
        out.append((x, x @ mix + rng.normal(scale=0.5, size=(n, dy)) + 3.0))
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("sizes", "dx", "dy"), [([7, 12, 3, 20], 6, 9), ([2, 3, 1], 12, 8)], ids=["many", "few-anchors"])
def test_federated_statistics_equal_pooled_fit(method: str, sizes: list[int], dx: int, dy: int) -> None:
    """Also with fewer anchors than dimensions, where Procrustes and least squares are not unique
    unless the solver picks a canonical solution."""
    rng = np.random.default_rng(0)
    sites = _sites(rng, sizes, dx=dx, dy=dy)
    federated = sum((AlignmentStatistics.from_pairs(x, y) for x, y in sites), AlignmentStatistics.zeros(dx, dy))
    pooled_x, pooled_y = np.concatenate([x for x, _ in sites]), np.concatenate([y for _, y in sites])
    fed, pooled = fit_alignment(federated, method), fit_pairs(pooled_x, pooled_y, method)
    assert federated.n == sum(sizes)
    for key in ("x_mean", "x_std", "y_mean", "y_std", "matrix"):
        np.testing.assert_allclose(getattr(fed, key), getattr(pooled, key), rtol=1e-8, atol=1e-9)
    probe = rng.normal(size=(5, dx))
    np.testing.assert_allclose(fed(probe), pooled(probe), rtol=1e-8, atol=1e-8)


def test_statistics_match_independent_pooled_solvers() -> None:
    """The closed forms from sums agree with scipy/numpy solvers run on the standardized anchors."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5)) * [1, 2, 3, 4, 5] + 7
    y = x @ rng.normal(size=(5, 8)) + rng.normal(size=(40, 8))
    xs, ys = _standardize(x), _standardize(y)
    padded, _ = orthogonal_procrustes(np.pad(xs, ((0, 0), (0, 3))), ys)
    np.testing.assert_allclose(fit_pairs(x, y, "procrustes").matrix, padded[:5], atol=1e-8)
    np.testing.assert_allclose(fit_pairs(x, y, "lstsq").matrix, np.linalg.lstsq(xs, ys, rcond=None)[0], atol=1e-8)
    alpha = 0.3
    ridge = np.linalg.solve(xs.T @ xs + alpha * 40 * np.eye(5), xs.T @ ys)
    np.testing.assert_allclose(fit_pairs(x, y, "ridge", alpha=alpha).matrix, ridge, atol=1e-8)


def test_procrustes_recovers_a_rotation_from_noisy_anchors() -> None:
    rng = np.random.default_rng(2)
    d = 16
    rotation = ortho_group.rvs(d, random_state=3)
    x = rng.normal(size=(2000, d))
    y = x @ rotation + rng.normal(scale=0.05, size=x.shape)
    fit = fit_pairs(x, y, "procrustes")
    assert np.abs(fit.matrix - rotation).max() < 0.05
    assert fit.matrix.T @ fit.matrix == pytest.approx(np.eye(d), abs=1e-8)
    x_new = rng.normal(size=(100, d))
    error = np.linalg.norm(fit(x_new) - x_new @ rotation) / np.linalg.norm(x_new @ rotation)
    assert error < 0.05
    # a wrong map is far off on the same check
    other = AlignmentMap("procrustes", fit.x_mean, fit.x_std, fit.y_mean, fit.y_std, ortho_group.rvs(d, random_state=4))
    assert np.linalg.norm(other(x_new) - x_new @ rotation) / np.linalg.norm(x_new @ rotation) > 0.5


@pytest.mark.parametrize("method", ["lstsq", "ridge"])
def test_affine_map_is_recovered(method: str) -> None:
    rng = np.random.default_rng(5)
    dx, dy = 10, 7
    a, b = rng.normal(size=(dx, dy)), rng.normal(scale=5, size=dy)
    x = rng.normal(loc=2, size=(3000, dx)) * rng.uniform(0.2, 4, size=dx)
    y = x @ a + b + rng.normal(scale=0.1, size=(3000, dy))
    fit = fit_pairs(x, y, method, alpha=1e-4)
    x_new = rng.normal(loc=2, size=(200, dx)) * rng.uniform(0.2, 4, size=dx)
    truth = x_new @ a + b
    assert np.linalg.norm(fit(x_new) - truth) / np.linalg.norm(truth - truth.mean(0)) < 0.02
    # the orthogonal map cannot express a general affine map: it must do clearly worse here
    procrustes = fit_pairs(x, y, "procrustes")
    assert np.linalg.norm(procrustes(x_new) - truth) > 5 * np.linalg.norm(fit(x_new) - truth)


def test_ridge_shrinks_and_identity_copies() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(50, 4))
    y = x @ rng.normal(size=(4, 6))
    weak, strong = fit_pairs(x, y, "ridge", alpha=1e-3), fit_pairs(x, y, "ridge", alpha=100.0)
    assert np.linalg.norm(strong.matrix) < 0.05 * np.linalg.norm(weak.matrix)
    ident = fit_pairs(x, y, "identity")
    np.testing.assert_array_equal(ident.matrix, np.eye(4, 6))
    np.testing.assert_allclose(ident(x, standardized=True)[:, :4], _standardize(x), atol=1e-10)
    np.testing.assert_allclose(ident(x, standardized=True)[:, 4:], 0.0)


def test_fewer_anchors_than_dimensions_gives_the_minimum_norm_solution() -> None:
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(5, 20)), rng.normal(size=(5, 3))
    fit = fit_pairs(x, y, "lstsq")
    xs, ys = _standardize(x), _standardize(y)
    np.testing.assert_allclose(fit.matrix, np.linalg.pinv(xs) @ ys, atol=1e-8)
    np.testing.assert_allclose(fit(x, standardized=True), ys, atol=1e-6)  # interpolates the anchors


def test_statistics_round_trip_and_constant_dimensions() -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(9, 3))
    x[:, 1] = 4.0  # a constant dimension must not produce NaN
    stats = AlignmentStatistics.from_pairs(x, rng.normal(size=(9, 2)))
    again = AlignmentStatistics.from_arrays(stats.to_arrays())
    assert again.n == 9
    np.testing.assert_array_equal(again.xty, stats.xty)
    fit = fit_alignment(stats, "ridge")
    assert np.isfinite(fit.matrix).all() and fit.x_std[1] == 1.0
    np.testing.assert_allclose(stats.sumsq_x, (x**2).sum(0))


def test_errors_are_clear() -> None:
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 4))
    with pytest.raises(ValueError, match="x has 6 rows, y has 5"):
        AlignmentStatistics.from_pairs(x, y[:5])
    with pytest.raises(ValueError, match="2-D"):
        AlignmentStatistics.from_pairs(x[0], y[0])
    with pytest.raises(ValueError, match="NaN or Inf"):
        AlignmentStatistics.from_pairs(np.where(x > 1, np.nan, x), y)
    with pytest.raises(ValueError, match="dimensions"):
        _ = AlignmentStatistics.from_pairs(x, y) + AlignmentStatistics.from_pairs(x[:, :2], y)
    with pytest.raises(ValueError, match="at least 2 anchors"):
        fit_pairs(x[:1], y[:1])
    with pytest.raises(ValueError, match="method must be one of"):
        fit_pairs(x, y, "cca")
    with pytest.raises(ValueError, match="alpha > 0"):
        fit_pairs(x, y, "ridge", alpha=0.0)
    with pytest.raises(ValueError, match="takes 3-dimensional"):
        fit_pairs(x, y)(rng.normal(size=(2, 5)))
    with pytest.raises(ValueError, match="lack xty"):
        AlignmentStatistics.from_arrays({k: v for k, v in AlignmentStatistics.from_pairs(x, y).to_arrays().items() if k != "xty"})
    with pytest.raises(ValueError, match="inconsistent"):
        AlignmentStatistics(3, np.zeros(3), np.zeros(4), np.zeros(4), np.zeros((3, 3)), np.zeros((4, 3)))


def test_flower_records_carry_the_statistics_and_the_server_sum_equals_the_pooled_fit() -> None:
    from fedpir.alignment.records import aggregate_statistics, statistics_from_record, statistics_record

    rng = np.random.default_rng(10)
    sites = _sites(rng, [8, 6, 11], dx=5, dy=7)
    replies = [statistics_record(AlignmentStatistics.from_pairs(x, y)) for x, y in sites]
    assert all(k.startswith("alignment/") for k in replies[0])
    broken = statistics_record(AlignmentStatistics.from_pairs(*sites[0]))
    broken["alignment/xty"] = broken["alignment/xty"].__class__(np.full((5, 7), np.nan))
    other_dims = statistics_record(AlignmentStatistics.from_pairs(sites[0][0][:, :3], sites[0][1]))
    total, rejected = aggregate_statistics([*replies, broken, other_dims], min_sites=3)
    assert len(rejected) == 2 and "NaN" in rejected[0] and "dimensions" in rejected[1]
    pooled = fit_pairs(np.concatenate([x for x, _ in sites]), np.concatenate([y for _, y in sites]), "ridge")
    np.testing.assert_allclose(fit_alignment(total, "ridge").matrix, pooled.matrix, atol=1e-10)
    assert statistics_from_record(replies[1]).n == 6
    with pytest.raises(ValueError, match="at least 5"):
        statistics_record(AlignmentStatistics.from_pairs(sites[0][0][:3], sites[0][1][:3]))
    with pytest.raises(ValueError, match="need 4"):
        aggregate_statistics(replies, min_sites=4)
