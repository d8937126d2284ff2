"""Alternating projected gradient descent for ``X ~ Z C`` under sparsity and quantization.

The solver takes arrays and a :class:`~qsdlearn.Constraints` and returns arrays;
:class:`qsdlearn.QuantizedSparseDecomposition` validates input and stores results. Every update below either solves its block exactly or is
a projected gradient step with step ``1 / L`` from a feasible point followed by exact
improvements, and each is checked against the objective, so the objective never increases.

Representation
--------------
Codes are kept as slots (see :mod:`qsdlearn._kernels`): ``idx`` of shape ``(n, s)`` and
``val`` of shape ``(n, s)``; dense codes have ``idx=None`` and ``val`` of shape ``(n, k)``.
Quantized code values are *unit* levels: their scale is folded into the codebook rows, which
keeps the codebook on its grid because the grid is symmetric and scaled per row.
"""

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.extmath import randomized_svd

from . import _kernels, _metric
from ._levels import scale_exponent, snap_to_levels, top_magnitude_mask
from ._sampling import importance_sample
from ._seeding import kmeans_plusplus_indices

#: Exact coordinate sweeps over the code slots per row and code step.
MAX_SWEEPS = 4
#: Relative decreases of the objective below this are float64 rounding noise of its sum, not
#: progress: the fit stops there even with ``tol=0``.
_NOISE_DECREASE = 1e-12
#: Entries of the float64 copy of a block of rows handed to the code kernels at once (8 MiB).
_BLOCK_ENTRIES = 2**20
#: Rows used to choose the initial code scales.
_SCALE_SAMPLE_ROWS = 20000
#: k-means++ seeds from at most this many rows per component (and at least _SEEDING_MIN_ROWS).
_SEEDING_ROWS_PER_COMPONENT = 64
_SEEDING_MIN_ROWS = 2**14


@dataclass
class Codes:
    """Code slots of ``n`` rows: ``idx`` (None when dense) and ``val``."""

    idx: np.ndarray | None
    val: np.ndarray

    def slot_index(self):
        """Slot positions as an array, also for dense codes (a read-only view then)."""
        if self.idx is not None:
            return self.idx
        return _kernels.all_positions(*self.val.shape)

    @classmethod
    def of_rows(cls, n, parts):
        """The codes of ``n`` rows from ``parts``, pairs ``(rows, codes)`` of row indices and
        their codes (of one layout), which together cover every row once."""
        first = parts[0][1]
        idx = None if first.idx is None else np.empty((n,) + first.idx.shape[1:],
                                                      dtype=first.idx.dtype)
        val = np.empty((n,) + first.val.shape[1:], dtype=first.val.dtype)
        for rows, codes in parts:
            if idx is not None:
                idx[rows] = codes.idx
            val[rows] = codes.val
        return cls(idx, val)

    def to_dense(self, n_components):
        """The ``(n, k)`` code matrix."""
        if self.idx is None:
            return self.val.copy()
        out = np.zeros((self.val.shape[0], n_components), dtype=self.val.dtype)
        _kernels.densify_codes(self.idx, self.val, out)
        return out


@dataclass
class FitResult:
    """What :func:`fit_factorization` returns."""

    codes: Codes
    codebook: np.ndarray
    codebook_scales: np.ndarray | None
    objective: list = field(default_factory=list)
    n_iter: int = 0
    row_errors: np.ndarray | None = None
    converged: bool = True
    #: Half-integer levels of a quantized codebook (``codebook == levels * scales[:, None]``).
    codebook_levels: np.ndarray | None = None
    #: ``||X - Z C||_F`` of the final codes, computed before the squared errors are scaled
    #: back (those overflow beyond about 1e154 in float64 data; the norm does not).
    error_norm: float = 0.0


# -- small linear-algebra helpers ------------------------------------------------------------


def _is_diagonal(A):
    """Whether the square matrix ``A`` has no nonzero entry off its diagonal (``Z^T Z`` of
    one-hot codes)."""
    return np.count_nonzero(A) == np.count_nonzero(np.diagonal(A))


def _largest_eigenvalue(sym, n_iter=100, rtol=1e-7):
    """Largest eigenvalue of a symmetric positive semi-definite matrix, by power iteration
    (exactly, as the largest entry, for a diagonal matrix).

    Much cheaper than a dense eigensolver at the sizes met here, and deterministic (fixed
    start). The 1 % margin makes the step ``1 / L`` safe in practice; the solver checks every
    step against the objective anyway, so an underestimate could only cost a rejected step.
    """
    k = sym.shape[0]
    if k == 0:
        return 0.0
    trace = float(np.trace(sym))
    if trace <= 0:
        return 0.0
    if _is_diagonal(sym):  # a power iteration would converge slowly between close entries
        return float(np.max(np.diagonal(sym)))
    v = 1.0 + np.arange(k) / k  # fixed start with a component along any nonnegative direction
    v /= math.sqrt(v.dot(v))
    value = 0.0
    for _ in range(n_iter):
        w = sym @ v
        norm = math.sqrt(w.dot(w))  # np.linalg.norm's value, without its dispatch
        if norm == 0.0:
            break
        new_value = float(v @ w)
        v = w / norm
        if abs(new_value - value) <= rtol * new_value:
            value = new_value
            break
        value = new_value
    return min(1.01 * value, trace) if value > 0 else trace


def _solve_psd(A, B):
    """Solution of ``A Y = B`` for symmetric positive semi-definite ``A`` (a division when
    ``A`` is diagonal and nonsingular, Cholesky, or least squares when ``A`` is singular)."""
    pivots = np.diagonal(A)
    if np.all(pivots > 0) and _is_diagonal(A):
        return (B.T / pivots).T
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(A, check_finite=False), B,
                                      check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        return scipy.linalg.lstsq(A, B, check_finite=False)[0]


def squared_error(X, C, codes, metric=None):
    """Per-row squared reconstruction errors (float64, in the ``metric`` and weighted when
    one is given) and their sum."""
    if metric is not None:
        out = _metric.row_errors(metric, _metric.residuals(X, C, codes.slot_index(), codes.val))
        return out, float(out.sum())
    out = np.empty(X.shape[0], dtype=np.float64)
    _kernels.row_squared_errors(X, C, codes.slot_index(), codes.val, out)
    return out, float(out.sum())


