"""Weighted samples that keep the weights (qsdlearn._sampling)."""

import numpy as np
import pytest

from qsdlearn._sampling import certainty_scale, importance_sample


def test_certainty_scale_makes_the_probabilities_add_up_to_the_size():
    weights = np.random.default_rng(0).uniform(0.5, 2.0, 400)
    weights[[7, 99]] = [500.0, 2000.0]
    for size in (1, 2, 3, 40, 397):
        c = certainty_scale(weights, size)
        assert np.sum(np.minimum(1.0, c * weights)) == pytest.approx(size)
    assert certainty_scale(np.ones(5), 5) == np.inf  # every row taken


def test_importance_sample_of_every_positive_row_keeps_their_weights():
    weights = np.array([0.0, 2.0, 3.0, 0.0, 5.0])
    rows, fit_weights, factor = importance_sample(weights, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(rows, [1, 2, 4])
    np.testing.assert_array_equal(fit_weights, [2.0, 3.0, 5.0])
    assert factor == 1.0


def test_importance_sample_takes_heavy_rows_for_certain_with_their_weight():
    """Rows that a sample drawn with replacement would hold more than once are taken for
    certain and weighted c w; the factor times the sample's weights is the total weight."""
    rng = np.random.default_rng(0)
    weights = rng.uniform(0.5, 2.0, 400)
    weights[[7, 99]] = [500.0, 2000.0]  # each more than 1 / c
    weights[50:60] = 0.0  # never drawn
    size = 40
    c = certainty_scale(weights, size)
    rows, fit_weights, factor = importance_sample(weights, size, np.random.default_rng(3))
    assert rows.size == size == np.unique(rows).size and np.all(np.diff(rows) > 0)
    assert {7, 99} <= set(rows.tolist()) and not set(range(50, 60)) & set(rows.tolist())
    heavy = np.isin(rows, [7, 99])
    np.testing.assert_allclose(fit_weights[heavy], c * weights[rows[heavy]])
    np.testing.assert_array_equal(fit_weights[~heavy], 1.0)
    assert factor * fit_weights.sum() == pytest.approx(weights.sum())


@pytest.mark.parametrize("make_rng", [np.random.default_rng, np.random.RandomState])
def test_importance_sample_without_heavy_rows_is_the_plain_weighted_draw(make_rng):
    weights = np.random.default_rng(1).uniform(0.5, 2.0, 400)
    rows, fit_weights, factor = importance_sample(weights, 40, make_rng(3), keep_order=False)
    expected = make_rng(3).choice(400, 40, replace=False, p=weights / weights.sum())
    np.testing.assert_array_equal(rows, expected)
    assert fit_weights is None and factor == pytest.approx(weights.sum() / 40)


@pytest.mark.parametrize("scale", [1e-310, 1e-300, 1.0, 1e300, 1e305])
def test_importance_sample_at_extreme_scales(scale):
    """Weights near the ends of float64: the same rows and fit weights as at unit scale."""
    weights = np.random.default_rng(2).uniform(0.5, 2.0, 100)
    weights[3] = 500.0
    reference = importance_sample(weights, 20, np.random.default_rng(0))
    rows, fit_weights, factor = importance_sample(weights * scale, 20,
                                                  np.random.default_rng(0))
    np.testing.assert_array_equal(rows, reference[0])
    np.testing.assert_allclose(fit_weights, reference[1], rtol=1e-12)
    assert factor * fit_weights.sum() == pytest.approx(weights.sum() * scale, rel=1e-12)


def test_importance_sample_of_integer_weights_and_bad_weights():
    rows, fit_weights, factor = importance_sample(np.full(10, 2**62, dtype=np.int64), 3,
                                                  np.random.default_rng(0))
    assert rows.size == 3 and fit_weights is None and factor == pytest.approx(10 * 2.0**62 / 3)
    for bad in (np.zeros(5), np.array([1.0, -1.0, 2.0]), np.array([1.0, np.nan, 2.0])):
        with pytest.raises(ValueError, match="finite and nonnegative"):
            importance_sample(bad, 1, np.random.default_rng(0))


def test_importance_sample_of_a_size_beyond_the_positive_rows_takes_them_all():
    weights = np.array([0.0, 2.5, 0.0, 1e-3, 7.0])
    rows, fit_weights, factor = importance_sample(weights, 10, np.random.default_rng(0))
    np.testing.assert_array_equal(rows, [1, 3, 4])
    np.testing.assert_array_equal(fit_weights, weights[[1, 3, 4]])
    assert factor == 1.0
