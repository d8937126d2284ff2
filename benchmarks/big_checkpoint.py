"""Compress synthetic bfloat16 checkpoints of growing size: memory flat, time linear.

Usage::

    python -m benchmarks.big_checkpoint [--millions 100 200 400] [--shards 4] [--jobs 2]
                                        [--bits 2] [--folder /tmp/qsd-big]

For each size, a checkpoint of ``4096 x 4096`` bfloat16 matrices (Gaussian, a different seed
per layer) plus a bias per layer is written as ``--shards`` safetensors shards with an index
(one tensor in memory at a time), then compressed with
``compress_weights(index, bits_per_weight, n_jobs, max_fit_rows=65536)`` in a fresh process,
which reports its wall time, weights per second, and the peak resident memory of itself and of
its largest worker (``getrusage``: ``RUSAGE_SELF`` and ``RUSAGE_CHILDREN`` after the workers
are shut down). The compressed file is written next to the checkpoint; both are removed
afterwards unless ``--keep-files``.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

SIDE = 4096


def write_synthetic(folder, n_weights, n_shards):
    """A sharded bfloat16 checkpoint of about ``n_weights`` weights; returns its index path."""
    import ml_dtypes

    from qsdlearn._checkpoint import write_checkpoint

    n_layers = max(1, round(n_weights / (SIDE * SIDE)))
    names = {}
    for i in range(n_layers):
        names[f"layers.{i}.weight"] = SIDE * SIDE * 2
        names[f"layers.{i}.bias"] = SIDE * 2

    def read(name):
        i = int(name.split(".")[1])
        rng = np.random.default_rng(i)
        if name.endswith("bias"):
            return (0.01 * rng.standard_normal(SIDE)).astype(ml_dtypes.bfloat16)
        return (rng.standard_normal((SIDE, SIDE), dtype=np.float32) / 64).astype(
            ml_dtypes.bfloat16)

    shard_bytes = -(-sum(names.values()) // n_shards)
    write_checkpoint(folder, names, read, shard_bytes)
    return os.path.join(folder, "model.safetensors.index.json"), n_layers


def _compress_child(index, output, bits, jobs):
    """Runs in a fresh process: compress, save, and print one JSON line of measurements."""
    import resource

    from joblib.externals.loky import get_reusable_executor

    from qsdlearn import compress_weights

    start = time.perf_counter()
    model = compress_weights(index, bits_per_weight=bits, n_jobs=jobs, random_state=0,
                             max_fit_rows=65536, verbose=False)
    model.save(output)
    seconds = time.perf_counter() - start
    get_reusable_executor().shutdown(wait=True)
    print(json.dumps(dict(
        seconds=seconds, n_weights=model.n_weights, bits_per_weight=model.bits_per_weight,
        peak_main_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_worker_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--millions", type=float, nargs="+", default=[100, 200, 400])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--bits", type=float, default=2.0)
    parser.add_argument("--folder", default="/tmp/qsd-big")
    parser.add_argument("--keep-files", action="store_true")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        index, output, bits, jobs = args.child
        _compress_child(index, output, float(bits), int(jobs))
        return
    rows = []
    for millions in args.millions:
        folder = os.path.join(args.folder, f"{millions:g}M")
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        index, n_layers = write_synthetic(folder, millions * 1e6, args.shards)
        written = time.perf_counter() - start
        output = os.path.join(folder, "model.qsd")
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.big_checkpoint", "--child", index, output,
             str(args.bits), str(args.jobs)], capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row.update(layers=n_layers, write_seconds=written)
        rows.append(row)
        print(f"{row['n_weights'] / 1e6:.0f} M weights ({n_layers} layers, {args.shards} "
              f"shards, written in {written:.0f} s): {row['seconds']:.0f} s, "
              f"{row['n_weights'] / row['seconds']:,.0f} weights/s, "
              f"{row['bits_per_weight']:.3f} b/w, peak RSS main {row['peak_main_mib']:.0f} MiB, "
              f"largest worker {row['peak_worker_mib']:.0f} MiB", flush=True)
        if not args.keep_files:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
