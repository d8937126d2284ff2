"""The Numba kernels against plain-NumPy references and brute force on tiny inputs."""

import itertools

import numba
import numpy as np
import pytest

from qsdlearn import _kernels
from qsdlearn._levels import quantize, unit_levels

NBITS = [_kernels.FLOAT, 0, 1, 2, 3]


def brute_force_projection(v, scale, nbits, n_keep):
    """Smallest squared distance from ``v`` to {exactly n_keep slots, values on the grid}."""
    best = np.inf
    for support in itertools.combinations(range(v.size), n_keep):
        rest = np.delete(v, support)
        if nbits == _kernels.FLOAT:
            candidates = [v[list(support)]]
        else:
            levels = scale * unit_levels(nbits)
            candidates = itertools.product(levels, repeat=n_keep)
        for values in candidates:
            dist = np.sum((v[list(support)] - np.asarray(values)) ** 2) + np.sum(rest**2)
            best = min(best, dist)
    return best


@pytest.mark.parametrize("nbits", NBITS)
def test_quantize_scalar_matches_numpy_reference(nbits):
    rng = np.random.default_rng(nbits + 10)
    values = np.concatenate([rng.normal(scale=3, size=200), [0.0, 0.5, -0.5, 1.0, -1.0, 100.0]])
    for scale in [1.0, 0.37, 2.5]:
        ref = quantize(values, scale, None if nbits < 0 else nbits)
        got = np.array([_kernels.quantize_scalar(v, scale, nbits) for v in values])
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("nbits", [1, 2, 3, 8])
def test_level_scales_match_numpy_reference(nbits, dtype):
    """The compiled search of grid scales picks the NumPy reference's step in every column
    (masked entries ignored; a column with nothing masked in, or all zeros, gets 1), and no
    other of the steps tried quantizes a column with less error."""
    from qsdlearn._levels import SCALE_FRACTIONS, fit_level_scales

    rng = np.random.default_rng(nbits)
    values = (rng.standard_normal((7, 300)) * rng.uniform(0.01, 100, 300)).astype(dtype)
    values[:, 5] = 0.0
    mask = rng.random(values.shape) < 0.7
    mask[:, 7] = False
    for m in (mask, None):
        got = _kernels.fit_level_scales(values, nbits, m)
        np.testing.assert_array_equal(got, fit_level_scales(values, nbits, m))
        assert got.dtype == np.float64 and got[5] == 1.0
        keep = np.ones(values.shape, bool) if m is None else m
        x = values.astype(np.float64)

        def error(step):
            return np.sum(keep * (x - quantize(x, step, nbits)) ** 2, axis=0)

        top = np.max(np.abs(x) * keep, axis=0) / (2 ** (nbits - 1) - 0.5)
        tried = np.min([error(np.where(top > 0, top * f, 1.0)) for f in SCALE_FRACTIONS], axis=0)
        np.testing.assert_allclose(error(got), tried, rtol=1e-12)
    assert _kernels.fit_level_scales(values, nbits, mask)[7] == 1.0
    # a column-major array (the solver passes the codebook's transpose) gives the same
    np.testing.assert_array_equal(_kernels.fit_level_scales(np.asfortranarray(values), nbits),
                                  _kernels.fit_level_scales(values, nbits))


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("m, n_keep", [(1, 1), (4, 1), (4, 2), (5, 3), (5, 5)])
def test_projection_equals_brute_force(nbits, m, n_keep, dtype):
    rng = np.random.default_rng(1000 * m + 10 * n_keep + nbits + 1)
    n_rows = 12 if nbits < 3 or n_keep < 4 else 3  # the brute force grows as 8**n_keep
    V = rng.normal(scale=1.5, size=(n_rows, m)).astype(dtype)
    scales = rng.uniform(0.3, 2.0, size=n_rows)
    out = np.empty_like(V)
    _kernels.project_rows(V, scales, nbits, n_keep, out)
    tol = 1e-10 if dtype == np.float64 else 1e-5
    for v, scale, p in zip(V.astype(np.float64), scales, out.astype(np.float64)):
        # Feasible: exactly n_keep slots (all nonzero when quantized) on the scaled grid.
        if nbits != _kernels.FLOAT:
            assert np.count_nonzero(p) == n_keep
            grid = quantize(p[p != 0], scale, nbits)
            np.testing.assert_allclose(p[p != 0], grid, rtol=tol)
        else:
            assert np.count_nonzero(p) <= n_keep
        dist = np.sum((v - p) ** 2)
        assert dist == pytest.approx(brute_force_projection(v, scale, nbits, n_keep), rel=tol, abs=tol)


def test_projection_ties_go_to_the_lower_index():
    V = np.array([[1.0, -1.0, 1.0, 0.5]])
    out = np.empty_like(V)
    _kernels.project_rows(V, np.ones(1), _kernels.FLOAT, 2, out)
    np.testing.assert_array_equal(out, [[1.0, -1.0, 0.0, 0.0]])


