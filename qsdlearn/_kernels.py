"""Numba kernels: projections onto sparse, quantized sets and row-wise code updates.

Everything here is a pure function on arrays (outputs are preallocated by the caller and
written in place). The Python driver in :mod:`qsdlearn._solver` owns iteration, convergence
and verbosity. Kernels never import scikit-learn.

Level sets
----------
Values are quantized on *unit* level sets, optionally multiplied by a per-row scale:

- ``nbits < 0`` (:data:`~qsdlearn._levels.FLOAT`): no quantization, the value itself;
- ``nbits == 0``: the single value ``1`` (one-hot codes);
- ``nbits >= 1``: the ``2**nbits`` symmetric mid-rise levels ``i - 2**(nbits-1) + 1/2`` for
  ``i = 0 .. 2**nbits - 1`` (``±1/2`` for one bit, ``±1/2, ±3/2`` for two bits, ...).

The mid-rise set has no zero level: zeros are expressed by the support, never by a value.

Slots
-----
A sparse row is stored as ``n_slots`` *slots* ``(index, value)``: exactly ``n_slots`` distinct
positions, sorted by position. With quantized values every slot is nonzero; with float values
a slot may hold zero. A *dense* row has one slot per position (slot ``a`` is position ``a``):
the code kernels recognise it by ``n_slots == k``.

Entry points
------------
Each entry does one job on a block of rows, in parallel: a Python function that runs one
serial compiled kernel in threads (:func:`~qsdlearn._jit.map_in_threads`), per fixed chunk
of rows for the code search (rows differ in cost), per contiguous range of rows (or of
fixed chunks, for the Lloyd pass) for the others; the
driver (:func:`qsdlearn._solver.solve_codes`) picks one per setting, before its loop:
:func:`solve_codes_cold` (``transform``: a multi-start search, each start a greedy fill then
exact coordinate sweeps; for sparse float codes, least squares on a support searched by
orthogonal least squares and exchanges of one position at a time),
:func:`improve_codes` (the alternating code step: the better of one improvement round from
the current codes and the cold solution) and :func:`assign_one_slot` (one slot: the greedy
choice is already exact). These three take the rows and the transposed codebook and
correlate each row with the codebook themselves, in float64, inside their threads: no
``(rows, k)`` array is formed, and no BLAS call runs beside them.

The per-row helpers of the code search allocate nothing and return no array: they are
compiled without numba's reference counting (``njit(refcounts=False)``, see
:func:`qsdlearn._jit.njit`), which took about 30 % of the search's time.
"""

import contextlib
import math

import numpy as np
from numba.extending import overload

from ._jit import map_in_threads, njit, split_among_threads
from ._levels import FLOAT  # noqa: F401  (re-exported: the kernels' name for float values)
from ._levels import SCALE_FRACTIONS

#: dtype of slot positions everywhere in the package (solver, kernels, codec).
INDEX_DTYPE = np.int32

#: Rows processed by one parallel task; fixed so results never depend on the thread count.
_CHUNK_ROWS = 256


