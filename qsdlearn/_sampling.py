"""Samples of weighted rows that keep the weights (NumPy only).

A fit on a sample of rows stands for a fit on all of them. Drawn with probability
proportional to the rows' weights and fitted with unit weights (importance sampling), the
sample gives every row its weight in expectation, as long as the draw may repeat a row. Drawn
without replacement, as a fit needs, a row heavier than the others together allow appears at
most once and keeps a fraction of its weight. Such rows are taken for certain here and carry
their weight over their inclusion probability (Horvitz, D. G. and Thompson, D. J., "A
generalization of sampling without replacement from a finite universe", JASA 47, 1952).

Drawn uniformly (every row of weight one), the rows that hold much of the rows' energy are
taken for certain in the same way (:func:`outlier_rows`, :func:`uniform_sample`): a sample
that misses them fits a codebook without their directions.
"""

import numpy as np


def _relative(weights):
    """``weights`` in float64 over their largest (sums then neither overflow nor vanish),
    and that largest."""
    w = np.asarray(weights, dtype=np.float64)
    top = float(w.max()) if w.size else 0.0
    if not (np.isfinite(top) and top > 0 and np.all(w >= 0)):
        raise ValueError("row weights must be finite and nonnegative, some of them positive")
    return w / top, top


def certainty_scale(weights, size):
    """The scale ``c`` of the inclusion probabilities ``min(1, c w)`` that add up to ``size``.

    Rows with ``c w >= 1`` are taken for certain; the rest of the sample goes to the others
    in proportion to their weights.

    Parameters
    ----------
    weights : ndarray of shape (n,)
        Nonnegative row weights, at least ``size`` of them positive.
    size : int
        Rows in the sample, at least 1.

    Returns
    -------
    float
        ``c``, in the units of ``1 / weights`` (``inf`` when every positive row is taken).

    Raises
    ------
    ValueError
        If a weight is negative or not finite, or none is positive.

    Examples
    --------
    >>> round(certainty_scale(np.array([1.0, 1.0, 1.0, 97.0]), 2), 12)
    0.333333333333
    """
    w, top = _relative(weights)
    return _relative_certainty_scale(w, size) / top


def _relative_certainty_scale(w, size):
    """:func:`certainty_scale` of weights already relative to their largest."""
    order = np.sort(w[w > 0])[::-1]
    remaining = np.cumsum(order[::-1])[::-1]  # remaining[t]: weight of rows t and after
    for taken in range(min(size, order.size)):
        c = (size - taken) / remaining[taken]
        if c * order[taken] < 1:
            return float(c)
    return np.inf


def importance_sample(weights, size, rng, keep_order=True):
    """``size`` distinct rows drawn with probability proportional to ``weights``, and the
    weights to fit them with so that the sample's weighted error estimates that of all rows.

    Rows with ``c w >= 1`` (:func:`certainty_scale`) are taken for certain and weighted
    ``c w``; the others are drawn without replacement with probability proportional to their
    weights (``rng.choice``) and weighted 1. Rows of weight zero are never drawn.

    Parameters
    ----------
    weights : ndarray of shape (n,)
        Nonnegative row weights.
    size : int
        Rows in the sample, at least 1; every row of positive weight when at most ``size``
        are.
    rng : numpy.random.Generator or numpy.random.RandomState
        Draws the rows not taken for certain.
    keep_order : bool, default=True
        Return the rows sorted (otherwise those taken for certain, then in the order drawn).

    Returns
    -------
    rows : ndarray of shape (size,), int
    fit_weights : ndarray of shape (size,), float64, or None
        None when no row is taken for certain: unit weights, and ``rows`` is then the draw
        of ``rng.choice(n, size, replace=False, p=weights / weights.sum())`` alone. When
        every row of positive weight is taken, their weights (and ``rows`` all of them).
    factor : float
        ``1 / c``: the sample's weighted error times ``factor`` estimates the weighted error
        of all rows (``factor * fit_weights.sum()`` is the total weight).

    Raises
    ------
    ValueError
        If a weight is negative or not finite, or none is positive.

    Examples
    --------
    >>> w = np.array([1.0, 1.0, 1.0, 97.0])
    >>> rows, fit_weights, factor = importance_sample(w, 2, np.random.default_rng(0))
    >>> 3 in rows, round(float(factor * fit_weights.sum()), 9)
    (True, 100.0)
    """
    w, top = _relative(weights)
    c = _relative_certainty_scale(w, size)  # in units of the largest weight
    if c == np.inf:  # every row of positive weight is taken, with its weight
        rows = np.flatnonzero(w)
        return rows, np.asarray(weights, dtype=np.float64)[rows], 1.0
    certain = np.flatnonzero(c * w >= 1)
    if certain.size == 0:
        rows = rng.choice(w.size, size, replace=False, p=w / w.sum())
        return (np.sort(rows) if keep_order else rows), None, float(w.sum()) * top / size
    others = np.ones(w.size, dtype=bool)
    others[certain] = False
    others = np.flatnonzero(others & (w > 0))
    drawn = others[rng.choice(others.size, size - certain.size, replace=False,
                              p=w[others] / w[others].sum())]
    rows = np.concatenate([certain, drawn])
    if keep_order:
        rows = np.sort(rows)
    fit_weights = np.where(c * w[rows] >= 1, c * w[rows], 1.0)
    return rows, fit_weights, top / c


