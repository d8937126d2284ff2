"""k-means++ seeding: a compiled kernel and the random draws that drive it.

Greedy k-means++ (Arthur, D. and Vassilvitskii, S., "k-means++: the advantages of careful
seeding", SODA 2007; the greedy variant with ``2 + floor(ln k)`` local trials per seed is
scikit-learn's ``sklearn.cluster.kmeans_plusplus``). The first seed is a row drawn with
probability proportional to its weight; each further seed is the best of ``n_trials`` rows,
each drawn with probability proportional to its weight times its squared distance to the
nearest seed so far, the best being the one that leaves the smallest weighted sum of those
distances (the *potential*).

The draws are scikit-learn's, in the same order from the same ``RandomState``: its
``choice`` for the first seed, then ``n_trials`` uniform numbers per seed, so that both pick
the same rows except where two distances tie to rounding (scikit-learn computes them as
``|x|^2 - 2 x.c + |c|^2`` through a matrix product, this kernel as sums of squared
differences). The kernel does in one compiled loop what scikit-learn does in one Python
step per seed, with a matrix product each: on one thread, 2,896 rows of 8 and 362 seeds take
21 ms against scikit-learn's 90 ms, 1,024 rows of 8 and 128 seeds 3.0 against 24 ms (the
planner seeds a few dozen codebooks of this size per tensor).
"""

import numpy as np

from ._jit import njit


#: Rows per block of :func:`_greedy_seeds`: the trials' distances to a block stay in the cache
#: (a dozen trials, 96 kB in float64) between their computation and their sums, instead of a
#: pass through memory per trial.
_BLOCK_ROWS = 1024

#: The smallest positive float64 (subnormal): the most a sum of products can be off per term
#: when the products underflow, where rounding is absolute rather than relative.
_SMALLEST_SUBNORMAL = float(np.nextafter(0.0, 1.0))


@njit()
def _block_distances(XT, centre, start, size, closest, out):
    """``out[i] = min(closest[start + i], |x - centre|^2)`` for the ``size`` rows ``x`` of
    ``XT`` (d, n) from ``start`` on: the squared differences summed over the coordinates in
    turn (from the first, as a sum from zero whose first addition is exact), one pass per
    coordinate over the rows, which vectorises, the minimum taken in the last. (Indices are
    unsigned: numba then adds no wraparound of negative indices, which would turn the loads and
    stores into gathers and scatters.)"""
    last = XT.shape[0] - 1
    c, x = centre[0], XT[0]
    if last == 0:
        for i in range(size):
            diff = x[np.uint64(start + i)] - c
            out[np.uint64(i)] = min(closest[np.uint64(start + i)], diff * diff)
        return
    for i in range(size):
        diff = x[np.uint64(start + i)] - c
        out[np.uint64(i)] = diff * diff
    for t in range(1, last):
        c, x = centre[t], XT[t]
        for i in range(size):
            diff = x[np.uint64(start + i)] - c
            out[np.uint64(i)] += diff * diff
    c, x = centre[last], XT[last]
    for i in range(size):
        diff = x[np.uint64(start + i)] - c
        j = np.uint64(i)
        out[j] = min(closest[np.uint64(start + i)], out[j] + diff * diff)


@njit(fastmath={"reassoc"})
def _weighted_sum(weights, start, size, values):
    """``sum_i weights[start + i] * values[i]`` over the first ``size`` values, in any order
    (reassociated so that it vectorises; the products rounded as in the sum in order, no fused
    multiply-add): within ``size * eps`` of the sum in order, relative to the sum of the terms
    when they are nonnegative, plus ``size`` subnormals where they underflow."""
    total = 0.0
    for i in range(size):
        total += weights[np.uint64(start + i)] * values[np.uint64(i)]
    return total


@njit()
def _join(XT, centre, closest, out):
    """Lower ``closest`` (n) to the rows' squared distances to ``centre`` where they are nearer
    to it (:func:`_block_distances`, block by block through ``out``, of :data:`_BLOCK_ROWS`)."""
    n = XT.shape[1]
    for start in range(0, n, _BLOCK_ROWS):
        size = min(_BLOCK_ROWS, n - start)
        _block_distances(XT, centre, start, size, closest, out)
        for i in range(size):
            closest[start + i] = out[i]


@njit()
def _sum_in_order(XT, weights, closest, centre):
    """The potential if ``centre`` joined the seeds, its terms summed in the order of the rows
    (the sum of a full pass, to which :func:`_greedy_seeds` compares its trials)."""
    n = XT.shape[1]
    out = np.empty(_BLOCK_ROWS)
    total = 0.0
    for start in range(0, n, _BLOCK_ROWS):
        size = min(_BLOCK_ROWS, n - start)
        _block_distances(XT, centre, start, size, closest, out)
        for i in range(size):
            total += weights[start + i] * out[i]
    return total


