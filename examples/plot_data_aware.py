"""
Data-aware compression of a perceptron
======================================

A perceptron trained on scikit-learn's digits is compressed twice at each budget: once to
minimise the squared error of its weights, once — given the Gram matrix of every layer's
inputs on the training data (:class:`qsdlearn.GramAccumulator`) — to minimise the error of
every layer's output. Both are scored on held-out digits: the distance of their logits to the
float model's, and their accuracy.
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
X_train, X_test, y_train, y_test = train_test_split(X / 16.0, y, test_size=0.5, random_state=0)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    mlp = MLPClassifier((256, 128), max_iter=60, random_state=0).fit(X_train, y_train)

weights = {f"fc{i}.weight": w.T.astype(np.float32) for i, w in enumerate(mlp.coefs_)}
weights.update({f"fc{i}.bias": b.astype(np.float32) for i, b in enumerate(mlp.intercepts_)})


def forward(w, inputs, grams=None):
    """The perceptron's logits; with ``grams``, accumulate every layer's input Gram matrix."""
    x = inputs
    for i in range(len(mlp.coefs_)):
        if grams is not None:
            grams.setdefault(f"fc{i}.weight", qsdlearn.GramAccumulator(x.shape[1])).update(x)
        x = x @ w[f"fc{i}.weight"].T + w[f"fc{i}.bias"]
        if i < len(mlp.coefs_) - 1:
            x = np.maximum(x, 0)
    return x


# %%
# Calibration: one pass over the training inputs, one Gram matrix per layer.
grams = {}
forward(weights, X_train, grams)
calibration = {name: acc.gram for name, acc in grams.items()}

reference = forward(weights, X_test)
budgets = [1.5, 2.0]
results = {"weight error": [], "output error (calibrated)": []}
for budget in budgets:
    for label, cal in [("weight error", None), ("output error (calibrated)", calibration)]:
        with warnings.catch_warnings(record=True) as caught:  # budgets a small model can't fill
            warnings.simplefilter("always", UserWarning)
            model = qsdlearn.compress_weights(weights, bits_per_weight=budget, calibration=cal,
                                              random_state=0)
        logits = forward({**weights, **model.decompress()}, X_test)
        relative = np.sum((logits - reference) ** 2) / np.sum(reference**2)
        accuracy = np.mean(np.argmax(logits, axis=1) == y_test)
        results[label].append((model.bits_per_weight, relative, accuracy))
        print(f"{budget} b/w, {label:<26}: {model.bits_per_weight:.3f} b/w, logits error "
              f"{relative:.4f}, accuracy {accuracy:.3f}")
        for warning in caught:
            print("   note:", warning.message)
print(f"float model accuracy: {np.mean(np.argmax(reference, axis=1) == y_test):.3f}")

# %%
# The calibrated report shows each layer's output SQNR next to its weight SQNR.
print(model.report_table())

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
for label, points in results.items():
    bits, errors, accuracies = np.array(points).T
    left.plot(bits, errors, "o-", label=label)
    right.plot(bits, accuracies, "o-", label=label)
left.set(xlabel="bits per weight (whole file)", ylabel="relative logits error", yscale="log")
right.axhline(np.mean(np.argmax(reference, axis=1) == y_test), color="gray", ls=":",
              label="float model")
right.set(xlabel="bits per weight (whole file)", ylabel="test accuracy")
right.legend()
fig.tight_layout()
plt.show()
