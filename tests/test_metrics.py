"""Distortion measures, the operational hull and the rate-aware scorers."""

import pickle

import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from qsdlearn import QuantizedSparseDecomposition
from qsdlearn.metrics import (
    budget_scorer,
    hull_at,
    lower_hull,
    normalized_mse,
    rate_distortion_curve,
    rate_distortion_scorer,
    sqnr,
)

from ._data import gaussian

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def vq(k):
    return QuantizedSparseDecomposition(k, n_nonzero=1, code_bits=0, codebook_bits=8,
                                        random_state=0, max_iter=20)


@pytest.fixture(scope="module")
def X():
    return gaussian(2000, 4, seed=5).astype(np.float32)


def test_sqnr_and_normalized_mse_agree():
    rng = np.random.default_rng(0)
    X, noise = rng.normal(size=(20, 3)), rng.normal(size=(20, 3)) * 0.1
    assert sqnr(X, X + noise) == pytest.approx(-10 * np.log10(normalized_mse(X, X + noise)))
    with pytest.raises(ValueError, match="shapes differ"):
        normalized_mse(X, X[:3])


# -- the operational hull ----------------------------------------------------------------------


def brute_force_hull(points, rate):
    """Least distortion of any mix of at most two points (or (0, 1)) within ``rate``: an LP
    with two constraints has an optimum on at most two points."""
    points = [(0.0, 1.0)] + [tuple(p) for p in points]
    best = min((d for r, d in points if r <= rate), default=np.nan)
    for ra, da in points:
        for rb, db in points:
            if ra < rate < rb:
                t = (rate - ra) / (rb - ra)
                best = min(best, (1 - t) * da + t * db)
    return best


def test_hull_of_one_point_and_the_origin():
    np.testing.assert_allclose(hull_at([(2.0, 0.25)], [0, 0.5, 2.0, 3.0]),
                               [1.0, 0.8125, 0.25, 0.25])
    np.testing.assert_array_equal(lower_hull([(2.0, 0.25)]), [[0, 1], [2, 0.25]])
    assert hull_at([], 1.0) == 1.0
    assert np.isnan(hull_at([(1.0, 0.5)], 0.5, origin=None))
    assert lower_hull(np.empty((0, 2)), origin=None).shape == (0, 2)


def test_hull_drops_points_above_chords_and_worse_points_at_more_bits():
    points = [(1.0, 0.8), (2.0, 0.2), (3.0, 0.3), (4.0, 0.05), (2.0, 0.5), (1.5, 0.9)]
    # (1, 0.8) lies above the chord from (0, 1) to (2, 0.2); (3, 0.3) is worse than (2, 0.2).
    np.testing.assert_allclose(lower_hull(points), [[0, 1], [2, 0.2], [4, 0.05]])
    assert hull_at(points, 3.0) == pytest.approx(0.125)
    assert hull_at(points, 9.0) == pytest.approx(0.05)


@pytest.mark.parametrize("seed", range(20))
def test_hull_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    rates = np.round(rng.uniform(0, 5, n), 1)  # ties in rate happen
    dists = rng.uniform(0, 1.3, n)  # some are worse than sending nothing
    points = np.column_stack([rates, dists])
    queries = np.concatenate([np.linspace(0, 6, 61), rates])
    expected = [brute_force_hull(points, q) for q in queries]
    np.testing.assert_allclose(hull_at(points, queries), expected, rtol=1e-12, atol=1e-12)
    vertices = lower_hull(points)
    assert np.all(np.diff(vertices[:, 0]) > 0) and np.all(np.diff(vertices[:, 1]) < 0)
    slopes = np.diff(vertices[:, 1]) / np.diff(vertices[:, 0])
    assert np.all(np.diff(slopes) >= -1e-12)  # convex