def code_statistics(X, codes, n_components, weights=None):
    """``Z^T Z`` and ``Z^T X``, the sufficient statistics of the codebook step, computed in
    float64 (float32 sums of rows with a large common offset would lose the offset-free part).
    With row ``weights``, ``Z^T W Z`` and ``Z^T W X`` (the rows of ``Z`` and ``X`` times the
    square roots of the weights). Codes of one slot per row (vector quantization) give the
    diagonal of ``Z^T Z`` alone, a vector (k,): the (k, k) matrix would cost O(k^2) to form
    and to use (:func:`diagonal`)."""
    if weights is not None:
        root = np.sqrt(weights)[:, None]
        X = X.astype(np.float64) * root
        codes = Codes(codes.idx, codes.val.astype(np.float64) * root)
    if codes.idx is None:
        Z = codes.val.astype(np.float64, copy=False)
        return Z.T @ Z, Z.T @ X.astype(np.float64, copy=False)
    if codes.idx.shape[1] == 1:
        rows, values = codes.idx[:, 0], codes.val[:, 0].astype(np.float64)
        ZtX = np.empty((n_components, X.shape[1]))
        for t in range(X.shape[1]):  # sums in row order, in float64, as the kernel's
            ZtX[:, t] = np.bincount(rows, values * X[:, t], minlength=n_components)
        return np.bincount(rows, values * values, minlength=n_components), ZtX
    ZtZ = np.zeros((n_components, n_components))
    ZtX = np.zeros((n_components, X.shape[1]))
    _kernels.code_statistics(X, codes.idx, codes.val, ZtZ, ZtX)
    return ZtZ, ZtX


def diagonal(ZtZ):
    """The diagonal of ``Z^T Z`` given as the matrix (k, k) or, for codes of one slot per row,
    as the diagonal itself (k,) (:func:`code_statistics`)."""
    return ZtZ if ZtZ.ndim == 1 else np.diagonal(ZtZ)


def refit_scales(ZtZ, ZtX, B, current):
    """Closed-form per-row scales ``s`` minimising ``||X - Z diag(s) B||^2``.

    Rows whose term vanishes keep their current scale. Returns ``current`` itself when the
    least-squares solution is not better (it always is in exact arithmetic). ``ZtZ`` may be
    the diagonal alone (:func:`code_statistics`): the system is then diagonal too.
    """
    b = np.einsum("jt,jt->j", ZtX, B)
    if ZtZ.ndim == 1:
        return solve_scales(ZtZ * np.einsum("jt,jt->j", B, B), b, current)
    return solve_scales(ZtZ * (B @ B.T), b, current)


def solve_scales(M, b, current):
    """Minimiser of ``s^T M s - 2 b^T s`` (``M`` positive semi-definite, or its diagonal alone,
    a vector) over the scales whose diagonal term does not vanish, the others kept at
    ``current``; ``current`` itself when the solution is not better (see
    :func:`refit_scales`)."""
    diagonal_only = M.ndim == 1
    terms = diagonal(M)
    active = terms > 1e-12 * max(np.max(terms, initial=0.0), 1e-300)
    new = current.astype(np.float64).copy()
    if not active.any():
        return current
    if diagonal_only:  # each scale alone
        new[active] = b[active] / M[active]
    elif active.all():  # the usual case, without two copies of M by fancy indexing
        new = _solve_psd(M, b)
    else:
        rhs = b[active] - M[np.ix_(active, ~active)] @ new[~active]
        new[active] = _solve_psd(M[np.ix_(active, active)], rhs)

    def objective(s):
        return -2.0 * b @ s + (M @ (s * s) if diagonal_only else s @ M @ s)

    if not np.all(np.isfinite(new)) or objective(new) > objective(current):
        return current
    return new


# -- codes -----------------------------------------------------------------------------------


def _correlations(X, C64):
    """``X @ C.T`` in float64. Correlations in float32 lose everything that distinguishes two
    codebook rows when the data sit far from the origin (``x.c`` is then dominated by the
    offset); the float32 values are exact in float64, so float64 products keep it."""
    return X.astype(np.float64, copy=False) @ C64.T


def _least_squares_codes(X, C):
    C64 = _searchable_codebook(C)
    pinv = scipy.linalg.pinvh(C64 @ C64.T)
    return (_correlations(X, C64) @ pinv).astype(X.dtype)


# -- scale normalisation ---------------------------------------------------------------------
#
# The solver is scale-equivariant in exact arithmetic, but not in floating point at the ends of
# a dtype's range: squared norms and correlations overflow (float32 above ~1e19) or underflow
# (below ~1e-19), and absolute tolerances stop meaning anything. Every entry point therefore
# works on the data divided by a power of two that brings its largest magnitude into [1/2, 1):
# dividing by a power of two is exact (barring subnormal results, which only affect values
# below 2**-126 of the largest one in float32), codes are invariant when data and codebook are
# scaled together, and the codebook, its scales and the squared errors are scaled back exactly.


def _scaled(a, exponent):
    """``a * 2**exponent`` in its own dtype (exact, unless it under- or overflows: squared
    errors of data beyond about 1e154 become inf, which :attr:`FitResult.error_norm` avoids)."""
    if exponent == 0 or a is None:
        return a
    with np.errstate(over="ignore"):
        return np.ldexp(a, exponent).astype(a.dtype, copy=False)


def solve_codes(X, C, constraints, codes=None, metric=None, search_width=1):
    """Codes of the rows of ``X`` against codebook ``C``, row by row.

    With ``codes=None`` every row is solved from scratch (this is ``transform``). Given
    ``codes``, each row keeps the better of that solution and its codes improved by one
    projected gradient round, so the error of no row increases (the alternating code step).
    ``X`` and ``C`` are divided by one power of two first (see above), so the codes do not
    depend on the scale of the data. Under a ``metric`` (:mod:`qsdlearn._metric`) each row
    minimises its error in its block of the metric. ``search_width`` is the number of starts
    of the multi-start descent of every row (:func:`qsdlearn._kernels.solve_codes_cold`).

    Returns
    -------
    codes : Codes
    row_errors : ndarray of shape (n,), float64
        Squared errors from direct residuals, in the units of ``X`` (times the metric's).
    """
    exponent = scale_exponent(X, C)
    codes, row_errors = _solve_codes(_scaled(X, -exponent), _scaled(C, -exponent), constraints,
                                     codes, metric, search_width)
    if metric is not None:
        row_errors = row_errors * metric.unit
    return codes, _scaled(row_errors, 2 * exponent)


