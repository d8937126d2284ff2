"""Speed and memory of the fits, side by side with scikit-learn's and faiss's k-means.

Run alone with ``python -m benchmarks.speed [--quick]``; ``benchmarks.rate_distortion`` runs it
as its last section. ``python -m benchmarks.speed --kmeans-only [--rows N] [--repeat R]
[--single-thread]`` runs only the k-means comparison (R times, to see the spread on a shared
machine; on one thread each, timed in CPU seconds, with ``--single-thread``). Every timing is
wall time on warm kernels (numba compiles on a tiny fit first).
"""

import argparse
import contextlib
import json
import subprocess
import sys
import time
import warnings

import numpy as np

from qsdlearn import QuantizedSparseDecomposition

#: The QSD setting timed against the VQ setting and over growing row counts.
QSD_SETTING = dict(n_components=256, n_nonzero=2, code_bits=2, codebook_bits=8)
VQ_SETTING = dict(n_components=256, n_nonzero=1, code_bits=0, codebook_bits=None)


def gaussian_rows(n_rows, width=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n_rows, width)).astype(np.float32)


def warm_up():
    """Compile the float32 kernels on tiny fits so that no timing below includes numba."""
    X = gaussian_rows(600, seed=1)
    for setting in (QSD_SETTING, VQ_SETTING):
        est, _ = _fit(X, dict(setting, n_components=16), max_iter=2)
        est.encode(X).decode()


