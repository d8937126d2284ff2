"""
Rate–distortion against scikit-learn baselines
==============================================

A matrix of 8-element rows is compressed by vector quantization and by sparse, quantized codes
at several codebook sizes, and by scikit-learn's ``KMeans`` and ``TruncatedSVD`` with every
bit counted by the same rules (float32 values, ``ceil(log2 k)``-bit indices, 16-bit SVD
factors). Each method's *operational hull* — what splitting the rows between two of its
settings reaches at any rate — is drawn through its points, up to the rate of its last
point.
"""

import math
import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.decomposition import TruncatedSVD
from sklearn.exceptions import ConvergenceWarning

from qsdlearn import QuantizedSparseDecomposition
from qsdlearn.metrics import hull_at, normalized_mse, rate_distortion_curve

X = (load_digits().data / 16.0).reshape(-1, 8).astype(np.float32)
n, d = X.shape

qsd_settings = [dict(n_components=k, n_nonzero=1, code_bits=0, codebook_bits=8)
                for k in (4, 16, 64, 256)]
qsd_settings += [dict(n_components=k, n_nonzero=2, code_bits=2, codebook_bits=8)
                 for k in (16, 64, 256)]
with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    curve = rate_distortion_curve(X, [
        QuantizedSparseDecomposition(random_state=0, max_iter=20, **p) for p in qsd_settings])
points = {"qsdlearn (VQ and QSD settings)":
          [(r["bits_per_element"], r["normalized_mse"]) for r in curve]}

points["sklearn KMeans"] = []
for k in (4, 16, 64, 256):
    km = KMeans(k, n_init=1, random_state=0).fit(X)
    bits = n * math.ceil(math.log2(k)) + k * d * 32
    X_hat = km.cluster_centers_[km.labels_]
    points["sklearn KMeans"].append((bits / X.size, normalized_mse(X, X_hat)))

points["sklearn TruncatedSVD, float16"] = []
for r in (1, 2, 3, 4):
    svd = TruncatedSVD(r, random_state=0).fit(X)
    codes = svd.transform(X).astype(np.float16)
    X_hat = codes.astype(np.float32) @ svd.components_.astype(np.float16).astype(np.float32)
    points["sklearn TruncatedSVD, float16"].append(((n * r + r * d) * 16 / X.size,
                                                   normalized_mse(X, X_hat)))

rates = np.linspace(0.25, 4, 60)
fig, ax = plt.subplots(figsize=(6, 4))
for label, pts in points.items():
    pts = np.array(pts)
    reached = rates[rates <= pts[:, 0].max()]  # beyond its last point a hull only stays flat
    line, = ax.plot(reached, -10 * np.log10(hull_at(pts, reached)), label=label)
    ax.scatter(pts[:, 0], -10 * np.log10(pts[:, 1]), color=line.get_color(), s=15)
ax.set_xlabel("bits per element")
ax.set_ylabel("SQNR on the operational hull (dB)")
ax.set_xlim(0, 4.15)
ax.set_title("8-pixel rows of scikit-learn's digits")
ax.legend()
plt.show()
