"""k-means++ seeding (qsdlearn._seeding) against a plain-NumPy reference and scikit-learn."""

import numpy as np
import pytest
from sklearn.cluster import kmeans_plusplus

from qsdlearn import _seeding
from qsdlearn._seeding import kmeans_plusplus_indices


def _reference(X, k, rng, weights=None):
    """Greedy k-means++ in plain NumPy, the draws of scikit-learn, sums in the kernel's order
    (coordinates in turn, rows in turn), so that the choices agree exactly."""
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)

    def distances(j):
        total = np.zeros(n)
        for t in range(d):
            total = total + (X[:, t] - X[j, t]) ** 2
        return total

    n_trials = 2 + int(np.log(k))
    chosen = [int(rng.choice(n, p=w / w.sum()))]
    closest = distances(chosen[0])
    potential = np.cumsum(w * closest)[-1]
    for _ in range(1, k):
        draws = rng.uniform(size=n_trials) * potential
        candidates = np.minimum(np.searchsorted(np.cumsum(w * closest), draws), n - 1)
        trials = [np.minimum(closest, distances(j)) for j in candidates]
        potentials = [np.cumsum(w * trial)[-1] for trial in trials]
        best = int(np.argmin(potentials))
        closest, potential = trials[best], potentials[best]
        chosen.append(int(candidates[best]))
    return np.array(chosen)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_seeds_match_the_numpy_reference_on_tiny_inputs(dtype, weighted):
    rng = np.random.default_rng(0)
    for case in range(40):
        n = int(rng.integers(1, 30))
        d = int(rng.integers(1, 6))
        k = int(rng.integers(1, n + 1))
        X = rng.standard_normal((n, d)).astype(dtype)
        if case % 4 == 0:  # repeated rows: zero distances, flat stretches of the running sum
            X = X[rng.integers(0, max(1, n // 3), n)]
        weights = None
        if weighted:
            weights = rng.random(n) * (rng.random(n) < 0.7)
            if np.count_nonzero(weights) == 0:
                weights[0] = 1.0
        rng_a, rng_b = np.random.RandomState(case), np.random.RandomState(case)
        got = kmeans_plusplus_indices(X, k, rng_a, weights)
        np.testing.assert_array_equal(got, _reference(X, k, rng_b, weights))
        assert rng_a.uniform() == rng_b.uniform()  # the same draws, in the same number


@pytest.mark.parametrize("weighted", [False, True])
def test_seeds_over_several_blocks_of_rows_match_the_reference(weighted):
    """More rows than a block of the kernel (``_BLOCK_ROWS``, the last one partial), many of
    them repeated: trials that tie exactly, decided by the sums in order as in the reference."""
    rng = np.random.default_rng(3)
    n = 2 * _seeding._BLOCK_ROWS + 300
    X = rng.standard_normal((n // 10, 3))[rng.integers(0, n // 10, n)]
    weights = rng.random(n) * (rng.random(n) < 0.8) if weighted else None
    for case in range(3):
        rng_a, rng_b = np.random.RandomState(case), np.random.RandomState(case)
        np.testing.assert_array_equal(kmeans_plusplus_indices(X, 40, rng_a, weights),
                                      _reference(X, 40, rng_b, weights))


def test_seeds_match_the_reference_where_the_weighted_distances_underflow():
    """Weights of a few subnormals on rows of a half-integer grid: the products round in
    absolute terms, halfway cases included, and the kernel's sums, in another order, must still
    choose as the sums in order do (found by review: with fused multiply-adds, 162 of 480 such
    cases chose other seeds)."""
    for case in range(12):
        rng = np.random.default_rng(case)
        n = int(rng.integers(40, 2 * _seeding._BLOCK_ROWS + 100))
        X = 0.5 * rng.integers(0, 10, (n, 2)).astype(np.float64)
        weights = 2.0**-1074 * rng.integers(1, 7, n).astype(np.float64)
        rng_a, rng_b = np.random.RandomState(case), np.random.RandomState(case)
        np.testing.assert_array_equal(kmeans_plusplus_indices(X, 15, rng_a, weights),
                                      _reference(X, 15, rng_b, weights))


@pytest.mark.parametrize("weighted", [False, True])
def test_seeds_are_scikit_learns_where_distances_do_not_tie(weighted):
    """Distinct rows, eight or more per seed (as the planner and the fits seed): the same rows
    and the same state of the random source after."""
    rng = np.random.default_rng(1)
    for case, (n, d, k) in enumerate([(128, 8, 16), (512, 4, 64), (1024, 2, 128), (300, 1, 32),
                                      (2048, 8, 256)]):
        X = rng.standard_normal((n, d)) * 10.0 ** rng.uniform(-3, 3)
        weights = rng.random(n) + 0.1 if weighted else None
        rng_a, rng_b = np.random.RandomState(case), np.random.RandomState(case)
        _, expected = kmeans_plusplus(X, k, sample_weight=weights, random_state=rng_a)
        np.testing.assert_array_equal(kmeans_plusplus_indices(X, k, rng_b, weights), expected)
        assert rng_a.uniform() == rng_b.uniform()


def test_rows_of_weight_zero_are_never_seeds():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((200, 3))
    weights = np.where(np.arange(200) % 2 == 0, 1.0, 0.0)
    seeds = kmeans_plusplus_indices(X, 50, np.random.RandomState(0), weights)
    assert np.all(seeds % 2 == 0)
    assert len(set(seeds.tolist())) == 50


@pytest.mark.parametrize("k", [0, 6])
def test_a_number_of_seeds_outside_the_rows_is_refused(k):
    with pytest.raises(ValueError, match=f"cannot draw {k} seeds from 5 rows"):
        kmeans_plusplus_indices(np.zeros((5, 2)), k, np.random.RandomState(0))