def test_projection_with_many_slots_matches_sorting():
    rng = np.random.default_rng(3)
    V = rng.normal(size=(50, 40))
    out = np.empty_like(V)
    _kernels.project_rows(V, np.ones(50), _kernels.FLOAT, 17, out)
    ref = np.where(np.argsort(np.argsort(-np.abs(V), axis=1), axis=1) < 17, V, 0.0)
    np.testing.assert_array_equal(out, ref)


def dense(idx, val, k):
    Z = np.zeros((idx.shape[0], k))
    np.put_along_axis(Z, idx.astype(np.int64), val.astype(np.float64), axis=1)
    return Z


def brute_force_codes(x, C, nbits, n_keep):
    """Best codes for one row over every support and every level assignment (float: LS)."""
    best = np.inf
    k = C.shape[0]
    for support in itertools.combinations(range(k), n_keep):
        S = C[list(support)]
        if nbits == _kernels.FLOAT:
            coef = np.linalg.lstsq(S.T, x, rcond=None)[0]
            best = min(best, np.sum((x - coef @ S) ** 2))
            continue
        for values in itertools.product(unit_levels(nbits), repeat=n_keep):
            best = min(best, np.sum((x - np.asarray(values) @ S) ** 2))
    return best


def run_update(X, C, nbits, n_keep, *, entry="cold", idx=None, val=None, width=1, rotation=-1):
    """Run one of the code kernels' entry points (``cold``, ``improve`` or ``one_slot``), with
    ``width`` starts of the multi-start descent."""
    m = X.shape[0]
    if idx is None:
        idx = np.zeros((m, n_keep), dtype=_kernels.INDEX_DTYPE)
        val = np.zeros((m, n_keep), dtype=X.dtype)
    gram = C.astype(np.float64) @ C.T.astype(np.float64)
    eta = 1.0 / np.linalg.eigvalsh(gram)[-1]
    err = np.empty(m)
    if entry == "cold":
        _kernels.solve_codes_cold(X, C.T, gram, nbits, 4, width, idx, val, err)
    elif entry == "improve":
        _kernels.improve_codes(X, C.T, gram, eta, nbits, 4, width, rotation, idx, val, err)
    else:
        _kernels.assign_one_slot(X, C.T, gram, nbits, idx, val, err)
    return idx, val, err


@pytest.mark.parametrize("entry", ["cold", "one_slot"])
@pytest.mark.parametrize("nbits", NBITS)
def test_single_slot_codes_are_exact(nbits, entry, dtype):
    """With one slot the greedy fill is the exact minimiser: compare with brute force."""
    rng = np.random.default_rng(7 + nbits)
    X = rng.normal(size=(30, 5)).astype(dtype)
    C = rng.normal(size=(6, 5)).astype(dtype)
    idx, val, err = run_update(X, C, nbits, 1, entry=entry)
    tol = 1e-9 if dtype == np.float64 else 1e-4
    for x, e in zip(X.astype(np.float64), err):
        assert e == pytest.approx(brute_force_codes(x, C.astype(np.float64), nbits, 1), rel=tol)


