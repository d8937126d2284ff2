"""Level sets in plain NumPy: the reference quantizer, the choice of grid scales, and the
power of two that brings data to unit scale.

The conventions are those of :mod:`qsdlearn._kernels` (unit mid-rise levels times a scale).
This module is the plain-NumPy counterpart the kernels are tested against, and what the solver
uses where vectorized NumPy is fast enough.
"""

import numpy as np

#: ``nbits`` code of float values, no quantization (the kernels' level-set argument).
FLOAT = -1

#: Relative grid steps tried when fitting a scale, as fractions of the range-covering step.
SCALE_FRACTIONS = np.linspace(0.05, 1.0, 39)


def unit_levels(nbits):
    """The unit level set of ``nbits`` bits as an array (``nbits >= 0``)."""
    if nbits == 0:
        return np.ones(1)
    half = 2 ** (nbits - 1)
    return np.arange(2 * half) - half + 0.5


def level_indices(levels, nbits):
    """Unit levels (half-integers) -> their indices ``0 .. 2**nbits - 1``, as uint64.

    The levels must lie on the grid: an index out of range is left for the bit packer to
    reject."""
    return np.rint(np.asarray(levels, dtype=np.float64) + 2 ** (nbits - 1) - 0.5).astype(np.uint64)


def level_values(indices, nbits, dtype=np.float64):
    """Inverse of :func:`level_indices`: the unit level of every index, in ``dtype``."""
    return (np.asarray(indices).astype(np.float64) - 2 ** (nbits - 1) + 0.5).astype(dtype)


def largest_level(nbits):
    """The largest unit level of ``nbits >= 1`` bits, ``2**(nbits-1) - 1/2``."""
    return 2.0 ** (nbits - 1) - 0.5


def snap_to_levels(levels, nbits):
    """Put values that lie on the unit grid up to rounding errors exactly back on it.

    Every value goes to the nearest multiple of 1/2 within the grid's range, so zeros (the
    entries off a sparse row's support) stay zero."""
    top = largest_level(nbits)
    return np.clip(np.rint(np.asarray(levels, dtype=np.float64) * 2.0) / 2.0, -top, top)


def quantize(values, scale, nbits):
    """Nearest point of ``scale`` times the unit level set, element-wise (NumPy reference).

    ``nbits=None`` returns the values unchanged; ``scale`` broadcasts against ``values``.
    """
    values = np.asarray(values, dtype=np.float64)
    if nbits is None:
        return values.copy()
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), values.shape)
    if nbits == 0:
        return scale.copy()
    half = 2 ** (nbits - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        i = np.clip(np.floor(values / scale + half), 0, 2 * half - 1)
    return np.where(scale == 0, 0.0, (i - half + 0.5) * scale)


def fit_level_scales(values, nbits, mask=None, fractions=None):
    """Per-column scale of the ``nbits`` grid with the smallest squared quantization error.

    Searches steps from 5 % to 100 % of the step that covers the column's largest magnitude
    (the MSE-optimal clipping of a uniform quantizer lies in that range for the value
    distributions met here). Columns with no (masked-in) nonzero value get scale 1.

    Parameters
    ----------
    values : ndarray of shape (m, n)
    nbits : int
        At least 1.
    mask : ndarray of bool, shape (m, n), optional
        Entries that count; others are ignored.
    fractions : sequence of float, optional
        The steps tried, as fractions of the range-covering step (default: 39 from 0.05 to 1).

    Returns
    -------
    scales : ndarray of shape (n,), float64, positive
    """
    values = np.asarray(values, dtype=np.float64)
    weights = np.ones_like(values) if mask is None else mask.astype(np.float64)
    top = np.max(np.abs(values) * weights, axis=0, initial=0.0)
    full_step = top / largest_level(nbits)
    best_err = np.full(values.shape[1], np.inf)
    best = np.ones(values.shape[1])
    for fraction in SCALE_FRACTIONS if fractions is None else fractions:
        step = np.where(full_step > 0, full_step * fraction, 1.0)
        err = np.sum(weights * (values - quantize(values, step, nbits)) ** 2, axis=0)
        better = err < best_err
        best_err[better] = err[better]
        best[better] = step[better]
    return best


def top_magnitude_mask(values, n_keep):
    """Boolean mask of the ``n_keep`` largest magnitudes of every row (all if ``None``)."""
    values = np.asarray(values)
    if n_keep is None or n_keep >= values.shape[1]:
        return np.ones(values.shape, dtype=bool)
    order = np.argpartition(-np.abs(values), n_keep - 1, axis=1)[:, :n_keep]
    mask = np.zeros(values.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def scale_exponent(*arrays):
    """``e`` such that the largest magnitude over ``arrays`` divided by ``2**e`` lies in
    [1/2, 1); 0 for all-zero arrays (and when that magnitude is not finite). Dividing by
    ``2**e`` is exact, and keeps squares of data near 1e300 from overflowing and of data near
    1e-300 from underflowing."""
    top = max(max(abs(float(a.max())), abs(float(a.min()))) if a.size else 0.0 for a in arrays)
    return int(np.frexp(top)[1]) if top > 0 else 0