@njit()
def _best_trial(XT, weights, closest, centres, totals, potential):
    """The trial of least potential, the earlier of two equal ones, as the sums in the order of
    the rows decide (:func:`_sum_in_order`). ``totals`` are summed in another order, each
    within ``n eps`` of the potential from its sum in order (the terms are nonnegative and at
    most the rows' current ones, which sum to ``potential``), plus ``n`` subnormals where the
    products underflow; so only the trials within twice that of the least can be the best,
    and those are summed again in order (usually the least alone, which is then the best).
    The least when no sum in order is finite."""
    n_trials = totals.shape[0]
    least = 0
    for a in range(1, n_trials):
        if totals[a] < totals[least]:
            least = a
    n = XT.shape[1]
    rounding = np.finfo(np.float64).eps * potential + _SMALLEST_SUBNORMAL
    within = totals[least] + 4.0 * n * rounding
    contenders = 0
    for a in range(n_trials):
        if totals[a] <= within:
            contenders += 1
    if contenders == 1:
        return least
    best, best_total = least, np.inf
    for a in range(n_trials):
        if totals[a] <= within:
            total = _sum_in_order(XT, weights, closest, centres[a])
            if total < best_total:
                best, best_total = a, total
    return best


@njit()
def _greedy_seeds(XT, weights, first, uniforms, indices):
    """Rows of the greedy k-means++ seeds of the rows of ``XT`` (float64, (d, n), transposed)
    into ``indices`` (k): the first is ``first``; seed ``c >= 1`` is the best of the rows its
    ``n_trials`` draws ``uniforms[c - 1]`` (in [0, 1)) pick from the cumulative weighted
    distances (the first row whose running sum reaches the draw times the potential, the
    last row at most). Ties go to the earlier trial.

    The trials are measured together, block by block of :data:`_BLOCK_ROWS` rows: their
    distances to a block, then their potentials' sums, vectorised (:func:`_weighted_sum`),
    with the sums in the order of the rows where two trials come within rounding of each other
    (:func:`_best_trial`): the choices and the running sums are those of one pass per trial
    summed in order, in 40 % of its time (32,768 rows of 4, 2,048 seeds: 0.64 s against
    1.58 s on one thread). The chosen trial's distances are computed again for the rows'
    nearest seeds."""
    d, n = XT.shape
    n_trials = uniforms.shape[1]
    closest = np.full(n, np.inf)  # squared distance of each row to its nearest seed
    block = np.empty((n_trials, _BLOCK_ROWS))  # the trials' distances to a block of rows
    totals = np.empty(n_trials)
    cumulative = np.empty(n)
    candidates = np.empty(n_trials, dtype=np.int64)
    centres = np.empty((n_trials, d))
    indices[0] = first
    for t in range(d):
        centres[0, t] = XT[t, first]
    _join(XT, centres[0], closest, block[0])
    for c in range(1, indices.shape[0]):
        running = 0.0
        for i in range(n):
            running += weights[i] * closest[i]
            cumulative[i] = running
        potential = running
        for a in range(n_trials):
            candidates[a] = min(np.searchsorted(cumulative, uniforms[c - 1, a] * potential),
                                n - 1)
            for t in range(d):
                centres[a, t] = XT[t, candidates[a]]
            totals[a] = 0.0
        for start in range(0, n, _BLOCK_ROWS):
            size = min(_BLOCK_ROWS, n - start)
            for a in range(n_trials):
                _block_distances(XT, centres[a], start, size, closest, block[a])
                totals[a] += _weighted_sum(weights, start, size, block[a])
        best = _best_trial(XT, weights, closest, centres, totals, potential)
        _join(XT, centres[best], closest, block[0])
        indices[c] = candidates[best]


def kmeans_plusplus_indices(X, k, rng, weights=None):
    """Rows of ``X`` chosen as ``k`` greedy k-means++ seeds.

    Parameters
    ----------
    X : ndarray of shape (n, d)
        The rows (converted to float64).
    k : int
        Number of seeds, ``1 <= k <= n``.
    rng : numpy.random.RandomState
        The source of the draws, advanced as ``sklearn.cluster.kmeans_plusplus`` advances it.
    weights : ndarray of shape (n,), optional
        Nonnegative row weights, some positive (default: all ones).

    Returns
    -------
    ndarray of shape (k,), int64
        Row indices, in the order they were chosen.

    Raises
    ------
    ValueError
        If ``k`` is not in ``[1, n]``.

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn._seeding import kmeans_plusplus_indices
    >>> X = np.array([[0.0], [0.1], [10.0], [10.1]])
    >>> seeds = kmeans_plusplus_indices(X, 2, np.random.RandomState(0))
    >>> sorted(int(i) // 2 for i in seeds)  # one seed in each of the two clusters
    [0, 1]
    """
    n = X.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot draw {k} seeds from {n} rows")
    w = np.ones(n) if weights is None else np.ascontiguousarray(weights, dtype=np.float64)
    n_trials = 2 + int(np.log(k))
    first = rng.choice(n, p=w / w.sum())
    uniforms = rng.uniform(size=(k - 1, n_trials))
    indices = np.empty(k, dtype=np.int64)
    _greedy_seeds(np.ascontiguousarray(np.asarray(X, dtype=np.float64).T), w, int(first),
                  uniforms, indices)
    return indices
