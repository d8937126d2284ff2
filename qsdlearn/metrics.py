"""Distortion, rate–distortion hulls and rate-aware scorers for model selection.

The rate of an encoded matrix is its exact payload in bits per element
(``CompressedMatrix.bits_per_element``, codebook included); its distortion is the normalised
mean squared error ``||X - X_hat||^2 / ||X||^2`` (``10 log10`` of its inverse is the SQNR).
Two settings can share one matrix, each coding a share of its rows, so every convex
combination of measured (rate, distortion) points is achievable: the *operational hull*
(:func:`lower_hull`, :func:`hull_at`) is what a set of settings can reach at each rate.

This module needs nothing of the package: scorers and curves use an estimator's public
``fit``, ``transform``, ``inverse_transform`` and ``encode``.
"""

import functools
import math
from typing import NamedTuple

import numpy as np
from scipy import sparse
from sklearn.base import clone
from sklearn.pipeline import Pipeline

from ._checks import check_real_array
from ._levels import scale_exponent

__all__ = [
    "budget_scorer",
    "hull_at",
    "lower_hull",
    "normalized_mse",
    "rate_distortion_curve",
    "rate_distortion_scorer",
    "sqnr",
]


def sqnr(X, X_hat):
    """Signal-to-quantization-noise ratio in decibels, ``10 log10(||X||^2 / ||X - X_hat||^2)``.

    Parameters
    ----------
    X : array-like
        Reference data.
    X_hat : array-like of the same shape
        Approximation of ``X``.

    Returns
    -------
    float
        In decibels; ``inf`` when the approximation is exact (an all-zero ``X`` included),
        ``-inf`` when ``X`` is all zero and the approximation is not.

    Raises
    ------
    ValueError
        If the shapes differ, the arrays are empty or hold NaN or infinite values.
    TypeError
        If either array does not hold real numbers (complex, strings, objects).

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn.metrics import sqnr
    >>> round(sqnr(np.ones(4), np.full(4, 1.1)), 2)
    20.0
    """
    noise, signal = _noise_and_signal(X, X_hat)
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def normalized_mse(X, X_hat):
    """Squared error over signal energy, ``||X - X_hat||^2 / ||X||^2`` (the distortion of the
    rate–distortion curves; 1 for ``X_hat = 0``).

    Parameters
    ----------
    X : array-like
        Reference data.
    X_hat : array-like of the same shape
        Approximation of ``X``.

    Returns
    -------
    float
        0 when exact, ``inf`` when ``X`` is all zero and the approximation is not.

    Raises
    ------
    ValueError
        If the shapes differ, the arrays are empty or hold NaN or infinite values.
    TypeError
        If either array does not hold real numbers (complex, strings, objects).

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn.metrics import normalized_mse
    >>> normalized_mse([3.0, 4.0], [3.0, 3.0])
    0.04
    """
    noise, signal = _noise_and_signal(X, X_hat)
    if noise == 0.0:
        return 0.0
    return noise / signal if signal > 0 else float("inf")


#: Elements converted to float64 at a time by :func:`_noise_and_signal` (8 MiB per copy), so
#: that measuring a large tensor does not hold float64 copies of it.
_CHUNK_ELEMENTS = 2**20


def _noise_and_signal(X, X_hat):
    X, X_hat = check_real_array(X, "X"), check_real_array(X_hat, "X_hat")
    if X.shape != X_hat.shape:
        raise ValueError(f"shapes differ: {X.shape} and {X_hat.shape}")
    if X.size == 0:
        raise ValueError("X and X_hat are empty")
    X, X_hat = X.reshape(-1), X_hat.reshape(-1)
    # Both divided by the power of two that brings them to unit scale (exact; the ratio does
    # not change), so that squares of data near 1e300 or 1e-300 neither overflow nor underflow.
    exponent = scale_exponent(X, X_hat)
    noise = signal = 0.0
    for start in range(0, X.size, _CHUNK_ELEMENTS):
        x = np.ldexp(X[start:start + _CHUNK_ELEMENTS].astype(np.float64), -exponent)
        error = x - np.ldexp(X_hat[start:start + _CHUNK_ELEMENTS].astype(np.float64), -exponent)
        noise += float(error @ error)
        signal += float(x @ x)
    if not (math.isfinite(noise) and math.isfinite(signal)):
        raise ValueError("X and X_hat must hold finite values (no NaN or infinity)")
    return noise, signal


