"""The solver's small linear-algebra helpers against NumPy and SciPy references, and its
seeding of weighted rows."""

import warnings

import numpy as np
import pytest
import scipy.linalg
from sklearn.exceptions import ConvergenceWarning

from qsdlearn import Constraints, QuantizedSparseDecomposition, _solver
from qsdlearn._solver import _largest_eigenvalue, _solve_psd


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_largest_eigenvalue_diagonal_is_exact_and_dense_is_a_safe_bound(dtype):
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=64).astype(dtype)
    counts[7] = counts[9] = 60  # two equal largest entries (a power iteration converges slowly)
    assert _largest_eigenvalue(np.diag(counts)) == 60.0
    Z = (rng.random((200, 64)) < 0.05).astype(dtype)
    gram = Z.T @ Z
    top = float(scipy.linalg.eigvalsh(gram.astype(np.float64))[-1])
    assert top <= _largest_eigenvalue(gram) <= 1.011 * top


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_solve_psd_matches_a_dense_solve(dtype):
    rng = np.random.default_rng(1)
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    diagonal = np.diag(rng.uniform(0.5, 4.0, size=6)).astype(dtype)
    M = rng.standard_normal((6, 6))
    dense = (M @ M.T + np.eye(6)).astype(dtype)
    for A in (diagonal, dense):
        for B in (rng.standard_normal(6), rng.standard_normal((6, 3))):
            expected = np.linalg.solve(A.astype(np.float64), B)
            np.testing.assert_allclose(_solve_psd(A, B), expected, rtol=rtol, atol=rtol)
    # a zero diagonal entry is singular: least squares, not a division by zero
    singular = np.diag([2.0, 0.0, 1.0])
    np.testing.assert_allclose(_solve_psd(singular, np.array([4.0, 0.0, 3.0])), [2.0, 0.0, 3.0])