@pytest.mark.parametrize("nbits", NBITS)
def test_one_slot_entry_equals_the_cold_solver(nbits, dtype):
    """The one-slot fast path makes the same choice as the general solver (float values and
    errors agree to rounding: the two compute them in different orders)."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 4)).astype(dtype)
    C = rng.normal(size=(9, 4)).astype(dtype)
    fast = run_update(X, C, nbits, 1, entry="one_slot")
    general = run_update(X, C, nbits, 1, entry="cold")
    np.testing.assert_array_equal(fast[0], general[0])
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(fast[1], general[1], rtol=rtol)
    np.testing.assert_allclose(fast[2], general[2], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("nbits", NBITS[1:])
def test_code_errors_are_exact_residuals(nbits, dtype):
    rng = np.random.default_rng(11)
    X = rng.normal(size=(40, 6)).astype(dtype)
    C = rng.normal(size=(7, 6)).astype(dtype)
    idx, val, err = run_update(X, C, nbits, 3)
    ref = np.sum((X.astype(np.float64) - dense(idx, val, 7) @ C.astype(np.float64)) ** 2, axis=1)
    np.testing.assert_allclose(err, ref, rtol=1e-9 if dtype == np.float64 else 2e-4, atol=1e-6)
    out = np.empty(40)
    _kernels.row_squared_errors(X, C, idx, val, out)
    np.testing.assert_allclose(out, ref, rtol=1e-9 if dtype == np.float64 else 1e-5)
    # slots: sorted, distinct positions, values on the level set
    assert np.all(np.diff(idx, axis=1) > 0)
    np.testing.assert_array_equal(val, quantize(val, 1.0, nbits))


@pytest.mark.parametrize("nbits", NBITS)
def test_code_update_never_increases_the_error(nbits, dtype):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(60, 6)).astype(dtype)
    C = rng.normal(size=(8, 6)).astype(dtype)
    idx, val, err0 = run_update(X, C, nbits, 2)
    C2 = (C + 0.3 * rng.normal(size=C.shape)).astype(dtype)
    before = np.sum((X.astype(np.float64) - dense(idx, val, 8) @ C2.astype(np.float64)) ** 2, 1)
    _, _, cold = run_update(X, C2, nbits, 2)
    idx, val, err = run_update(X, C2, nbits, 2, entry="improve", idx=idx, val=val)
    assert np.all(err <= before * (1 + 1e-6) + 1e-9)  # never worse than the incoming codes
    assert np.all(err <= cold * (1 + 1e-12) + 1e-12)  # nor than solving from scratch


@pytest.mark.parametrize("rotation", [1, 3])
@pytest.mark.parametrize("nbits", [1, 2, 3])
def test_improved_codes_are_the_better_of_the_round_and_the_rotated_start(nbits, rotation,
                                                                          dtype):
    """Row by row, improve_codes keeps the better of one improvement round from the incoming
    codes and the rotated start of the cold search (the cold one on a tie), as the two
    compiled pieces give them; rows whose rotated start settles on their incoming codes (the
    kernel then skips the round) included."""
    rng = np.random.default_rng(23 + nbits)
    X = rng.normal(size=(150, 5)).astype(dtype)
    C = rng.normal(size=(9, 5)).astype(dtype)
    idx, val, _ = run_update(X, C, nbits, 2, width=4)
    C2 = (C + 0.05 * rng.normal(size=C.shape)).astype(dtype)
    got_idx, got_val, got_err = run_update(X, C2, nbits, 2, entry="improve", idx=idx.copy(),
                                           val=val.copy(), width=4, rotation=rotation)
    X64, CT = X.astype(np.float64), np.ascontiguousarray(C2.T, dtype=np.float64)
    G = CT.T @ CT
    work = _kernels._row_work(G, 2, 4, False)
    p = np.empty(9)
    settled_on_incoming = 0
    for i in range(X.shape[0]):
        xx = _kernels._correlate(X64, i, CT, p)
        row_idx, row_val = idx[i].astype(np.int64), val[i].astype(np.float64)
        row_err = _kernels._improvement_round(row_idx, row_val, 2, False, False, p, G, xx,
                                              nbits, 0.0, 4, work)
        alt_idx, alt_val = np.empty(2, np.int64), np.empty(2)
        alt_err, _ = _kernels._solve_row_cold(alt_idx, alt_val, 2, False, False, p, G, xx,
                                              nbits, 4, work, rotation)
        order = np.argsort(alt_idx)
        settled_on_incoming += (np.array_equal(alt_idx[order], idx[i])
                                and np.array_equal(alt_val[order], val[i]))
        if alt_err <= row_err:
            row_idx, row_val, row_err = alt_idx, alt_val, alt_err
        order = np.argsort(row_idx)  # slots are stored by position
        np.testing.assert_array_equal(got_idx[i], row_idx[order])
        np.testing.assert_array_equal(got_val[i], row_val[order].astype(dtype))
        assert got_err[i] == max(row_err, 0.0)
    assert 10 < settled_on_incoming < X.shape[0]  # both paths of the kernel are exercised


@pytest.mark.parametrize("nbits", NBITS)
def test_multi_start_search(nbits, dtype):
    """More starts never lose to fewer (the first start is the greedy choice), the errors
    stay exact residuals on the level set, and with every position as a start the search
    reaches the brute-force optimum on more rows than the greedy start alone."""
    rng = np.random.default_rng(17)
    X = rng.normal(size=(80, 5)).astype(dtype)
    C = rng.normal(size=(7, 5)).astype(dtype)
    X64, C64 = X.astype(np.float64), C.astype(np.float64)
    best = np.array([brute_force_codes(x, C64, nbits, 2) for x in X64])
    tol = 1e-9 if dtype == np.float64 else 1e-4
    errors = {}
    for width in (1, 3, 7, 50):
        idx, val, err = run_update(X, C, nbits, 2, width=width)
        ref = np.sum((X64 - dense(idx, val, 7) @ C64) ** 2, axis=1)
        np.testing.assert_allclose(err, ref, rtol=tol, atol=1e-6)
        if nbits != _kernels.FLOAT:
            np.testing.assert_array_equal(val, quantize(val, 1.0, nbits))
        assert np.all(np.diff(idx, axis=1) > 0)
        assert np.all(err >= best * (1 - tol) - 1e-9)
        errors[width] = err
    assert np.all(errors[3] <= errors[1] * (1 + tol) + 1e-9)
    assert np.all(errors[7] <= errors[3] * (1 + tol) + 1e-9)
    np.testing.assert_array_equal(errors[50], errors[7])  # at most k starts
    exact = {w: int(np.sum(e <= best * (1 + tol) + 1e-9)) for w, e in errors.items()}
    assert exact[7] > exact[1], exact
    # the improvement entry keeps the better of its round and the multi-start solution
    idx, val, _ = run_update(X, C, nbits, 2)
    _, _, improved = run_update(X, C, nbits, 2, entry="improve", idx=idx.copy(), val=val.copy(),
                                width=7)
    assert np.all(improved <= errors[7] * (1 + tol) + 1e-9)
    # ... and with a rotation, the better of its round and that one start's solution: never
    # worse than the greedy codes that came in, never better than all starts
    for rotation in (0, 3, 9):
        _, _, one = run_update(X, C, nbits, 2, entry="improve", idx=idx.copy(), val=val.copy(),
                               width=7, rotation=rotation)
        assert np.all(one <= errors[1] * (1 + tol) + 1e-9)
        assert np.all(one >= improved * (1 - tol) - 1e-9)


# -- sparse float codes: least squares on a searched support ----------------------------------


def support_least_squares(p, G, xx, support):
    """Least-squares values on ``support``, the error, the residual correlations ``c`` and the
    squared norms ``g`` of the codebook rows outside the support's span (plain NumPy)."""
    S = list(support)
    if not S:
        return np.zeros(0), xx, p.copy(), np.diag(G).copy()
    values = np.linalg.solve(G[np.ix_(S, S)], p[S])
    c = p - G[:, S] @ values
    g = np.diag(G) - np.einsum("bt,bt->t", G[S, :], np.linalg.solve(G[np.ix_(S, S)], G[S, :]))
    return values, xx - p[S] @ values, c, g


