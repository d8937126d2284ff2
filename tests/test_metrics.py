"""Distortion measures, the operational hull and the rate-aware scorers."""

import itertools

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


def _hull_brute_force(points, rate):
    """Least distortion of any pair of points (origin included) mixed to cost at most rate."""
    points = [(0.0, 1.0)] + list(points)
    best = min((d for r, d in points if r <= rate), default=np.nan)
    for (r0, d0), (r1, d1) in itertools.combinations(points, 2):
        if min(r0, r1) <= rate < max(r0, r1):
            (r0, d0), (r1, d1) = sorted([(r0, d0), (r1, d1)])
            best = min(best, d0 + (d1 - d0) * (rate - r0) / (r1 - r0))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_hull_equals_the_best_mix_of_two_points(seed):
    rng = np.random.default_rng(seed)
    points = np.column_stack([rng.uniform(0, 5, 7), rng.uniform(0, 1.2, 7)])
    rates = rng.uniform(0, 6, 25)
    np.testing.assert_allclose(hull_at(points, rates), [_hull_brute_force(points, r) for r in rates],
                               rtol=1e-12, atol=1e-12)
    vertices = lower_hull(points)
    assert np.all(np.diff(vertices[:, 0]) > 0) and np.all(np.diff(vertices[:, 1]) < 0)


def test_hull_rejects_bad_points():
    with pytest.raises(ValueError, match="finite"):
        lower_hull([(np.nan, 0.5)])
    with pytest.raises(ValueError, match="nonnegative"):
        lower_hull([(-1.0, 0.5)])


def test_curve_measures_the_codec(X):
    curve = rate_distortion_curve(X, [vq(4), vq(64)])
    for record in curve:
        compressed = record["estimator"].encode(X)
        assert record["bits"] == compressed.bits
        assert record["bits_per_element"] == compressed.bits_per_element
        assert record["normalized_mse"] == pytest.approx(normalized_mse(X, compressed.decode()))
    assert curve[0]["bits_per_element"] < curve[1]["bits_per_element"]
    assert curve[0]["normalized_mse"] > curve[1]["normalized_mse"]


def test_budget_scorer_scores_sqnr_within_and_the_hull_share_beyond(X):
    est = vq(64).fit(X)
    compressed = est.encode(X)
    rate, dist = compressed.bits_per_element, normalized_mse(X, compressed.decode())
    assert budget_scorer(rate + 0.01)(est, X) == pytest.approx(sqnr(X, compressed.decode()))
    budget = rate / 2
    expected = -10 * np.log10(1 - budget / rate * (1 - dist))
    assert budget_scorer(budget)(est, X) == pytest.approx(expected)


def test_larger_lambda_selects_fewer_bits(X):
    chosen = []
    for lmbda in (0.0, 0.05, 1.0):
        search = GridSearchCV(vq(2), {"n_components": [2, 8, 64]},
                              scoring=rate_distortion_scorer(lmbda), cv=2).fit(X)
        chosen.append(search.best_params_["n_components"])
    assert chosen[0] == 64 and chosen[-1] == 2 and chosen == sorted(chosen, reverse=True)


def test_scorers_work_on_a_pipeline(X):
    pipeline = make_pipeline(FunctionTransformer(lambda Z: Z * 2.0), vq(8))
    scores = cross_validate(pipeline, X, cv=2, scoring={
        "rd": rate_distortion_scorer(0.1), "budget": budget_scorer(3.0)})
    assert np.all(np.isfinite(scores["test_rd"])) and np.all(scores["test_budget"] > 0)


def test_scorers_reject_bad_arguments_and_estimators(X):
    with pytest.raises(ValueError, match="non-negative"):
        rate_distortion_scorer(-1.0)
    with pytest.raises(ValueError, match="positive"):
        budget_scorer(0)
    from sklearn.decomposition import PCA

    with pytest.raises(TypeError, match="encode"):
        budget_scorer(2.0)(PCA(2).fit(X), X)