# -- the operational hull ----------------------------------------------------------------------


def _as_origin(origin):
    """The hull's ``origin`` as a ``(1, 2)`` array of points (:func:`_as_points`)."""
    origin = check_real_array(origin, "origin").astype(np.float64)
    if origin.shape != (2,):
        raise ValueError(f"origin must be one (rate, distortion) pair, got shape {origin.shape}")
    return _as_points(origin, "origin")


def _as_points(points, name="points"):
    """``points`` as a float64 array of ``(rate, distortion)`` rows: real numbers (a
    TypeError otherwise), finite and nonnegative."""
    points = check_real_array(points, name).astype(np.float64)
    if points.size and points.shape[-1] != 2 or points.ndim > 2:
        raise ValueError(f"{name} must be (rate, distortion) pairs, of shape (n_points, 2); "
                         f"got shape {points.shape}")
    points = points.reshape(-1, 2)
    if points.size and (not np.all(np.isfinite(points)) or np.any(points < 0)):
        raise ValueError(f"{name} must be finite with nonnegative rates and distortions")
    return points


def lower_hull(points, origin=(0.0, 1.0)):
    """Vertices of the operational (lower convex, nonincreasing) hull of rate–distortion points.

    Parameters
    ----------
    points : array-like of shape (n_points, 2)
        ``(rate, distortion)`` pairs, e.g. bits per element and normalised mean squared error.
        ``n_points`` may be 0.
    origin : tuple of two floats or None, default=(0.0, 1.0)
        A point that is always achievable and is added to ``points``: by default sending
        nothing, which costs no bits and leaves all of the (normalised) signal as error.
        ``None`` adds nothing.

    Returns
    -------
    vertices : ndarray of shape (n_vertices, 2)
        The hull's vertices by increasing rate and strictly decreasing distortion. The hull
        is the piecewise linear function through them, constant after the last one and
        undefined before the first one. Empty when there are no points at all.

    Raises
    ------
    TypeError
        If the points (or ``origin``) are not real numbers.
    ValueError
        If a point (or ``origin``) is not a finite pair or has a negative rate or distortion.

    Notes
    -----
    Andrew's monotone chain on the points sorted by rate (ties: lowest distortion first),
    keeping only turns to the left, then cut at the lowest distortion: beyond it, extra bits
    can be left unused, so the hull does not rise again.

    Examples
    --------
    >>> from qsdlearn.metrics import lower_hull
    >>> lower_hull([(1.0, 0.5), (2.0, 0.45), (3.0, 0.1)]).tolist()
    [[0.0, 1.0], [1.0, 0.5], [3.0, 0.1]]
    """
    points = _as_points(points)
    if origin is not None:
        points = np.vstack([_as_origin(origin), points])
    if len(points) == 0:
        return points.reshape(0, 2)
    order = np.lexsort((points[:, 1], points[:, 0]))
    hull = []
    for rate, dist in points[order]:
        if hull and hull[-1][0] == rate:
            continue  # same rate, not lower (sorted): never a vertex
        if hull and dist >= hull[-1][1]:
            continue  # more bits for no less error: never on a nonincreasing hull
        while len(hull) >= 2:
            (r0, d0), (r1, d1) = hull[-2], hull[-1]
            # Drop the last vertex when it lies on or above the chord from r0 to the new point.
            if (d1 - d0) * (rate - r0) >= (dist - d0) * (r1 - r0):
                hull.pop()
            else:
                break
        hull.append((rate, dist))
    return np.array(hull, dtype=np.float64).reshape(-1, 2)


