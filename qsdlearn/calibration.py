"""Calibration statistics for data-aware compression.

A linear layer ``y = W a`` with calibration inputs ``A`` (one row per sample) has output error
``||(W - W_hat) A^T||_F^2 = sum_r e_r H e_r^T`` over the rows ``e_r`` of ``W - W_hat``, with
``H = A^T A`` the Gram matrix of its inputs. Only ``H`` is needed, so calibration costs one
pass over the activations and ``in x in`` numbers per layer, whatever the number of samples.
For a convolution, ``A`` holds the unfolded input patches (in-channels x kernel positions, in
the order of the weight's flattened ``(in, *kernel)`` axes, as ``torch.nn.functional.unfold``
gives them). An embedding table's input is a one-hot token: its "Gram matrix" is diagonal, the
number of times each row is used.
"""

import numpy as np

from ._checks import check_positive_int, check_real_array

__all__ = ["GramAccumulator", "metric_blocks"]


class GramAccumulator:
    """Accumulate the Gram matrix ``H = A^T A`` of a layer's inputs over batches.

    Memory is ``n_features**2`` float64 numbers plus one batch in float64, whatever the number
    of samples seen.

    Parameters
    ----------
    n_features : int
        Input width ``in`` of the layer (in-channels times kernel size for a convolution).

    Attributes
    ----------
    gram : ndarray of shape (n_features, n_features), float64
        ``sum over batches of A^T A``.
    n_samples : int
        Number of input rows seen.

    Raises
    ------
    ValueError
        If ``n_features`` is below 1 or its Gram matrix cannot be allocated; from
        :meth:`update`, when a batch's last axis is not ``n_features`` wide, holds NaN or
        infinity, or makes the sums overflow.
    TypeError
        If ``n_features`` is not an integer; from :meth:`update`, when a batch does not hold
        real numbers.

    See Also
    --------
    metric_blocks : The metric the estimator takes, from a Gram matrix.
    compress_weights : Takes the Gram matrices as ``calibration``.

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn import GramAccumulator
    >>> rng = np.random.default_rng(0)
    >>> acc = GramAccumulator(16)
    >>> for _ in range(4):                      # e.g. in a forward hook, batch by batch
    ...     _ = acc.update(rng.standard_normal((32, 10, 16)))  # (batch, tokens, features)
    >>> acc.gram.shape, acc.n_samples
    ((16, 16), 1280)
    """

    def __init__(self, n_features):
        self.n_features = check_positive_int("n_features", n_features)
        try:
            self.gram = np.zeros((self.n_features, self.n_features))
        except (ValueError, MemoryError):  # numpy's "array is too big", or out of memory
            raise ValueError(
                f"n_features={self.n_features}: its Gram matrix of n_features**2 float64 "
                f"numbers ({8 * self.n_features**2 / 2**30:.3g} GiB) cannot be allocated"
            ) from None
        self.n_samples = 0

    def update(self, batch):
        """Add the inputs of one batch.

        Parameters
        ----------
        batch : array-like of shape (..., n_features)
            Inputs of the layer; leading axes (batch, sequence) are flattened into samples.
            Any float dtype (bfloat16 included); accumulated in float64.

        Returns
        -------
        self : GramAccumulator
            The accumulator, updated.
        """
        A = check_real_array(batch, "batch")
        if A.ndim == 0 or A.shape[-1] != self.n_features:
            raise ValueError(f"batch has shape {A.shape}; its last axis must have "
                             f"n_features={self.n_features} entries")
        A = A.reshape(-1, self.n_features).astype(np.float64)
        if not np.all(np.isfinite(A)):
            raise ValueError("batch holds NaN or infinity")
        with np.errstate(over="ignore"):  # checked just below
            gram = self.gram + A.T @ A
        if not np.all(np.isfinite(gram)):
            raise ValueError("the Gram matrix overflows float64: scale the inputs down")
        self.gram = gram
        self.n_samples += A.shape[0]
        return self


def metric_blocks(gram, vector_size):
    """The metric blocks of a layer's sub-vectors from the Gram matrix of its inputs.

    A weight row of length ``in`` is cut into ``m = ceil(in / vector_size)`` sub-vectors (the
    last one zero-padded, as :func:`compress_weights` does), so sub-vector ``i`` of the
    flattened weight is block ``i mod m`` of its row. Its metric is the matching diagonal block
    of ``gram`` (zero on the padding): pass the result as ``metric`` to
    :meth:`QuantizedSparseDecomposition.fit`. The blocks keep the within-block correlations of
    the inputs and drop those across blocks.

    Parameters
    ----------
    gram : array-like of shape (in, in)
        Symmetric positive semi-definite Gram matrix ``A^T A`` of the layer's inputs.
    vector_size : int
        Sub-vector length ``d``.

    Returns
    -------
    blocks : ndarray of shape (m, vector_size, vector_size), float64
        Block ``b`` is ``gram[b d:(b + 1) d, b d:(b + 1) d]``, zero-padded at the end.

    Raises
    ------
    ValueError
        If ``gram`` is not a finite square matrix of at least one entry, or ``vector_size`` is
        below 1 or above its width.
    TypeError
        If ``vector_size`` is not an integer, or ``gram`` does not hold real numbers.

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn import metric_blocks
    >>> rng = np.random.default_rng(0)
    >>> A = rng.standard_normal((100, 20))
    >>> metric_blocks(A.T @ A, 8).shape
    (3, 8, 8)
    """
    H = check_real_array(gram, "gram").astype(np.float64)
    if H.ndim != 2 or H.shape[0] != H.shape[1] or H.size == 0:
        raise ValueError(f"gram has shape {H.shape}; expected a square (in, in) matrix, "
                         "in >= 1")
    if not np.all(np.isfinite(H)):
        raise ValueError("gram holds NaN or infinity")
    d = check_positive_int("vector_size", vector_size)
    if d > max(H.shape[0], 1):
        raise ValueError(f"vector_size={d} exceeds the input width {H.shape[0]}")
    m = -(-H.shape[0] // d)
    padded = np.zeros((m * d, m * d))
    padded[: H.shape[0], : H.shape[0]] = H
    return np.stack([padded[b * d:(b + 1) * d, b * d:(b + 1) * d] for b in range(m)])