def test_weighted_seeding_sample_takes_heavy_rows_with_their_weight():
    """Above the seeding cap, rows are drawn in proportion to their weights, the heavy ones
    for certain: a uniform sample would leave most of them out (found with token counts)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40_000, 4))
    X[:, 0] = np.arange(40_000)  # the row's number, to find it in the sample
    weights = np.ones(40_000)
    heavy = rng.choice(np.arange(100, 40_000), 50, replace=False)
    weights[heavy] = 1e6
    weights[:100] = 0.0
    rows, w = _solver._seeding_sample(X, 16, np.random.RandomState(0), weights)
    taken = rows[:, 0].astype(int)
    assert rows.shape[0] == _solver._SEEDING_MIN_ROWS == np.unique(taken).size
    assert set(heavy.tolist()) <= set(taken.tolist()) and taken.min() >= 100
    np.testing.assert_array_equal(np.sort(taken[w > 1]), np.sort(heavy))
    np.testing.assert_array_equal(w[w <= 1], 1.0)


@pytest.mark.parametrize("dense", [False, True])
def test_weighted_code_statistics_match_a_plain_numpy_reference(dense, dtype):
    """``Z^T W Z`` and ``Z^T W X`` (the codebook step of a fit with row weights, zeros among
    them), from sparse slots or dense codes."""
    rng = np.random.default_rng(5)
    n, k, d = 50, 7, 3
    X = rng.normal(size=(n, d)).astype(dtype)
    weights = rng.choice([0.0, 0.25, 1.0, 9.0], size=n)
    if dense:
        codes = _solver.Codes(None, rng.normal(size=(n, k)).astype(dtype))
    else:
        idx = np.sort(np.argsort(rng.random((n, k)), axis=1)[:, :2], axis=1)
        values = rng.choice([-1.0, 1.0], size=(n, 2)).astype(dtype)
        codes = _solver.Codes(idx.astype(np.int32), values)
    Z = codes.to_dense(k).astype(np.float64)
    ZtZ, ZtX = _solver.code_statistics(X, codes, k, weights)
    np.testing.assert_allclose(ZtZ, Z.T @ (weights[:, None] * Z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ZtX, Z.T @ (weights[:, None] * X.astype(np.float64)),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_one_slot_codes_give_the_diagonal_of_their_statistics(weighted, dtype):
    """Codes of one slot per row (vector quantization, gain-shape) give ``diag(Z^T W Z)`` as a
    vector, the matrix being diagonal; ``Z^T W X`` as for any codes."""
    rng = np.random.default_rng(6)
    n, k, d = 60, 9, 3
    X = rng.normal(size=(n, d)).astype(dtype)
    weights = rng.choice([0.0, 0.25, 1.0, 9.0], size=n) if weighted else None
    codes = _solver.Codes(rng.integers(0, k - 1, size=(n, 1)).astype(np.int32),  # k-1 unused
                          rng.choice([-2.0, 0.5, 1.0], size=(n, 1)).astype(dtype))
    Z = codes.to_dense(k).astype(np.float64)
    w = np.ones(n) if weights is None else weights
    ZtZ, ZtX = _solver.code_statistics(X, codes, k, weights)
    assert ZtZ.shape == (k,) and ZtZ[k - 1] == 0.0
    np.testing.assert_allclose(np.diag(ZtZ), Z.T @ (w[:, None] * Z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ZtX, Z.T @ (w[:, None] * X.astype(np.float64)),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(_solver.diagonal(ZtZ), _solver.diagonal(np.diag(ZtZ)))


@pytest.mark.parametrize("codebook", [{}, {"codebook_bits": 8}, {"codebook_bits": 3},
                                      {"codebook_bits": 4, "component_nonzero": 2}])
def test_the_codebook_step_on_a_diagonal_is_the_step_on_its_matrix(codebook):
    """The codebook step and the scale refit given ``diag(Z^T Z)`` alone (codes of one slot)
    equal those given the diagonal matrix (the general step, O(k^2 d)), unused codewords
    included."""
    rng = np.random.default_rng(7)
    k, d = 12, 5
    constraints = Constraints(n_components=k, n_nonzero=1, code_bits=0, **codebook)
    counts = rng.integers(1, 40, size=k).astype(np.float64)
    counts[[2, 7]] = 0.0
    C, scales = _solver.quantize_codebook(rng.normal(size=(k, d)), constraints)
    ZtX = C + 0.3 * rng.normal(size=(k, d))  # the rows' mean for each codeword
    for used in (counts, np.zeros(k)):  # some codewords unused, then all of them
        got = _solver.update_codebook(used, used[:, None] * ZtX, C, scales, constraints)
        expected = _solver.update_codebook(np.diag(used), used[:, None] * ZtX, C, scales,
                                           constraints)
        for a, b in zip(got, expected):  # the codebook, and its scales (None for a float one)
            assert (a is None) == (b is None)
            if b is not None:
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    pattern = rng.normal(size=(k, d))
    np.testing.assert_allclose(
        _solver.refit_scales(counts, counts[:, None] * ZtX, pattern, np.ones(k)),
        _solver.refit_scales(np.diag(counts), counts[:, None] * ZtX, pattern, np.ones(k)),
        rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weighted_kmeans_on_many_rows_seeds_as_on_all_rows(dtype):
    """Token-count-like weights (five rows a hundred times heavier than the next) on more rows
    than the seeding cap: the fit matches one seeded from every row."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((4000, 64)) * 0.05
    counts = np.zeros(4000)
    hot = rng.choice(4000, 2000, replace=False)
    counts[hot] = np.floor(1e4 / np.arange(1, 2001))
    counts[hot[:5]] = 1e6
    used = np.flatnonzero(counts)
    X = table[used].reshape(-1, 4).astype(dtype)
    w = np.repeat(counts[used], 16)
    params = dict(n_components=256, n_nonzero=1, code_bits=0, codebook_bits=8, random_state=0)

    def weighted_sqnr(est):
        error = ((est.inverse_transform(est.transform(X)) - X) ** 2).sum(axis=1)
        return 10 * np.log10((w * (X.astype(np.float64) ** 2).sum(axis=1)).sum() / (w @ error))

    def fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return QuantizedSparseDecomposition(**params).fit(X, sample_weight=w)

    sampled = weighted_sqnr(fit())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_solver, "_SEEDING_MIN_ROWS", 10**7)
        every_row = weighted_sqnr(fit())
    assert sampled > every_row - 0.5, (sampled, every_row)


@pytest.mark.parametrize("inactive", [[], [3], [0, 5, 6]])
def test_solved_scales_minimise_the_quadratic_over_the_active_ones(inactive):
    """``solve_scales`` against NumPy's solution: the scales whose diagonal term does not
    vanish solve their normal equations, the others keep their current values."""
    from qsdlearn._solver import solve_scales

    rng = np.random.default_rng(len(inactive))
    A = rng.standard_normal((40, 8))
    A[:, inactive] = 0.0  # those scales have no term: M's rows and columns vanish
    M, b = A.T @ A, A.T @ rng.standard_normal(40)
    current = rng.uniform(0.5, 2.0, 8)
    got = solve_scales(M, b, current)
    active = np.setdiff1d(np.arange(8), inactive)
    expected = current.copy()
    expected[active] = np.linalg.solve(M[np.ix_(active, active)], b[active])
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    np.testing.assert_array_equal(got[inactive], current[inactive])