def least_squares_search_reference(p, G, xx, n_slots, n_starts, max_swaps,
                                   independent=_kernels._INDEPENDENT):
    """The sparse float code search in plain NumPy: for each of the ``n_starts`` positions
    that alone fit best (ranked by ``p_j**2 / G_jj``, lower index first on a tie; one start
    is plain orthogonal least squares), orthogonal least squares from that first
    position, then the best exchange of one position for another while one lowers the error
    by more than the row's tolerance; the best start kept. Returns (positions, values,
    error), positions in slot order."""
    k = p.size
    diag = np.diag(G)
    savings = np.where(diag > 0, p * p / np.where(diag > 0, diag, 1.0), 0.0)
    ranked = sorted(range(k), key=lambda j: (-savings[j], j))
    tol = 1e-13 * xx + 1e-300
    best = None
    for start in ranked[:min(max(n_starts, 1), k)]:
        support = [start] if diag[start] > independent * diag[start] else []
        while len(support) < n_slots:  # orthogonal least squares
            _, _, c, g = support_least_squares(p, G, xx, support)
            free = [t for t in range(k) if t not in support and g[t] > independent * diag[t]]
            if not free:
                break
            support.append(max(free, key=lambda t: (c[t] ** 2 / g[t], -t)))
        r = len(support)
        values, err, _, _ = support_least_squares(p, G, xx, support)
        for _ in range(max_swaps if r == n_slots else 0):  # best exchange first
            move, gain = None, tol
            for a in range(r):
                rest = support[:a] + support[a + 1:]
                _, rest_err, c, g = support_least_squares(p, G, xx, rest)
                for j in range(k):
                    if j in support or g[j] <= independent * diag[j]:
                        continue
                    delta = c[j] ** 2 / g[j] - (rest_err - err)
                    if delta > gain:
                        move, gain = (a, j), delta
            if move is None:
                break
            trial = list(support)
            trial[move[0]] = move[1]
            trial_values, trial_err, _, _ = support_least_squares(p, G, xx, trial)
            if trial_err > err - tol:
                break
            support, values, err = trial, trial_values, trial_err
        unused = [t for t in range(k) if t not in support]
        positions = support + unused[:n_slots - r]
        full_values = np.concatenate([values, np.zeros(n_slots - r)])
        if best is None or err < best[2]:
            best = (positions, full_values, err)
    return best


def best_exchange_gain(x, C, positions):
    """The largest decrease of the least-squares error over all exchanges of one position of
    ``positions`` for one outside it (brute force)."""
    def error(S):
        coef = np.linalg.lstsq(C[S].T, x, rcond=None)[0]
        return np.sum((x - coef @ C[S]) ** 2)

    base = error(list(positions))
    gains = [base - error(list(positions[:a]) + [j] + list(positions[a + 1:]))
             for a in range(len(positions)) for j in range(C.shape[0]) if j not in positions]
    return max(gains)