#: Rows whose energies :func:`_ranked_rows` ranks at a time (16 MB of float64 energies and
#: their indices, where all of a 4096 x 4096 matrix's scalars took 268 MB).
_RANKED_ROWS = 1 << 20


def _row_energies(X, block, weights=None):
    """Squared norms of the rows ``block`` of ``X`` (times ``weights``, all rows', when
    given), in float64 (squares of float32 values beyond 2**64 overflow float32), without a
    copy of ``X``."""
    energy = np.einsum("ij,ij->i", X[block], X[block], dtype=np.float64)
    return energy if weights is None else energy * weights[block]


def _ranked_rows(X, weights, depth):
    """The ``depth`` rows of ``X`` of largest squared norm (times ``weights``, all rows', when
    given) and their energies, in no particular order, and the energy of all rows; ranked
    :data:`_RANKED_ROWS` at a time, each block's heaviest kept for the next (the memory of a
    block, not of every row)."""
    n_rows = X.shape[0]
    rows, energy, total = np.empty(0, dtype=np.intp), np.empty(0), 0.0
    for start in range(0, n_rows, _RANKED_ROWS):
        block = slice(start, min(n_rows, start + _RANKED_ROWS))
        block_energy = _row_energies(X, block, weights)
        total += float(block_energy.sum())
        rows = np.concatenate([rows, np.arange(block.start, block.stop)])
        energy = np.concatenate([energy, block_energy])
        if energy.shape[0] > depth:
            top = np.argpartition(energy, energy.shape[0] - depth)[energy.shape[0] - depth:]
            rows, energy = rows[top], energy[top]
    return rows, energy, total


#: Rows are taken for certain in a uniform sample of ``size`` rows heaviest first, while a
#: row's energy is more than ``1 / (size - t)`` of the energy of the rows not yet taken (more
#: than a drawn row stands for; ``t`` rows taken) and more than OUTLIER_MEAN_RATIO times their
#: mean (on a sample of nearly all rows, only rows far above the others); at most
#: ``size // MAX_OUTLIER_SHARE`` of them. Weighed against the rows not yet taken, outliers of
#: 1e3 are taken beside outliers of 1e5, which hold nearly all of the energy. Drawn uniformly, a
#: row a million times the others' scale was missed by the fit: in a 512 x 512 Gaussian matrix
#: with 20 such weights, cut into pairs (131,072 sub-vectors, 65,536 fitted), 5 of them were
#: decoded as noise (6.1 dB at 3 b/w), and the estimates of every candidate were that error
#: alone, so the rate allocation chose on noise (87.8 dB at 2 b/w, 37.8 at 3). Standard Gaussian
#: rows of 8 (or 1) elements exceed 16 times their mean with probability 1e-23 (6e-5).
OUTLIER_MEAN_RATIO = 16
MAX_OUTLIER_SHARE = 4