def _fit(X, setting, max_iter, codebook_init=None, seed=0):
    est = QuantizedSparseDecomposition(**setting, max_iter=max_iter, tol=0.0,
                                       codebook_init=codebook_init, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: the iteration count is fixed
        start = time.perf_counter()
        est.fit(X)
        return est, time.perf_counter() - start


def _nearest_mse(X, centroids):
    """Mean squared distance of the rows to their nearest centroid (the same measure for all)."""
    from sklearn.metrics import pairwise_distances_argmin_min

    _, dist = pairwise_distances_argmin_min(X, centroids.astype(X.dtype))
    return float(np.mean(dist.astype(np.float64) ** 2) / X.shape[1])


def kmeans_comparison(n_rows, n_clusters=256, n_iter=20, seed=0, single_thread=False):
    """The VQ setting, ``sklearn.cluster.KMeans`` (Lloyd) and ``faiss.Kmeans`` on the same rows,
    from the same initial centroids, for ``n_iter`` iterations each (no early stop: tol=0).

    With ``single_thread`` every method runs on one thread and ``seconds`` is the process's
    CPU time, which other processes on a shared machine disturb much less than wall time.

    Returns
    -------
    list of dict
        ``method, seconds, n_iter, seconds_per_iter, mse`` (per element, after the fit).
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    clock = time.process_time if single_thread else time.perf_counter
    limits = threadpool_limits(1) if single_thread else contextlib.nullcontext()
    X = gaussian_rows(n_rows, seed=seed)
    init = X[np.random.default_rng(seed).choice(n_rows, n_clusters, replace=False)]
    rows = []

    setting = dict(VQ_SETTING, n_components=n_clusters)
    if single_thread:
        setting["n_threads"] = 1
    start = clock()
    est, _ = _fit(X, setting, n_iter, init, seed)
    rows.append(dict(method="qsdlearn VQ setting", seconds=clock() - start, n_iter=est.n_iter_,
                     mse=_nearest_mse(X, est.components_)))

    km = KMeans(n_clusters, init=init, n_init=1, max_iter=n_iter, tol=0.0, algorithm="lloyd")
    with limits:
        start = clock()
        km.fit(X)
        rows.append(dict(method="sklearn KMeans (lloyd)", seconds=clock() - start,
                         n_iter=int(km.n_iter_), mse=_nearest_mse(X, km.cluster_centers_)))

    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        threads = faiss.omp_get_max_threads()
        if single_thread:
            faiss.omp_set_num_threads(1)
        # max_points_per_centroid high enough that faiss trains on every row, as the others do.
        fk = faiss.Kmeans(X.shape[1], n_clusters, niter=n_iter, seed=seed,
                          max_points_per_centroid=n_rows // n_clusters + 1)
        start = clock()
        fk.train(X, init_centroids=init)
        rows.append(dict(method="faiss Kmeans", seconds=clock() - start,
                         n_iter=n_iter, mse=_nearest_mse(X, fk.centroids)))
        faiss.omp_set_num_threads(threads)
    for row in rows:
        row["seconds_per_iter"] = row["seconds"] / max(row["n_iter"], 1)
    return rows


def per_iteration(n_rows, extra_iter=3, seed=0, repeat=3):
    """Seconds per iteration of the QSD setting and of the VQ setting on the same rows.

    Each setting is fitted from the same initial codebook with 1 and with ``1 + extra_iter``
    iterations; the difference over ``extra_iter`` is the cost of one iteration (code step and
    codebook step), free of the set-up and the final encoding. Each of the four fits is timed
    ``repeat`` times, the settings in turn (QSD, VQ, QSD, ...), and the least time of each is
    used (as ``timeit`` advises: the others measure the machine's other work as well); all
    times are returned (``seconds_short``, ``seconds_long``).
    """
    X = gaussian_rows(n_rows, seed=seed)
    init = X[np.random.default_rng(seed).choice(n_rows, 256, replace=False)]
    settings = (("QSD " + _describe(QSD_SETTING), QSD_SETTING),
                ("VQ " + _describe(VQ_SETTING), VQ_SETTING))
    times = {name: ([], []) for name, _ in settings}
    n_iter = {}
    for _ in range(repeat):
        for name, setting in settings:
            short, t_short = _fit(X, setting, 1, init, seed)
            long, t_long = _fit(X, setting, 1 + extra_iter, init, seed)
            times[name][0].append(t_short)
            times[name][1].append(t_long)
            n_iter[name] = long.n_iter_ - short.n_iter_
    return [dict(setting=name, n_rows=n_rows,
                 seconds_per_iter=(min(times[name][1]) - min(times[name][0])) / n_iter[name],
                 seconds_one_iteration_fit=min(times[name][0]),
                 seconds_short=times[name][0], seconds_long=times[name][1])
            for name, _ in settings]


def _describe(setting):
    return ", ".join(f"{key}={value}" for key, value in setting.items())


def fit_time_scaling(row_counts, max_iter=10, seed=0):
    """Fit time of the QSD setting (k-means++ start, ``max_iter`` iterations) against rows.

    Returns
    -------
    rows : list of dict
        ``n_rows, seconds``.
    exponent : float
        Slope of log(seconds) against log(rows), least squares.
    """
    rows = []
    for n in row_counts:
        _, seconds = _fit(gaussian_rows(n, seed=seed), QSD_SETTING, max_iter, None, seed)
        rows.append(dict(n_rows=int(n), seconds=seconds))
    exponent = float(np.polyfit(np.log([r["n_rows"] for r in rows]),
                                np.log([r["seconds"] for r in rows]), 1)[0])
    return rows, exponent


def peak_memory(size=4096, max_iter=2):
    """Peak resident memory of a fit of a ``size x size`` float32 matrix (rows of 8), measured
    in a fresh process so that nothing else this run allocated counts."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--peak-memory-child", str(size),
         "--max-iter", str(max_iter)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _resident_mib(field):
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


def _peak_memory_child(size, max_iter):
    warm_up()
    X = gaussian_rows(size * size // 8)
    before = _resident_mib("VmRSS")
    try:
        # Reset the high-water mark so that the compilation's peak above does not count.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    est, seconds = _fit(X, QSD_SETTING, max_iter)
    peak = _resident_mib("VmHWM")
    print(json.dumps(dict(
        shape=[size, size], rows=list(X.shape), setting=_describe(QSD_SETTING),
        max_iter=max_iter, input_mib=X.nbytes / 2**20, rss_before_fit_mib=before,
        peak_rss_mib=peak, fit_seconds=seconds,
    )))


def run_all(quick=False, log=print):
    """Every speed measurement; returns a JSON-ready dict."""
    warm_up()
    n_big = 50_000 if quick else 1_000_000
    log(f"speed: k-means comparison on {n_big} x 8 rows")
    results = dict(kmeans=kmeans_comparison(n_big), kmeans_rows=n_big)
    log("speed: QSD vs VQ per iteration")
    results["per_iteration"] = per_iteration(n_big, extra_iter=2)
    counts = [5_000, 15_000, 50_000] if quick else [10_000, 31_623, 100_000, 316_228, 1_000_000]
    log(f"speed: fit time against rows {counts}")
    results["scaling"], results["scaling_exponent"] = fit_time_scaling(counts, max_iter=5)
    results["scaling_max_iter"] = 5
    size = 1024 if quick else 4096
    log(f"speed: peak memory of a {size} x {size} fit")
    results["peak_memory"] = peak_memory(size)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--kmeans-only", action="store_true",
                        help="only the k-means comparison (VQ setting, scikit-learn, faiss)")
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="rows of the k-means comparison with --kmeans-only")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of the k-means comparison with --kmeans-only")
    parser.add_argument("--single-thread", action="store_true",
                        help="k-means comparison on one thread each, in CPU seconds")
    parser.add_argument("--peak-memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-iter", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_memory_child:
        _peak_memory_child(args.peak_memory_child, args.max_iter)
        return
    if args.kmeans_only:
        warm_up()
        runs = [kmeans_comparison(args.rows, single_thread=args.single_thread)
                for _ in range(args.repeat)]
        print(json.dumps(dict(kmeans_rows=args.rows, single_thread=args.single_thread,
                              kmeans_runs=runs), indent=2))
        return
    print(json.dumps(run_all(args.quick), indent=2))


if __name__ == "__main__":
    main()
