"""The data-aware objective: squared errors measured in a metric, rows weighted.

The objective of a fit under a metric is

``F(Z, C) = sum_i w_i (x_i - z_i C) H_b(i) (x_i - z_i C)^T``,  ``b(i) = i mod m``,

with ``m`` positive semi-definite ``d x d`` blocks ``H_b`` and nonnegative row weights ``w_i``.
For a linear layer ``y = W a`` cut into ``d``-element sub-vectors along its input (``m`` of
them per output row), ``H_b`` is the ``b``-th diagonal block of the input Gram matrix
``A^T A`` and ``F`` is the block-diagonal part of the output error ``||(W - W_hat) A^T||^2``.

Everything here works on arrays. With ``H_b = L_b L_b^T`` the error of a row is the plain
squared error of the *whitened* row ``x_i L_b`` against the whitened codebook ``C L_b``, so the
code step is the plain code step block by block (rows ``b::m`` form block ``b``); the codebook
step needs the products of this module, which cost ``O(n (s d + d^2))`` and never form an
``(n, k)`` or ``(m, k, k)`` array.
"""

from dataclasses import dataclass

import numpy as np
import scipy.sparse

from ._kernels import reconstruct_from_slots


@dataclass(frozen=True)
class Metric:
    """A prepared metric: blocks, their square roots and row weights, scaled by powers of two.

    ``blocks * 2**exponent`` and ``weights * 2**weight_exponent`` are what the caller gave;
    objectives computed here are in units of ``2**(exponent + weight_exponent)`` (exact:
    powers of two).
    """

    #: ``(m, d, d)`` float64 blocks, or None for the identity (weights only).
    blocks: np.ndarray | None
    #: ``(m, d, d)`` float64 with ``blocks[b] == roots[b] @ roots[b].T`` (None with blocks).
    roots: np.ndarray | None
    #: ``(n,)`` float64 row weights, or None for unit weights.
    weights: np.ndarray | None
    exponent: int = 0
    weight_exponent: int = 0

    @property
    def n_blocks(self):
        return 1 if self.blocks is None else self.blocks.shape[0]

    @property
    def unit(self):
        """The factor that turns objectives computed here into the caller's units."""
        return float(np.ldexp(1.0, self.exponent + self.weight_exponent))

    def block_rows(self, n):
        """``(b, slice)`` of every block's rows among ``n`` rows (``b::m``), empty ones left out."""
        m = self.n_blocks
        return [(b, slice(b, None, m)) for b in range(min(m, n))]

    def whiten(self, X, b):
        """Rows of block ``b`` of ``X`` (already sliced) times ``L_b``, in float64."""
        X64 = np.asarray(X, dtype=np.float64)
        return X64 if self.roots is None else X64 @ self.roots[b]

    def times_blocks(self, R):
        """``R_i H_b(i)`` for every row ``i`` of ``R`` (float64 ``(n, d)``)."""
        if self.blocks is None:
            return R
        n, d = R.shape
        m = self.n_blocks
        if n % m == 0:  # rows r * m + b: one batched product over the blocks
            return np.matmul(R.reshape(n // m, m, 1, d), self.blocks).reshape(n, d)
        out = np.empty_like(R)
        for b, rows in self.block_rows(n):
            out[rows] = R[rows] @ self.blocks[b]
        return out


def _power_of_two_exponent(values):
    top = float(np.max(np.abs(values), initial=0.0))
    return int(np.frexp(top)[1]) if top > 0 else 0


def prepare(blocks, weights, n_rows):
    """A :class:`Metric` from validated arrays, or None for the plain objective.

    Blocks that are all multiples of the identity, ``H_b = c_b I``, weigh rows and nothing
    else: they are folded into the row weights (``w_i c_(i mod m)``), which the solver
    handles with its plain, exact steps. Identity blocks with unit weights are the plain
    objective itself: None.

    Parameters
    ----------
    blocks : ndarray of shape (m, d, d) or None
        Symmetric positive semi-definite blocks (None: the identity).
    weights : ndarray of shape (n,) or None
        Nonnegative row weights, not all zero (None: unit weights).
    n_rows : int
        Number of rows ``n`` the metric is for.
    """
    if blocks is not None:
        d = blocks.shape[1]
        diagonal = blocks[:, np.arange(d), np.arange(d)]
        if np.array_equal(blocks, diagonal[:, :1, None] * np.eye(d)):
            factors = np.resize(diagonal[:, 0], n_rows)
            weights = factors if weights is None else weights * factors
            blocks = None
    if blocks is None and (weights is None or np.all(weights == 1.0)):
        return None
    roots = None
    exponent = weight_exponent = 0
    if blocks is not None:
        exponent = _power_of_two_exponent(blocks)
        blocks = np.ldexp(np.asarray(blocks, dtype=np.float64), -exponent)
        blocks = (blocks + np.swapaxes(blocks, 1, 2)) / 2
        eigenvalues, vectors = np.linalg.eigh(blocks)
        roots = vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))[:, None, :]
    if weights is not None:
        weight_exponent = _power_of_two_exponent(weights)
        weights = np.ldexp(np.asarray(weights, dtype=np.float64), -weight_exponent)
    return Metric(blocks, roots, weights, exponent, weight_exponent)


