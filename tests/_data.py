"""Test data and small helpers shared by the test modules."""

import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
from hypothesis import strategies as st
from sklearn.datasets import load_digits, make_blobs
from sklearn.exceptions import ConvergenceWarning

#: The main settings of the estimator, by name (the special cases and QSD proper).
SETTINGS = {
    "svd": dict(n_components=3),
    "vq": dict(n_components=6, n_nonzero=1, code_bits=0),
    "vq-quantized-codebook": dict(n_components=6, n_nonzero=1, code_bits=0, codebook_bits=4),
    "sparse-float": dict(n_components=10, n_nonzero=2),
    "sparse-components": dict(n_components=3, component_nonzero=3),
    "quantized-svd": dict(n_components=4, code_bits=3, codebook_bits=6),
    "qsd": dict(n_components=16, n_nonzero=2, code_bits=2, codebook_bits=5),
    "qsd-sparse-codebook": dict(
        n_components=8, n_nonzero=2, code_bits=1, codebook_bits=4, component_nonzero=4
    ),
}


def gaussian(n=300, d=8, seed=0):
    """An ``(n, d)`` standard normal matrix."""
    return np.random.default_rng(seed).normal(size=(n, d))


def low_rank_plus_noise(n=200, d=12, rank=3, seed=0):
    """A rank-``rank`` signal plus unit noise."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d)) * 3 + rng.normal(size=(n, d))


def pooled_digits(n):
    """scikit-learn's bundled digits, 2x2-average-pooled to 4x4 images (16 features), so the
    reference implementations stay fast."""
    images = load_digits().images[:n].astype(np.float64)
    return images.reshape(n, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(n, 16)


#: Small real and synthetic data sets the special cases are compared on.
DATASETS = {
    "blobs": lambda: make_blobs(400, n_features=5, centers=7, random_state=0)[0],
    "gaussian": lambda: gaussian(500, 4, seed=1),
    "digits": lambda: pooled_digits(500),
}


def sq_error(X, X_hat):
    """``||X - X_hat||_F**2`` in float64."""
    X = np.asarray(X, dtype=np.float64)
    return float(np.sum((X - np.asarray(X_hat, dtype=np.float64)) ** 2))


def fit_quietly(est, X):
    """``est.fit(X)`` without its ConvergenceWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X)


@st.composite
def factorization_problems(draw, max_rows=30, max_features=6, max_components=8):
    """Random estimator problems: ``(n, d, params, dtype, seed)`` over every kind of codes
    (dense, sparse, one-hot), code and codebook precisions and sparse codebooks."""
    n = draw(st.integers(1, max_rows))
    d = draw(st.integers(1, max_features))
    k = draw(st.integers(1, max_components))
    params = dict(n_components=k)
    kind = draw(st.sampled_from(["dense", "sparse", "one-hot"]))
    if kind != "dense":
        params["n_nonzero"] = 1 if kind == "one-hot" else draw(st.integers(1, k))
    params["code_bits"] = 0 if kind == "one-hot" else draw(st.sampled_from([None, 1, 2, 3, 4]))
    params["codebook_bits"] = draw(st.sampled_from([None, 1, 3, 4, 8]))
    params["component_nonzero"] = draw(st.one_of(st.none(), st.integers(1, d)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**16))
    return n, d, params, dtype, seed


def run_python(*args):
    """``python *args`` in a fresh interpreter that imports this copy of qsdlearn (not an
    installed one): the completed process, its output as text."""
    root = str(pathlib.Path(__file__).resolve().parents[1])
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": path})
