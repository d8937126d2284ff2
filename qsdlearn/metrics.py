"""Distortion measures for compressed matrices."""

import numpy as np


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

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn.metrics import sqnr
    >>> round(sqnr(np.ones(4), np.full(4, 1.1)), 2)
    20.0
    """
    X = np.asarray(X, dtype=np.float64)
    X_hat = np.asarray(X_hat, dtype=np.float64)
    if X.shape != X_hat.shape:
        raise ValueError(f"shapes differ: {X.shape} and {X_hat.shape}")
    noise = float(np.sum((X - X_hat) ** 2))
    signal = float(np.sum(X**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))
