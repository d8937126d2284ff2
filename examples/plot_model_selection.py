"""
Choosing a setting under a size budget
======================================

``GridSearchCV`` with the estimator's default score always picks the setting with the most
bits. :func:`qsdlearn.metrics.budget_scorer` scores the SQNR a setting reaches within a budget
of bits per element (counting the exact bits of ``encode`` on the validation rows), so the
search picks the best setting that fits. The estimator sits in a ``Pipeline`` like any other
scikit-learn transformer.
"""

import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from qsdlearn import QuantizedSparseDecomposition
from qsdlearn.metrics import budget_scorer

X = (load_digits().data[:800] / 16.0).reshape(-1, 8).astype(np.float32)  # 6,400 rows

pipeline = make_pipeline(
    FunctionTransformer(lambda Z: Z - 0.5),  # centre the pixels
    QuantizedSparseDecomposition(codebook_bits=8, max_iter=10, random_state=0),
)
grid = {
    "quantizedsparsedecomposition__n_components": [16, 64, 256],
    "quantizedsparsedecomposition__n_nonzero": [1, 2],
    "quantizedsparsedecomposition__code_bits": [0, 2],
}
search = GridSearchCV(pipeline, grid, scoring=budget_scorer(2.0), cv=2)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    search.fit(X)
print("best setting within 2 bits per element:", search.best_params_)
print(f"SQNR {search.best_score_:.2f} dB")

prefix = "quantizedsparsedecomposition__"
labels = [f"k={p[prefix + 'n_components']} s={p[prefix + 'n_nonzero']} "
          f"code_bits={p[prefix + 'code_bits']}" for p in search.cv_results_["params"]]
fig, ax = plt.subplots(figsize=(6, 4))
ax.barh(labels, search.cv_results_["mean_test_score"])
ax.set_xlabel("SQNR within 2 bits per element (dB)")
fig.tight_layout()
plt.show()
