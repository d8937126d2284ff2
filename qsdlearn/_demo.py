"""``qsdlearn demo``: the classical methods and QSD side by side on a real weight matrix.

The matrix is built on the spot, without any download: a two-hidden-layer perceptron is trained
on scikit-learn's bundled digits data and its 256 x 256 hidden-to-hidden weight matrix is
compressed by each method at about two bits per weight. The table reports the exact bits per
weight (codebooks, scales and indices included), the SQNR of the weights, the fit time and the
test accuracy of the network with the reconstructed weights put back. The fit time leaves out
numba's compilation of the kernels (on a first run, tens of seconds): each method is fitted
once for one iteration before its timed fit.
"""

import time
import warnings
from dataclasses import dataclass, replace

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from ._estimator import QuantizedSparseDecomposition
from .metrics import sqnr
from ._layers import from_rows, to_rows


#: Iterations per fit: the demo compares methods at equal effort and stays under a minute.
DEMO_MAX_ITER = 50


@dataclass(frozen=True)
class DemoMethod:
    """One row of the demo table."""

    name: str
    setting: str
    vector_size: int  # 0: the whole (out, in) matrix is factorized, rows are output neurons
    params: dict


DEMO_METHODS = [
    DemoMethod("truncated SVD", "rank 8, float32 factors", 0, dict(n_components=8)),
    DemoMethod(
        "quantized SVD",
        "rank 64, 4-bit codes, 4-bit codebook",
        0,
        dict(n_components=64, code_bits=4, codebook_bits=4),
    ),
    DemoMethod(
        "sparse PCA",
        "8 components, 128 nonzeros each, float32",
        0,
        dict(n_components=8, component_nonzero=128),
    ),
    DemoMethod(
        "VQ (k-means)",
        "d=4, 128 codewords, 8-bit codebook",
        4,
        dict(n_components=128, n_nonzero=1, code_bits=0, codebook_bits=8),
    ),
    DemoMethod(
        "QSD",
        "d=8, k=64, 2 of 64, 2-bit codes, 8-bit codebook",
        8,
        dict(n_components=64, n_nonzero=2, code_bits=2, codebook_bits=8),
    ),
    DemoMethod(
        "QSD",
        "d=8, k=256, 1 of 256, 3-bit gain, 8-bit codebook",
        8,
        dict(n_components=256, n_nonzero=1, code_bits=3, codebook_bits=8),
    ),
]


def train_digits_mlp(random_state=0):
    """A 64-256-256-10 perceptron trained on the bundled digits data.

    Returns
    -------
    model : MLPClassifier
    X_test, y_test : ndarray
        Held-out 30 % of the digits.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X / 16.0, y, test_size=0.3, random_state=random_state, stratify=y
    )
    model = MLPClassifier((256, 256), max_iter=60, random_state=random_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X_train, y_train)
    return model, X_test, y_test


def _compress(weight, method, random_state):
    """Fit one method on an (out, in) weight; return the reconstruction and the estimator."""
    X = weight if method.vector_size == 0 else to_rows(weight, method.vector_size)
    params = {"max_iter": DEMO_MAX_ITER, **method.params}
    est = QuantizedSparseDecomposition(random_state=random_state, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is the budget here
        codes = est.fit_transform(X)
    return from_rows(est.inverse_transform(codes), weight.shape), est


def run_demo(random_state=0, methods=DEMO_METHODS):
    """Compress the demo weight matrix with every method; return the table rows.

    Returns
    -------
    rows : list of dict
        Keys ``method, setting, bits_per_weight, sqnr_db, fit_seconds, accuracy``; the first
        row is the uncompressed float32 network.
    """
    model, X_test, y_test = train_digits_mlp(random_state)
    original = model.coefs_[1]
    # scikit-learn stores (in, out); export it as frameworks do, (out, in), in float32.
    weight = np.ascontiguousarray(original.T, dtype=np.float32)
    rows = [
        dict(
            method="original",
            setting="float32",
            bits_per_weight=32.0,
            sqnr_db=float("inf"),
            fit_seconds=0.0,
            accuracy=float(model.score(X_test, y_test)),
        )
    ]
    for method in methods:
        # compiles the kernels the fit runs, so that the time below is the fit's
        _compress(weight, replace(method, params={**method.params, "max_iter": 1}), random_state)
        start = time.perf_counter()
        reconstruction, est = _compress(weight, method, random_state)
        seconds = time.perf_counter() - start
        model.coefs_[1] = reconstruction.T.astype(original.dtype)
        rows.append(
            dict(
                method=method.name,
                setting=method.setting,
                bits_per_weight=float(est.bits_per_element_),
                sqnr_db=sqnr(weight, reconstruction),
                fit_seconds=seconds,
                accuracy=float(model.score(X_test, y_test)),
            )
        )
        model.coefs_[1] = original
    return rows


def format_table(rows):
    """The demo rows as a fixed-width text table."""
    header = f"{'method':<15} {'setting':<50} {'bits/weight':>11} {'SQNR dB':>8} " \
             f"{'fit s':>6} {'accuracy':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['method']:<15} {row['setting']:<50} {row['bits_per_weight']:>11.3f} "
            f"{row['sqnr_db']:>8.2f} {row['fit_seconds']:>6.2f} {row['accuracy']:>8.3f}"
        )
    return "\n".join(lines)
