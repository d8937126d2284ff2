"""
Saving, loading and inspecting a compressed matrix
==================================================

:meth:`QuantizedSparseDecomposition.encode` packs the codes of a matrix and the codebook into
bit streams of exactly the counted size; :func:`qsdlearn.save` writes them atomically as a
safetensors file, and :func:`qsdlearn.load` reads them back after checking everything — here a
damaged copy is refused. The codes of the first rows are drawn from the decoded factors.
"""

import os
import tempfile
import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning

import qsdlearn
from qsdlearn import QuantizedSparseDecomposition

X = (load_digits().data / 16.0).reshape(-1, 8).astype(np.float32)
est = QuantizedSparseDecomposition(64, n_nonzero=2, code_bits=2, codebook_bits=8,
                                   max_iter=20, random_state=0)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    est.fit(X)
compressed = est.encode(X)

folder = tempfile.mkdtemp()
path = os.path.join(folder, "digits.qsd")
qsdlearn.save(compressed, path)
print(f"{os.path.getsize(path)} bytes on disk: 1032 bytes of header and "
      f"{compressed.nbytes} bytes of streams ({compressed.bits} bits counted)")

loaded = qsdlearn.load(path)
print(loaded)
assert np.array_equal(loaded.decode(), est.inverse_transform(est.transform(X)))

damaged = bytearray(open(path, "rb").read())
damaged[-10] ^= 0xFF
with open(path, "wb") as file:
    file.write(damaged)
try:
    qsdlearn.load(path)
except ValueError as error:
    print("refused:", error)

idx, val, codebook = loaded.factors()
fig, axes = plt.subplots(1, 2, figsize=(7, 3))
image = axes[0].imshow(codebook, aspect="auto", cmap="coolwarm")
axes[0].set_title("codebook (64 x 8)")
axes[0].set_xlabel("element of the 8-pixel row")
axes[0].set_ylabel("codebook row")
fig.colorbar(image, ax=axes[0], label="value (pixel intensity)")
axes[1].scatter(idx[:300].ravel(), val[:300].ravel(), s=8)
axes[1].set_xlabel("codebook row")
axes[1].set_ylabel("code level")
axes[1].set_title("codes of the first 300 rows")
fig.tight_layout()
plt.show()