def test_hull_rejects_bad_points():
    with pytest.raises(ValueError, match="finite"):
        lower_hull([(np.nan, 0.5)])
    with pytest.raises(ValueError, match="nonnegative"):
        lower_hull([(-1.0, 0.5)])
    for rates in ([np.nan], [-1.0], np.inf):
        with pytest.raises(ValueError, match="rates must be finite and nonnegative"):
            hull_at([(1.0, 0.5)], rates)
    # origin is checked as points are (a fresh user's trial: NaN and a negative rate were
    # taken, and wrong shapes gave NumPy's reshape errors)
    for origin in ((0.0, np.nan), (np.inf, 1.0), (-1.0, 1.0)):
        with pytest.raises(ValueError, match="origin must be finite with nonnegative rates"):
            hull_at([(2.0, 0.25)], [0.0, 1.0], origin=origin)
    for origin in ((1.0,), [(0.0, 1.0)], (0.0, 1.0, 2.0)):
        with pytest.raises(ValueError, match="origin must be one"):
            lower_hull([(2.0, 0.25)], origin=origin)
    for points in ([(1.0, 0.5, 3.0)], [1.0, 0.5, 3.0], np.ones((2, 2, 2))):
        with pytest.raises(ValueError, match=r"points must be \(rate, distortion\) pairs"):
            lower_hull(points)
    # a distortion is not negative; strings and None are not numbers (a fresh user's trial:
    # both were taken, None as a rate said "must be finite")
    with pytest.raises(ValueError, match="nonnegative rates and distortions"):
        lower_hull([(1.0, -0.5)])
    for points, rates in (([("1", ".5")], 1.0), ([(1.0, 0.5)], "1.0"), ([(1.0, 0.5)], None)):
        with pytest.raises(TypeError, match="must hold real numbers"):
            hull_at(points, rates)
    assert lower_hull([1.0, 0.5]).tolist() == [[0.0, 1.0], [1.0, 0.5]]  # one pair, flat


@pytest.mark.parametrize("metric", [sqnr, normalized_mse])
def test_errors_refuse_what_is_not_real_finite_data(metric):
    """Not a silent NaN, a numpy ufunc error or a dropped imaginary part: errors that say
    what to fix."""
    X = np.ones((4, 4))
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="finite values"):
            metric(X, np.full_like(X, bad))
    with pytest.raises(ValueError, match="empty"):
        metric(np.zeros(0), np.zeros(0))
    for x, x_hat in (("abc", "abd"), (X + 1j, X), (X, X.astype(object))):
        with pytest.raises(TypeError, match="real numbers"):
            metric(x, x_hat)
    # integers, booleans and bfloat16 are numbers
    ml_dtypes = pytest.importorskip("ml_dtypes")
    expected = metric(X, 1.1 * X)
    for x in (X.astype(int), X.astype(bool), X.astype(ml_dtypes.bfloat16)):
        assert metric(x, 1.1 * X) == pytest.approx(expected)


def test_curve_measures_the_codec(X):
    curve = rate_distortion_curve(X, [vq(4), vq(64)])
    for record in curve:
        compressed = record["estimator"].encode(X)
        assert record["bits"] == compressed.bits
        assert record["bits_per_element"] == compressed.bits_per_element
        assert record["normalized_mse"] == pytest.approx(normalized_mse(X, compressed.decode()))
    assert curve[0]["bits_per_element"] < curve[1]["bits_per_element"]
    assert curve[0]["normalized_mse"] > curve[1]["normalized_mse"]


def test_curve_refuses_sparse_input_as_the_estimator_does(X):
    """Turned into a 0-d object array, it failed with "setting an array element with a
    sequence"."""
    scipy_sparse = pytest.importorskip("scipy.sparse")
    with pytest.raises(TypeError, match="Sparse data was passed"):
        rate_distortion_curve(scipy_sparse.csr_matrix(X), [vq(4)])
    est = vq(4).fit(X)  # the scorers too ("setting an array element with a sequence")
    for scorer in (budget_scorer(2.0), rate_distortion_scorer(0.1)):
        with pytest.raises(TypeError, match="Sparse data was passed"):
            scorer(est, scipy_sparse.csr_matrix(X))


def test_budget_scorer_scores_sqnr_within_and_the_hull_share_beyond(X):
    est = vq(64).fit(X)
    compressed = est.encode(X)
    rate, dist = compressed.bits_per_element, normalized_mse(X, compressed.decode())
    assert budget_scorer(rate + 0.01)(est, X) == pytest.approx(sqnr(X, compressed.decode()))
    # over the budget: the largest share of the rows whose codes and the whole codebook fit
    budget = rate / 2
    fixed = compressed.settings.constraints.bits(0, X.shape[1], 32).total
    share = (budget * X.size - fixed) / (compressed.bits - fixed)
    expected = -10 * np.log10(1 - share * (1 - dist))
    assert budget_scorer(budget)(est, X) == pytest.approx(expected)
    coded = int(share * X.shape[0])  # those rows fit the budget, one more does not
    assert est.encode(X[:coded]).bits <= budget * X.size < est.encode(X[:coded + 1]).bits
    # a codebook alone over the budget codes nothing: 0 dB
    nothing = budget_scorer(0.99 * fixed / X.size)(est, X)
    assert nothing == 0.0 and np.copysign(1.0, nothing) == 1.0  # 0 dB, not -0.0


