"""
Rate and distortion on a trained layer
======================================

A perceptron is trained on scikit-learn's digits data; its 256 x 256 hidden layer is cut into
8-element sub-vectors and compressed with vector quantization and with sparse, quantized codes
over a range of codebook sizes. Every point is placed at its exact bits per weight (codebook and
scales included) and its SQNR.
"""

import warnings

import matplotlib.pyplot as plt

from qsdlearn import QuantizedSparseDecomposition
from qsdlearn._demo import train_digits_mlp
from qsdlearn.metrics import sqnr

model, _, _ = train_digits_mlp(random_state=0)
W = model.coefs_[1].T.astype("float32")
X = W.reshape(-1, 8)

curves = {
    "VQ (k-means)": [dict(n_components=k, n_nonzero=1, code_bits=0, codebook_bits=8)
                     for k in (16, 64, 256)],
    "QSD, 2 slots, 2-bit codes": [dict(n_components=k, n_nonzero=2, code_bits=2, codebook_bits=8)
                                  for k in (16, 64, 256)],
}
fig, ax = plt.subplots()
for label, settings in curves.items():
    rates, quality = [], []
    for params in settings:
        est = QuantizedSparseDecomposition(max_iter=30, random_state=0, **params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            X_hat = est.inverse_transform(est.fit_transform(X))
        rates.append(est.bits_per_element_)
        quality.append(sqnr(X, X_hat))
    ax.plot(rates, quality, marker="o", label=label)
ax.set_xlabel("bits per weight")
ax.set_ylabel("SQNR (dB)")
ax.legend()
plt.show()