def hull_at(points, rates, origin=(0.0, 1.0)):
    """Distortion of the operational hull at given rates.

    Parameters
    ----------
    points : array-like of shape (n_points, 2)
        ``(rate, distortion)`` pairs, as in :func:`lower_hull`.
    rates : float or array-like of floats
        Rates at which to read the hull.
    origin : tuple of two floats or None, default=(0.0, 1.0)
        As in :func:`lower_hull`.

    Returns
    -------
    distortion : float or ndarray
        The least distortion of any convex combination of the points (and ``origin``) whose
        rate is at most the given rate; ``nan`` where no point has a rate that low. A float
        for a scalar ``rates``.

    Raises
    ------
    TypeError
        If the points, ``origin`` or the rates are not real numbers.
    ValueError
        If a point, ``origin`` or a rate is not finite or is negative, or the points are not
        ``(rate, distortion)`` pairs.

    Examples
    --------
    >>> from qsdlearn.metrics import hull_at
    >>> hull_at([(2.0, 0.25)], [0.5, 1.0, 2.0, 3.0])
    array([0.8125, 0.625 , 0.25  , 0.25  ])
    """
    vertices = lower_hull(points, origin)
    rates_arr = check_real_array(rates, "rates").astype(np.float64)
    if not np.all(np.isfinite(rates_arr)) or np.any(rates_arr < 0):
        raise ValueError("rates must be finite and nonnegative")
    out = np.full(rates_arr.shape, np.nan)
    if len(vertices):
        below = rates_arr >= vertices[0, 0]
        out[below] = np.interp(rates_arr[below], vertices[:, 0], vertices[:, 1])
    return float(out) if out.ndim == 0 else out


# -- curves and scorers ------------------------------------------------------------------------


def _encoder_and_input(estimator, X):
    """The encoding step of ``estimator`` (the last step of a pipeline) and its input."""
    if isinstance(estimator, Pipeline):
        for _, step in estimator.steps[:-1]:
            if step is not None and step != "passthrough":
                X = step.transform(X)
        estimator = estimator.steps[-1][1]
    if sparse.issparse(X):
        raise TypeError("Sparse data was passed, but dense data is required to measure the "
                        "rate and distortion of an encoding. Use X.toarray() to convert to a "
                        "dense array.")
    if not hasattr(estimator, "encode"):
        raise TypeError(
            f"{type(estimator).__name__} has no encode(X): rate-aware scores need an estimator "
            "such as QuantizedSparseDecomposition (or a pipeline ending in one)"
        )
    return estimator, X


class _Rate(NamedTuple):
    """The bits of an encoding: ``fixed`` (the codebook's, whatever the rows) and ``per_row``
    (each row's codes), for rows of ``n_features`` elements."""

    fixed: float
    per_row: float
    n_features: int

    def bits_per_element(self, n_rows):
        """Bits per element of ``n_rows`` rows under this encoding."""
        return (self.fixed + self.per_row * n_rows) / (n_rows * self.n_features)

    def share_within(self, budget, n_rows):
        """The largest share of ``n_rows`` rows this encoding codes within ``budget`` bits per
        element of all of them (the others coded with no bits), in [0, 1]."""
        if self.per_row == 0:
            return 1.0 if self.fixed <= budget * n_rows * self.n_features else 0.0
        share = (budget * n_rows * self.n_features - self.fixed) / (self.per_row * n_rows)
        return min(1.0, max(0.0, share))


def _rate_and_distortion(estimator, X):
    """The bits (a :class:`_Rate`) and normalised MSE of the scored rows ``X``, and their
    number; a ValueError when they are all zero, where the normalised error is not defined
    (``inf`` for every setting that does not decode them exactly, so that every setting would
    tie)."""
    encoder, X = _encoder_and_input(estimator, X)
    if not np.any(X):  # before the encoding, which would be wasted
        raise ValueError("the scored rows are all zero: their normalised error (and SQNR) is "
                         "not defined; score on rows that hold some signal (e.g. leave the "
                         "all-zero rows out of the cross-validation data)")
    compressed = encoder.encode(X)
    n_rows, n_features = compressed.shape
    settings = compressed.settings
    fixed = settings.constraints.bits(0, n_features, settings.float_bits).total
    rate = _Rate(fixed, (compressed.bits - fixed) / n_rows, n_features)
    X = np.asarray(X, dtype=np.float64)
    return rate, normalized_mse(X, compressed.decode()), n_rows


def _check_n_rows(n_rows):
    """Refuse an ``n_rows`` that is not None or a positive integer."""
    if n_rows is not None and (isinstance(n_rows, bool) or not isinstance(
            n_rows, (int, np.integer)) or n_rows < 1):
        raise ValueError(f"n_rows must be None or a positive integer, got {n_rows!r}")