@pytest.mark.parametrize("width", [1, 3, 8, 50])
@pytest.mark.parametrize("k, d, n_keep", [(9, 5, 3), (12, 4, 2), (6, 6, 4)])
def test_sparse_float_codes_match_numpy_reference(k, d, n_keep, width, dtype):
    rng = np.random.default_rng(100 * k + 10 * d + n_keep)
    X = (rng.normal(size=(30, d)) @ rng.normal(size=(d, d))).astype(dtype)
    C = rng.normal(size=(k, d)).astype(dtype)
    idx, val, err = run_update(X, C, _kernels.FLOAT, n_keep, width=width)
    P = X.astype(np.float64) @ C.T.astype(np.float64)  # the kernels correlate in float64
    G = C.astype(np.float64) @ C.T.astype(np.float64)
    xx = np.einsum("ij,ij->i", X, X, dtype=np.float64)
    for i in range(X.shape[0]):
        positions, values, ref_err = least_squares_search_reference(
            P[i], G, xx[i], n_keep, width, max_swaps=4 * n_keep)
        order = np.argsort(positions)
        np.testing.assert_array_equal(idx[i], np.asarray(positions)[order])
        rtol = 1e-9 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(val[i], values[order], rtol=rtol,
                                   atol=rtol * np.abs(values).max())
        assert err[i] == pytest.approx(max(ref_err, 0.0), rel=1e-9, abs=1e-9 * xx[i])


def test_sparse_float_codes_are_exchange_optimal_and_improve_with_starts(dtype):
    """Least-squares values on a support that no exchange of one position improves (brute
    force over all exchanges), never below the optimum, and never worse with more starts."""
    rng = np.random.default_rng(8)
    k, d, n_keep = 10, 4, 2
    X = (rng.normal(size=(40, d)) @ rng.normal(size=(d, d))).astype(dtype)
    C = rng.normal(size=(k, d)).astype(dtype)
    idx, val, err = run_update(X, C, _kernels.FLOAT, n_keep, width=k)
    X64, C64 = X.astype(np.float64), C.astype(np.float64)
    fewer = [run_update(X, C, _kernels.FLOAT, n_keep, width=w)[2] for w in range(1, k)]
    rtol = 1e-9 if dtype == np.float64 else 1e-5
    for i, x in enumerate(X64):
        S = list(idx[i])
        coef = np.linalg.lstsq(C64[S].T, x, rcond=None)[0]
        np.testing.assert_allclose(val[i], coef, rtol=rtol, atol=rtol * np.abs(coef).max())
        assert best_exchange_gain(x, C64, S) <= rtol * x @ x
        assert err[i] >= brute_force_codes(x, C64, _kernels.FLOAT, n_keep) - rtol * x @ x
        # never worse than fewer starts (errors of equal supports agree to rounding)
        assert err[i] <= min(e[i] for e in fewer) + 1e-12 * x @ x


def test_sparse_float_codes_of_rows_in_the_span(dtype):
    """Rows equal to a codebook row or to a combination of ``n_keep`` of them are fitted
    exactly, also with duplicated and zero codebook rows (dependent positions never share a
    support; left-over slots hold zeros at distinct positions)."""
    rng = np.random.default_rng(4)
    C = rng.normal(size=(8, 5))
    C[5] = C[2]  # a duplicate
    C[6] = 0.0  # an empty row
    C[7] = C[0] + C[1]  # in the span of two others
    X = np.vstack([C[:6], C[[0, 3, 4]].sum(axis=0), 2 * C[1] - C[4]]).astype(dtype)
    C = C.astype(dtype)
    for n_keep in (3, 5, 7):
        idx, val, err = run_update(X, C, _kernels.FLOAT, n_keep, width=8)
        assert np.all(np.diff(idx, axis=1) > 0)
        resid = X.astype(np.float64) - dense(idx, val, 8) @ C.astype(np.float64)
        scale = np.sum(X.astype(np.float64) ** 2, axis=1)
        tol = 1e-20 if dtype == np.float64 else 1e-10
        assert np.all(np.sum(resid**2, axis=1) <= tol * scale)
        # the kernel's errors come from correlations in the data type
        assert np.all(err <= (1e-12 if dtype == np.float64 else 1e-6) * scale)
    # rank 5 < n_keep = 7: the search stops with the span, the other slots hold zeros
    assert np.all(np.count_nonzero(val, axis=1) <= 5)


@pytest.mark.parametrize("nbits", [1, 2])
def test_dense_quantized_codes_near_brute_force(nbits):
    """Dense codes on a grid: coordinate descent from a greedy fill finds the optimum on
    well-conditioned tiny problems (and is never worse than rounding least squares)."""
    rng = np.random.default_rng(21)
    C = np.linalg.qr(rng.normal(size=(4, 4)))[0][:3]
    X = rng.normal(size=(25, 4)) * 1.5
    idx, val, err = run_update(X, C, nbits, 3)
    for x, e in zip(X, err):
        assert e <= brute_force_codes(x, C, nbits, 3) + 1e-9  # orthonormal C: separable


def test_densify_codes():
    idx = np.array([[0, 2], [1, 3]], dtype=np.int32)
    val = np.array([[1.5, -0.5], [2.0, 3.0]])
    out = np.zeros((2, 4))
    _kernels.densify_codes(idx, val, out)
    np.testing.assert_array_equal(out, [[1.5, 0, -0.5, 0], [0, 2.0, 0, 3.0]])


