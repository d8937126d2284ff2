"""Numba kernels: projections onto sparse, quantized sets and row-wise code updates.

Everything here is a pure function on arrays (outputs are preallocated by the caller and
written in place). The Python driver in :mod:`qsdlearn._solver` owns iteration, convergence
and verbosity. Kernels never import scikit-learn.

Level sets
----------
Values are quantized on *unit* level sets, optionally multiplied by a per-row scale:

- ``nbits < 0`` (:data:`FLOAT`): no quantization, the value itself;
- ``nbits == 0``: the single value ``1`` (one-hot codes);
- ``nbits >= 1``: the ``2**nbits`` symmetric mid-rise levels ``i - 2**(nbits-1) + 1/2`` for
  ``i = 0 .. 2**nbits - 1`` (``±1/2`` for one bit, ``±1/2, ±3/2`` for two bits, ...).

The mid-rise set has no zero level: zeros are expressed by the support, never by a value.

Slots
-----
A sparse row is stored as ``n_keep`` *slots* ``(index, value)``: exactly ``n_keep`` distinct
positions, sorted by position. With quantized values every slot is nonzero; with float values
a slot may hold zero. A *dense* row has one slot per position (slot ``a`` is position ``a``).
"""

import math
import os

import numba
import numpy as np

#: ``nbits`` value meaning "float values, no quantization".
FLOAT = -1

#: Rows processed by one parallel task; fixed so results never depend on the thread count.
_CHUNK_ROWS = 256