def rate_distortion_scorer(lmbda, n_rows=None):
    """A scorer for scikit-learn's model selection: ``-(distortion + lmbda * rate)``.

    The rate is what storing the scored rows costs, ``encode(X).bits_per_element`` (codebook
    included), or what ``n_rows`` rows coded alike would cost; the distortion is the scored
    rows' normalised mean squared error. Higher is better, so
    ``GridSearchCV(..., scoring=rate_distortion_scorer(lmbda))`` picks the setting on the
    operational hull where its slope is ``-lmbda``: larger ``lmbda`` favours fewer bits.

    Parameters
    ----------
    lmbda : float
        Price of one bit per element in units of normalised squared error (non-negative).
    n_rows : int, optional
        The rows of the matrix the chosen setting will code (e.g. all of them, where a
        cross-validation scores folds of a part): the codebook's bits, the same for any
        number of rows, are spread over these. None: over the scored rows, so that the rate,
        and the choice, change with the size of the folds.

    Returns
    -------
    callable
        ``scorer(estimator, X, y=None) -> float`` (a :func:`functools.partial`, so that it
        pickles with a search that holds it). The estimator (or a pipeline's last step) must
        have ``encode``.

    Raises
    ------
    ValueError
        If ``lmbda`` is negative or not finite, or ``n_rows`` is not a positive integer; the
        scorer, if the scored rows are all zero (their normalised error is not defined).

    See Also
    --------
    budget_scorer : SQNR subject to a bit budget.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.model_selection import GridSearchCV
    >>> from qsdlearn import QuantizedSparseDecomposition
    >>> from qsdlearn.metrics import rate_distortion_scorer
    >>> X = np.random.default_rng(0).standard_normal((2000, 4)).astype(np.float32)
    >>> search = GridSearchCV(
    ...     QuantizedSparseDecomposition(n_nonzero=1, code_bits=0, random_state=0),
    ...     {"n_components": [2, 16, 256]}, scoring=rate_distortion_scorer(0.1), cv=2)
    >>> search.fit(X).best_params_
    {'n_components': 16}
    """
    if not (isinstance(lmbda, (int, float, np.integer, np.floating))
            and not isinstance(lmbda, bool) and math.isfinite(lmbda) and lmbda >= 0):
        raise ValueError(f"lmbda must be a finite non-negative number, got {lmbda!r}")
    _check_n_rows(n_rows)
    return functools.partial(_rate_distortion_score, lmbda=lmbda, n_rows=n_rows)


def _rate_distortion_score(estimator, X, y=None, *, lmbda, n_rows):
    """The score of :func:`rate_distortion_scorer` (a module function, so that the scorer
    pickles, as a fitted search that holds it must)."""
    rate, distortion, scored = _rate_and_distortion(estimator, X)
    return -(distortion + lmbda * rate.bits_per_element(n_rows or scored))