def test_scorers_spread_the_codebook_over_n_rows():
    """A fresh user's trial: scored on cross-validation folds, the codebook's bits were spread
    over a fold's rows, so the rate, and the choice, depended on the number of folds. With
    n_rows, a fold's rate is that of the whole matrix."""
    X = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    est = vq(64).fit(X)
    whole = est.encode(X).bits_per_element
    fold = X[:250]
    dist = normalized_mse(fold, est.encode(fold).decode())
    assert est.encode(fold).bits_per_element > whole + 0.1  # the codebook on fewer rows
    assert rate_distortion_scorer(1.0, n_rows=1000)(est, fold) == pytest.approx(-(dist + whole))
    assert budget_scorer(whole + 1e-9, n_rows=1000)(est, fold) == pytest.approx(
        -10 * np.log10(dist))
    assert budget_scorer(whole + 1e-9)(est, fold) < -10 * np.log10(dist)  # over, on the fold
    for bad in (0, -5, 2.5, True, "1000"):
        for scorer in (budget_scorer, rate_distortion_scorer):
            with pytest.raises(ValueError, match="n_rows must be None or a positive integer"):
                scorer(1.0, n_rows=bad)


def test_larger_lambda_selects_fewer_bits(X):
    chosen = []
    for lmbda in (0.0, 0.05, 1.0):
        search = GridSearchCV(vq(2), {"n_components": [2, 8, 64]},
                              scoring=rate_distortion_scorer(lmbda), cv=2).fit(X)
        chosen.append(search.best_params_["n_components"])
    assert chosen[0] == 64 and chosen[-1] == 2 and chosen == sorted(chosen, reverse=True)


def test_scorers_pickle_with_a_fitted_search(X):
    # a fitted search is saved with pickle or joblib, its scorer with it
    for scorer in (budget_scorer(3.0, n_rows=500), rate_distortion_scorer(0.1)):
        search = GridSearchCV(vq(2), {"n_components": [2, 8]}, scoring=scorer, cv=2).fit(X)
        restored = pickle.loads(pickle.dumps(search))
        assert restored.scorer_(restored.best_estimator_, X) == scorer(search.best_estimator_, X)


def test_scorers_work_on_a_pipeline(X):
    pipeline = make_pipeline(FunctionTransformer(lambda Z: Z * 2.0), vq(8))
    scores = cross_validate(pipeline, X, cv=2, scoring={
        "rd": rate_distortion_scorer(0.1), "budget": budget_scorer(3.0)})
    assert np.all(np.isfinite(scores["test_rd"])) and np.all(scores["test_budget"] > 0)


def test_scorers_reject_bad_arguments_and_estimators(X):
    for lmbda in (-1.0, True, np.inf):
        with pytest.raises(ValueError, match="non-negative"):
            rate_distortion_scorer(lmbda)
    assert np.isfinite(rate_distortion_scorer(np.int64(1))(vq(8).fit(X), X))
    for budget in (0, True, np.nan):
        with pytest.raises(ValueError, match="positive"):
            budget_scorer(budget)
    from sklearn.decomposition import PCA

    with pytest.raises(TypeError, match="encode"):
        budget_scorer(2.0)(PCA(2).fit(X), X)


def test_scorers_refuse_all_zero_rows_whose_error_is_not_defined(X):
    """Rows of pruned weights are all zero (a fresh user's trial): every setting scored -inf
    on them, a silent tie that made GridSearchCV pick the first candidate."""
    est = vq(8).fit(X)
    for scorer in (budget_scorer(2.0), rate_distortion_scorer(0.1)):
        with pytest.raises(ValueError, match="scored rows are all zero"):
            scorer(est, np.zeros((10, X.shape[1]), X.dtype))
        assert np.isfinite(scorer(est, X))


@pytest.mark.parametrize("scale", [1e-300, 1e-30, 1.0, 1e30, 1e300])
def test_sqnr_does_not_depend_on_the_scale(scale):
    """Squares of data near 1e300 overflow and near 1e-300 underflow in float64; the SQNR is
    computed on the data divided by a power of two, so that it stays the same (40 dB here)."""
    X = np.random.default_rng(0).standard_normal((50, 8))
    assert sqnr(scale * X, 1.01 * scale * X) == pytest.approx(40.0, abs=1e-9)
    assert normalized_mse(scale * X, 0.0 * X) == pytest.approx(1.0, rel=1e-12)
