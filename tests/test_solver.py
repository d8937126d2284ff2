"""The solver's small linear-algebra helpers against NumPy and SciPy references."""

import numpy as np
import pytest
import scipy.linalg

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
