"""Samples of weighted rows that keep the weights (NumPy only).

A fit on a sample of rows stands for a fit on all of them. Drawn with probability
proportional to the rows' weights and fitted with unit weights (importance sampling), the
sample gives every row its weight in expectation, as long as the draw may repeat a row. Drawn
without replacement, as a fit needs, a row heavier than the others together allow appears at
most once and keeps a fraction of its weight. Such rows are taken for certain here and carry
their weight over their inclusion probability (Horvitz, D. G. and Thompson, D. J., "A
generalization of sampling without replacement from a finite universe", JASA 47, 1952).
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
