"""Calibration of one layer for :func:`qsdlearn.compress_weights`: checking an entry against
its tensor, the metric and row weights of the tensor's sub-vectors, and output errors.

An entry is either the Gram matrix ``H = A^T A`` of the layer's inputs, shape ``(in, in)``
with ``in`` the product of the tensor's axes after the first, or a vector of row weights of
shape ``(rows,)`` (how often each row of an embedding table is used). See
:mod:`qsdlearn.calibration`.
"""

from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np

from ._dtypes import is_float
from .calibration import metric_blocks


@dataclass(frozen=True)
class LayerCalibration:
    """The calibration of one tensor: a Gram matrix or row weights (one of them)."""

    gram: np.ndarray | None = None
    row_weights: np.ndarray | None = None
    #: Sub-vectors each row of the tensor is cut into (the ``m`` of the metric's layout).
    subvectors_per_row: int = 1

    def for_layout(self, subvectors_per_row):
        """The same calibration for rows cut into ``subvectors_per_row`` sub-vectors."""
        return replace(self, subvectors_per_row=subvectors_per_row)

    def for_rows(self, rows):
        """The calibration of the output rows ``rows`` (a slice) of the tensor."""
        if self.row_weights is None:
            return self
        return replace(self, row_weights=self.row_weights[rows])

    def metric(self, vector_size):
        """Metric blocks of the tensor's sub-vectors (None for row weights), with negative
        eigenvalues (rounding of a Gram matrix stored in low precision, within the tolerance
        of :func:`check_entry`) set to zero."""
        if self.gram is None:
            return None
        eigenvalues, vectors = np.linalg.eigh(metric_blocks(self.gram, vector_size))
        return np.einsum("bik,bk,bjk->bij", vectors, np.clip(eigenvalues, 0.0, None), vectors)

    def sample_weight(self, subvectors_per_row):
        """Weights of the tensor's sub-vectors (None for a Gram matrix)."""
        if self.row_weights is None:
            return None
        return np.repeat(self.row_weights, subvectors_per_row)

    def energy(self, matrix):
        """``sum_r e_r H e_r^T`` (or ``sum_r u_r ||e_r||^2``) over the rows of ``matrix``
        (``(rows, in)``, float64): the output energy of its rows on the calibration data."""
        E = np.asarray(matrix, dtype=np.float64)
        if self.gram is not None:
            return float(np.einsum("ri,ri->", E @ self.gram, E))
        return float(self.row_weights @ np.einsum("ri,ri->r", E, E))


def check_entry(name, array, shape):
    """The :class:`LayerCalibration` of tensor ``name`` of ``shape`` from its entry.

    Raises
    ------
    ValueError
        If the entry has neither shape, is not finite, or is not a symmetric positive
        semi-definite Gram matrix (on its diagonal blocks, the part that is used) or a
        nonnegative, not all-zero vector.
    TypeError
        If the entry is not a float array.
    """
    array = np.asarray(array)
    if not is_float(array.dtype):
        raise TypeError(f"calibration for {name!r} has dtype {array.dtype}; give floats")
    n_in = int(np.prod(shape[1:], dtype=np.int64))
    # rounding to the entry's dtype (bfloat16 keeps 8 bits) may leave a Gram matrix slightly
    # asymmetric or indefinite: tolerate that much, relative to its largest entry
    tolerance = max(1e-6, 16 * float(ml_dtypes.finfo(array.dtype).eps))
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"calibration for {name!r} holds NaN or infinity")
    if array.shape == (n_in, n_in):
        scale = float(np.max(np.abs(array), initial=0.0))
        if np.max(np.abs(array - array.T), initial=0.0) > tolerance * scale:
            raise ValueError(f"calibration for {name!r} is not symmetric: a Gram matrix "
                             "A.T @ A of the layer's inputs is")
        blocks = metric_blocks(array, min(n_in, 64))
        lowest = float(np.min(np.linalg.eigvalsh(blocks)))
        if lowest < -tolerance * scale:
            raise ValueError(f"calibration for {name!r} is not positive semi-definite "
                             f"(eigenvalue {lowest:.3g}): a Gram matrix A.T @ A is")
        if scale == 0:
            raise ValueError(f"calibration for {name!r} is all zero")
        return LayerCalibration(gram=(array + array.T) / 2)
    if array.shape == (shape[0],):
        if np.any(array < 0) or not array.any():
            raise ValueError(f"calibration row weights for {name!r} must be nonnegative and "
                             "not all zero")
        return LayerCalibration(row_weights=array)
    raise ValueError(
        f"calibration for {name!r} has shape {array.shape}; for a tensor of shape "
        f"{tuple(shape)} give the Gram matrix of its inputs, shape ({n_in}, {n_in}), or "
        f"row weights, shape ({shape[0]},)"
    )
