"""
Compressing a network's weights
===============================

A small perceptron is trained on scikit-learn's digits; its weights are compressed to a whole
file budget of bits per weight with :func:`qsdlearn.compress_weights` (the header and the
biases, kept verbatim, are counted too), the report shows what each tensor got, and the
network is scored again with the decompressed weights put back.
"""

import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

import qsdlearn

X, y = load_digits(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X / 16.0, y, test_size=0.3, random_state=0)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    model = MLPClassifier((256, 256), max_iter=40, random_state=0).fit(X_train, y_train)
original = model.score(X_test, y_test)

# the weights as a model's state dict would hold them: name -> (out, in) array
weights = {f"layer{i}.weight": w.T.astype(np.float32) for i, w in enumerate(model.coefs_)}
weights.update({f"layer{i}.bias": b.astype(np.float32) for i, b in enumerate(model.intercepts_)})

# candidate settings the rate allocation chooses from, per layer: vector quantization with
# 16 to 256 codewords, two 2-bit codes per sub-vector, dense 3- and 4-bit codes
candidates = [qsdlearn.LayerSetting(8, qsdlearn.Constraints(k, n_nonzero=s, code_bits=b,
                                                            codebook_bits=8))
              for k, s, b in [(16, 1, 0), (256, 1, 0), (256, 2, 2), (8, None, 3), (8, None, 4)]]
budgets, accuracies = [2.0, 3.0, 4.0], []
for budget in budgets:
    compressed = qsdlearn.compress_weights(weights, bits_per_weight=budget,
                                           candidates=candidates, max_iter=20, random_state=0)
    restored = compressed.decompress()
    coefs = model.coefs_
    model.coefs_ = [restored[f"layer{i}.weight"].T for i in range(len(coefs))]
    accuracies.append(model.score(X_test, y_test))
    model.coefs_ = coefs
    if budget == 2.0:
        print(compressed.report_table())

fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(budgets, accuracies, marker="o", label="compressed weights")
ax.axhline(original, color="gray", linestyle="--", label="float32 weights")
ax.set_xlabel("bits per weight (whole file)")
ax.set_ylabel("test accuracy")
ax.legend()
plt.show()