def outlier_rows(rows, energy, total, n_rows, size):
    """The rows that a uniform sample of ``size`` of ``n_rows`` rows takes for certain (see
    :data:`OUTLIER_MEAN_RATIO`), in increasing order.

    Parameters
    ----------
    rows : ndarray of shape (m,), int, or None
        The indices of the rows whose ``energy`` is given (those of largest energy, at
        least ``size // MAX_OUTLIER_SHARE`` of them), or None: ``energy`` is every row's.
    energy : ndarray of shape (m,), float64
        Their squared norms (times row weights, if any).
    total : float
        The energy of all ``n_rows`` rows.
    n_rows, size : int
        Rows in all and in the sample.

    Returns
    -------
    ndarray of shape (c,), int
        Indices of rows, ``c <= size // MAX_OUTLIER_SHARE``.

    Examples
    --------
    >>> outlier_rows(None, np.array([1.0] * 97 + [1e3, 1e6, 1e9]), 1e9 + 1e6 + 1e3 + 97,
    ...              100, 20)
    array([97, 98, 99])
    """
    most = min(size // MAX_OUTLIER_SHARE, energy.shape[0])
    if most == 0:
        return np.empty(0, dtype=np.intp)
    top = np.argpartition(energy, energy.shape[0] - most)[energy.shape[0] - most:]
    top = top[np.argsort(energy[top])[::-1]]  # the heaviest, heaviest first
    taken = np.arange(most)
    left = total - np.concatenate([[0.0], np.cumsum(energy[top])[:-1]])  # energy not taken
    limit = left * np.maximum(1.0 / (size - taken), OUTLIER_MEAN_RATIO / (n_rows - taken))
    over = energy[top] > limit
    count = most if over.all() else int(np.argmin(over))  # while each row is over its limit
    chosen = top[:count]
    return np.sort(chosen if rows is None else rows[chosen])


def with_outliers(drawn, outliers, n_rows):
    """A uniform draw of rows ``drawn`` (in the order drawn) with the ``outliers`` first in
    place of as many of its rows (the last not among the outliers go), and the weights and
    factor of :func:`uniform_sample` for them (``n_rows`` rows in all).

    Examples
    --------
    >>> rows, fit_weights, factor = with_outliers(np.array([5, 2, 4, 1]), np.array([9]), 10)
    >>> rows.tolist(), fit_weights.tolist(), factor
    ([9, 5, 2, 4], [0.3333333333333333, 1.0, 1.0, 1.0], 3.0)
    """
    kept = drawn[~np.isin(drawn, outliers)][:drawn.shape[0] - outliers.shape[0]]
    factor = (n_rows - outliers.shape[0]) / kept.shape[0]
    fit_weights = np.concatenate([np.full(outliers.shape[0], 1.0 / factor),
                                  np.ones(kept.shape[0])])
    return np.concatenate([outliers, kept]), fit_weights, factor


def uniform_rows(n, size, seed, keep_order=True):
    """``size`` of ``n`` row indices, drawn uniformly without replacement with ``seed``
    (``numpy.random.default_rng(seed).choice(n, size, replace=False)``); sorted unless
    ``keep_order=False`` (then in the order drawn)."""
    rows = np.random.default_rng(seed).choice(n, size, replace=False)
    return np.sort(rows) if keep_order else rows


def uniform_sample(X, size, seed, keep_order=True):
    """``size`` distinct rows of ``X`` drawn uniformly with ``seed``, except its outliers
    (:func:`outlier_rows`), taken for certain; and the weights to fit them with so that the
    sample's weighted error times ``factor`` estimates the error of all rows.

    Parameters
    ----------
    X : ndarray of shape (n, d)
        The rows, ``n > size``.
    size : int
        Rows in the sample, at least 1.
    seed : int
        Seeds the draw (``numpy.random.default_rng``).
    keep_order : bool, default=True
        Return the rows sorted (otherwise the outliers, then in the order drawn).

    Returns
    -------
    rows : ndarray of shape (size,), int
    fit_weights : ndarray of shape (size,), float64, or None
        None without outliers: unit weights, and ``rows`` the draw of
        ``default_rng(seed).choice(n, size, replace=False)`` alone. Otherwise 1 for a drawn
        row and ``1 / factor`` for an outlier, which stands for itself alone.
    factor : float
        Rows a drawn row stands for: ``(n - c) / (size - c)`` with ``c`` outliers.

    Examples
    --------
    >>> X = np.ones((1000, 2)); X[7] = 1e4
    >>> rows, fit_weights, factor = uniform_sample(X, 100, seed=0)
    >>> 7 in rows, round(float(factor * fit_weights.sum()), 9)
    (True, 1000.0)
    """
    n = X.shape[0]
    ranked, energy, total = _ranked_rows(X, None, max(size // MAX_OUTLIER_SHARE, 1))
    outliers = outlier_rows(ranked, energy, total, n, size)
    if outliers.shape[0] == 0:
        return uniform_rows(n, size, seed, keep_order), None, n / size
    drawn = uniform_rows(n, size, seed, keep_order=False)
    rows, fit_weights, factor = with_outliers(drawn, outliers, n)
    if keep_order:
        order = np.argsort(rows)
        rows, fit_weights = rows[order], fit_weights[order]
    return rows, fit_weights, factor
