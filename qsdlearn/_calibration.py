"""Calibration of one layer for :func:`qsdlearn.compress_weights`: checking an entry against
its tensor, the metric and row weights of the tensor's sub-vectors, and output errors.

An entry is either the Gram matrix ``H = A^T A`` of the layer's inputs, shape ``(in, in)``
with ``in`` the product of the tensor's axes after the first, or a vector of row weights of
shape ``(rows,)`` (how often each row of an embedding table is used). See
:mod:`qsdlearn.calibration`.
"""

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import scipy.linalg

from ._dtypes import finfo, is_float


#: Damping of a Gram matrix before it is inverted: this fraction of its mean diagonal is
#: added to the diagonal (GPTQ's default, Frantar et al., 2023). It keeps the inverse finite
#: where inputs never vary (constant pixels, dead units) and weights there from drifting.
DAMPING = 0.01


@dataclass(frozen=True)
class Feedback:
    """Error feedback for one Gram matrix and sub-vector length ``d`` (GPTQ's order).

    Sub-vectors of a row are encoded in order ``b = 0, 1, ...``; the error ``e_b`` of block
    ``b`` is absorbed by the not yet encoded weights, ``w_later -= (e_b U_bb^-1) U_b,later``
    with ``U`` the upper Cholesky factor of the inverse of the damped, zero-padded Gram matrix
    (``H^-1 = U^T U``). With that compensation the output error a block adds is
    ``e_b M_b e_b^T``, ``M_b = U_bb^-1 U_bb^-T`` (the Schur complement of ``H`` on the blocks
    from ``b`` on): the metric block ``b`` is encoded in.
    """

    #: ``(m, d, d)``: the metric of every block.
    metric: np.ndarray
    #: ``(m d, m d)``: the upper Cholesky factor of the inverse damped Gram matrix.
    upper: np.ndarray
    #: ``(m, d, d)``: ``U_bb^-1`` of every block.
    inverse_blocks: np.ndarray


def _damped(H, mean_diagonal, damping=DAMPING):
    """``H`` plus ``damping`` times the mean diagonal on its diagonal (a copy)."""
    H = H.copy()
    H[np.diag_indices(H.shape[0])] += damping * mean_diagonal
    return H


