"""Operational rate–distortion hull of a set of compression settings.

Two settings can always share one matrix, each coding a share of its rows, so every convex
combination of measured points ``(rate, distortion)`` is achievable; so is spending fewer bits
than allowed, and so is sending nothing (rate 0, normalised distortion 1). The smallest
distortion reachable with at most ``R`` bits per element is therefore the lower convex hull of
the points and ``(0, 1)``, kept constant after its lowest point.

Distortions are interpolated linearly (as mean squared errors, not in decibels). The functions
here are pure functions of arrays, free of anything specific to one benchmark.
"""

import numpy as np

__all__ = ["lower_hull", "hull_at"]


def _as_points(points):
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if points.size and (not np.all(np.isfinite(points)) or np.any(points[:, 0] < 0)):
        raise ValueError("points must be finite with nonnegative rates")
    return points


def lower_hull(points, origin=(0.0, 1.0)):
    """Vertices of the operational (lower convex, nonincreasing) hull of rate–distortion points.

    Parameters
    ----------
    points : array-like of shape (n_points, 2)
        ``(rate, distortion)`` pairs, e.g. bits per element and normalised mean squared error
        (squared error divided by the signal's energy). ``n_points`` may be 0.
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

    Notes
    -----
    Andrew's monotone chain on the points sorted by rate (ties: lowest distortion first),
    keeping only turns to the left, then cut at the lowest distortion: beyond it, extra bits
    can be left unused, so the hull does not rise again.
    """
    points = _as_points(points)
    if origin is not None:
        points = np.vstack([np.asarray(origin, dtype=np.float64).reshape(1, 2), points])
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

    Examples
    --------
    >>> hull_at([(2.0, 0.25)], [0.5, 1.0, 2.0, 3.0])
    array([0.8125, 0.625 , 0.25  , 0.25  ])
    """
    vertices = lower_hull(points, origin)
    rates_arr = np.asarray(rates, dtype=np.float64)
    out = np.full(rates_arr.shape, np.nan)
    if len(vertices):
        below = rates_arr >= vertices[0, 0]
        out[below] = np.interp(rates_arr[below], vertices[:, 0], vertices[:, 1])
    return float(out) if out.ndim == 0 else out