def budget_scorer(max_bits_per_element, n_rows=None):
    """A scorer for scikit-learn's model selection: SQNR (dB) within a bit budget.

    A setting whose encoding of the scored rows fits in ``max_bits_per_element``
    (``encode(X).bits_per_element``, codebook included; or of ``n_rows`` rows coded alike)
    scores its SQNR. One over the budget scores what it can deliver within it: coding the
    largest share ``f`` of the rows that fits, its codebook counted in full, and nothing for
    the others, whose normalised error is ``1 - f (1 - D)``; ``f = 0`` (0 dB) when the
    codebook alone passes the budget. So settings over budget rank below what they would
    reach within it, with a finite score (an exact reconstruction within the budget scores
    ``inf``).

    Parameters
    ----------
    max_bits_per_element : float
        The budget in bits per element (positive).
    n_rows : int, optional
        The rows of the matrix the chosen setting will code (e.g. all of them, where a
        cross-validation scores folds of a part): the codebook's bits, the same for any
        number of rows, are spread over these. None: over the scored rows, so that what fits
        the budget, and the choice, change with the size of the folds.

    Returns
    -------
    callable
        ``scorer(estimator, X, y=None) -> float`` (a :func:`functools.partial`, so that it
        pickles with a search that holds it).

    Raises
    ------
    ValueError
        If the budget is not a positive finite number, or ``n_rows`` is not a positive
        integer; the scorer, if the scored rows are all zero (their SQNR is not defined).

    See Also
    --------
    rate_distortion_scorer : The Lagrangian trade-off of error and bits.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.model_selection import GridSearchCV
    >>> from qsdlearn import QuantizedSparseDecomposition
    >>> from qsdlearn.metrics import budget_scorer
    >>> X = np.random.default_rng(0).standard_normal((2000, 4)).astype(np.float32)
    >>> search = GridSearchCV(
    ...     QuantizedSparseDecomposition(n_nonzero=1, code_bits=0, random_state=0),
    ...     {"n_components": [4, 16, 256]}, scoring=budget_scorer(2.0), cv=2)
    >>> search.fit(X).best_params_
    {'n_components': 16}
    """
    if not (isinstance(max_bits_per_element, (int, float, np.integer, np.floating))
            and not isinstance(max_bits_per_element, bool)
            and math.isfinite(max_bits_per_element) and max_bits_per_element > 0):
        raise ValueError(
            f"max_bits_per_element must be a positive number, got {max_bits_per_element!r}"
        )

    _check_n_rows(n_rows)
    return functools.partial(_budget_score, max_bits_per_element=max_bits_per_element,
                             n_rows=n_rows)


def _budget_score(estimator, X, y=None, *, max_bits_per_element, n_rows):
    """The score of :func:`budget_scorer` (a module function, so that the scorer pickles)."""
    rate, distortion, scored = _rate_and_distortion(estimator, X)
    rows = n_rows or scored
    if rate.bits_per_element(rows) > max_bits_per_element:
        distortion = 1.0 - rate.share_within(max_bits_per_element, rows) * (1.0 - distortion)
    # (+ 0.0: nothing coded within the budget scores 0 dB, not -0.0)
    return float("inf") if distortion == 0 else float(-10.0 * np.log10(distortion)) + 0.0


def rate_distortion_curve(X, estimators):
    """Fit each estimator to ``X`` and measure its exact rate and distortion on ``X``.

    For a pipeline, they are those of its last step on its input (the rows as the earlier
    steps transform them).

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        The matrix to compress.
    estimators : iterable of estimators
        Unfitted estimators with ``encode`` (e.g. :class:`QuantizedSparseDecomposition` of
        several settings); each is cloned, so they are left unfitted.

    Returns
    -------
    list of dict
        One record per estimator, in order: ``estimator`` (the fitted clone), ``bits`` (exact
        payload), ``bits_per_element``, ``normalized_mse`` and ``sqnr_db``. The points
        ``(bits_per_element, normalized_mse)`` are what :func:`lower_hull` and
        :func:`hull_at` take.

    See Also
    --------
    hull_at : The least distortion the settings reach at a rate, splitting rows if needed.

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn import QuantizedSparseDecomposition
    >>> from qsdlearn.metrics import hull_at, rate_distortion_curve
    >>> X = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    >>> curve = rate_distortion_curve(X, [
    ...     QuantizedSparseDecomposition(k, n_nonzero=1, code_bits=0, random_state=0)
    ...     for k in (4, 16, 64)])
    >>> [round(r["bits_per_element"], 3) for r in curve]
    [0.378, 1.012, 2.798]
    >>> points = [(r["bits_per_element"], r["normalized_mse"]) for r in curve]
    >>> # 1.5 bits per element: split the rows between k=16 and k=64, better than k=16 alone
    >>> bool(hull_at(points, 1.5) < curve[1]["normalized_mse"])
    True
    """
    X = X if sparse.issparse(X) else np.asarray(X)  # sparse input: the estimator's error
    records = []
    for template in estimators:
        estimator = clone(template).fit(X)
        encoder, X_enc = _encoder_and_input(estimator, X)
        compressed = encoder.encode(X_enc)
        X_hat = compressed.decode()
        records.append(dict(
            estimator=estimator, bits=compressed.bits,
            bits_per_element=compressed.bits_per_element,
            normalized_mse=normalized_mse(X_enc, X_hat), sqnr_db=sqnr(X_enc, X_hat),
        ))
    return records