def _cache_is_writable():
    """Whether numba's on-disk cache can be used (never on read-only installs)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return True
    return os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK)


_CACHE = _cache_is_writable()


def _njit(**options):
    return numba.njit(cache=_CACHE, nogil=True, **options)


@_njit()
def quantize_scalar(v, scale, nbits):
    """Nearest point to ``v`` on ``scale`` times the unit level set of ``nbits`` bits."""
    if nbits < 0:
        return v
    if nbits == 0:
        return scale
    if scale == 0.0:
        return 0.0
    half = 1 << (nbits - 1)
    i = math.floor(v / scale + half)
    if i < 0:
        i = 0
    elif i > 2 * half - 1:
        i = 2 * half - 1
    return (i - half + 0.5) * scale


@_njit()
def _sort_slots(idx, val, n):
    # Insertion sort by index: n is small and the slots are nearly sorted already.
    for a in range(1, n):
        j = idx[a]
        v = val[a]
        b = a - 1
        while b >= 0 and idx[b] > j:
            idx[b + 1] = idx[b]
            val[b + 1] = val[b]
            b -= 1
        idx[b + 1] = j
        val[b + 1] = v


@_njit()
def _better(gains, i, j):
    # Larger gain first; the lower index wins a tie, so the selection is deterministic.
    return gains[i] > gains[j] or (gains[i] == gains[j] and i < j)


@_njit()
def _select_largest(gains, n_keep, out_idx):
    """Positions of the ``n_keep`` largest gains, in no particular order (a min-heap of the
    kept ones, O(m log n_keep))."""
    for a in range(n_keep):
        out_idx[a] = a
        child = a
        while child > 0:  # sift up: the heap root is the worst kept position
            parent = (child - 1) // 2
            if _better(gains, out_idx[parent], out_idx[child]):
                out_idx[parent], out_idx[child] = out_idx[child], out_idx[parent]
                child = parent
            else:
                break
    for i in range(n_keep, gains.shape[0]):
        if not _better(gains, i, out_idx[0]):
            continue
        out_idx[0] = i
        parent = 0
        while True:  # sift down
            worst = parent
            for child in (2 * parent + 1, 2 * parent + 2):
                if child < n_keep and _better(gains, out_idx[worst], out_idx[child]):
                    worst = child
            if worst == parent:
                break
            out_idx[parent], out_idx[worst] = out_idx[worst], out_idx[parent]
            parent = worst


@_njit()
def _project_row(v, scale, nbits, n_keep, gains, out_idx, out_val):
    """Exact Euclidean projection of ``v`` onto {exactly ``n_keep`` slots, values on the grid}.

    The problem separates: quantizing entry ``i`` to its nearest level ``q_i`` saves
    ``v_i**2 - (v_i - q_i)**2`` against leaving it at zero, so the best support is the
    ``n_keep`` entries with the largest saving (ties go to the lower index).
    """
    m = v.shape[0]
    if n_keep >= m:
        for i in range(m):
            out_idx[i] = i
            out_val[i] = quantize_scalar(v[i], scale, nbits)
        return
    for i in range(m):
        q = quantize_scalar(v[i], scale, nbits)
        gains[i] = v[i] * v[i] - (v[i] - q) * (v[i] - q)
    _select_largest(gains, n_keep, out_idx)
    for a in range(n_keep):
        out_val[a] = quantize_scalar(v[out_idx[a]], scale, nbits)
    _sort_slots(out_idx, out_val, n_keep)


@_njit(parallel=True)
def project_rows(V, scales, nbits, n_keep, out):
    """Project every row of ``V`` (its own scale) and write the dense result into ``out``."""
    m, n = V.shape
    keep = min(n_keep, n)
    for i in numba.prange(m):
        gains = np.empty(n, dtype=np.float64)
        slot_idx = np.empty(keep, dtype=np.int64)
        slot_val = np.empty(keep, dtype=np.float64)
        row = V[i].astype(np.float64)
        _project_row(row, np.float64(scales[i]), nbits, keep, gains, slot_idx, slot_val)
        out[i, :] = 0
        for a in range(keep):
            out[i, slot_idx[a]] = slot_val[a]


@_njit()
def codebook_row_sweep(ZtZ, ZtX, C, scales, nbits, n_keep):
    """Exact block-coordinate pass over the codebook rows, in place.

    Given the codes (through ``ZtZ = Z^T Z`` and ``ZtX = Z^T X``) and all other rows, the
    objective in row ``j`` is ``ZtZ[j, j] * ||C[j] - target||^2`` plus a constant, with
    ``target = C[j] + (ZtX[j] - ZtZ[j] @ C) / ZtZ[j, j]``; its exact minimiser over the row's
    constraint set is the projection of ``target``. Unused rows (``ZtZ[j, j] == 0``) are left.
    """
    k, d = C.shape
    keep = min(n_keep, d)
    target = np.empty(d, dtype=np.float64)
    gains = np.empty(d, dtype=np.float64)
    slot_idx = np.empty(keep, dtype=np.int64)
    slot_val = np.empty(keep, dtype=np.float64)
    for j in range(k):
        weight = ZtZ[j, j]
        if weight <= 0.0:
            continue
        for t in range(d):
            residual = ZtX[j, t]
            for i in range(k):
                residual -= ZtZ[j, i] * C[i, t]
            target[t] = C[j, t] + residual / weight
        _project_row(target, scales[j], nbits, keep, gains, slot_idx, slot_val)
        for t in range(d):
            C[j, t] = 0.0
        for a in range(keep):
            C[j, slot_idx[a]] = slot_val[a]


# --------------------------------------------------------------------------------------
# Row-wise code solver in coefficient space.
#
# For a row x and codebook C, write p = C x (correlations) and G = C C^T (Gram). The squared
# error of codes z is ||x||^2 - 2 z.p + z G z^T, and c = p - G z is minus the gradient.
# Every update below works with p, G and c only, so a row costs O(k d) once for p and then
# O(n_keep * k) per step: no (n, k, levels) array is ever formed.
# --------------------------------------------------------------------------------------


@_njit()
def _row_error(idx, val, n, p, G, xx):
    err = xx
    for a in range(n):
        ja = idx[a]
        va = np.float64(val[a])
        err -= 2.0 * va * p[ja]
        for b in range(n):
            err += va * np.float64(val[b]) * G[ja, idx[b]]
    return err


@_njit()
def _best_value(cj, gjj, nbits):
    """Best value for one slot on position j given the others, and what it saves."""
    if nbits < 0:
        q = cj / gjj if gjj > 0.0 else 0.0
    elif gjj > 0.0:
        q = quantize_scalar(cj / gjj, 1.0, nbits)
    else:
        q = quantize_scalar(0.0, 1.0, nbits)
    return q, 2.0 * q * cj - q * q * gjj


@_njit()
def _residual_correlation(idx, val, n, p, G, c):
    k = p.shape[0]
    for t in range(k):
        c[t] = p[t]
    for a in range(n):
        ja = idx[a]
        va = np.float64(val[a])
        for t in range(k):
            c[t] -= va * G[ja, t]


@_njit()
def _cholesky_solve(A, b, n):
    """Solve A x = b in place (b becomes x) for the leading n x n block; False if singular."""
    tiny = 1e-12 * max(A[0, 0], 1e-300)
    for j in range(n):
        s = A[j, j]
        for t in range(j):
            s -= A[j, t] * A[j, t]
        if s <= tiny:
            return False
        A[j, j] = math.sqrt(s)
        for i in range(j + 1, n):
            s = A[i, j]
            for t in range(j):
                s -= A[i, t] * A[j, t]
            A[i, j] = s / A[j, j]
    for i in range(n):
        s = b[i]
        for t in range(i):
            s -= A[i, t] * b[t]
        b[i] = s / A[i, i]
    for i in range(n - 1, -1, -1):
        s = b[i]
        for t in range(i + 1, n):
            s -= A[t, i] * b[t]
        b[i] = s / A[i, i]
    return True


@_njit()
def _debias_slots(idx, val, n, p, G, A, b):
    """Least-squares values on a fixed support (float codes); keeps the old ones if singular."""
    for a in range(n):
        b[a] = p[idx[a]]
        for t in range(n):
            A[a, t] = G[idx[a], idx[t]]
    if _cholesky_solve(A, b, n):
        for a in range(n):
            val[a] = b[a]


@_njit()
def _greedy_slots(idx, val, n, dense, p, G, inv_g, nbits, c, used, A, b):
    """Cold start: fill the slots one at a time with the best (position, value) pair.

    With float values the values of the filled slots are refitted by least squares after
    every addition (orthogonal matching pursuit)."""
    k = p.shape[0]
    for t in range(k):
        c[t] = p[t]
        used[t] = False
    for a in range(n):
        if dense:
            best_j = a
            best_q, _ = _best_value(c[a], G[a, a], nbits)
        else:
            best_j = -1
            best_q = 0.0
            best_gain = -np.inf
            for j in range(k):
                # c_j**2 / G_jj bounds what position j can save (pruning; ties keep the first)
                if used[j] or c[j] * c[j] * inv_g[j] <= best_gain:
                    continue
                q, gain = _best_value(c[j], G[j, j], nbits)
                if gain > best_gain:
                    best_gain, best_j, best_q = gain, j, q
            if best_j < 0:  # defensive (non-finite input, excluded by validation): stay in bounds
                for j in range(k):
                    if not used[j]:
                        best_j = j
                        best_q, best_gain = _best_value(c[j], G[j, j], nbits)
                        break
        used[best_j] = True
        idx[a] = best_j
        val[a] = best_q
        if nbits < 0 and not dense and a > 0:
            _debias_slots(idx, val, a + 1, p, G, A, b)
            _residual_correlation(idx, val, a + 1, p, G, c)
        else:
            for t in range(k):
                c[t] -= best_q * G[best_j, t]


@_njit()
def _refine_slots(idx, val, n, dense, p, G, inv_g, nbits, max_sweeps, tol, c, used):
    """Exact block-coordinate descent: re-solve one slot at a time given all the others.

    Each step is the exact minimiser over (position, value) of one slot, the current pair
    included, so the error never increases. ``c`` must equal ``p - G z`` on entry.
    """
    k = p.shape[0]
    for t in range(k):
        used[t] = False
    for a in range(n):
        used[idx[a]] = True
    for _ in range(max_sweeps):
        changed = False
        for a in range(n):
            j0 = idx[a]
            q0 = np.float64(val[a])
            for t in range(k):
                c[t] += q0 * G[j0, t]
            keep_gain = 2.0 * q0 * c[j0] - q0 * q0 * G[j0, j0]
            best_j = j0
            best_q, best_gain = _best_value(c[j0], G[j0, j0], nbits)
            if not dense:
                for j in range(k):
                    if used[j] or c[j] * c[j] * inv_g[j] <= best_gain + tol:
                        continue
                    q, gain = _best_value(c[j], G[j, j], nbits)
                    if gain > best_gain + tol:
                        best_gain, best_j, best_q = gain, j, q
            if best_gain <= keep_gain + tol:
                best_j, best_q = j0, q0
            else:
                changed = True
            used[j0] = False
            used[best_j] = True
            idx[a] = best_j
            val[a] = best_q
            for t in range(k):
                c[t] -= best_q * G[best_j, t]
        if not changed:
            break


@_njit()
def _pgd_step(idx, val, n, dense, p, G, nbits, eta, z, gains, c):
    """One projected gradient step: z <- P(z + eta (p - G z)), written back into the slots."""
    k = p.shape[0]
    _residual_correlation(idx, val, n, p, G, c)
    for t in range(k):
        z[t] = 0.0
    for a in range(n):
        z[idx[a]] = val[a]
    for t in range(k):
        z[t] += eta * c[t]
    if dense:
        for t in range(k):
            idx[t] = t
            val[t] = quantize_scalar(z[t], 1.0, nbits)
    else:
        _project_row(z, 1.0, nbits, n, gains, idx, val)


@_njit()
def _run_rounds(idx, val, n, dense, p, G, xx, nbits, eta, n_rounds, max_sweeps, work):
    """Rounds of (gradient step, coordinate sweeps, debiasing) from the given slots; a round
    that does not lower the error is undone and ends the loop. Returns the error."""
    c, z, gains, used, old_idx, old_val, A, b, inv_g = work
    tol = 1e-13 * xx + 1e-300
    err = _row_error(idx, val, n, p, G, xx)
    for _ in range(n_rounds):
        for a in range(n):
            old_idx[a] = idx[a]
            old_val[a] = val[a]
        _pgd_step(idx, val, n, dense, p, G, nbits, eta, z, gains, c)
        _residual_correlation(idx, val, n, p, G, c)
        _refine_slots(idx, val, n, dense, p, G, inv_g, nbits, max_sweeps, tol, c, used)
        if nbits < 0 and not dense:
            _debias_slots(idx, val, n, p, G, A, b)
        new_err = _row_error(idx, val, n, p, G, xx)
        if new_err > err:
            for a in range(n):
                idx[a] = old_idx[a]
                val[a] = old_val[a]
            break
        improved = err - new_err
        err = new_err
        if improved <= tol:
            break
    return err


@_njit()
def _solve_row_cold(idx, val, n, dense, p, G, xx, nbits, eta, n_rounds, max_sweeps, work):
    """Codes of one row from scratch: greedy fill, sweeps, then improvement rounds."""
    c, z, gains, used, old_idx, old_val, A, b, inv_g = work
    tol = 1e-13 * xx + 1e-300
    _greedy_slots(idx, val, n, dense, p, G, inv_g, nbits, c, used, A, b)
    _refine_slots(idx, val, n, dense, p, G, inv_g, nbits, max_sweeps, tol, c, used)
    if nbits < 0 and not dense:
        _debias_slots(idx, val, n, p, G, A, b)
    return _run_rounds(idx, val, n, dense, p, G, xx, nbits, eta, n_rounds, max_sweeps, work)


#: ``update_codes`` start modes.
WARM, COLD, BEST_OF_BOTH = 0, 1, 2


@_njit()
def _inverse_diagonal(G):
    """``1 / G_jj`` for every j (0 for an empty codebook row): the pruning bounds' factors."""
    k = G.shape[0]
    inv_g = np.empty(k, dtype=np.float64)
    for j in range(k):
        inv_g[j] = 1.0 / G[j, j] if G[j, j] > 0.0 else 0.0
    return inv_g