def _per_chunk(kernel, m, *args):
    """``kernel(*args, start, stop)`` on every fixed chunk of :data:`_CHUNK_ROWS` of the ``m``
    rows, in threads: for kernels whose rows differ in cost, which the threads then share out
    chunk by chunk."""
    map_in_threads(lambda c: kernel(*args, c * _CHUNK_ROWS, min(m, (c + 1) * _CHUNK_ROWS)),
                   -(-m // _CHUNK_ROWS))


@njit()
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


@njit()
def _level_scales(values, nbits, mask, fractions, out):
    """Serial body of :func:`fit_level_scales`."""
    m, n = values.shape
    top_level = (1 << (nbits - 1)) - 0.5
    for j in range(n):
        top = 0.0
        for i in range(m):
            if mask[i, j]:
                top = max(top, abs(values[i, j]))
        out[j] = 1.0
        if not top > 0.0:
            continue
        best = np.inf
        for f in range(fractions.shape[0]):
            step = top / top_level * fractions[f]
            err = 0.0
            for i in range(m):
                if mask[i, j]:
                    r = values[i, j] - quantize_scalar(values[i, j], step, nbits)
                    err += r * r
            if err < best:
                best = err
                out[j] = step


def fit_level_scales(values, nbits, mask=None):
    """Per-column scale of the ``nbits`` grid (``nbits >= 1``) with the smallest squared
    quantization error over the entries of ``mask``: the compiled counterpart of
    :func:`qsdlearn._levels.fit_level_scales` (the same steps tried, its sums in another
    order). Returns float64 scales of shape ``(values.shape[1],)``."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    mask = (np.ones(values.shape, dtype=np.bool_) if mask is None
            else np.ascontiguousarray(mask, dtype=np.bool_))
    out = np.empty(values.shape[1], dtype=np.float64)
    _level_scales(values, int(nbits), mask, SCALE_FRACTIONS, out)
    return out


@njit(refcounts=False)
def _sort_slots(idx, val, n_slots):
    # Insertion sort by index: n_slots is small and the slots are nearly sorted already.
    for a in range(1, n_slots):
        j = idx[a]
        v = val[a]
        b = a - 1
        while b >= 0 and idx[b] > j:
            idx[b + 1] = idx[b]
            val[b + 1] = val[b]
            b -= 1
        idx[b + 1] = j
        val[b + 1] = v


@njit(refcounts=False)
def _largest(values, start, stop):
    """The largest of ``values[start:stop]`` (``-inf`` when empty; on valid input, where no
    value is NaN). Four running maxima over interleaved positions: one chain of comparisons
    waits for each comparison before it, four overlap."""
    m0 = m1 = m2 = m3 = -np.inf
    i = start
    while i + 4 <= stop:
        v0, v1, v2, v3 = values[i], values[i + 1], values[i + 2], values[i + 3]
        m0 = v0 if v0 > m0 else m0
        m1 = v1 if v1 > m1 else m1
        m2 = v2 if v2 > m2 else m2
        m3 = v3 if v3 > m3 else m3
        i += 4
    while i < stop:
        m0 = values[i] if values[i] > m0 else m0
        i += 1
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    return m2 if m2 > m0 else m0


@njit(refcounts=False)
def _select_largest(savings, n_keep, out_idx, candidates):
    """Positions of the ``n_keep`` largest savings, by decreasing saving (the lower index
    first on a tie); ``candidates`` is scratch of ``len(savings)`` ints.

    The ``n_keep`` largest all reach ``T``, the smallest of the maxima of ``n_keep``
    contiguous blocks of positions (those maxima are ``n_keep`` distinct savings). One pass
    finds ``T``, a branch-free one lists the positions that reach it (on data in random
    order, a few times ``n_keep``), and only those are inserted, in order, into the sorted
    kept ones."""
    m = savings.shape[0]
    n_keep = min(n_keep, m)
    if n_keep <= 0:
        return
    threshold = np.inf
    for b in range(n_keep):
        threshold = min(threshold, _largest(savings, b * m // n_keep, (b + 1) * m // n_keep))
    count = 0
    for i in range(m):
        candidates[count] = i
        count += savings[i] >= threshold
    if count < n_keep:  # NaN savings (excluded by validation): every position, in bounds
        for i in range(m):
            candidates[i] = i
        count = m
    kept = 0
    for c in range(count):
        i = candidates[c]
        s = savings[i]
        if kept == n_keep:
            if not s > savings[out_idx[n_keep - 1]]:  # a tie keeps the lower, earlier index
                continue
            kept -= 1
        b = kept
        while b > 0 and s > savings[out_idx[b - 1]]:
            out_idx[b] = out_idx[b - 1]
            b -= 1
        out_idx[b] = i
        kept += 1


@njit(refcounts=False)
def _project_row(v, scale, nbits, n_keep, savings, out_idx, out_val, candidates):
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
        savings[i] = v[i] * v[i] - (v[i] - q) * (v[i] - q)
    _select_largest(savings, n_keep, out_idx, candidates)
    for a in range(n_keep):
        out_val[a] = quantize_scalar(v[out_idx[a]], scale, nbits)
    _sort_slots(out_idx, out_val, n_keep)


@njit()
def _project_rows(V, scales, nbits, n_keep, out, start, stop):
    """Serial body of :func:`project_rows` for rows ``start:stop``."""
    width = V.shape[1]
    keep = min(n_keep, width)
    savings = np.empty(width, dtype=np.float64)
    candidates = np.empty(width, dtype=np.int64)
    slot_idx = np.empty(keep, dtype=np.int64)
    slot_val = np.empty(keep, dtype=np.float64)
    for i in range(start, stop):
        row = V[i].astype(np.float64)
        _project_row(row, np.float64(scales[i]), nbits, keep, savings, slot_idx, slot_val,
                     candidates)
        out[i, :] = 0
        for a in range(keep):
            out[i, slot_idx[a]] = slot_val[a]


def project_rows(V, scales, nbits, n_keep, out):
    """Project every row of ``V`` (its own scale) and write the dense result into ``out``."""
    split_among_threads(_project_rows, V.shape[0], V, scales, int(nbits), int(n_keep), out)


@njit()
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
    savings = np.empty(d, dtype=np.float64)
    candidates = np.empty(d, dtype=np.int64)
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
        _project_row(target, scales[j], nbits, keep, savings, slot_idx, slot_val, candidates)
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


@njit(refcounts=False)
def _row_error(idx, val, n_slots, p, G, xx):
    err = xx
    for a in range(n_slots):
        ja = idx[a]
        va = np.float64(val[a])
        err -= 2.0 * va * p[ja]
        for b in range(n_slots):
            err += va * np.float64(val[b]) * G[ja, idx[b]]
    return err


@njit()
def _row_tolerance(xx):
    """Smallest decrease of a row's error that counts as an improvement."""
    return 1e-13 * xx + 1e-300


@njit()
def _best_value(cj, gjj, nbits):
    """Best value for one slot on position j given the others, and what it saves."""
    if nbits < 0:
        q = cj / gjj if gjj > 0.0 else 0.0
    elif gjj > 0.0:
        q = quantize_scalar(cj / gjj, 1.0, nbits)
    else:
        q = quantize_scalar(0.0, 1.0, nbits)
    return q, 2.0 * q * cj - q * q * gjj


@njit(refcounts=False)
def _single_slot_savings(p, diag, nbits, out):
    """What every position alone saves with its best value (``diag``: the ``G_jj``), the
    values of :func:`_best_value` exactly, in a loop that vectorises: the level's index is
    floored and clamped as a float instead of an int (the same integers)."""
    if nbits < 1:
        for j in range(p.shape[0]):
            _, out[j] = _best_value(p[j], diag[j], nbits)
        return
    half = np.float64(1 << (nbits - 1))
    top = 2.0 * half - 1.0
    for j in range(p.shape[0]):
        g = diag[j]
        level = np.floor((p[j] / g if g > 0.0 else 0.0) + half)
        q = min(max(level, 0.0), top) - half + 0.5
        out[j] = 2.0 * q * p[j] - q * q * g


@njit(refcounts=False)
def _residual_correlation(idx, val, n_slots, p, G, c):
    """``c = p - G z`` for the slots' row ``z``."""
    k = p.shape[0]
    if n_slots == 2:  # the common sparse case in one pass (the same operations, in order)
        j0, j1 = idx[0], idx[1]
        v0, v1 = np.float64(val[0]), np.float64(val[1])
        for t in range(k):
            c[t] = p[t] - v0 * G[j0, t] - v1 * G[j1, t]
        return
    for t in range(k):
        c[t] = p[t]
    for a in range(n_slots):
        ja = idx[a]
        va = np.float64(val[a])
        for t in range(k):
            c[t] -= va * G[ja, t]


# --------------------------------------------------------------------------------------
# Sparse float codes: least-squares values on a support, the support found by orthogonal
# least squares and improved by exchanging one position at a time.
#
# For a support S (the slots' positions) the best float values are the least-squares ones,
# v = M p_S with M = G_SS^-1, and the error is ||x||^2 - p_S . v. With B = M G_S: (an
# (|S|, k) array), the residual correlations are c = p - G_S:^T v, and the squared norm of
# the part of codebook row j outside the span of S is g_j = G_jj - G_S:j . B_:j. Adding
# position j to S lowers the error by c_j**2 / g_j. Removing the position of slot a raises it
# by v_a**2 / M_aa and turns c and g into (the inverse of G_SS without a, by the Schur
# complement)
#     c_j + v_a B_aj / M_aa    and    g_j + B_aj**2 / M_aa,
# so every exchange of a position of S for one outside it is priced exactly in O(1), and a
# pass over all of them costs O(|S| k). A greedy fill alone (OMP and its relatives), or
# re-solving one slot with the others held fixed, stops at supports that one exchange
# improves a lot once k is several times the row length.
# --------------------------------------------------------------------------------------

#: A codebook row joins a support only while the part of it outside the span of the others
#: keeps at least this fraction of its squared norm: the least-squares values then stay within
#: about ``_INDEPENDENT**-0.5`` times what one row alone would need.
_INDEPENDENT = 1e-8
#: Least squares on a support is refused below this fraction (rounding level).
_SINGULAR = 1e-14


@njit(refcounts=False)
def _ols_add(j, r, G, c, g, W):
    """Add position ``j`` as the ``r``-th orthonormal direction of the support (Gram-Schmidt
    in coefficient space: ``W[b, t]`` is codebook row t along direction b) and update the
    residual correlations ``c`` and the outside norms ``g``."""
    k = G.shape[0]
    norm = math.sqrt(g[j])
    for t in range(k):
        w = G[j, t]
        for b in range(r):
            w -= W[b, j] * W[b, t]
        W[r, t] = w / norm
    coef = c[j] / norm
    for t in range(k):
        c[t] -= coef * W[r, t]
        g[t] -= W[r, t] * W[r, t]


@njit(refcounts=False)
def _ols_fill(idx, n_given, n_slots, p, G, diag, floor, c, g, used, W):
    """Fill the slots by orthogonal least squares; returns the number ``r`` of positions used.

    The given positions ``idx[:n_given]`` come first, in order, each kept when it is
    independent of those before it (see :data:`_INDEPENDENT`); then, one at a time, the
    position that lowers the error most (``c_j**2 / g_j``; ties keep the lower index). The
    ``r`` positions lead ``idx``. When fewer than ``n_slots`` positions are independent, every
    codebook row lies in the span of the ``r`` (so no support does better); the remaining
    slots get the lowest unused positions, for values of zero. ``diag`` holds ``G_tt`` and
    ``floor`` ``_INDEPENDENT * G_tt`` (contiguous: the diagonal of ``G`` is strided).
    """
    k = p.shape[0]
    for t in range(k):
        c[t] = p[t]
        g[t] = diag[t]
        used[t] = False
    r = 0
    # positions passed as int64: a literal (r = 0, best_j = -1) would compile _ols_add again
    for a in range(n_given):
        j = idx[a]
        if not used[j] and g[j] > floor[j]:
            _ols_add(j, np.int64(r), G, c, g, W)
            used[j] = True
            idx[r] = j
            r += 1
    while r < n_slots:
        # The largest gain c_t**2 / g_t, compared by cross-multiplying (no division).
        best_j = -1
        best_c2 = -1.0
        best_g = 1.0
        for t in range(k):
            gt = g[t]
            if used[t] or gt <= floor[t]:
                continue
            c2 = c[t] * c[t]
            if c2 * best_g > best_c2 * gt:
                best_c2, best_g, best_j = c2, gt, t
        if best_j < 0:
            break
        _ols_add(np.int64(best_j), np.int64(r), G, c, g, W)
        used[best_j] = True
        idx[r] = best_j
        r += 1
    t = 0
    for a in range(r, n_slots):
        while used[t]:
            t += 1
        used[t] = True
        idx[a] = t
    return r


@njit(refcounts=False)
def _support_fit(idx, r, p, G, diag, xx, pivot_floor, L, M, B, v, c, g):
    """Least squares on the support ``idx[:r]``: values ``v``, and ``M``, ``B``, ``c``, ``g``
    as defined above (``L`` is scratch). Returns whether every position keeps more than
    ``pivot_floor`` of its squared norm outside the span of the positions before it (the
    pivots of the Cholesky factorisation of ``G_SS``; with :data:`_INDEPENDENT`, the test of
    :func:`_ols_fill`), and the squared error (which rounding can make slightly negative when
    the row lies in the span of the support)."""
    k = G.shape[0]
    # Cholesky factor L of G_SS, then L^-1 in the lower triangle of M.
    for a in range(r):
        for b in range(a + 1):
            s = G[idx[a], idx[b]]
            for t in range(b):
                s -= L[a, t] * L[b, t]
            if a == b:
                if not s > pivot_floor * diag[idx[a]]:
                    return False, xx
                L[a, a] = math.sqrt(s)
            else:
                L[a, b] = s / L[b, b]
    for col in range(r):
        for a in range(col, r):
            s = 1.0 if a == col else 0.0
            for t in range(col, a):
                s -= L[a, t] * M[t, col]
            M[a, col] = s / L[a, a]
    # M = L^-T L^-1 (the inverse in the upper triangle first, then mirrored).
    for a in range(r):
        for b in range(a, r):
            s = 0.0
            for t in range(b, r):
                s += M[t, a] * M[t, b]
            L[a, b] = s
    for a in range(r):
        for b in range(a, r):
            M[a, b] = L[a, b]
            M[b, a] = L[a, b]
    err = xx
    for a in range(r):
        s = 0.0
        for b in range(r):
            s += M[a, b] * p[idx[b]]
        v[a] = s
        err -= s * p[idx[a]]
    for t in range(k):
        c[t] = p[t]
        g[t] = diag[t]
    for a in range(r):
        for t in range(k):
            B[a, t] = 0.0
        for b in range(r):
            mab = M[a, b]
            jb = idx[b]
            for t in range(k):
                B[a, t] += mab * G[jb, t]
        ja = idx[a]
        va = v[a]
        for t in range(k):
            c[t] -= va * G[ja, t]
            g[t] -= G[ja, t] * B[a, t]
    return True, err


@njit(refcounts=False)
def _swap_search(idx, r, p, G, xx, err, max_swaps, work):
    """Exchanges of one position of the support ``idx[:r]`` (fitted by :func:`_support_fit`,
    error ``err``) for one outside it, the best one first, while one lowers the error by
    more than the row's tolerance (at most ``max_swaps``). Returns the error; the values are
    in ``work``'s ``v``."""
    (c, z, savings, used, old_idx, old_val, inv_g, starts, candidates, g, W, L, M, B, v, diag,
     floor) = work
    k = G.shape[0]
    tol = _row_tolerance(xx)
    for _ in range(max_swaps):
        best_a = -1
        best_j = -1
        best_delta = tol
        for a in range(r):
            inv = 1.0 / M[a, a]
            va = v[a]
            loss = va * va * inv
            bar = best_delta + loss  # a gain c_j**2 / g_j above this improves on the best
            for j in range(k):
                if used[j]:
                    continue
                baj = B[a, j]
                gj = g[j] + baj * baj * inv
                if gj <= floor[j]:
                    continue
                cj = c[j] + va * baj * inv
                c2 = cj * cj
                if c2 > bar * gj:
                    delta = c2 / gj - loss
                    if delta > best_delta:
                        best_delta, best_a, best_j = delta, a, j
                        bar = best_delta + loss
        if best_a < 0:
            break
        old = idx[best_a]
        idx[best_a] = best_j
        regular, new_err = _support_fit(idx, r, p, G, diag, xx, _SINGULAR, L, M, B, v, c, g)
        if not regular or new_err > err - tol:  # rounding: undo and stop
            idx[best_a] = old
            err = _support_fit(idx, r, p, G, diag, xx, _SINGULAR, L, M, B, v, c, g)[1]
            break
        used[old] = False
        used[best_j] = True
        err = new_err
    return err


@njit(refcounts=False)
def _least_squares_codes(idx, val, n_given, n_slots, p, G, xx, max_swaps, work):
    """Sparse float codes of one row: the orthogonal least-squares fill (from the positions
    ``idx[:n_given]``), least squares on it, then :func:`_swap_search`. Returns the row's
    error."""
    (c, z, savings, used, old_idx, old_val, inv_g, starts, candidates, g, W, L, M, B, v, diag,
     floor) = work
    k = G.shape[0]
    r = 0
    regular = False
    err = xx
    if n_given == n_slots:
        # A full support (the current codes): when the fill would keep every position, it
        # is the support as it is, and least squares on it directly is the same and cheaper.
        for t in range(k):
            used[t] = False
        for a in range(n_slots):
            used[idx[a]] = True
        r = n_slots
        regular, err = _support_fit(idx, r, p, G, diag, xx, _INDEPENDENT, L, M, B, v, c, g)
    if not regular:
        r = _ols_fill(idx, n_given, n_slots, p, G, diag, floor, c, g, used, W)
        if r > 0:
            regular, err = _support_fit(idx, r, p, G, diag, xx, _SINGULAR, L, M, B, v, c, g)
    if not regular:  # no position, or (defensive: the fill admits independent ones) singular
        r = 0
        err = xx
    elif r == n_slots:  # fewer positions: every row is in their span, no exchange helps
        err = _swap_search(idx, r, p, G, xx, err, max_swaps, work)
    for a in range(n_slots):
        val[a] = v[a] if a < r else 0.0
    return err


@njit(refcounts=False)
def _greedy_slots(idx, val, n_slots, dense, p, G, nbits, c, used, diag, savings, first=-1):
    """Cold start: fill the slots one at a time with the best (position, value) pair (codes
    on a level set, and dense codes; sparse float codes use :func:`_ols_fill`).

    ``first >= 0`` puts the first slot at that position instead (a start of the multi-start
    search). ``diag`` holds the ``G_jj``; ``savings`` is scratch of ``k`` floats."""
    k = p.shape[0]
    for t in range(k):
        c[t] = p[t]
        used[t] = False
    for a in range(n_slots):
        if dense:
            best_j = a
        elif a == 0 and first >= 0:
            best_j = first
        else:
            # every position's saving in a loop that vectorises, then the first largest of
            # the free ones (the choice of a scan pruned by c_j**2 / G_jj, at a fraction of
            # its cost: that scan's branches are hard to predict)
            _single_slot_savings(c, diag, nbits, savings)
            best_j = -1
            best_saving = -np.inf
            for j in range(k):
                if savings[j] > best_saving and not used[j]:
                    best_saving, best_j = savings[j], j
            if best_j < 0:  # defensive (non-finite input, excluded by validation): stay in bounds
                for j in range(k):
                    if not used[j]:
                        best_j = j
                        break
        best_q, _ = _best_value(c[best_j], G[best_j, best_j], nbits)
        used[best_j] = True
        idx[a] = best_j
        val[a] = best_q
        for t in range(k):
            c[t] -= best_q * G[best_j, t]


@njit(refcounts=False)
def _positions_above(c, G, j0, q0, inv_g, used, threshold, bounds, out):
    """The pruning bounds ``(c_j + q0 G[j0, j])**2 / G_jj`` of every position into ``bounds``,
    and the positions not ``used`` whose bound is not at most ``threshold``, in increasing
    order, into the start of ``out``; returns how many. A NaN bound is listed (``0 * inf``,
    from a codeword whose squared norm is so small that its inverse overflows): such a
    position is priced, as a plain scan would. Two branch-free passes: the first vectorises
    and counts, the second (only when the count is not zero) lists."""
    k = c.shape[0]
    count = 0
    for j in range(k):
        cj = c[j] + q0 * G[j0, j]
        bound = cj * cj * inv_g[j]
        bounds[j] = bound
        count += (not bound <= threshold) & (not used[j])
    if count == 0:
        return 0
    count = 0
    for j in range(k):
        out[count] = j
        count += (not bounds[j] <= threshold) & (not used[j])
    return count


@njit(refcounts=False)
def _refine_slots(idx, val, n_slots, dense, p, G, inv_g, nbits, max_sweeps, tol, c, used,
                  bounds, candidates, verified):
    """Exact block-coordinate descent: re-solve one slot at a time given all the others, in
    turn, until every slot has been re-solved without a change since the last change (at most
    ``max_sweeps * n_slots`` re-solves).

    Each step is the exact minimiser over (position, value) of one slot, the current pair
    included, so the error never increases. ``c`` must equal ``p - G z`` on entry. A re-solve
    prices every position with the slot taken out (``c_j + q0 G[j0, j]``) without writing
    ``c``, which is updated only when the slot changes. ``verified``: how many slots at the end
    of the order are already optimal given all the others (1 after a greedy fill, whose last
    slot was chosen given all the others), so that they are not re-solved before a change.
    ``bounds`` (k floats) and ``candidates`` (k ints) are scratch. Returns whether the descent
    settled: every slot re-solved without a change since the last change (not stopped by
    ``max_sweeps``).
    """
    k = p.shape[0]
    for t in range(k):
        used[t] = False
    for a in range(n_slots):
        used[idx[a]] = True
    stable = verified  # slots re-solved, in cyclic order, since the last change
    a = 0
    for _ in range(max_sweeps * n_slots):
        if stable >= n_slots:
            break
        j0 = idx[a]
        q0 = np.float64(val[a])
        c0 = c[j0] + q0 * G[j0, j0]
        keep_saving = 2.0 * q0 * c0 - q0 * q0 * G[j0, j0]
        best_j = j0
        best_q, best_saving = _best_value(c0, G[j0, j0], nbits)
        if not dense:
            threshold = best_saving + tol
            # cj**2 / G_jj bounds what position j can save. The same tests as a plain scan,
            # in order (ties keep the first), over the positions whose bound passes the first
            # threshold (a later threshold is only higher), listed by a pass that vectorises
            n_listed = _positions_above(c, G, j0, q0, inv_g, used, threshold, bounds,
                                        candidates)
            for m in range(n_listed):
                j = candidates[m]
                if bounds[j] <= threshold:
                    continue
                q, saving = _best_value(c[j] + q0 * G[j0, j], G[j, j], nbits)
                if saving > threshold:
                    best_saving, best_j, best_q = saving, j, q
                    threshold = best_saving + tol
        if best_saving <= keep_saving + tol:
            stable += 1
        else:
            for t in range(k):
                c[t] += q0 * G[j0, t] - best_q * G[best_j, t]
            used[j0] = False
            used[best_j] = True
            idx[a] = best_j
            val[a] = best_q
            stable = 1
        a = a + 1 if a + 1 < n_slots else 0
    return stable >= n_slots


@njit(refcounts=False)
def _pgd_step(idx, val, p, G, nbits, eta, z, c):
    """One projected gradient step of dense codes (slot ``t`` at position ``t``):
    z <- P(z + eta (p - G z)), the projection quantizing every entry, written back into the
    slots."""
    k = p.shape[0]
    _residual_correlation(idx, val, k, p, G, c)
    for t in range(k):
        z[t] = 0.0
    for a in range(k):
        z[idx[a]] = val[a]
    for t in range(k):
        z[t] += eta * c[t]
    for t in range(k):
        idx[t] = t
        val[t] = quantize_scalar(z[t], 1.0, nbits)


@njit(refcounts=False)
def _improvement_round(idx, val, n_slots, dense, least_squares, p, G, xx, nbits, eta,
                       max_sweeps, work):
    """One round of improvement from the given slots; undone when it does not lower the
    error. Returns the row's error.

    Sparse float codes (``least_squares``): least-squares values on the given positions and
    exchanges of one position at a time (:func:`_least_squares_codes`). Sparse codes on a level
    set: exact coordinate sweeps. Dense codes: a projected gradient step, then the sweeps.

    (Sparse codes on a level set once took a gradient step before their sweeps as well. On
    the settings measured it never changed a fit's result, since each sweep re-solves a slot
    exactly over every position and level, and it cost a fifth of a fit's code step.)"""
    (c, z, savings, used, old_idx, old_val, inv_g, starts, candidates, g, W, L, M, B, v, diag,
     floor) = work
    err = _row_error(idx, val, n_slots, p, G, xx)
    for a in range(n_slots):
        old_idx[a] = idx[a]
        old_val[a] = val[a]
    if least_squares:
        _least_squares_codes(idx, val, n_slots, n_slots, p, G, xx, n_slots * max_sweeps, work)
    else:
        if dense:
            _pgd_step(idx, val, p, G, nbits, eta, z, c)
        _residual_correlation(idx, val, n_slots, p, G, c)
        # 'verified' as int64 here and in _descend_from: one compiled signature, not one per
        # literal
        _refine_slots(idx, val, n_slots, dense, p, G, inv_g, nbits, max_sweeps,
                      _row_tolerance(xx), c, used, savings, candidates, np.int64(0))
    new_err = _row_error(idx, val, n_slots, p, G, xx)
    if new_err > err:
        for a in range(n_slots):
            idx[a] = old_idx[a]
            val[a] = old_val[a]
        return err
    return new_err


@njit(refcounts=False)
def _descend_from(idx, val, n_slots, dense, least_squares, p, G, xx, nbits, max_sweeps, work,
                  first):
    """One start of the cold solve, first slot at ``first`` (if ``>= 0``); returns the row's
    error and whether its coordinate sweeps settled (:func:`_refine_slots`; False for sparse
    float codes). Sparse float codes (``least_squares``): the orthogonal least-squares fill,
    then exchanges with least-squares values (at most ``n_slots * max_sweeps``,
    :func:`_least_squares_codes`). Otherwise: a greedy fill, then exact coordinate sweeps."""
    (c, z, savings, used, old_idx, old_val, inv_g, starts, candidates, g, W, L, M, B, v, diag,
     floor) = work
    if least_squares:
        n_given = 0
        if first >= 0:
            idx[0] = first
            n_given = 1
        return _least_squares_codes(idx, val, n_given, n_slots, p, G, xx, n_slots * max_sweeps,
                                    work), False
    _greedy_slots(idx, val, n_slots, dense, p, G, nbits, c, used, diag, z, first)
    settled = _refine_slots(idx, val, n_slots, dense, p, G, inv_g, nbits, max_sweeps,
                            _row_tolerance(xx), c, used, savings, candidates, np.int64(1))
    return _row_error(idx, val, n_slots, p, G, xx), settled


@njit(refcounts=False)
def _solve_row_cold(idx, val, n_slots, dense, least_squares, p, G, xx, nbits, max_sweeps,
                    work, rotation=-1):
    """Codes of one row from scratch; returns the row's error and whether the kept descent
    settled (:func:`_descend_from`).

    A multi-start search: from each of the ``len(starts)`` positions that alone save the most
    (the first of them is the plain greedy choice), one descent (:func:`_descend_from`); the
    best result is kept (the earliest start on a tie). ``rotation >= 0`` runs only start
    ``rotation mod len(starts)`` (a fit's code step, which visits the starts in turn over its
    iterations)."""
    (c, z, savings, used, old_idx, old_val, inv_g, starts, candidates, g, W, L, M, B, v, diag,
     floor) = work
    n_starts = starts.shape[0]
    if dense or n_starts <= 1 or n_slots == 1:
        return _descend_from(idx, val, n_slots, dense, least_squares, p, G, xx, nbits,
                             max_sweeps, work, np.int64(-1))  # typed like starts[st] below
    k = p.shape[0]  # starts holds at most k positions (see _row_work)
    if least_squares:
        for j in range(k):
            savings[j] = p[j] * p[j] * inv_g[j]
    else:
        _single_slot_savings(p, diag, nbits, savings)
    first, stop = 0, n_starts
    if rotation >= 0:
        first = rotation % n_starts
        stop = first + 1
    # the starts up to the last one run: the same positions, in the same order, as the first
    # ``stop`` of all ``n_starts`` (a rotated start needs fewer, and fewer cost less to find)
    _select_largest(savings, stop, starts, candidates)
    best_err, best_settled = np.inf, False
    for st in range(first, stop):
        err, settled = _descend_from(old_idx, old_val, n_slots, dense, least_squares, p, G, xx,
                                     nbits, max_sweeps, work, starts[st])
        if st == first or err < best_err:  # the first start always: a NaN error stays in bounds
            best_err, best_settled = err, settled
            for a in range(n_slots):
                idx[a] = old_idx[a]
                val[a] = old_val[a]
    return best_err, best_settled


@njit()
def _inverse_diagonal(G):
    """``1 / G_jj`` for every j (0 for an empty codebook row): the pruning bounds' factors."""
    k = G.shape[0]
    inv_g = np.empty(k, dtype=np.float64)
    for j in range(k):
        inv_g[j] = 1.0 / G[j, j] if G[j, j] > 0.0 else 0.0
    return inv_g


@njit()
def _row_work(G, n_slots, n_starts, least_squares):
    """Per-task scratch arrays of the row solvers (those of the least-squares search are
    empty unless ``least_squares``; see :func:`_support_fit`)."""
    k = G.shape[0]
    ls_k = k if least_squares else 0
    ls_slots = n_slots if least_squares else 0
    diag = np.empty(k, dtype=np.float64)
    for t in range(k):
        diag[t] = G[t, t]
    return (
        np.empty(k, dtype=np.float64),  # c: residual correlations p - G z
        np.empty(k, dtype=np.float64),  # z: the dense code row of a gradient step
        np.empty(k, dtype=np.float64),  # savings of the starts; a sweep's pruning bounds
        np.empty(k, dtype=np.bool_),  # used positions
        np.empty(n_slots, dtype=np.int64),  # old_idx (also the slots of one start)
        np.empty(n_slots, dtype=np.float64),  # old_val
        _inverse_diagonal(G),  # inv_g
        np.empty(max(1, min(n_starts, k)), dtype=np.int64),  # starts of the multi-start solve
        np.empty(k, dtype=np.int64),  # candidates of a selection or of a sweep's scan
        np.empty(ls_k, dtype=np.float64),  # g: squared norms outside the support's span
        np.empty((ls_slots, k), dtype=np.float64),  # W: orthonormal directions of the fill
        np.empty((ls_slots, ls_slots), dtype=np.float64),  # L: Cholesky factor
        np.empty((ls_slots, ls_slots), dtype=np.float64),  # M: inverse Gram of the support
        np.empty((ls_slots, k), dtype=np.float64),  # B = M G_S:
        np.empty(ls_slots, dtype=np.float64),  # v: least-squares values
        diag,  # G_tt (contiguous: the diagonal of G is strided)
        diag[:ls_k] * _INDEPENDENT,  # floor: the smallest g_t of a position that may join a
                                     # support (least squares only)
    )


@njit(refcounts=False)
def _correlate(X, i, CT, p):
    """Correlations ``p = C x_i`` of row ``i`` into ``p``, from the transposed codebook ``CT``
    (d, k) in float64; returns the row's squared norm. In float32 the correlations would lose
    what distinguishes two codewords when the data sit far from the origin, where ``x.c`` is
    dominated by the offset.

    Each ``p_j`` is the sum of ``x_t C_jt`` in coordinate order, from zero. The passes over
    the codewords (which vectorise) add four coordinates at a time after the first
    ``d mod 4`` one at a time: ``p`` is loaded and stored once per four products (half the
    time of one pass per coordinate at d = 8), the additions in the same order."""
    d, k = CT.shape
    xx = 0.0
    for t in range(d):
        xx += X[i, t] * X[i, t]
    if d == 0:
        p[:] = 0.0
    head = d % 4
    for t in range(head):
        x = X[i, t]
        for j in range(k):
            p[j] = (p[j] if t > 0 else 0.0) + x * CT[t, j]
    for t in range(head, d, 4):
        x0, x1, x2, x3 = X[i, t], X[i, t + 1], X[i, t + 2], X[i, t + 3]
        for j in range(k):
            p[j] = ((p[j] if t > 0 else 0.0) + x0 * CT[t, j] + x1 * CT[t + 1, j]
                    + x2 * CT[t + 2, j] + x3 * CT[t + 3, j])
    return xx


@njit(refcounts=False)
def _slots_within(idx, val, other_idx, other_val, n_slots):
    """Whether every (position, value) pair of the first slots is among the others."""
    for a in range(n_slots):
        found = False
        for b in range(n_slots):
            if other_idx[b] == idx[a] and other_val[b] == val[a]:
                found = True
                break
        if not found:
            return False
    return True


@njit(refcounts=False)
def _same_slots(idx, val, other_idx, other_val, n_slots):
    """Whether two sets of slots hold the same (position, value) pairs, in any order (a
    repeated position on one side makes them differ)."""
    return (_slots_within(idx, val, other_idx, other_val, n_slots)
            and _slots_within(other_idx, other_val, idx, val, n_slots))


@njit()
def _code_rows(X, CT, G, eta, nbits, max_sweeps, n_starts, rotation, improve, idx, val, err,
               start, stop):
    """Serial body of :func:`solve_codes_cold` and :func:`improve_codes` for rows
    ``start:stop`` (see :func:`_code_block`)."""
    k = CT.shape[1]
    n_slots = idx.shape[1]
    dense = n_slots == k
    least_squares = nbits < 0 and not dense
    work = _row_work(G, n_slots, n_starts, least_squares)
    p = np.empty(k, dtype=np.float64)
    row_idx = np.empty(n_slots, dtype=np.int64)
    row_val = np.empty(n_slots, dtype=np.float64)
    alt_idx = np.empty(n_slots, dtype=np.int64)
    alt_val = np.empty(n_slots, dtype=np.float64)
    for i in range(start, stop):
        xx = _correlate(X, i, CT, p)
        alt_err, settled = _solve_row_cold(alt_idx, alt_val, n_slots, dense, least_squares, p,
                                           G, xx, nbits, max_sweeps, work, rotation)
        row_err = np.inf
        if improve:
            for a in range(n_slots):
                row_idx[a] = idx[i, a]
                row_val[a] = val[i, a]
            if (settled and not dense and not least_squares
                    and _same_slots(row_idx, row_val, alt_idx, alt_val, n_slots)):
                # the cold descent settled on the incoming codes: every slot re-solved without
                # a change, which is all the improvement round from them would do
                row_err = _row_error(row_idx, row_val, n_slots, p, G, xx)
            else:
                row_err = _improvement_round(row_idx, row_val, n_slots, dense, least_squares,
                                             p, G, xx, nbits, eta, max_sweeps, work)
        if alt_err <= row_err:
            row_err = alt_err
            for a in range(n_slots):
                row_idx[a] = alt_idx[a]
                row_val[a] = alt_val[a]
        if not dense:
            _sort_slots(row_idx, row_val, n_slots)
        for a in range(n_slots):
            idx[i, a] = row_idx[a]
            val[i, a] = row_val[a]
        err[i] = max(row_err, 0.0)


def _code_block(X, CT, G, eta, nbits, max_sweeps, n_starts, rotation, improve, idx, val, err):
    """:func:`_code_rows` over chunks of rows, in threads (:func:`_per_chunk`).
    The arguments are cast to one type each (Python and NumPy scalars alike), so that the
    kernel has one signature."""
    X, CT = _float64_rows(X), _float64_rows(CT)
    with _float64_values(val) as values:
        _per_chunk(_code_rows, X.shape[0], X, CT, G, float(eta), int(nbits), int(max_sweeps),
                   int(n_starts), int(rotation), bool(improve), idx, values, err)


def _float64_rows(a):
    """``a`` as a C-contiguous float64 array (float32 values are exact in float64)."""
    return np.ascontiguousarray(a, dtype=np.float64)


@contextlib.contextmanager
def _float64_values(val):
    """``val`` as a C-contiguous float64 array (itself when it is one), stored back into
    ``val`` on exit. The code kernels read and write float64 values, so that they compile
    once, not once per dtype; float32 values are exact in float64, and storing the float64
    results back rounds them as the kernel's own store into a float32 array would."""
    values = _float64_rows(val)
    yield values
    if values is not val:
        val[...] = values


def solve_codes_cold(X, CT, G, nbits, max_sweeps, n_starts, idx, val, err):
    """Codes of a block of rows from scratch, in place: the best of ``n_starts`` descents,
    each with its first slot on a different position.

    Codes on a level set: a greedy fill, then exact coordinate sweeps. Sparse float codes:
    least-squares values on a support found by orthogonal least squares and then exchanges of
    one position for another while one lowers the error (the best exchange first, at most
    ``n_slots * max_sweeps``). Dense codes: one greedy fill and sweeps (no starts).

    Parameters
    ----------
    X : ndarray of shape (m, d)
        The rows (float64; other dtypes are converted). Their correlations with the codebook
        are computed row by row in float64 (:func:`_correlate`), so no ``(m, k)`` array is
        formed.
    CT : ndarray of shape (d, k)
        The codebook, transposed (float64; converted likewise).
    G : ndarray of shape (k, k), float64
        Gram matrix ``C @ C.T``.
    nbits : int
        Level set of the code values (see the module docstring).
    max_sweeps : int
        Coordinate sweeps (each re-solves every slot once, exactly); a row stops early when a
        sweep changes nothing. Sparse float codes: at most ``n_slots * max_sweeps`` exchanges.
    n_starts : int
        Starts of the multi-start descent (``1``: the plain greedy / orthogonal least-squares
        fill); each puts the first slot on one of the ``n_starts`` positions that alone save
        the most.
    idx : ndarray of shape (m, n_slots), int32
        Output: slot positions (``n_slots == k``: dense codes, slot ``a`` at position ``a``).
    val : ndarray of shape (m, n_slots)
        Output: slot values.
    err : ndarray of shape (m,), float64
        Output: the squared error of every row.
    """
    _code_block(X, CT, G, 0.0, nbits, max_sweeps, n_starts, -1, False, idx, val, err)


def improve_codes(X, CT, G, eta, nbits, max_sweeps, n_starts, rotation, idx, val, err):
    """Improve the codes of a block of rows in place; no row's error increases.

    Every row keeps the better of (a) its incoming slots after one round of improvement, the
    round undone if it does not help, and (b) the cold solution of :func:`solve_codes_cold`
    (taken on a tie), from all its starts when ``rotation < 0``, else from its start
    ``rotation mod n_starts`` alone (a fit passes its iteration count, so that its code steps
    visit the starts in turn at the cost of one). Where (b)'s descent settles on the incoming
    slots of a sparse row on a level set, (a) is skipped: it would re-solve every slot without
    a change (10 to 50 % of rows in a fit's later code steps). The round is exact coordinate
    sweeps (dense codes: after a projected gradient step with step ``eta``); for sparse float
    codes, least squares on the incoming positions (those independent of the ones before
    them) and the exchanges of :func:`solve_codes_cold`. Arguments are those of
    :func:`solve_codes_cold`, plus the gradient step ``eta`` (``1 / lambda_max(G)``, used by
    dense codes) and ``rotation``; ``idx`` and ``val`` hold the incoming slots on entry.
    """
    _code_block(X, CT, G, eta, nbits, max_sweeps, n_starts, rotation, True, idx, val, err)


@njit()
def _one_slot_rows(X, CT, G, nbits, idx, val, err, start, stop):
    """Serial body of :func:`assign_one_slot` for rows ``start:stop``."""
    k = CT.shape[1]
    inv_g = _inverse_diagonal(G)
    p = np.empty(k, dtype=np.float64)
    for i in range(start, stop):
        xx = _correlate(X, i, CT, p)
        best_j = 0
        best_q, best_saving = _best_value(p[0], G[0, 0], nbits)
        for j in range(1, k):
            cj = p[j]
            if cj * cj * inv_g[j] <= best_saving:
                continue
            q, saving = _best_value(cj, G[j, j], nbits)
            if saving > best_saving:
                best_saving, best_j, best_q = saving, j, q
        row_err = xx
        row_err -= 2.0 * best_q * p[best_j]
        row_err += best_q * best_q * G[best_j, best_j]
        idx[i, 0] = best_j
        val[i, 0] = best_q
        err[i] = max(row_err, 0.0)


def assign_one_slot(X, CT, G, nbits, idx, val, err):
    """Codes of rows with one slot, in place: the best (codebook row, value) pair of each.

    With one slot the greedy choice of :func:`solve_codes_cold` is already the exact
    minimiser; this is the same choice (same pruning, ties keep the first position), in one
    pass over the correlations. Arguments as in :func:`solve_codes_cold`,
    with ``idx`` and ``val`` of shape ``(m, 1)``.
    """
    X, CT = _float64_rows(X), _float64_rows(CT)
    with _float64_values(val) as values:
        _per_chunk(_one_slot_rows, X.shape[0], X, CT, G, int(nbits), idx, values, err)


# --------------------------------------------------------------------------------------
# One-hot codes (vector quantization): Lloyd's algorithm in one pass per chunk of rows.
#
# Distances are computed from differences, sum_t (x_t - c_t)**2, never as
# ||x||**2 - 2 x.c + ||c||**2: a difference of two close numbers is exact (Sterbenz), so the
# distances keep their precision however far from the origin the data lie, which the expanded
# form loses to cancellation (in float32 entirely, at an offset of 1e4). With differences no
# centring of the data is needed. The codebook is passed transposed, ``CT`` of shape (d, k),
# so that the inner loop runs over codewords with unit stride (SIMD over codewords).
# --------------------------------------------------------------------------------------


def _bits_view(a):
    """The bit patterns of a float array as signed integers of the same width (a view)."""
    raise NotImplementedError("only callable from compiled code")


@overload(_bits_view)
def _bits_view_impl(a):
    int_type = np.int32 if a.dtype.bitwidth == 32 else np.int64

    def impl(a):
        return a.view(int_type)

    return impl


@njit()
def _first_minimum(bits):
    """Position of the first minimum of nonnegative floats given as their bit patterns.

    Nonnegative IEEE floats order like their bit patterns as integers, and integer minima
    vectorize (float minima do not without fastmath); two vector passes instead of one
    branchy scalar pass."""
    k = bits.shape[0]
    smallest = bits[0]
    for j in range(1, k):
        smallest = min(smallest, bits[j])
    first = k
    for j in range(k):
        first = min(first, j if bits[j] == smallest else k)
    return first


def _first_minima(bits, bits_next):
    """:func:`_first_minimum` of two arrays of the same length, as a pair."""
    raise NotImplementedError("only callable from compiled code")


@overload(_first_minima)
def _first_minima_impl(bits, bits_next):
    if bits.dtype.bitwidth == 64:
        def impl(bits, bits_next):
            return _first_minimum(bits), _first_minimum(bits_next)

        return impl

    def impl(bits, bits_next):
        # 32-bit patterns: the key (bits << 32) | j orders as (distance, index), so one
        # vectorized integer minimum over the keys finds the first minimum of each array
        # (instead of a minimum and then a search for its first position).
        first = np.int64(bits[0]) << 32
        first_next = np.int64(bits_next[0]) << 32
        for j in range(1, bits.shape[0]):
            first = min(first, (np.int64(bits[j]) << 32) | j)
            first_next = min(first_next, (np.int64(bits_next[j]) << 32) | j)
        return first & 0xFFFFFFFF, first_next & 0xFFFFFFFF

    return impl


@njit()
def _squared_differences(x0, x1, x2, x3, c0, c1, c2, c3):
    """``sum_t (x_t - c_t)**2`` over four features, in a fixed order of operations."""
    e0, e1, e2, e3 = x0 - c0, x1 - c1, x2 - c2, x3 - c3
    return (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3)


@njit()
def _pair_distances(X, i, i_next, CT, dist, dist_next):
    """Squared distances of rows ``i`` and ``i_next`` to every codeword, into
    ``dist``/``dist_next`` (the data type); ``i_next = i`` for a single row.

    Four features per sweep over the codewords, SIMD over the codewords: a quarter of the
    loads and stores of the distances (the loop is otherwise bound by them), each codeword
    entry loaded once for both rows; the first sweep writes, saving a pass that zeroes. Every
    distance is the same expression whichever row it is paired with. (The codebook entries
    are loaded before the distances are stored: they might alias, and would be loaded again.)
    """
    d, k = CT.shape
    if d >= 4:
        x0, x1, x2, x3 = X[i, 0], X[i, 1], X[i, 2], X[i, 3]
        y0, y1, y2, y3 = X[i_next, 0], X[i_next, 1], X[i_next, 2], X[i_next, 3]
        for j in range(k):
            c0, c1, c2, c3 = CT[0, j], CT[1, j], CT[2, j], CT[3, j]
            dist[j] = _squared_differences(x0, x1, x2, x3, c0, c1, c2, c3)
            dist_next[j] = _squared_differences(y0, y1, y2, y3, c0, c1, c2, c3)
    else:
        dist[:] = 0.0
        dist_next[:] = 0.0
    t = 4
    while t + 4 <= d:
        x0, x1, x2, x3 = X[i, t], X[i, t + 1], X[i, t + 2], X[i, t + 3]
        y0, y1, y2, y3 = X[i_next, t], X[i_next, t + 1], X[i_next, t + 2], X[i_next, t + 3]
        for j in range(k):
            c0, c1, c2, c3 = CT[t, j], CT[t + 1, j], CT[t + 2, j], CT[t + 3, j]
            dist[j] += _squared_differences(x0, x1, x2, x3, c0, c1, c2, c3)
            dist_next[j] += _squared_differences(y0, y1, y2, y3, c0, c1, c2, c3)
        t += 4
    for t in range(d - d % 4, d):
        x_t, y_t = X[i, t], X[i_next, t]
        for j in range(k):
            e = x_t - CT[t, j]
            dist[j] += e * e
            e = y_t - CT[t, j]
            dist_next[j] += e * e


@njit()
def _distance64(X, i, CT, j):
    """``||X[i] - C[j]||**2`` from the differences, accumulated in float64."""
    total = 0.0
    for t in range(X.shape[1]):
        diff = np.float64(X[i, t]) - np.float64(CT[t, j])
        total += diff * diff
    return total


@njit()
def _assign_rows(X, CT, start, stop, labels, row_err):
    """Nearest codeword of rows ``start:stop`` (lowest index on a tie) and its squared
    distance (float64), in place; rows go in pairs (see :func:`_pair_distances`)."""
    k = CT.shape[1]
    dist = np.empty(k, dtype=X.dtype)
    dist_next = np.empty(k, dtype=X.dtype)
    bits, bits_next = _bits_view(dist), _bits_view(dist_next)
    for i in range(start, stop, 2):
        i_next = min(i + 1, stop - 1)  # the last row of an odd range goes with itself
        _pair_distances(X, i, i_next, CT, dist, dist_next)
        labels[i], labels[i_next] = _first_minima(bits, bits_next)
        row_err[i] = _distance64(X, i, CT, labels[i])
        row_err[i_next] = _distance64(X, i_next, CT, labels[i_next])


@njit()
def _lloyd_chunks(X, CT, chunk_rows, labels, row_err, chunk_sums, chunk_counts, chunk_err,
                  first, last):
    """Serial body of :func:`lloyd_pass` for chunks ``first:last``: assign each chunk's rows,
    then add each row to its codeword's sum and count in the chunk's own slice of
    ``chunk_sums``/``chunk_counts`` (zeroed here), and its error to ``chunk_err[c]``."""
    n = X.shape[0]
    for c in range(first, last):
        start, stop = c * chunk_rows, min(n, (c + 1) * chunk_rows)
        _assign_rows(X, CT, start, stop, labels, row_err)
        sums = chunk_sums[c]
        counts = chunk_counts[c]
        sums[:, :] = 0.0
        counts[:] = 0
        total = 0.0
        for i in range(start, stop):
            j = labels[i]
            total += row_err[i]
            counts[j] += 1
            for t in range(X.shape[1]):
                sums[j, t] += np.float64(X[i, t])
        chunk_err[c] = total


def lloyd_pass(X, CT, chunk_rows, labels, row_err, chunk_sums, chunk_counts, sums, counts):
    """One Lloyd pass: nearest codewords and the statistics of the centroid step, in place.

    The distances are computed in the data type: the rows and codewords must be scaled so
    that their squared distances do not overflow (the solver brings every fit to unit scale
    first, :func:`qsdlearn._levels.scale_exponent`); an infinite distance ties with the others.

    Each fixed chunk of ``chunk_rows`` rows has its own slice of
    ``chunk_sums``/``chunk_counts`` (each thread takes a contiguous range of chunks); the
    chunks are then reduced in chunk order, so the result does not depend on the number of
    threads.

    Parameters
    ----------
    X : ndarray of shape (n, d)
    CT : ndarray of shape (d, k), the dtype of ``X``
        The codebook, transposed.
    chunk_rows : int
    labels : ndarray of shape (n,), int32
        Output: the nearest codeword of every row (lowest index on a tie).
    row_err : ndarray of shape (n,), float64
        Output: squared distance of every row to its codeword (from differences, in float64).
    chunk_sums : ndarray of shape (n_chunks, k, d), float64
        Scratch, ``n_chunks = ceil(n / chunk_rows)``.
    chunk_counts : ndarray of shape (n_chunks, k), int64
        Scratch.
    sums : ndarray of shape (k, d), float64
        Output: the sum of the rows assigned to every codeword.
    counts : ndarray of shape (k,), int64
        Output: the number of rows assigned to every codeword.

    Returns
    -------
    float
        The total squared error (chunk totals added in chunk order).
    """
    chunk_err = np.empty(chunk_sums.shape[0], dtype=np.float64)
    split_among_threads(_lloyd_chunks, chunk_err.shape[0], X, CT, chunk_rows, labels,
                        row_err, chunk_sums, chunk_counts, chunk_err)
    return _reduce_chunks(chunk_err, chunk_sums, chunk_counts, sums, counts)


@njit()
def _reduce_chunks(chunk_err, chunk_sums, chunk_counts, sums, counts):
    """Add the chunks' statistics in chunk order; returns the total error."""
    k, d = sums.shape
    for j in range(k):
        counts[j] = 0
        for t in range(d):
            sums[j, t] = 0.0
    total = 0.0
    for c in range(chunk_err.shape[0]):  # loops, not array expressions: faster to compile
        total += chunk_err[c]
        for j in range(k):
            counts[j] += chunk_counts[c, j]
            for t in range(d):
                sums[j, t] += chunk_sums[c, j, t]
    return total


def assign_nearest(X, CT, labels, row_err):
    """Nearest codewords only (``transform`` of one-hot codes): the assignment of
    :func:`lloyd_pass`, the same operations on every row, without the statistics (the same
    scaling of the inputs is needed)."""
    split_among_threads(
        lambda start, stop: _assign_rows(X, CT, start, stop, labels, row_err), X.shape[0])


@njit()
def _row_squared_errors(X, C, idx, val, out, start, stop):
    """Serial body of :func:`row_squared_errors` for rows ``start:stop`` (``idx`` of one row
    serves every row: see :func:`_shared_positions`)."""
    d = X.shape[1]
    n_slots = idx.shape[1]
    each = idx.shape[0] > 1
    for i in range(start, stop):
        row = i if each else 0
        total = 0.0
        for t in range(d):
            r = np.float64(X[i, t])
            for a in range(n_slots):
                r -= np.float64(val[i, a]) * np.float64(C[idx[row, a], t])
            total += r * r
        out[i] = total


def row_squared_errors(X, C, idx, val, out):
    """``out[i] = ||X[i] - sum_a val[i, a] C[idx[i, a]]||^2``, accumulated in float64."""
    split_among_threads(_row_squared_errors, X.shape[0], X, C, _shared_positions(idx, val),
                        val, out)


def _shared_positions(idx, val):
    """Slot positions as the decoding kernels take them: the positions of dense codes
    (:func:`all_positions`, the same row repeated by a read-only view of stride 0) as that one
    row, a C-contiguous array of its own, which serves every row. The kernels then compile
    one signature per dtype, not a second one for the view. Positions and values must have
    the same rows (a ValueError otherwise: the kernels would read past the positions)."""
    if idx.shape[0] != val.shape[0]:
        raise ValueError(f"slot positions for {idx.shape[0]} rows, values for {val.shape[0]}")
    if idx.ndim == 2 and idx.strides[0] == 0:
        return np.array(idx[:1], order="C")  # a copy: writable, as the codes' own arrays are
    return idx


@njit()
def code_statistics(X, idx, val, ZtZ, ZtX):
    """``Z^T Z`` and ``Z^T X`` of sparse codes, into the zeroed float64 arrays ``ZtZ`` (k, k)
    and ``ZtX`` (k, d): the sufficient statistics of the codebook step, in one pass over the
    rows at O(n_slots**2 + n_slots * d) per row, summed in float64 in row order."""
    n_slots = idx.shape[1]
    d = X.shape[1]
    for i in range(X.shape[0]):
        for a in range(n_slots):
            ja = idx[i, a]
            va = np.float64(val[i, a])
            for b in range(n_slots):
                ZtZ[ja, idx[i, b]] += va * np.float64(val[i, b])
            for t in range(d):
                ZtX[ja, t] += va * np.float64(X[i, t])


@njit()
def _densify_codes(idx, val, out, start, stop):
    """Serial body of :func:`densify_codes` for rows ``start:stop``."""
    for i in range(start, stop):
        for a in range(idx.shape[1]):
            out[i, idx[i, a]] = val[i, a]


def densify_codes(idx, val, out):
    """Scatter slots into a dense (m, k) code matrix (``out`` must be zero on entry)."""
    split_among_threads(_densify_codes, idx.shape[0], idx, val, out)


@njit()
def _reconstruct_from_slots(idx, val, C, out, start, stop):
    """Serial body of :func:`reconstruct_from_slots` for rows ``start:stop`` (``idx`` of one
    row serves every row: see :func:`_shared_positions`)."""
    n_slots = idx.shape[1]
    d = C.shape[1]
    each = idx.shape[0] > 1
    for i in range(start, stop):
        row = i if each else 0
        for t in range(d):
            out[i, t] = 0
        for a in range(n_slots):
            v = val[i, a]
            if v == 0:
                continue
            j = idx[row, a]
            for t in range(d):
                out[i, t] += v * C[j, t]


def reconstruct_from_slots(idx, val, C, out):
    """``out[i] = sum_a val[i, a] * C[idx[i, a]]`` over nonzero values, in slot order.

    Dense codes go through the same loop with :func:`all_positions`, so decoding and
    ``inverse_transform`` perform the same operations in the same order.
    """
    split_among_threads(_reconstruct_from_slots, val.shape[0], _shared_positions(idx, val),
                        val, C, out)


def all_positions(n_rows, n_components):
    """Slot positions of dense codes (every row uses every component, in order), as a
    read-only ``(n_rows, n_components)`` view of :data:`INDEX_DTYPE`."""
    return np.broadcast_to(np.arange(n_components, dtype=INDEX_DTYPE), (n_rows, n_components))