def feedback(gram, vector_size):
    """The :class:`Feedback` of a Gram matrix ``(in, in)`` for sub-vectors of ``vector_size``."""
    d = int(vector_size)
    n_in = gram.shape[0]
    m = -(-n_in // d)
    mean_diagonal = float(np.mean(np.diag(gram))) or 1.0
    H = np.zeros((m * d, m * d))
    H[:n_in, :n_in] = gram
    try:
        lower = scipy.linalg.cholesky(_damped(H, mean_diagonal), lower=True)
    except np.linalg.LinAlgError:
        # a Gram matrix rounded to low precision (bfloat16) may be indefinite by more than the
        # damping: clip its negative eigenvalues first
        eigenvalues, vectors = np.linalg.eigh(H)
        H = (vectors * np.clip(eigenvalues, 0.0, None)) @ vectors.T
        lower = scipy.linalg.cholesky(_damped(H, mean_diagonal), lower=True)
    inverse = scipy.linalg.cho_solve((lower, True), np.eye(m * d))
    upper = scipy.linalg.cholesky((inverse + inverse.T) / 2, lower=False)
    inverse_blocks = np.stack([
        scipy.linalg.solve_triangular(upper[b * d:(b + 1) * d, b * d:(b + 1) * d], np.eye(d),
                                      lower=False)
        for b in range(m)])
    metric = inverse_blocks @ np.swapaxes(inverse_blocks, 1, 2)
    return Feedback((metric + np.swapaxes(metric, 1, 2)) / 2, upper, inverse_blocks)


@dataclass(frozen=True)
class LayerCalibration:
    """The calibration of one tensor: a Gram matrix or row weights (one of them)."""

    gram: np.ndarray | None = None
    row_weights: np.ndarray | None = None
    #: Sub-vectors each row of the tensor is cut into (the ``m`` of the metric's layout).
    subvectors_per_row: int = 1
    #: The objective's Gram matrix is ``gram`` plus this fraction of its mean diagonal on its
    #: diagonal (see :attr:`objective_gram`).
    damping: float = 0.0
    _feedback: dict = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def objective_gram(self):
        """The Gram matrix of the objective: ``H + damping * mean(diag H) * I`` (computed once
        per instance; ``H`` itself without damping).

        The output error on the calibration inputs plus ``damping`` times their mean energy
        per input times the weight error: a layer whose calibration inputs span few
        directions (fewer samples than inputs, or inputs that barely vary) is otherwise free
        to move its weights along the others, which held-out inputs do not ignore."""
        if not self.damping:
            return self.gram
        return _damped(self.gram, float(np.mean(np.diag(self.gram))), self.damping)

    def feedback(self, vector_size):
        """The :class:`Feedback` of the objective's Gram matrix for ``vector_size`` (None for
        row weights); computed once per padded width."""
        if self.gram is None:
            return None
        width = -(-self.gram.shape[0] // vector_size) * vector_size
        key = (width, vector_size)
        if key not in self._feedback:
            self._feedback[key] = feedback(self.objective_gram, vector_size)
        return self._feedback[key]

    def for_layout(self, subvectors_per_row):
        """The same calibration for rows cut into ``subvectors_per_row`` sub-vectors."""
        return replace(self, subvectors_per_row=subvectors_per_row)

    def for_rows(self, rows):
        """The calibration of the output rows ``rows`` (a slice) of the tensor."""
        if self.row_weights is None:
            return self
        return replace(self, row_weights=self.row_weights[rows])

    def metric(self, vector_size):
        """Metric blocks of the tensor's sub-vectors (None for row weights): those of
        :class:`Feedback`, in which each sub-vector is encoded."""
        if self.gram is None:
            return None
        return self.feedback(vector_size).metric

    def sample_weight(self, subvectors_per_row):
        """Weights of the tensor's sub-vectors (None for a Gram matrix)."""
        if self.row_weights is None:
            return None
        return np.repeat(self.row_weights, subvectors_per_row)

    def energy(self, matrix, objective=True):
        """``sum_r e_r H e_r^T`` (or ``sum_r u_r ||e_r||^2``) over the rows of ``matrix``
        (``(rows, in)``, float64): in the objective's Gram matrix (:attr:`objective_gram`),
        or with ``objective=False`` in the calibration's own, the output energy of the rows on
        the calibration data."""
        E = np.asarray(matrix, dtype=np.float64)
        if self.gram is not None:
            gram = self.objective_gram if objective else self.gram
            return float(np.einsum("ri,ri->", E @ gram, E))
        return float(self.row_weights @ np.einsum("ri,ri->r", E, E))


def check_entry(name, array, shape):
    """The :class:`LayerCalibration` of tensor ``name`` of ``shape`` from its entry.

    A Gram matrix is divided by a power of two that brings its largest entry into [1/2, 1)
    (exact; output errors are only ever compared or divided by one another), row weights
    likewise.

    Raises
    ------
    ValueError
        If the entry has neither shape, is not finite, or is not a symmetric positive
        semi-definite Gram matrix (beyond the rounding of its dtype) or a nonnegative, not
        all-zero vector.
    TypeError
        If the entry holds neither floats nor integers.
    """
    array = np.asarray(array)
    if not (is_float(array.dtype) or array.dtype.kind in "iu"):
        raise TypeError(f"calibration for {name!r} has dtype {array.dtype}; give floats")
    n_in = int(np.prod(shape[1:], dtype=np.int64))
    # rounding to the entry's dtype (bfloat16 keeps 8 bits) may leave a Gram matrix slightly
    # asymmetric or indefinite: tolerate that much, relative to its largest entry
    eps = float(finfo(array.dtype).eps) if is_float(array.dtype) else 0.0
    tolerance = max(1e-6, 16 * eps)
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"calibration for {name!r} holds NaN or infinity")
    top = float(np.max(np.abs(array), initial=0.0))
    if top > 0:
        array = np.ldexp(array, -int(np.frexp(top)[1]))
    if array.shape == (n_in, n_in):
        if top == 0:
            raise ValueError(f"calibration for {name!r} is all zero")
        if np.max(np.abs(array - array.T), initial=0.0) > tolerance:
            raise ValueError(f"calibration for {name!r} is not symmetric, as a Gram matrix "
                             "A.T @ A of the layer's inputs would be")
        gram = (array + array.T) / 2
        try:  # positive semi-definite up to the tolerance: a Cholesky factor exists
            scipy.linalg.cholesky(gram + 2 * tolerance * np.eye(n_in), lower=True)
        except np.linalg.LinAlgError:
            raise ValueError(f"calibration for {name!r} is not positive semi-definite, as a "
                             "Gram matrix A.T @ A of the layer's inputs would be") from None
        return LayerCalibration(gram=gram)
    if array.shape == (shape[0],):
        if np.any(array < 0) or top == 0:
            raise ValueError(f"calibration row weights for {name!r} must be nonnegative and "
                             "not all zero")
        return LayerCalibration(row_weights=array)
    raise ValueError(
        f"calibration for {name!r} has shape {array.shape}; for a tensor of shape "
        f"{tuple(shape)} give the Gram matrix of its inputs, shape ({n_in}, {n_in}), or "
        f"row weights, shape ({shape[0]},)"
    )