def residuals(X, C, idx, val):
    """``X - Z C`` in float64 (``Z`` given by its slots ``idx``, ``val``)."""
    recon = np.empty((X.shape[0], C.shape[1]), dtype=np.float64)
    reconstruct_from_slots(idx, val.astype(np.float64, copy=False),
                           np.asarray(C, dtype=np.float64), recon)
    return np.asarray(X, dtype=np.float64) - recon


def row_errors(metric, R):
    """``w_i r_i H_b(i) r_i^T`` for the residual rows ``R`` (float64 ``(n,)``)."""
    out = np.einsum("ij,ij->i", R, metric.times_blocks(R))
    np.maximum(out, 0.0, out=out)  # rounding of a PSD form just below zero
    if metric.weights is not None:
        out *= metric.weights
    return out


def code_matrix(idx, val, n_components, weights=None):
    """``Z`` (or ``W Z`` with row ``weights``) as a CSR matrix of shape ``(n, k)``, float64."""
    n, s = idx.shape
    values = val.astype(np.float64)
    if weights is not None:
        values = values * weights[:, None]
    return scipy.sparse.csr_matrix((values.ravel(), np.asarray(idx).ravel(),
                                    np.arange(0, n * s + 1, s)), shape=(n, n_components))


def codebook_gradient(metric, WZ, R):
    """Half the gradient of ``F`` in ``C`` at residuals ``R = X - Z C``: ``-sum_i w_i z_i^T
    r_i H_b(i)``, a ``(k, d)`` float64 array (``WZ`` from :func:`code_matrix`)."""
    return -np.asarray(WZ.T @ metric.times_blocks(R))


def apply_hessian(metric, WZ, Z, D):
    """``sum_i w_i z_i^T (z_i D) H_b(i)``: half the Hessian of ``F`` in ``C`` applied to a
    ``(k, d)`` direction ``D``."""
    return np.asarray(WZ.T @ metric.times_blocks(np.asarray(Z @ D)))


def hessian_bound(metric, idx, val, n_components):
    """An upper bound of the largest eigenvalue of :func:`apply_hessian`: that of
    ``sum_i w_i lambda_i z_i^T z_i`` with ``lambda_i`` the largest eigenvalue of row ``i``'s
    block (``||z_i C L_b||^2 <= lambda_i ||z_i C||^2``). A ``k x k`` problem, whatever ``d``
    and ``m``; a step of ``1 / bound`` is safe (the solver checks every step anyway)."""
    n = idx.shape[0]
    factors = np.ones(n) if metric.weights is None else metric.weights.copy()
    if metric.blocks is not None:
        tops = np.linalg.eigvalsh(metric.blocks)[:, -1]
        factors *= np.resize(tops, n)
    A = code_matrix(idx, val, n_components, factors).T @ code_matrix(idx, val, n_components)
    if idx.shape[1] == 1:  # one code per row: A is diagonal, its largest entry the eigenvalue
        return float(A.diagonal().max(initial=0.0)) * 1.01
    return float(np.linalg.eigvalsh(A.toarray())[-1]) * 1.01


