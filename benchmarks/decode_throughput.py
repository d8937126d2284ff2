"""Decode throughput of the codec: a 4096 x 4096 float32 matrix at about 2 bits per element.

Run from the repository root::

    python -m benchmarks.decode_throughput [--size 4096] [--repeat 5]

The matrix is i.i.d. Gaussian, reshaped to 8-element rows and compressed with
``n_components=64, n_nonzero=2, code_bits=2, codebook_bits=8`` (about 1.9 bits per element).
The codebook is fitted on a sample of rows (fitting is not what is measured), the whole matrix
is encoded, and ``CompressedMatrix.decode`` is timed (best of ``--repeat`` runs, after a warm-up
that compiles the kernels). Reported: weights per second, and the same for
``inverse_transform(transform(X))``-free decoding from a saved file (load + decode).
"""

import argparse
import os
import tempfile
import time
import warnings

import numba
import numpy as np

import qsdlearn
from qsdlearn import QuantizedSparseDecomposition


def best_time(function, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    W = rng.standard_normal((args.size, args.size), dtype=np.float32)
    X = W.reshape(-1, 8)
    est = QuantizedSparseDecomposition(
        n_components=64, n_nonzero=2, code_bits=2, codebook_bits=8, max_iter=20, random_state=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X[rng.choice(X.shape[0], 50_000, replace=False)])
    start = time.perf_counter()
    compressed = est.encode(X)
    encode_seconds = time.perf_counter() - start
    compressed.decode()  # warm-up: compile

    decode_seconds = best_time(compressed.decode, args.repeat)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "w.qsd")
        qsdlearn.save(compressed, path)
        file_bytes = os.path.getsize(path)
        load_seconds = best_time(lambda: qsdlearn.load(path).decode(), args.repeat)

    n = W.size
    print(f"matrix {args.size} x {args.size} float32, rows of 8, {numba.get_num_threads()} threads")
    print(f"bits per element        {compressed.bits_per_element:.4f}")
    print(f"file size               {file_bytes} bytes ({32 * n / (8 * file_bytes):.1f}x smaller)")
    print(f"encode (transform+pack) {encode_seconds:.2f} s")
    print(f"decode                  {decode_seconds * 1e3:.1f} ms  "
          f"{n / decode_seconds / 1e6:.0f} M weights/s")
    print(f"load + decode           {load_seconds * 1e3:.1f} ms  "
          f"{n / load_seconds / 1e6:.0f} M weights/s")


if __name__ == "__main__":
    main()
