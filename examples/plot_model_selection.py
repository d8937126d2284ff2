"""
Choosing a setting under a size budget
======================================

``GridSearchCV`` with the estimator's default score always picks the setting with the most
bits. :func:`qsdlearn.metrics.budget_scorer` scores the SQNR a setting reaches within a budget
of bits per element (counting the exact bits of ``encode`` on the validation rows, the
codebook's spread over all the rows with ``n_rows``), so the search picks the best setting that
fits. The estimator sits in a ``Pipeline`` like any other
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
# n_rows: the budget is for all 6,400 rows, where a fold holds 3,200 (a codebook costs the
# same bits on either)
search = GridSearchCV(pipeline, grid, scoring=budget_scorer(2.0, n_rows=X.shape[0]), cv=2)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    search.fit(X)
print("best setting within 2 bits per element:", search.best_params_)
print(f"SQNR {search.best_score_:.2f} dB")

prefix = "quantizedsparsedecomposition__"
labels = [f"k={p[prefix + 'n_components']} s={p[prefix + 'n_nonzero']} "
          f"code_bits={p[prefix + 'code_bits']}" for p in search.cv_results_["params"]]
# %%
# The rate of each setting, measured once more on all rows: a setting over the budget is
# scored by the share of the rows it could code within it.
rates = []
for params in search.cv_results_["params"]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted = pipeline.set_params(**params).fit(X)
    rates.append(fitted[-1].encode(fitted[0].transform(X)).bits_per_element)
scores = search.cv_results_["mean_test_score"]
colors = ["tab:green" if i == search.best_index_ else "lightgray" if rate > 2.0
          else "tab:blue" for i, rate in enumerate(rates)]
fig, ax = plt.subplots(figsize=(7, 4))
ax.barh(labels, scores, color=colors)
for y, (score, rate) in enumerate(zip(scores, rates)):
    ax.text(score, y, f" {rate:.2f} b/e", va="center", fontsize=8)
ax.set_xlabel("SQNR within 2 bits per element (dB)")
ax.set_title("green: chosen; gray: over the budget; rate at each bar's end")
fig.tight_layout()
plt.show()