def _solve_codes(X, C, constraints, codes=None, metric=None, search_width=1, rotation=-1):
    """:func:`solve_codes` on data of unit scale (no normalisation)."""
    if metric is not None:
        return _metric_codes(X, C, constraints, codes, metric, search_width, rotation)
    n, k = X.shape[0], constraints.n_components
    if constraints.one_hot:
        return _nearest_codewords(X, C)
    if constraints.dense_codes and constraints.code_bits is None:
        codes = Codes(None, _least_squares_codes(X, C))
        return codes, squared_error(X, C, codes)[0]

    nbits = constraints.code_levels
    C64 = _searchable_codebook(C)
    gram = C64 @ C64.T
    search_width = max(1, min(int(search_width), k))  # at most one start per codeword
    if not constraints.dense_codes and constraints.slots == 1:
        # One slot: the greedy choice is already the exact minimiser, warm start or not.
        def kernel(X, CT, idx, val, err):
            _kernels.assign_one_slot(X, CT, gram, nbits, idx, val, err)
    elif codes is None:
        def kernel(X, CT, idx, val, err):
            _kernels.solve_codes_cold(X, CT, gram, nbits, MAX_SWEEPS, search_width, idx, val, err)
    else:
        # the step of the projected gradient, which only dense codes take (sparse codes are
        # improved by coordinate sweeps alone)
        top = _largest_eigenvalue(gram) if constraints.dense_codes else 0.0
        eta = 1.0 / top if top > 0 else 0.0

        def kernel(X, CT, idx, val, err):
            _kernels.improve_codes(X, CT, gram, eta, nbits, MAX_SWEEPS, search_width, rotation,
                                   idx, val, err)

    if codes is None:
        s = constraints.slots
        codes = Codes(
            None if constraints.dense_codes else np.zeros((n, s), dtype=_kernels.INDEX_DTYPE),
            np.zeros((n, s), dtype=X.dtype),
        )
    idx = np.array(codes.slot_index(), dtype=_kernels.INDEX_DTYPE, order="C")  # writable
    row_errors = np.empty(n, dtype=np.float64)
    # float64 copies of blocks of rows: the kernels correlate each row with the codebook
    block = max(1, _BLOCK_ENTRIES // max(X.shape[1], 1))
    CT = np.ascontiguousarray(C64.T)
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        kernel(np.ascontiguousarray(X[rows], dtype=np.float64), CT, idx[rows], codes.val[rows],
               row_errors[rows])
    if codes.idx is not None:
        codes.idx = idx
    # The kernel's errors come from correlations; report direct residuals instead.
    return codes, squared_error(X, C, codes)[0]


def _searchable_codebook(C):
    """``C`` in float64, with the rows whose squared norm is subnormal (norm below about
    1e-154 of the data's unit scale) set to zero: the code search would divide by those
    squared norms and overflow (NaN codes). A zero row is an empty codeword, which no row
    uses and the codebook step relocates."""
    C64 = C.astype(np.float64)
    norms = np.einsum("ij,ij->i", C64, C64)
    tiny = (norms > 0) & (norms < np.finfo(np.float64).tiny)
    if tiny.any():
        C64[tiny] = 0.0
    return C64


def _metric_codes(X, C, constraints, codes, metric, search_width, rotation=-1):
    """The code step under a metric: the plain code step on the whitened rows ``x_i L_b``
    and codebook ``C L_b`` of every block ``b`` (the row weights do not change a row's
    minimiser); errors in the metric."""
    if metric.roots is None:
        codes, _ = _solve_codes(X, C, constraints, codes, search_width=search_width,
                                rotation=rotation)
        return codes, squared_error(X, C, codes, metric)[0]
    n, s = X.shape[0], constraints.slots
    out = Codes(None if constraints.dense_codes else np.zeros((n, s), dtype=_kernels.INDEX_DTYPE),
                np.zeros((n, s), dtype=X.dtype))
    for b, rows in metric.block_rows(n):
        start = None
        if codes is not None:
            start = Codes(None if codes.idx is None else codes.idx[rows].copy(),
                          codes.val[rows].copy())
        block_codes, _ = _solve_codes(metric.whiten(X[rows], b).astype(X.dtype),
                                      metric.whiten(C, b).astype(C.dtype), constraints, start,
                                      search_width=search_width, rotation=rotation)
        if out.idx is not None:
            out.idx[rows] = block_codes.idx
        out.val[rows] = block_codes.val
    return out, squared_error(X, C, out, metric)[0]


def _one_hot_codes(labels, dtype):
    """One-hot codes (one slot of value 1) from the codeword index of every row."""
    return Codes(labels.reshape(-1, 1), np.ones((labels.shape[0], 1), dtype=dtype))


def _nearest_codewords(X, C):
    """One-hot codes: the nearest codeword of every row, and its squared distance."""
    labels = np.empty(X.shape[0], dtype=_kernels.INDEX_DTYPE)
    row_errors = np.empty(X.shape[0], dtype=np.float64)
    _kernels.assign_nearest(X, np.ascontiguousarray(C.T, dtype=X.dtype), labels, row_errors)
    return _one_hot_codes(labels, X.dtype), row_errors


# -- codebook --------------------------------------------------------------------------------


def _project_codebook(V, scales, constraints):
    k, d = V.shape
    if scales is None:
        scales = np.ones(k)
    out = np.empty((k, d), dtype=np.float64)
    _kernels.project_rows(np.ascontiguousarray(V, dtype=np.float64), scales,
                          constraints.codebook_levels, constraints.codebook_row_nonzero(d), out)
    return out


def quantize_codebook(C, constraints):
    """Put a float codebook on its constraint set; returns the codebook and its scales."""
    C = np.asarray(C, dtype=np.float64)
    scales = None
    if constraints.codebook_bits is not None:
        mask = top_magnitude_mask(C, constraints.component_nonzero)
        scales = _kernels.fit_level_scales(C.T, constraints.codebook_bits, mask.T)
    if constraints.free_codebook:
        return C, scales
    return _project_codebook(C, scales, constraints), scales


def update_codebook(ZtZ, ZtX, C, scales, constraints):
    """One codebook block update (float64 in and out). ``ZtZ`` is the matrix (k, k), or its
    diagonal (k,) for codes of one slot per row (:func:`code_statistics`)."""
    if ZtZ.ndim == 1:
        return _update_one_slot_codebook(ZtZ, ZtX, C, scales, constraints)
    if constraints.free_codebook:
        active = np.diag(ZtZ) > 0
        C = C.copy()
        if active.any():
            rhs = ZtX[active] - ZtZ[np.ix_(active, ~active)] @ C[~active]
            C[active] = _solve_psd(ZtZ[np.ix_(active, active)], rhs)
        return C, scales
    top = _largest_eigenvalue(ZtZ)
    if top <= 0:
        return C, scales
    V = C - (ZtZ @ C - ZtX) / top
    C_new = _project_codebook(V, scales, constraints)
    # The gradient step moves all rows with the step of the worst-conditioned one; an exact
    # pass over the rows then lets each row move as far as it should.
    row_scales = np.ones(C.shape[0]) if scales is None else scales
    # C order always (some statistics come in Fortran order): one compiled signature, not two
    _kernels.codebook_row_sweep(np.ascontiguousarray(ZtZ), ZtX, C_new, row_scales,
                                constraints.codebook_levels,
                                constraints.codebook_row_nonzero(C.shape[1]))
    return _with_refitted_scales(ZtZ, ZtX, C_new, scales, constraints)


def _with_refitted_scales(ZtZ, ZtX, C, scales, constraints):
    """The codebook ``C`` (on its grid) with its per-codeword scales refitted in closed form
    (:func:`refit_scales`; a scale that would vanish is kept), and the scales; as it is when
    the codebook has no scales."""
    if constraints.codebook_bits is None:
        return C, scales
    pattern = C / scales[:, None]
    new_scales = refit_scales(ZtZ, ZtX, pattern, scales)
    vanished = new_scales == 0
    new_scales[vanished] = scales[vanished]
    return pattern * new_scales[:, None], np.abs(new_scales)


def _update_one_slot_codebook(counts, ZtX, C, scales, constraints):
    """:func:`update_codebook` where ``Z^T Z`` is diagonal (``counts``, codes of one slot per
    row): the codewords do not interact, so the gradient step and the exact pass over the rows
    come to one projection per codeword of its least-squares value ``ZtX[j] / counts[j]``,
    at O(k d) instead of O(k^2 d). Unused codewords are projected where they are."""
    active = counts > 0
    targets = C.copy()
    targets[active] = ZtX[active] / counts[active, None]
    if constraints.free_codebook:
        return targets, scales
    return _with_refitted_scales(counts, ZtX, _project_codebook(targets, scales, constraints),
                                 scales, constraints)


def _codebook_statistics(X, codes, constraints, metric):
    """The statistics ``(Z^T W Z, Z^T W X)`` of the codebook block of a fit without a metric
    or with row weights alone (for which the plain step on them is exact), else None."""
    if metric is not None and metric.blocks is not None:
        return None
    return code_statistics(X, codes, constraints.n_components,
                           None if metric is None else metric.weights)


def _metric_codebook_step(X, codes, C, scales, constraints, metric):
    """The codebook block under a metric (float64 in and out), and the codewords no row of
    positive weight uses.

    A float codebook is solved exactly: by the weighted normal equations with one block (the
    block cancels from them), per codeword with one-hot codes, by conjugate gradients
    otherwise. A constrained one keeps the best, in the metric, of the current codebook, the
    plain step on weighted statistics (exact per-row sweeps, but blind to ``H``), and a
    projected gradient step in the metric (step ``1 / L``, ``L`` a bound of the largest
    eigenvalue of the block's Hessian, then an exact refit of the grid scales) from either of
    them. (With row weights alone, isotropic blocks folded into them by
    :func:`qsdlearn._metric.prepare`, the plain step on the weighted statistics is exact: the
    fit takes it instead, see :func:`_codebook_statistics`.)
    """
    k, d = C.shape
    idx, val = codes.slot_index(), codes.val
    Z = _metric.code_matrix(idx, val, k)
    WZ = _metric.code_matrix(idx, val, k, metric.weights)
    curvature = np.asarray(WZ.multiply(Z).sum(axis=0)).ravel()
    unused = np.flatnonzero(curvature <= 0)
    if constraints.free_codebook:
        if metric.n_blocks == 1:
            ZtZ = (WZ.T @ Z).toarray()
            return update_codebook(ZtZ, np.asarray(WZ.T @ X.astype(np.float64)), C, scales,
                                   constraints)[0], scales, unused
        if constraints.one_hot:
            return _metric.solve_one_hot_codebook(metric, idx[:, 0], X, C), scales, unused
        return _metric.solve_free_codebook(metric, WZ, Z, X, C, n_iter=min(k * d, 500)), \
            scales, unused
    # Candidates, the best in the metric kept: the metric's projected gradient step from C;
    # the plain step on the weighted statistics (exact per-row sweeps, blind to H), which wins
    # when H is near isotropic; and the metric's step from that one.
    plain, plain_scales = update_codebook((WZ.T @ Z).toarray(),
                                          np.asarray(WZ.T @ X.astype(np.float64)), C, scales,
                                          constraints)
    candidates = [(C, scales), (plain, plain_scales),
                  _metric_gradient_step(X, idx, val, C, scales, constraints, metric, WZ),
                  _metric_gradient_step(X, idx, val, plain, plain_scales, constraints, metric,
                                        WZ)]
    errors = [float(_metric.row_errors(metric, _metric.residuals(X, c, idx, val)).sum())
              for c, _ in candidates]
    best = int(np.argmin(errors))
    return candidates[best][0], candidates[best][1], unused


def _metric_gradient_step(X, idx, val, C, scales, constraints, metric, WZ):
    """A projected gradient step of the codebook in the metric (step ``1 / L``, ``L`` from
    :func:`qsdlearn._metric.hessian_bound`), then the exact refit of its grid scales."""
    top = _metric.hessian_bound(metric, idx, val, C.shape[0])
    if top <= 0:
        return C, scales
    gradient = _metric.codebook_gradient(metric, WZ, _metric.residuals(X, C, idx, val))
    C_new = _project_codebook(C - gradient / top, scales, constraints)
    if constraints.codebook_bits is None:
        return C_new, scales
    pattern = C_new / scales[:, None]
    new_scales = solve_scales(*_metric.scale_system(metric, X, pattern, idx, val), scales)
    vanished = new_scales == 0
    new_scales[vanished] = scales[vanished]
    return pattern * new_scales[:, None], np.abs(new_scales)


def _relocate_unused(X, C, scales, codes, row_errors, unused, constraints):
    """Move the ``unused`` codebook rows onto the worst-fitted rows (their residual, or the row
    itself for one-hot codes, when ``codes`` may be None). Unused rows do not enter the
    objective, so it is unchanged."""
    if unused.size == 0 or X.shape[0] == 0:
        return C, scales
    worst = np.argsort(-row_errors, kind="stable")[: unused.size]
    targets = X[worst].astype(np.float64)
    if not constraints.one_hot:
        dense = codes.to_dense(constraints.n_components)[worst].astype(np.float64)
        targets = targets - dense @ C
    C = C.copy()
    scales = None if scales is None else scales.copy()
    moved = np.any(targets != 0, axis=1)  # a zero target leaves its codeword where it is
    if not np.any(moved):
        return C, scales
    rows, row_scales = quantize_codebook(targets[moved], constraints)  # row by row
    into = unused[: worst.size][moved]
    C[into] = rows
    if scales is not None:
        scales[into] = row_scales
    return C, scales


def _fold_code_scales(X, codes, C, scales, constraints, metric, statistics):
    """Refit per-component scales of quantized codes and fold them into the codebook.
    ``statistics``: the codes' ``(Z^T W Z, Z^T W X)`` of a fit without a metric or with row
    weights alone (:func:`_codebook_statistics`); None under a metric of blocks."""
    ones = np.ones(constraints.n_components)
    if statistics is not None:
        ZtZ, ZtX = statistics
        alpha = refit_scales(ZtZ, ZtX, C, ones)
    else:
        system = _metric.scale_system(metric, X, C, codes.slot_index(), codes.val)
        alpha = solve_scales(*system, ones)
    alpha[alpha == 0] = 1.0
    C = C * alpha[:, None]
    if scales is not None:
        scales = scales * np.abs(alpha)
    return C, scales


# -- initialization --------------------------------------------------------------------------


def _svd_components(X, k, rng):
    """Top ``k`` right singular vectors (rows) and the matching left factor ``U S``."""
    n, d = X.shape
    r = min(k, n, d)
    if r < min(n, d) // 4 and n * d > 2**22:
        U, S, Vt = randomized_svd(X, r, random_state=rng)
    else:
        U, S, Vt = scipy.linalg.svd(X, full_matrices=False, check_finite=False)
        U, S, Vt = U[:, :r], S[:r], Vt[:r]
    return (U * S).astype(np.float64), Vt.astype(np.float64)


def _seeding_sample(X, k, rng, weights=None):
    """The rows k-means++ seeds ``k`` components from, with their weights: all of ``X``, or
    ``_SEEDING_ROWS_PER_COMPONENT * k`` rows (at least ``_SEEDING_MIN_ROWS``) when ``X`` is
    larger, drawn uniformly, or with weights in proportion to them (heavy rows taken for
    certain, :func:`~qsdlearn._sampling.importance_sample`; a uniform sample seeded with the
    sampled rows' weights would leave most heavy rows out, and Lloyd's iterations do not
    separate heavy rows that share a seed). Seeding costs O(rows * k * log k); on a sample its
    cost no longer grows with ``n`` (the iterations that follow use every row)."""
    cap = max(_SEEDING_MIN_ROWS, _SEEDING_ROWS_PER_COMPONENT * k)
    if X.shape[0] <= cap:
        return X, weights
    if weights is None or np.count_nonzero(weights) < k:
        rows = np.sort(rng.choice(X.shape[0], cap, replace=False))
        return X[rows], None if weights is None else weights[rows]
    # at most cap rows of positive weight: all of them, with their weights
    rows, fit_weights, _ = importance_sample(weights, cap, rng)
    return X[rows], fit_weights


def kmeans_plusplus_seeds(X, k, rng, weights=None):
    """k-means++ seeds of ``k`` components on (a sample of) the rows of ``X``, weighted by
    ``weights`` when given (scikit-learn's greedy seeding and draws,
    :func:`qsdlearn._seeding.kmeans_plusplus_indices`; rows of weight zero are never seeds
    unless fewer than ``k`` rows weigh anything)."""
    rows, w = _seeding_sample(X, k, rng, weights)
    if w is not None and np.count_nonzero(w) < k:
        w = None
    return np.asarray(rows[kmeans_plusplus_indices(rows, k, rng, w)], dtype=np.float64)


def _pad_components(X, C, k, rng, weights=None):
    """Add rows drawn from ``X`` (k-means++ seeding) until the codebook has ``k`` rows."""
    missing = k - C.shape[0]
    if missing <= 0:
        return C
    n = X.shape[0]
    if n >= missing:
        extra = kmeans_plusplus_seeds(X, missing, rng, weights)
    else:
        extra = X[rng.randint(n, size=missing)] + rng.standard_normal((missing, X.shape[1])) * (
            np.std(X) + 1e-12
        )
    return np.vstack([C, np.asarray(extra, dtype=np.float64)])


def resolve_init(init, shape, constraints):
    """The start ``init="auto"`` stands for on data of ``shape``: ``"svd"`` when the
    codebook has at most ``min(n, d)`` rows and the codes are not one-hot, else
    ``"k-means++"``. Other values are returned as they are."""
    if init != "auto":
        return init
    k = constraints.n_components
    return "svd" if k <= min(shape) and not constraints.one_hot else "k-means++"


def initial_codebook(X, constraints, init, rng, weights=None):
    """Float codebook to start from, and the matching float codes when the init gives them.

    ``init`` is resolved (see :func:`resolve_init`); k-means++ seeding is weighted by the row
    ``weights`` when given (the SVD start ignores them)."""
    k = constraints.n_components
    n, d = X.shape
    if init == "svd":
        Z0, C0 = _svd_components(X, k, rng)
        if C0.shape[0] < k:
            C0 = _pad_components(X, C0, k, rng, weights)
            Z0 = None
        return C0, Z0
    if init == "k-means++" and n >= k:
        return kmeans_plusplus_seeds(X, k, rng, weights), None
    # "random" (or k-means++ with fewer rows than components): distinct rows plus noise.
    chosen = rng.choice(n, size=k, replace=n < k)
    C0 = X[chosen].astype(np.float64)
    if n < k:
        C0 += rng.standard_normal(C0.shape) * (np.std(X) + 1e-12)
    return C0, None


def _scale_for_code_levels(C0, Z0, constraints, rng):
    """Rescale codebook rows so that the initial float codes sit well on the code levels."""
    if constraints.code_bits is None or constraints.code_bits == 0 or Z0 is None:
        return C0
    rows = Z0
    if rows.shape[0] > _SCALE_SAMPLE_ROWS:
        rows = rows[rng.choice(rows.shape[0], _SCALE_SAMPLE_ROWS, replace=False)]
    mask = top_magnitude_mask(rows, constraints.n_nonzero)
    alpha = _kernels.fit_level_scales(rows, constraints.code_bits, mask)
    return C0 * alpha[:, None]


# -- one-hot codes: Lloyd's algorithm ------------------------------------------------------
#
# With one-hot codes the code step is the nearest codeword of every row and the sufficient
# statistics of the codebook step are the per-codeword sums and counts (Z^T Z is diagonal), so
# an iteration is one fused pass over the rows (kernels.lloyd_pass) and a k x d update:
# centroids = sums / counts for a free codebook, the exact per-row projections of
# qsdlearn._solver.update_codebook for a constrained one.

#: Rows per task of the Lloyd pass, at least (see _LloydScratch).
_LLOYD_CHUNK_ROWS = 4096


class _LloydScratch:
    """Per-chunk buffers of :func:`qsdlearn._kernels.lloyd_pass`, allocated once per fit.

    Chunks have at least ``2 k`` rows, so the per-chunk sums (k x d float64) never take more
    memory than the float32 rows they sum; the chunking depends on ``n`` and ``k`` only."""

    def __init__(self, n, k, d):
        self.chunk_rows = max(_LLOYD_CHUNK_ROWS, 2 * k)
        n_chunks = max(1, -(-n // self.chunk_rows))
        self.sums = np.empty((n_chunks, k, d), dtype=np.float64)
        self.counts = np.empty((n_chunks, k), dtype=np.int64)


@dataclass
class _LloydState:
    """One assignment: labels and row errors against a codebook, with its statistics."""

    labels: np.ndarray
    row_errors: np.ndarray
    sums: np.ndarray
    counts: np.ndarray
    value: float = np.inf

    @classmethod
    def empty(cls, n, k, d):
        return cls(np.empty(n, dtype=_kernels.INDEX_DTYPE), np.empty(n, dtype=np.float64),
                   np.empty((k, d), dtype=np.float64), np.empty(k, dtype=np.int64))


def _lloyd_assign(X, C, scratch, state):
    """Fill ``state`` with the assignment of the rows of ``X`` to codebook ``C``."""
    CT = np.ascontiguousarray(C.T, dtype=X.dtype)
    state.value = _kernels.lloyd_pass(X, CT, scratch.chunk_rows, state.labels, state.row_errors,
                                      scratch.sums, scratch.counts, state.sums, state.counts)


def _centroid_step(X, C, scales, state, constraints):
    """The codebook block given one-hot codes: exact per codeword (Z^T Z is diagonal); unused
    codewords move onto the worst-fitted rows."""
    counts = state.counts.astype(np.float64)
    C, scales = update_codebook(counts, state.sums, C, scales, constraints)
    return _relocate_unused(X, C, scales, None, state.row_errors, np.flatnonzero(counts <= 0),
                            constraints)


def _lloyd_fit(X, constraints, C0, max_iter, tol, verbose, error_unit):
    """:func:`_single_fit` for one-hot codes, in the shape of Lloyd's algorithm.

    ``objective[t]`` is the error after ``t`` iterations, each a centroid step followed by
    the assignment to the new centroids, so the last codes are the nearest codewords of the
    returned codebook. An iteration whose error is higher (rounding, or a constrained
    codebook step that the new assignment does not make up for) is undone, and the fit stops.
    """
    n, d = X.shape
    k = constraints.n_components
    scratch = _LloydScratch(n, k, d)
    state, spare = _LloydState.empty(n, k, d), _LloydState.empty(n, k, d)
    C, scales = quantize_codebook(C0, constraints)
    _lloyd_assign(X, C, scratch, state)
    objective = [state.value]
    n_iter = 0
    converged = False
    for n_iter in range(1, max_iter + 1):
        C_new, scales_new = _centroid_step(X, C, scales, state, constraints)
        _lloyd_assign(X, C_new, scratch, spare)
        if spare.value <= state.value:
            C, scales, state, spare = C_new, scales_new, spare, state
        if _end_iteration(objective, state.value, n_iter, tol, verbose, error_unit):
            converged = True
            break
    _warn_if_not_converged(converged, max_iter, tol)
    return FitResult(_one_hot_codes(state.labels, X.dtype), C.astype(X.dtype), scales, objective,
                     n_iter, state.row_errors, converged=converged)


# -- the plain method (solver="pgd") -------------------------------------------------------


def _slots_of(Z, constraints, dtype):
    """Codes of a dense ``(n, k)`` code matrix whose rows have at most ``slots`` nonzeros (the
    ``slots`` largest magnitudes of each row, lowest position first on a tie)."""
    if constraints.dense_codes:
        return Codes(None, Z.astype(dtype))
    s = constraints.slots
    idx = np.sort(np.argsort(-np.abs(Z), axis=1, kind="stable")[:, :s], axis=1)
    return Codes(idx.astype(_kernels.INDEX_DTYPE), np.take_along_axis(Z, idx, axis=1).astype(dtype))


def _project_codes(V, constraints):
    """Exact projection of every row of ``V`` onto the code constraints (unit level sets)."""
    out = np.empty_like(V)
    _kernels.project_rows(V, np.ones(V.shape[0]), constraints.code_levels,
                          constraints.slots, out)
    return out


def _pgd_fit(X, constraints, C0, Z0_codes, max_iter, tol, verbose, error_unit=1.0):
    """The plain method of Kuzmin et al. (2022): alternating projected gradient steps of size
    ``1 / L`` with the exact projections, nothing else (``solver="pgd"``, the reference).

    The codes start at zero (or at ``Z0_codes``); the codebook's grid scales stay those of the
    start. With a step of ``1 / L`` from a feasible point the objective cannot increase; a
    step that raises it through rounding ends the fit. Codes are held as a dense ``(n, k)``
    float64 matrix."""
    k = constraints.n_components
    X64 = X.astype(np.float64)
    C, scales = quantize_codebook(C0, constraints)
    Z = np.zeros((X.shape[0], k)) if Z0_codes is None else \
        _project_codes(Z0_codes.to_dense(k).astype(np.float64), constraints)

    def error(Z, C):
        R = X64 - Z @ C
        return np.einsum("ij,ij->", R, R)

    objective = [float(error(Z, C))]
    n_iter, converged = 0, False
    for n_iter in range(1, max_iter + 1):
        Z_old, C_old = Z, C
        top = _largest_eigenvalue(C @ C.T)
        if top > 0:
            Z = _project_codes(Z - (Z @ C - X64) @ C.T / top, constraints)
        top = _largest_eigenvalue(Z.T @ Z)
        if top > 0:
            C = C - Z.T @ (Z @ C - X64) / top
            if not constraints.free_codebook:
                C = _project_codebook(C, scales, constraints)
        value = float(error(Z, C))
        if value > objective[-1]:  # rounding: keep the last iterate, stop
            Z, C, value = Z_old, C_old, objective[-1]
            converged = True
            objective.append(value)
            break
        if _end_iteration(objective, value, n_iter, tol, verbose, error_unit):
            converged = True
            break
    _warn_if_not_converged(converged, max_iter, tol)
    codes = _slots_of(Z, constraints, X.dtype)
    row_errors, _ = squared_error(X, C.astype(X.dtype), codes)
    return FitResult(codes, C.astype(X.dtype), scales, objective, n_iter, row_errors,
                     converged=converged)


# -- driver ----------------------------------------------------------------------------------


def _end_iteration(objective, value, n_iter, tol, verbose, error_unit):
    """Record iteration ``n_iter``'s objective (in units of ``error_unit``, printed when
    ``verbose``) and return whether the fit has converged."""
    objective.append(value)
    if verbose:
        print(f"[qsdlearn] iteration {n_iter:4d}  objective {value * error_unit:.6e}")
    return _has_converged(objective, tol)


def _has_converged(objective, tol):
    """Whether the last iteration lowered the objective by at most ``tol`` of its value."""
    previous, value = objective[-2], objective[-1]
    return value == 0.0 or (previous - value) <= max(tol, _NOISE_DECREASE) * previous


def _warn_if_not_converged(converged, max_iter, tol):
    if not converged and max_iter > 0:
        warnings.warn(
            f"QuantizedSparseDecomposition did not converge in max_iter={max_iter} iterations "
            f"(tol={tol}); increase max_iter or tol.",
            ConvergenceWarning,
        )


def _single_fit(X, constraints, C0, Z0_codes, max_iter, tol, verbose, error_unit=1.0,
                metric=None, search_width=1, solver="descent"):
    """One fit from codebook ``C0`` (and codes ``Z0_codes``, if given). ``solver="pgd"`` is
    :func:`_pgd_fit`. One-hot codes go to :func:`_lloyd_fit` (a start from codes is superseded
    there by the nearest codewords, the exact code step), unless a ``metric`` is given."""
    if solver == "pgd":
        return _pgd_fit(X, constraints, C0, Z0_codes, max_iter, tol, verbose, error_unit)
    if constraints.one_hot and metric is None:
        return _lloyd_fit(X, constraints, C0, max_iter, tol, verbose, error_unit)
    dtype = X.dtype
    C, scales = quantize_codebook(C0, constraints)
    codes, row_errors = _solve_codes(X, C.astype(dtype), constraints, Z0_codes, metric,
                                     search_width)
    objective = [float(row_errors.sum())]
    n_iter = 0
    converged = False
    for n_iter in range(1, max_iter + 1):
        # Code block (skipped on the first pass when the codes were just solved from scratch).
        if n_iter > 1 or Z0_codes is not None:
            # the cold solve visits one start per iteration, in turn (see improve_codes)
            codes, row_errors = _solve_codes(X, C.astype(dtype), constraints, codes, metric,
                                             search_width, rotation=n_iter)
        after_codes = float(row_errors.sum())

        # Codebook block: fold code scales, then exact LS or a projected gradient step.
        C_old, scales_old = C, scales
        statistics = _codebook_statistics(X, codes, constraints, metric)  # codes fixed here
        if constraints.code_bits is not None and constraints.code_bits > 0:
            C, scales = _fold_code_scales(X, codes, C, scales, constraints, metric, statistics)
        if statistics is not None:
            ZtZ, ZtX = statistics
            C, scales = update_codebook(ZtZ, ZtX, C, scales, constraints)
            unused = np.flatnonzero(diagonal(ZtZ) <= 0)
        else:
            C, scales, unused = _metric_codebook_step(X, codes, C, scales, constraints, metric)
        C, scales = _relocate_unused(X, C, scales, codes, row_errors, unused, constraints)
        new_errors, value = squared_error(X, C.astype(dtype), codes, metric)
        if value > after_codes:
            C, scales, value = C_old, scales_old, after_codes
        else:
            row_errors = new_errors
        if _end_iteration(objective, value, n_iter, tol, verbose, error_unit):
            converged = True
            break
    _warn_if_not_converged(converged, max_iter, tol)
    return FitResult(codes, C.astype(dtype), scales, objective, n_iter, row_errors,
                     converged=converged)


def fit_factorization(
    X,
    constraints,
    *,
    init="auto",
    code_init=None,
    codebook_init=None,
    n_init=1,
    max_iter=100,
    tol=1e-4,
    random_state,
    verbose=0,
    metric=None,
    search_width=1,
    solver="descent",
):
    """Fit ``X ~ Z C`` under ``constraints``; keep the best of ``n_init`` starts.

    With a ``metric`` (:func:`qsdlearn._metric.prepare`) the objective is the weighted error
    in the metric; the start ignores it (``solver="pgd"`` takes no metric).

    The returned codes are those of :func:`solve_codes` from scratch against the final
    codebook (what ``transform`` gives), so that fitting and transforming agree; with
    ``solver="pgd"``, its own last iterate (the reference method, untouched).

    Returns
    -------
    FitResult
        ``objective`` holds the squared error after initialization and after every iteration;
        ``row_errors`` the final per-row squared errors.
    """
    if not X.any():
        return _zero_fit(X, constraints, metric)
    # Fit on X / 2**exponent (see "scale normalisation"); the result is scaled back exactly.
    exponent = scale_exponent(X)
    X = _scaled(X, -exponent)
    if codebook_init is not None:
        codebook_init = np.ldexp(np.asarray(codebook_init, dtype=np.float64), -exponent)
    metric_unit = 1.0 if metric is None else metric.unit
    with np.errstate(over="ignore"):  # only for printing the objective (inf beyond float64)
        error_unit = float(np.ldexp(metric_unit, 2 * exponent))
    rng = random_state
    init = resolve_init(init, X.shape, constraints)
    # One start when the start is fixed; repeating it would only repeat the same fit.
    deterministic = codebook_init is not None or init == "svd"
    best = None
    for _ in range(1 if deterministic else n_init):
        if codebook_init is not None:
            C0, Z0 = np.asarray(codebook_init, dtype=np.float64), None
        else:
            C0, Z0 = initial_codebook(X, constraints, init, rng,
                                      None if metric is None else metric.weights)
            C0 = _scale_for_code_levels(C0, Z0, constraints, rng)
        start_codes = None
        if code_init is not None:
            start_codes = _project_code_init(code_init, constraints, X.dtype)
        result = _single_fit(X, constraints, C0, start_codes, max_iter, tol, verbose, error_unit,
                             metric, search_width, solver)
        if best is None or result.objective[-1] < best.objective[-1]:
            best = result
    fitted = best.codebook
    best.codebook, best.codebook_scales, best.codebook_levels = _finalize_codebook(
        best.codebook, best.codebook_scales, constraints, X.dtype
    )
    _scale_codebook(best, exponent)
    # The codebook stored, in the units of the fit: the final one, unless scaling it back
    # rounded it (among subnormal numbers). The codes are solved against it, as transform does.
    stored = _scaled(best.codebook.astype(X.dtype), -exponent)
    if solver == "pgd":
        best.row_errors, _ = squared_error(X, stored, best.codes)
    # One-hot codes from the last iteration are already the nearest codewords of the codebook.
    elif metric is not None or not (constraints.one_hot and np.array_equal(stored, fitted)):
        best.codes, best.row_errors = _solve_codes(X, stored, constraints, metric=metric,
                                                   search_width=search_width)
    return _scale_errors(best, exponent, metric_unit)


def _scale_codebook(result, exponent):
    """The codebook and grid scales of the fit of ``X / 2**exponent`` as those of ``X``
    (times ``2**exponent``). A quantized codebook is recomputed as its levels times the
    scaled scales, the product the decoder computes (the two differ where scaling rounds,
    among subnormal numbers)."""
    result.codebook_scales = _scaled(result.codebook_scales, exponent)
    if result.codebook_levels is None:
        result.codebook = _scaled(result.codebook, exponent)
    else:
        result.codebook = result.codebook_levels * result.codebook_scales[:, None]


def _scale_errors(result, exponent, metric_unit=1.0):
    """The errors of the fit of ``X / 2**exponent`` as those of ``X``: squared errors times
    ``4**exponent`` and the metric's power of two ``metric_unit`` (codes are unchanged)."""
    with np.errstate(over="ignore"):  # a norm or squared errors beyond float64's range: inf
        result.error_norm = float(np.ldexp(
            math.sqrt(float(result.row_errors.sum()) * metric_unit), exponent))
        result.row_errors = _scaled(result.row_errors * metric_unit, 2 * exponent)
        result.objective = np.ldexp(np.asarray(result.objective, dtype=np.float64) * metric_unit,
                                    2 * exponent).tolist()
    return result


def _zero_fit(X, constraints, metric=None):
    """The exact factorization of an all-zero ``X``: a zero codebook (zero grid scales), and
    codes solved against it. No iteration is needed; the mid-rise grids have no zero level, so
    an iterated fit could only approach zero."""
    k, d = constraints.n_components, X.shape[1]
    C = np.zeros((k, d), dtype=X.dtype)
    scales = None if constraints.codebook_bits is None else np.zeros(k, dtype=X.dtype)
    codes, row_errors = solve_codes(X, C, constraints, metric=metric)
    return FitResult(codes, C, scales, [0.0], 0, row_errors, converged=True)


def _finalize_codebook(C, scales, constraints, dtype):
    """Cast to the data type so that ``levels * scale`` in that type is exactly the codebook.

    The codec stores the half-integer levels and the scales; decoding multiplies them in the
    data type, and that product must be the fitted codebook bit for bit. Returns the codebook,
    its scales and its levels (``None`` twice for a float codebook).
    """
    if constraints.codebook_bits is None:
        return np.asarray(C, dtype=dtype), None, None
    scales = np.asarray(scales, dtype=dtype)
    safe = np.where(scales > 0, scales, 1).astype(np.float64)
    levels = snap_to_levels(np.asarray(C, dtype=np.float64) / safe[:, None],
                            constraints.codebook_bits).astype(dtype)
    return levels * scales[:, None], scales, levels


def _project_code_init(code_init, constraints, dtype):
    """Feasible slots closest to user-given dense codes."""
    Z = np.ascontiguousarray(code_init, dtype=np.float64)
    n, k = Z.shape
    s = constraints.slots
    dense = np.empty_like(Z)
    _kernels.project_rows(Z, np.ones(n), constraints.code_levels, s, dense)
    if constraints.dense_codes:
        return Codes(None, dense.astype(dtype))
    idx = np.argsort(dense == 0, axis=1, kind="stable")[:, :s]
    idx.sort(axis=1)
    val = np.take_along_axis(dense, idx, axis=1)
    return Codes(idx.astype(_kernels.INDEX_DTYPE), val.astype(dtype))
