"""
The classical methods as settings of one estimator
==================================================

Truncated SVD, vector quantization (k-means), sparse coding, sparse PCA, quantized SVD and
sparse quantized codes are all settings of :class:`qsdlearn.QuantizedSparseDecomposition`. Here
each compresses the same matrix — scikit-learn's digits images cut into rows of 8 pixels — and
is placed at its exact bits per element (codebook, scales and indices counted) and its SQNR.
"""

import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning

from qsdlearn import QuantizedSparseDecomposition
from qsdlearn.metrics import sqnr

X = (load_digits().data / 16.0).reshape(-1, 8).astype(np.float32)  # 14,376 rows of 8 pixels

settings = {
    "truncated SVD": dict(n_components=3),
    "VQ (k-means)": dict(n_components=64, n_nonzero=1, code_bits=0),
    "sparse coding": dict(n_components=32, n_nonzero=2),
    "sparse PCA": dict(n_components=3, component_nonzero=4),
    "quantized SVD": dict(n_components=4, code_bits=3, codebook_bits=6),
    "QSD": dict(n_components=64, n_nonzero=2, code_bits=2, codebook_bits=8),
}
rates, quality = [], []
for name, params in settings.items():
    est = QuantizedSparseDecomposition(random_state=0, max_iter=30, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        X_hat = est.inverse_transform(est.fit_transform(X))
    rates.append(est.bits_per_element_)
    quality.append(sqnr(X, X_hat))
    print(f"{name:14s} {est.bits_per_element_:6.3f} bits/element  {quality[-1]:6.2f} dB")

fig, ax = plt.subplots(figsize=(6, 4))
ax.scatter(rates, quality)
for name, rate, db in zip(settings, rates, quality):
    ax.annotate(name, (rate, db), textcoords="offset points", xytext=(5, 3))
ax.set_xscale("log")
ax.set_xlim(0.5, 30)
ax.set_xlabel("bits per element (everything counted, log scale)")
ax.set_ylabel("SQNR (dB)")
ax.set_title("One estimator, six methods")
fig.tight_layout()
plt.show()