@_njit()
def _update_code_rows(P, xx, G, eta, nbits, dense, mode, warm_rounds, cold_rounds, max_sweeps,
                      idx, val, err, start, stop):
    """Serial body of :func:`update_codes` for rows ``start:stop`` (kept out of the parallel
    loop so that the parallel wrapper stays small and quick to compile)."""
    k = P.shape[1]
    n = idx.shape[1]
    work = (
        np.empty(k, dtype=np.float64),  # c
        np.empty(k, dtype=np.float64),  # z
        np.empty(k, dtype=np.float64),  # gains
        np.empty(k, dtype=np.bool_),  # used
        np.empty(n, dtype=np.int64),  # old_idx
        np.empty(n, dtype=np.float64),  # old_val
        np.empty((n, n), dtype=np.float64),  # A
        np.empty(n, dtype=np.float64),  # b
        _inverse_diagonal(G),  # inv_g
    )
    p = np.empty(k, dtype=np.float64)
    row_idx = np.empty(n, dtype=np.int64)
    row_val = np.empty(n, dtype=np.float64)
    alt_idx = np.empty(n, dtype=np.int64)
    alt_val = np.empty(n, dtype=np.float64)
    for i in range(start, stop):
        for t in range(k):
            p[t] = P[i, t]
        row_err = np.inf
        if mode != COLD:
            for a in range(n):
                row_idx[a] = idx[i, a]
                row_val[a] = val[i, a]
            row_err = _run_rounds(row_idx, row_val, n, dense, p, G, xx[i], nbits, eta,
                                  warm_rounds, max_sweeps, work)
        if mode != WARM:
            alt_err = _solve_row_cold(alt_idx, alt_val, n, dense, p, G, xx[i], nbits, eta,
                                      cold_rounds, max_sweeps, work)
            if alt_err <= row_err:
                row_err = alt_err
                for a in range(n):
                    row_idx[a] = alt_idx[a]
                    row_val[a] = alt_val[a]
        if not dense:
            _sort_slots(row_idx, row_val, n)
        for a in range(n):
            idx[i, a] = row_idx[a]
            val[i, a] = row_val[a]
        err[i] = max(row_err, 0.0)