def test_code_statistics_match_dense_products(dtype):
    """The sufficient statistics of sparse codes equal the dense products Z^T Z and Z^T X
    (repeated positions across rows, zero values and an unused position included)."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(40, 3)).astype(dtype)
    # two distinct sorted positions per row among the first four: position 4 is unused
    idx = np.sort(rng.permuted(np.tile(np.arange(4), (40, 1)), axis=1)[:, :2], axis=1)
    idx = idx.astype(_kernels.INDEX_DTYPE)
    val = rng.normal(size=(40, 2)).astype(dtype)
    val[::7, 1] = 0.0
    Z = dense(idx, val, 5).astype(np.float64)
    ZtZ, ZtX = np.zeros((5, 5)), np.zeros((5, 3))
    _kernels.code_statistics(X, idx, val, ZtZ, ZtX)
    np.testing.assert_allclose(ZtZ, Z.T @ Z, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ZtX, Z.T @ X.astype(np.float64), rtol=1e-12, atol=1e-12)
    assert np.all(ZtZ[4] == 0) and np.all(ZtX[4] == 0)


@pytest.mark.parametrize("n_keep", [1, 3, 8])
def test_select_largest_orders_by_saving_then_index(n_keep):
    """The kept positions are the n_keep largest savings, largest first and the lower index
    first on a tie: a stable sort, on values with many ties."""
    rng = np.random.default_rng(n_keep)
    out = np.empty(n_keep, dtype=np.int64)
    candidates = np.empty(20, dtype=np.int64)
    for _ in range(50):
        savings = rng.integers(-3, 6, size=20).astype(np.float64)
        _kernels._select_largest(savings, n_keep, out, candidates)
        expected = np.argsort(-savings, kind="stable")[:n_keep]
        np.testing.assert_array_equal(out, expected)
    _kernels._select_largest(savings, 0, out[:0], candidates)  # nothing to keep: no read
    # NaN savings (excluded upstream) still give n_keep distinct positions in range
    savings[::2] = np.nan
    out[:] = -1
    _kernels._select_largest(savings, n_keep, out, candidates)
    assert len(set(out.tolist())) == n_keep and np.all((out >= 0) & (out < 20))


@pytest.mark.parametrize("n_keep", [1, 2, 5, 8])
def test_select_largest_on_long_rows(n_keep):
    """Blocks long enough for the interleaved running maxima of :func:`_largest` (and a last
    partial group of four): the same positions as a stable sort, ties and signed zeros
    included."""
    rng = np.random.default_rng(40 + n_keep)
    out = np.empty(n_keep, dtype=np.int64)
    for m in (37, 256, 258):
        candidates = np.empty(m, dtype=np.int64)
        for _ in range(20):
            savings = rng.integers(-40, 40, size=m) / 4.0
            savings[rng.random(m) < 0.1] = -0.0
            _kernels._select_largest(savings, n_keep, out, candidates)
            np.testing.assert_array_equal(out, np.argsort(-savings, kind="stable")[:n_keep])


def test_largest_is_the_maximum_of_the_slice():
    rng = np.random.default_rng(3)
    values = rng.normal(size=23)
    for start in range(0, 23):
        for stop in range(start, 24):
            expected = values[start:stop].max() if stop > start else -np.inf
            assert _kernels._largest(values, start, stop) == expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_correlate_sums_in_coordinate_order(dtype):
    """The correlations of a row (four coordinates per pass after the first d mod 4) are,
    bit for bit, the float64 sums of x_t C_jt in coordinate order from zero, and the squared
    norm likewise, for every row length from 1 to 9."""
    rng = np.random.default_rng(11)
    for d in range(1, 10):
        X = (rng.normal(size=(4, d)) * 10.0 ** rng.integers(-3, 4, size=(4, d))).astype(dtype)
        C = rng.normal(size=(13, d)).astype(dtype)
        X64, CT = X.astype(np.float64), np.ascontiguousarray(C.T, dtype=np.float64)
        p = np.empty(13)
        for i in range(4):
            expected, expected_xx = np.zeros(13), 0.0
            for t in range(d):
                expected = expected + X64[i, t] * CT[t]
                expected_xx += X64[i, t] * X64[i, t]
            assert _kernels._correlate(X64, i, CT, p) == expected_xx
            np.testing.assert_array_equal(p, expected)


@pytest.mark.parametrize("threshold", [-np.inf, 0.5, 2.0, np.inf])
def test_positions_above_lists_the_free_positions_whose_bound_passes(threshold):
    """A coordinate sweep's scan: the bounds (c_j + q0 G[j0, j])**2 / G_jj of every position,
    and the positions not in use whose bound is not at most the threshold, in increasing
    order; a NaN bound (0 * inf) is listed, so that its position is priced as a plain scan
    prices it."""
    rng = np.random.default_rng(7)
    k, j0, q0 = 37, 5, -1.5
    A = rng.normal(size=(k, 4))
    G = A @ A.T
    G[9] = G[:, 9] = 0.0  # an empty codeword: its factor 1 / G_jj is 0
    inv_g = _kernels._inverse_diagonal(G)
    c = rng.normal(size=k)
    inv_g[11] = np.inf  # a squared norm whose inverse overflows, and c_11 + q0 G[j0, 11] = 0
    c[11] = -q0 * G[j0, 11]
    used = np.zeros(k, dtype=np.bool_)
    used[[j0, 20]] = True
    bounds = np.full(k, np.nan)
    out = np.full(k, -1, dtype=np.int64)
    n = _kernels._positions_above(c, G, j0, q0, inv_g, used, threshold, bounds, out)
    with np.errstate(invalid="ignore"):  # 0 * inf at position 11
        expected_bounds = (c + q0 * G[j0]) ** 2 * inv_g
    np.testing.assert_allclose(bounds, expected_bounds, rtol=1e-14, atol=0)
    assert np.isnan(bounds[11])
    expected = np.flatnonzero(~(bounds <= threshold) & ~used)
    assert 11 in expected
    assert n == expected.size
    np.testing.assert_array_equal(out[:n], expected)


# -- one-hot codes: the Lloyd pass -------------------------------------------------------------


def run_lloyd_pass(X, C, chunk_rows):
    n, d = X.shape
    k = C.shape[0]
    n_chunks = -(-n // chunk_rows)
    labels = np.empty(n, dtype=_kernels.INDEX_DTYPE)
    row_err = np.empty(n)
    sums = np.empty((k, d))
    counts = np.empty(k, dtype=np.int64)
    total = _kernels.lloyd_pass(X, np.ascontiguousarray(C.T), chunk_rows, labels, row_err,
                                np.empty((n_chunks, k, d)), np.empty((n_chunks, k), np.int64),
                                sums, counts)
    return labels, row_err, sums, counts, total


@pytest.mark.parametrize("d", [3, 9])
@pytest.mark.parametrize("chunk_rows", [1, 4, 64])
def test_lloyd_pass_matches_numpy_reference(chunk_rows, d, dtype):
    rng = np.random.default_rng(12)
    X = rng.normal(size=(37, d)).astype(dtype)
    C = rng.normal(size=(5, d)).astype(dtype)
    labels, row_err, sums, counts, total = run_lloyd_pass(X, C, chunk_rows)
    X64, C64 = X.astype(np.float64), C.astype(np.float64)
    distances = ((X64[:, None, :] - C64[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, distances.argmin(axis=1))
    np.testing.assert_allclose(row_err, distances.min(axis=1), rtol=1e-12)
    ref_sums = np.zeros((5, d))
    np.add.at(ref_sums, labels, X64)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=5))
    assert total == pytest.approx(row_err.sum(), rel=1e-12)
    # transform's entry makes the same choice and reports the same errors
    nearest, nearest_err = np.empty_like(labels), np.empty(37)
    _kernels.assign_nearest(X, np.ascontiguousarray(C.T), nearest, nearest_err)
    np.testing.assert_array_equal(nearest, labels)
    np.testing.assert_array_equal(nearest_err, row_err)


def test_lloyd_pass_ties_go_to_the_lowest_index(dtype):
    X = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]], dtype=dtype)
    C = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    labels, row_err, _, counts, _ = run_lloyd_pass(X, C, 2)
    np.testing.assert_array_equal(labels, [0, 0, 0])
    np.testing.assert_array_equal(row_err, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(counts, [3, 0, 0, 0])


def test_lloyd_pass_is_exact_far_from_the_origin():
    """Distances from differences: an offset of 1e4 in float32 costs nothing."""
    rng = np.random.default_rng(2)
    C = (1e4 + rng.integers(-2, 3, size=(4, 4))).astype(np.float32)
    X = (C[rng.integers(0, 4, size=50)] + 0.01 * rng.normal(size=(50, 4))).astype(np.float32)
    labels, row_err, *_ = run_lloyd_pass(X, C, 8)
    distances = ((X.astype(np.float64)[:, None] - C.astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, distances.argmin(axis=1))
    np.testing.assert_allclose(row_err, distances.min(axis=1), rtol=1e-12)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="numba has one thread here")
def test_lloyd_pass_does_not_depend_on_the_thread_count():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(5000, 4)).astype(np.float32)
    C = X[:7].copy()
    results = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        results.append(run_lloyd_pass(X, C, 64))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def _holds_an_array(numba_type):
    """Whether a numba type is an array or a tuple holding one."""
    if isinstance(numba_type, numba.types.Array):
        return True
    return any(_holds_an_array(t) for t in getattr(numba_type, "types", ()))


@pytest.mark.slow  # compiles the row kernels anew: about 11 s
def test_helpers_compiled_without_reference_counting_return_no_array(monkeypatch):
    """A helper compiled without reference counting (``_jit.njit(refcounts=False)``) must not
    return an array: its counting caller would release a reference it was never given. The
    row kernels and the helpers are compiled anew here, without numba's cache, which would
    load a kernel with its helpers inside and leave the helpers' own signatures unknown;
    compiled for the arguments of real calls, and not run (a helper that broke the rule
    could corrupt memory before the check)."""
    from numba.core.caching import NullCache

    from qsdlearn import _jit

    if not _jit._CAN_SKIP_REFCOUNTS:
        pytest.skip("this numba compiles every function with reference counting")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 3))
    C = rng.standard_normal((6, 3))
    gram = C @ C.T
    for dispatcher in _jit.UNCOUNTED:
        monkeypatch.setattr(dispatcher, "_cache", NullCache())
    code_rows = numba.njit(_kernels._code_rows.py_func)
    for nbits, n_slots in [(_kernels.FLOAT, 2), (2, 6)]:
        idx = np.zeros((40, n_slots), dtype=_kernels.INDEX_DTYPE)
        args = (X, C.T.copy(), gram, 0.1, nbits, 4, 3, 1, True, idx, np.zeros((40, n_slots)),
                np.zeros(40), 0, 40)
        code_rows.compile(tuple(numba.typeof(a) for a in args))
    args = (X, np.ones(40), 2, 2, np.zeros_like(X), 0, 40)
    numba.njit(_kernels._project_rows.py_func).compile(tuple(numba.typeof(a) for a in args))
    # A helper already compiled (or loaded from the cache) by earlier tests is not typed
    # again, nor are its callees: each signature is typed anew, until no new one appears.
    uncounted = {d.py_func.__name__ for d in _jit.UNCOUNTED}
    checked = set()
    while True:
        signatures = {(d, s) for d in _jit.UNCOUNTED for s in d.nopython_signatures} - checked
        if not signatures:
            break
        for dispatcher, signature in signatures:
            assert not _holds_an_array(signature.return_type), (dispatcher, signature)
            if uncounted & set(dispatcher.py_func.__code__.co_names):  # it calls helpers
                numba.njit(dispatcher.py_func).compile(signature.args)
        checked |= signatures
    assert len({d for d, _ in checked}) == len(_jit.UNCOUNTED)


def test_a_helper_compiled_without_reference_counting_cannot_allocate(monkeypatch):
    from qsdlearn import _jit

    if not _jit._CAN_SKIP_REFCOUNTS:
        pytest.skip("this numba compiles every function with reference counting")
    monkeypatch.setattr(_jit, "UNCOUNTED", [])
    monkeypatch.setattr(_jit, "_CACHE", False)

    @_jit.njit(refcounts=False)
    def allocates(n):
        return np.empty(n)

    with pytest.raises(numba.core.errors.TypingError):
        allocates(3)


@pytest.mark.parametrize("n_rows", [0, 1, 5, 300])
def test_dense_positions_decode_as_explicit_ones_with_one_signature(n_rows, dtype):
    """Dense codes' positions (:func:`all_positions`, a read-only view of one repeated row)
    decode and give errors exactly as an explicit array of every row's positions does, and
    as NumPy does; the decoding kernels never compile a signature for the view."""
    rng = np.random.default_rng(12)
    k, d = 6, 5
    X = rng.normal(size=(n_rows, d)).astype(dtype)
    C = rng.normal(size=(k, d)).astype(dtype)
    val = rng.normal(size=(n_rows, k)).astype(dtype)
    val[:, 2] = 0  # a zero value is skipped by the decoder
    view = _kernels.all_positions(n_rows, k)
    explicit = np.array(view, order="C")
    decoded, expected = np.empty((n_rows, d), dtype), np.empty((n_rows, d), dtype)
    errors, expected_errors = np.empty(n_rows), np.empty(n_rows)
    _kernels.reconstruct_from_slots(explicit, val, C, expected)
    _kernels.row_squared_errors(X, C, explicit, val, expected_errors)
    kernels = (_kernels._reconstruct_from_slots, _kernels._row_squared_errors)
    compiled = [set(kernel.signatures) for kernel in kernels]
    _kernels.reconstruct_from_slots(view, val, C, decoded)
    _kernels.row_squared_errors(X, C, view, val, errors)
    assert [set(kernel.signatures) for kernel in kernels] == compiled  # no new signature
    np.testing.assert_array_equal(decoded, expected)
    np.testing.assert_array_equal(errors, expected_errors)
    reference = val.astype(np.float64) @ C.astype(np.float64)
    np.testing.assert_allclose(decoded, reference, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-5 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(errors, np.sum((X - reference) ** 2, axis=1), rtol=1e-9)


def test_decoding_refuses_positions_and_values_of_different_rows():
    """Positions of fewer (or more) rows than the values: a ValueError, not a read past the
    positions in the compiled kernel."""
    val = np.ones((4, 3), np.float32)
    C = np.ones((3, 2), np.float32)
    for idx in (np.zeros((2, 3), np.int32), np.zeros((1, 3), np.int32),
                _kernels.all_positions(5, 3)):
        with pytest.raises(ValueError, match="rows"):
            _kernels.reconstruct_from_slots(idx, val, C, np.empty((4, 2), np.float32))
        with pytest.raises(ValueError, match="rows"):
            _kernels.row_squared_errors(np.ones((4, 2), np.float32), C, idx, val, np.empty(4))
