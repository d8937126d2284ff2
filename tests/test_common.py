"""scikit-learn's estimator checks over the main settings."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from qsdlearn import QuantizedSparseDecomposition

# These checks shrink n_components (to 1, or to the number of features of a tiny data set) and
# leave n_nonzero as it is; an estimator asked for more nonzeros per row than it has components
# rejects the contradiction with a ValueError that names both parameters, by design.
_SHRINKS_N_COMPONENTS = (
    "n_nonzero=2 exceeds the n_components the check sets; rejected with a ValueError by design"
)
_TWO_SLOT_XFAILS = {
    name: _SHRINKS_N_COMPONENTS
    for name in [
        "check_dont_overwrite_parameters",
        "check_methods_sample_order_invariance",
        "check_methods_subset_invariance",
        "check_fit2d_1sample",
        "check_fit2d_1feature",
        "check_fit2d_predict1d",
    ]
}

# As for scikit-learn's KMeans: the objective weights rows exactly as repeating them would
# (tests/test_metric.py proves it from a fixed start), but the start is drawn from the rows
# themselves (k-means++ seeds, the SVD, n_components=None = min(n_samples, n_features)), so
# a repeated row set starts elsewhere and reaches another local optimum.
_WEIGHTS_MOVE_THE_START = {
    "check_sample_weight_equivalence_on_dense_data": (
        "sample_weight is equivalent to repeating rows in the objective, but the start "
        "depends on the rows (see tests/test_metric.py for the equivalence from one start)"
    ),
}

ESTIMATORS = [
    QuantizedSparseDecomposition(),  # truncated SVD
    QuantizedSparseDecomposition(n_components=3, n_nonzero=1, code_bits=0, random_state=0),
    QuantizedSparseDecomposition(
        n_components=4, n_nonzero=1, code_bits=2, codebook_bits=4, random_state=0
    ),
    QuantizedSparseDecomposition(
        n_components=4, n_nonzero=2, code_bits=2, codebook_bits=4, random_state=0
    ),
]


def _expected_failures(estimator):
    if estimator.n_nonzero == 2:
        return {**_TWO_SLOT_XFAILS, **_WEIGHTS_MOVE_THE_START}
    return _WEIGHTS_MOVE_THE_START


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=_expected_failures)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
