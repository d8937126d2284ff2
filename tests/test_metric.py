"""The data-aware objective: row weights and metric blocks (``fit(X, sample_weight, metric)``)."""

import itertools
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from qsdlearn import GramAccumulator, QuantizedSparseDecomposition, metric_blocks
from qsdlearn._levels import level_values

from ._data import SETTINGS, gaussian


def _random_metric(d, m, seed, rank=None):
    """``m`` random positive semi-definite ``d x d`` blocks (of rank ``rank``, default full)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, rank or 2 * d, d)) * rng.uniform(0.1, 3.0, size=(1, 1, d))
    return np.einsum("bsi,bsj->bij", A, A)


def _metric_error(X, X_hat, blocks=None, weights=None):
    """``sum_i w_i r_i H_(i mod m) r_i^T`` in float64, plainly."""
    R = np.asarray(X, dtype=np.float64) - np.asarray(X_hat, dtype=np.float64)
    if blocks is None:
        per_row = np.sum(R * R, axis=1)
    else:
        blocks = blocks[None] if blocks.ndim == 2 else blocks
        H = blocks[np.arange(R.shape[0]) % blocks.shape[0]]
        per_row = np.einsum("ij,ijk,ik->i", R, H, R)
    return float(per_row @ (np.ones(len(R)) if weights is None else weights))


def _fit(params, X, **fit_params):
    est = QuantizedSparseDecomposition(**params, random_state=0, max_iter=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, **fit_params)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_identity_metric_and_unit_weights_are_the_plain_objective(setting):
    X = gaussian(120, 8)
    plain = _fit(SETTINGS[setting], X)
    same = _fit(SETTINGS[setting], X, sample_weight=np.ones(120),
                metric=np.stack([np.eye(8)] * 3))
    assert np.array_equal(plain.components_, same.components_)
    assert np.array_equal(plain.objective_, same.objective_)
    assert np.array_equal(plain.transform(X), same.transform(X, metric=np.eye(8)))


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("scaled", ["metric", "weights"])
def test_a_scaled_identity_metric_or_constant_weights_only_scale_the_objective(setting, scaled):
    """``metric = 4 I`` or ``sample_weight = 4``: the plain fit, its objective times 4."""
    X = gaussian(150, 8, seed=4)
    plain = _fit(SETTINGS[setting], X)
    params = (dict(metric=4 * np.eye(8)) if scaled == "metric"
              else dict(sample_weight=np.full(150, 4)))
    scaled_fit = _fit(SETTINGS[setting], X, **params)
    np.testing.assert_allclose(scaled_fit.components_, plain.components_, rtol=1e-6, atol=1e-9)
    # (one-hot codes record the objective at another point of the iteration in the weighted
    # loop than in Lloyd's, so the final errors are compared)
    expected = 4 * plain.reconstruction_err_**2
    assert scaled_fit.reconstruction_err_**2 == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("m", [1, 3])
def test_objective_is_the_weighted_metric_error_and_never_increases(setting, m, dtype):
    X = gaussian(150, 8, seed=m).astype(dtype)
    blocks = _random_metric(8, m, seed=m)
    weights = np.random.default_rng(m).uniform(0.0, 3.0, size=150)
    est = _fit(SETTINGS[setting], X, sample_weight=weights, metric=blocks)
    objective = est.objective_
    assert np.all(np.diff(objective) <= 1e-6 * objective[0])
    X_hat = est.inverse_transform(est.transform(X, metric=blocks))
    assert est.reconstruction_err_**2 == pytest.approx(
        _metric_error(X, X_hat, blocks, weights), rel=1e-4 if dtype == np.float32 else 1e-9)


@pytest.mark.parametrize("setting", ["qsd", "vq-quantized-codebook", "sparse-float"])
def test_fitting_in_the_metric_lowers_the_metric_error(setting):
    X = gaussian(400, 8, seed=3)
    blocks = _random_metric(8, 2, seed=4, rank=3)  # strongly anisotropic
    plain = _fit(SETTINGS[setting], X)
    aware = _fit(SETTINGS[setting], X, metric=blocks)
    plain_error = _metric_error(X, plain.inverse_transform(plain.transform(X)), blocks)
    aware_error = _metric_error(X, aware.inverse_transform(aware.transform(X, metric=blocks)),
                                blocks)
    assert aware_error < 0.9 * plain_error


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vq_in_a_metric_is_vq_of_the_whitened_rows(dtype):
    """One block ``H = L L^T`` (``L`` invertible): Lloyd in the metric from codebook ``C0``
    is Lloyd on the rows ``X L`` from ``C0 L``; codebooks correspond through ``L``."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 4)).astype(dtype)
    L = np.tril(rng.standard_normal((4, 4))) + 3 * np.eye(4)
    C0 = X[:5].astype(np.float64)
    params = dict(n_components=5, n_nonzero=1, code_bits=0, max_iter=15, tol=0.0)
    aware = QuantizedSparseDecomposition(**params, codebook_init=C0)
    plain = QuantizedSparseDecomposition(**params, codebook_init=C0 @ L)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        aware.fit(X, metric=L @ L.T)
        plain.fit((X.astype(np.float64) @ L).astype(dtype))
    tol = 1e-4 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(aware.components_ @ L, plain.components_, rtol=tol, atol=tol)
    assert aware.reconstruction_err_ == pytest.approx(plain.reconstruction_err_, rel=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m", [1, 2])
def test_one_slot_codes_in_a_metric_match_brute_force(m, dtype):
    """With one slot the code of a row is exact: the best (codeword, level) pair in the
    row's metric block, found here by enumerating all of them."""
    X = gaussian(40, 4, seed=5).astype(dtype)
    blocks = _random_metric(4, m, seed=6)
    est = _fit(dict(n_components=5, n_nonzero=1, code_bits=2, codebook_bits=6), X)
    C = est.components_.astype(np.float64)
    codes = est.transform(X, metric=blocks)
    found = _metric_error(X, codes @ C, blocks)
    best = 0.0
    for i, x in enumerate(X.astype(np.float64)):
        H = blocks[i % m]
        best += min(
            (x - v * C[j]) @ H @ (x - v * C[j])
            for j, v in itertools.product(range(5), level_values(np.arange(4), 2))
        )
    assert found == pytest.approx(best, rel=1e-5 if dtype == np.float32 else 1e-10)


@pytest.mark.parametrize("setting", ["vq", "qsd", "quantized-svd", "sparse-float"])
def test_integer_weights_equal_repeated_rows_from_one_start(setting):
    """Weights ``2 c_i`` on the rows equal weight 2 on every row repeated ``c_i`` times (both
    weighted, so that both take the weighted path)."""
    rng = np.random.default_rng(1)
    X = gaussian(60, 8, seed=7)
    counts = rng.integers(1, 4, size=60)
    params = dict(SETTINGS[setting], max_iter=10, tol=0.0)
    k = params["n_components"]
    C0 = X[:k] + 0.1
    weighted = QuantizedSparseDecomposition(**params, codebook_init=C0)
    repeated = QuantizedSparseDecomposition(**params, codebook_init=C0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        weighted.fit(X, sample_weight=2 * counts)
        repeated.fit(np.repeat(X, counts, axis=0), sample_weight=np.full(counts.sum(), 2))
    np.testing.assert_allclose(weighted.components_, repeated.components_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(weighted.objective_, repeated.objective_, rtol=1e-6)


def test_zero_weight_rows_do_not_count():
    X = gaussian(80, 8, seed=2)
    weights = np.r_[np.ones(40), np.zeros(40)]
    params = dict(SETTINGS["vq"], max_iter=10, tol=0.0, codebook_init=X[:6])
    half = QuantizedSparseDecomposition(**params).fit(X[:40])
    weighted = QuantizedSparseDecomposition(**params).fit(X, sample_weight=weights)
    np.testing.assert_allclose(weighted.components_, half.components_, rtol=1e-10)


@pytest.mark.parametrize(
    "metric, message",
    [
        (np.eye(5), "expected"),
        (np.ones((2, 3, 8, 8)), "expected"),
        (np.triu(np.ones((8, 8))), "not symmetric"),
        (-np.eye(8), "not positive semi-definite"),
        (np.full((8, 8), np.nan), "NaN"),
        (np.zeros((8, 8)), "zero"),
    ],
)
def test_bad_metric_is_refused(metric, message):
    est = QuantizedSparseDecomposition(n_components=2)
    with pytest.raises(ValueError, match=message):
        est.fit(gaussian(20, 8), metric=metric)


@pytest.mark.parametrize(
    "weights, message",
    [(-np.ones(20), "[Nn]egative"), (np.zeros(20), "non-zero|zero for every row"),
     (np.ones(3), "sample_weight.shape")],
)
def test_bad_sample_weight_is_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        QuantizedSparseDecomposition(n_components=2).fit(gaussian(20, 8), sample_weight=weights)


def test_metric_blocks_are_the_diagonal_blocks_zero_padded():
    H = np.arange(100.0).reshape(10, 10)
    H = H + H.T
    blocks = metric_blocks(H, 4)
    assert blocks.shape == (3, 4, 4)
    np.testing.assert_array_equal(blocks[1], H[4:8, 4:8])
    np.testing.assert_array_equal(blocks[2][:2, :2], H[8:, 8:])
    assert not blocks[2][2:].any() and not blocks[2][:, 2:].any()


def test_block_metric_error_is_the_block_diagonal_output_error():
    """A weight cut into sub-vectors with :func:`metric_blocks`: the metric error of its rows
    is ``||(W - W_hat) A^T||^2`` with the Gram matrix's off-diagonal blocks dropped."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((50, 12))
    W, W_hat = rng.standard_normal((3, 12)), rng.standard_normal((3, 12))
    H = A.T @ A
    blocks = metric_blocks(H, 4)
    block_diagonal = np.zeros_like(H)
    for b in range(3):
        block_diagonal[4 * b:4 * b + 4, 4 * b:4 * b + 4] = H[4 * b:4 * b + 4, 4 * b:4 * b + 4]
    E = W - W_hat
    assert _metric_error(W.reshape(-1, 4), W_hat.reshape(-1, 4), blocks) == pytest.approx(
        np.trace(E @ block_diagonal @ E.T))


def test_gram_accumulator_streams_batches():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 7, 5)).astype(np.float32)
    acc = GramAccumulator(5)
    for batch in A:
        acc.update(batch)
    flat = A.reshape(-1, 5).astype(np.float64)
    np.testing.assert_allclose(acc.gram, flat.T @ flat, rtol=1e-12)
    assert acc.n_samples == 21
    with pytest.raises(ValueError, match="n_features=5"):
        acc.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.full((2, 5), np.inf))
    with pytest.raises(ValueError, match="n_features must be a positive integer"):
        GramAccumulator(0)
    for huge in (2**40, 2**70):  # numpy's "array is too big" before
        with pytest.raises(ValueError, match=f"n_features={huge}: its Gram matrix"):
            GramAccumulator(huge)
    for value in ("a", 5.0, float("nan"), True, None):  # int()'s or no message before
        with pytest.raises(TypeError, match="n_features must be a positive integer"):
            GramAccumulator(value)
    with pytest.raises(TypeError, match="real numbers"):
        acc.update(np.ones((2, 5), dtype=complex))
    with pytest.raises(ValueError, match="overflows"):
        GramAccumulator(5).update(np.full((2, 5), 1e200))


@pytest.mark.parametrize("vector_size, error", [
    (0, ValueError), (-1, ValueError), (11, ValueError), (2.5, TypeError), (True, TypeError),
    ("2", TypeError)])
def test_metric_blocks_refuses_bad_vector_sizes(vector_size, error):
    with pytest.raises(error, match="vector_size"):
        metric_blocks(np.eye(10), vector_size)


def test_metric_blocks_refuses_a_complex_or_empty_gram():
    """A complex Gram matrix lost its imaginary part with only NumPy's ComplexWarning, and an
    empty one gave NumPy's "need at least one array to stack" (a fresh user's trial)."""
    with pytest.raises(TypeError, match="gram must hold real numbers"):
        metric_blocks(np.eye(4) * (1 + 1j), 2)
    with pytest.raises(ValueError, match="gram has shape"):
        metric_blocks(np.ones((0, 0)), 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_nearly_isotropic_metric_fits_about_as_well_as_the_plain_objective(seed):
    """The metric's codebook step keeps the plain step (exact row sweeps) as a candidate, so
    a metric a rounding away from ``2 I`` does not fit worse than the plain objective does
    (it was 20-28 % worse with the gradient step alone)."""
    X = gaussian(300, 8, seed=0).astype(np.float32)
    metric = 2 * np.eye(8)
    metric[0, 0] += 1e-12
    params = dict(SETTINGS["qsd"], random_state=seed)
    aware = QuantizedSparseDecomposition(**params).fit(X, metric=metric)
    plain = QuantizedSparseDecomposition(**params).fit(X)
    assert aware.objective_[-1] <= 1.10 * 2 * plain.objective_[-1]


@pytest.mark.parametrize("n_slots", [1, 2])
def test_hessian_bound_is_the_dense_eigenvalue_bound(n_slots):
    """One code per row makes the bound's ``k x k`` matrix diagonal: its largest entry is
    read off instead of an eigen-decomposition, with the same value."""
    from qsdlearn import _metric

    rng = np.random.default_rng(0)
    n, d, k, m = 60, 3, 7, 4
    A = rng.standard_normal((m, 5, d))
    metric = _metric.prepare(np.einsum("mpd,mpe->mde", A, A), rng.uniform(0.5, 2.0, n), n)
    idx = np.stack([rng.choice(k, n_slots, replace=False) for _ in range(n)]).astype(np.int32)
    val = rng.standard_normal((n, n_slots))
    factors = metric.weights * np.resize(np.linalg.eigvalsh(metric.blocks)[:, -1], n)
    dense = (_metric.code_matrix(idx, val, k, factors).T
             @ _metric.code_matrix(idx, val, k)).toarray()
    expected = np.linalg.eigvalsh(dense)[-1] * 1.01
    np.testing.assert_allclose(_metric.hessian_bound(metric, idx, val, k), expected, rtol=1e-12)