@_njit()
def _update_one_slot_rows(P, xx, G, nbits, idx, val, err, start, stop):
    """Cold codes of rows ``start:stop`` with one slot, in one pass over the correlations.

    With one slot the greedy fill of :func:`_solve_row_cold` is already the exact minimiser;
    this is the same choice (same pruning, ties keep the first position) and the same error,
    without the per-row work arrays the general solver needs.
    """
    k = P.shape[1]
    inv_g = _inverse_diagonal(G)
    for i in range(start, stop):
        best_j = 0
        best_q, best_gain = _best_value(np.float64(P[i, 0]), G[0, 0], nbits)
        for j in range(1, k):
            cj = np.float64(P[i, j])
            if cj * cj * inv_g[j] <= best_gain:
                continue
            q, gain = _best_value(cj, G[j, j], nbits)
            if gain > best_gain:
                best_gain, best_j, best_q = gain, j, q
        row_err = xx[i]
        row_err -= 2.0 * best_q * np.float64(P[i, best_j])
        row_err += best_q * best_q * G[best_j, best_j]
        idx[i, 0] = best_j
        val[i, 0] = best_q
        err[i] = max(row_err, 0.0)


@_njit(parallel=True)
def update_codes(P, xx, G, eta, nbits, dense, mode, warm_rounds, cold_rounds, max_sweeps,
                 idx, val, err):
    """Solve or improve the codes of a block of rows in place.

    Parameters
    ----------
    P : ndarray of shape (m, k)
        Correlations ``X_block @ C.T``.
    xx : ndarray of shape (m,), float64
        Squared norms of the rows.
    G : ndarray of shape (k, k), float64
        Gram matrix ``C @ C.T``.
    eta : float
        Gradient step, ``1 / lambda_max(G)``.
    nbits : int
        Level set of the code values (see the module docstring).
    dense : bool
        Whether slot ``a`` is pinned to position ``a`` (``n_keep == k``, no support).
    mode : int
        :data:`WARM`: improve the incoming slots by ``warm_rounds`` rounds (never worse);
        :data:`COLD`: ignore them and solve from scratch (greedy fill, coordinate sweeps, then
        ``cold_rounds`` rounds); :data:`BEST_OF_BOTH`: keep the better of the two per row
        (the cold one on a tie).
    warm_rounds, cold_rounds : int
        Rounds of (projected gradient step, coordinate sweeps, debiasing); a row stops early
        when a round does not lower its error.
    max_sweeps : int
        Coordinate sweeps per round (each re-solves every slot once, exactly).
    idx : ndarray of shape (m, n_keep), int32
        Slot positions, updated in place.
    val : ndarray of shape (m, n_keep)
        Slot values, updated in place.
    err : ndarray of shape (m,), float64
        Output: the squared error of every row after the update.
    """
    m = P.shape[0]
    n_chunks = (m + _CHUNK_ROWS - 1) // _CHUNK_ROWS
    one_slot = idx.shape[1] == 1 and not dense and mode != WARM
    for chunk in numba.prange(n_chunks):
        if one_slot:
            _update_one_slot_rows(P, xx, G, nbits, idx, val, err, chunk * _CHUNK_ROWS,
                                  min(m, (chunk + 1) * _CHUNK_ROWS))
            continue
        _update_code_rows(P, xx, G, eta, nbits, dense, mode, warm_rounds, cold_rounds,
                          max_sweeps, idx, val, err, chunk * _CHUNK_ROWS,
                          min(m, (chunk + 1) * _CHUNK_ROWS))


@_njit(parallel=True)
def row_squared_errors(X, C, idx, val, out):
    """``out[i] = ||X[i] - sum_a val[i, a] C[idx[i, a]]||^2``, accumulated in float64."""
    m, d = X.shape
    n = idx.shape[1]
    for i in numba.prange(m):
        total = 0.0
        for t in range(d):
            r = np.float64(X[i, t])
            for a in range(n):
                r -= np.float64(val[i, a]) * np.float64(C[idx[i, a], t])
            total += r * r
        out[i] = total


@_njit(parallel=True)
def densify_codes(idx, val, out):
    """Scatter slots into a dense (m, k) code matrix (``out`` must be zero on entry)."""
    m, n = idx.shape
    for i in numba.prange(m):
        for a in range(n):
            out[i, idx[i, a]] = val[i, a]