def scale_system(metric, X, P, idx, val):
    """``(M, b)`` of the per-row scales ``t`` minimising ``F`` at ``C = diag(t) P``:
    ``F = t^T M t - 2 b^T t + const``.

    ``M[j, l] = sum_i w_i z_ij z_il p_j H_b(i) p_l^T`` and ``b[j] = sum_i w_i z_ij p_j H_b(i)
    x_i^T``, accumulated over the slots of every row (``O(n s (d^2 + s d))``)."""
    k = P.shape[0]
    n, s = idx.shape
    weights = np.ones(n) if metric.weights is None else metric.weights
    values = val.astype(np.float64) * weights[:, None]
    pz = P[idx]                                               # (n, s, d): the slots' rows
    ph = np.stack([metric.times_blocks(pz[:, t]) for t in range(s)], axis=1)
    pair = np.einsum("isd,itd->ist", ph, pz) * (values[:, :, None] * val[:, None, :])
    flat = (idx[:, :, None] * k + idx[:, None, :]).ravel()
    M = np.bincount(flat, weights=pair.ravel(), minlength=k * k).reshape(k, k)
    proj = np.einsum("isd,id->is", ph, np.asarray(X, dtype=np.float64)) * values
    b = np.bincount(np.asarray(idx).ravel(), weights=proj.ravel(), minlength=k)
    return M, b


def solve_free_codebook(metric, WZ, Z, X, C, n_iter):
    """Minimise ``F`` over a float codebook from ``C``: exact by conjugate gradients on the
    normal equations ``sum_i w_i z_i^T (z_i C - x_i) H_b(i) = 0`` (each iteration lowers
    ``F``; ``n_iter`` iterations at most, stopping when the residual vanishes)."""
    C = np.array(C, dtype=np.float64)
    rhs = np.asarray(WZ.T @ metric.times_blocks(np.asarray(X, dtype=np.float64)))
    r = rhs - apply_hessian(metric, WZ, Z, C)
    p = r.copy()
    rr = float(np.vdot(r, r))
    floor = 1e-24 * max(float(np.vdot(rhs, rhs)), 1e-300)
    for _ in range(n_iter):
        if rr <= floor:
            break
        Ap = apply_hessian(metric, WZ, Z, p)
        curvature = float(np.vdot(p, Ap))
        if curvature <= 0:
            break
        alpha = rr / curvature
        C += alpha * p
        r -= alpha * Ap
        rr_new = float(np.vdot(r, r))
        p = r + (rr_new / rr) * p
        rr = rr_new
    return C


def solve_one_hot_codebook(metric, labels, X, C):
    """Minimise ``F`` over a float codebook for one-hot codes (``labels``): per codeword
    ``j``, ``(sum_b N_bj H_b) c_j = sum_b S_bj H_b`` with ``N_bj`` the weight and ``S_bj`` the
    weighted sum of block ``b``'s rows assigned to ``j``. Directions the system does not
    determine (a singular metric) keep their current value."""
    k, d = C.shape
    n = X.shape[0]
    weights = np.ones(n) if metric.weights is None else metric.weights
    X64 = np.asarray(X, dtype=np.float64)
    system = np.zeros((k, d, d))
    rhs = np.zeros((k, d))
    for b, rows in metric.block_rows(n):
        lab, w = labels[rows], weights[rows]
        counts = np.bincount(lab, weights=w, minlength=k)
        sums = np.zeros((k, d))
        np.add.at(sums, lab, X64[rows] * w[:, None])
        H = metric.blocks[b]
        system += counts[:, None, None] * H
        rhs += sums @ H
    C = np.array(C, dtype=np.float64)
    eigenvalues, vectors = np.linalg.eigh(system)
    floor = 1e-12 * np.max(eigenvalues, axis=1, keepdims=True)
    inverse = np.where(eigenvalues > floor, 1.0 / np.where(eigenvalues > floor, eigenvalues, 1.0),
                       0.0)
    # c_j + pinv(K_j) (r_j - K_j c_j): the solution nearest to the current codeword
    gap = rhs - np.einsum("jxy,jy->jx", system, C)
    step = np.einsum("jxa,ja,jya,jy->jx", vectors, inverse, vectors, gap)
    return C + step
