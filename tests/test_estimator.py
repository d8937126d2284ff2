"""QuantizedSparseDecomposition: the classical methods as settings, invariants, bad input."""

import warnings

import numba
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.decomposition import MiniBatchDictionaryLearning, SparsePCA, sparse_encode
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.utils._param_validation import InvalidParameterError

from qsdlearn import QuantizedSparseDecomposition

from ._data import (
    DATASETS,
    SETTINGS,
    fit_quietly,
    gaussian,
    low_rank_plus_noise,
    sq_error,
)


# -- the special cases as equivalences -------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 7])
def test_svd_setting_reaches_eckart_young(k, dtype):
    X = low_rank_plus_noise().astype(dtype)
    est = QuantizedSparseDecomposition(n_components=k, random_state=0).fit(X)
    singular = np.linalg.svd(X.astype(np.float64), compute_uv=False)
    optimum = np.sum(singular[k:] ** 2)
    rtol = 1e-6 if dtype == np.float64 else 1e-4
    assert est.reconstruction_err_**2 == pytest.approx(optimum, rel=rtol)
    X_hat = est.inverse_transform(est.transform(X))
    assert sq_error(X, X_hat) == pytest.approx(optimum, rel=rtol)


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("k", [4, 12])
def test_vq_setting_matches_kmeans_inertia(name, k):
    X = DATASETS[name]()
    kmeans = KMeans(n_clusters=k, n_init=3, random_state=0).fit(X)
    est = QuantizedSparseDecomposition(
        n_components=k, n_nonzero=1, code_bits=0, n_init=3, max_iter=300, tol=1e-8,
        random_state=0,
    ).fit(X)
    assert est.reconstruction_err_**2 <= 1.01 * kmeans.inertia_
    codes = est.transform(X)
    # one-hot codes of value 1: each row is its nearest codeword
    np.testing.assert_array_equal(np.sort(np.unique(codes)), [0.0, 1.0])
    np.testing.assert_array_equal(codes.sum(axis=1), 1.0)
    distances = ((X[:, None, :] - est.components_[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(codes.argmax(axis=1), distances.argmin(axis=1))


@pytest.mark.parametrize("n_iter", [1, 5, 20])
def test_vq_setting_is_lloyd_from_the_same_start(n_iter, dtype):
    """From the same centroids, the VQ setting and scikit-learn's Lloyd iteration compute the
    same thing: equal labels and centres after every number of iterations (on data where no
    cluster empties, so neither relocates a centre)."""
    X = make_blobs(600, n_features=4, centers=6, cluster_std=1.5, random_state=1)[0].astype(dtype)
    C0 = X[np.random.default_rng(0).choice(600, 6, replace=False)]
    kmeans = KMeans(6, init=C0, n_init=1, max_iter=n_iter, tol=0, algorithm="lloyd").fit(X)
    est = fit_quietly(QuantizedSparseDecomposition(
        6, n_nonzero=1, code_bits=0, codebook_init=C0, max_iter=n_iter, tol=0), X)
    assert kmeans.n_iter_ == est.n_iter_
    np.testing.assert_array_equal(est.transform(X).argmax(axis=1), kmeans.labels_)
    rtol = 1e-10 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(est.components_, kmeans.cluster_centers_, rtol=rtol, atol=rtol)
    assert est.reconstruction_err_**2 == pytest.approx(kmeans.inertia_, rel=rtol)


@pytest.mark.parametrize("codebook_bits", [None, 6])
def test_vq_setting_ends_on_the_assignment_to_its_codebook(codebook_bits, dtype):
    """Lloyd's shape: every iteration ends with the nearest-codeword assignment, so the last
    objective is the error of the returned codes; a codeword no row picks is moved onto the
    worst-fitted row and gets used."""
    X = make_blobs(300, n_features=3, centers=4, random_state=3)[0].astype(dtype)
    C0 = X[:4].copy()
    C0[3] = 1e3  # far from every row: unused after the first assignment
    est = fit_quietly(QuantizedSparseDecomposition(
        4, n_nonzero=1, code_bits=0, codebook_bits=codebook_bits, codebook_init=C0,
        max_iter=30), X)
    assert np.all(np.diff(est.objective_) <= 0)
    assert len(np.unique(est.transform(X).argmax(axis=1))) == 4
    if codebook_bits is None:
        assert est.objective_[-1] == pytest.approx(est.reconstruction_err_**2, rel=1e-12)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_float32_and_float64_fits_agree(setting):
    """The same data in float32 and float64 give the same factorization, to float32's
    precision (well-separated data, so that no assignment sits on a tie)."""
    X = make_blobs(300, n_features=6, centers=5, cluster_std=0.3, random_state=2)[0]
    fits = [fit_quietly(QuantizedSparseDecomposition(random_state=0, max_iter=15, tol=0,
                                                     **SETTINGS[setting]), X.astype(dt))
            for dt in (np.float64, np.float32)]
    scale = np.abs(X).max()
    np.testing.assert_allclose(fits[1].components_, fits[0].components_, atol=1e-4 * scale)
    np.testing.assert_allclose(fits[1].objective_, fits[0].objective_, rtol=1e-3)
    assert fits[1].n_iter_ == fits[0].n_iter_


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow) if name == "digits" else name
             for name in sorted(DATASETS)])  # digits: 7 s of MiniBatchDictionaryLearning
@pytest.mark.parametrize("k, s", [(8, 2), (24, 3)])
def test_sparse_codes_beat_dictionary_learning_with_omp(name, k, s):
    X = DATASETS[name]()
    dl = MiniBatchDictionaryLearning(
        n_components=k, transform_algorithm="omp", transform_n_nonzero_coefs=s,
        max_iter=50, random_state=0,
    ).fit(X)
    dl_error = sq_error(X, dl.transform(X) @ dl.components_)
    est = fit_quietly(
        QuantizedSparseDecomposition(n_components=k, n_nonzero=s, max_iter=200, random_state=0), X
    )
    assert np.count_nonzero(est.transform(X), axis=1).max() <= s
    assert est.reconstruction_err_**2 <= dl_error


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_plain_pgd_solver_is_monotone_and_the_default_is_no_worse(setting, dtype):
    """solver="pgd", the paper's plain method, never raises its objective; the default
    solver (exact block minimisers, multi-start code search) ends at most where it does."""
    X = gaussian(300, 6, seed=3).astype(dtype)
    params = dict(max_iter=60, tol=0, random_state=0, **SETTINGS[setting])
    pgd = fit_quietly(QuantizedSparseDecomposition(solver="pgd", **params), X)
    slack = 1e-12 if dtype == np.float64 else 1e-6
    assert np.all(np.diff(pgd.objective_) <= slack * pgd.objective_[:-1])
    assert pgd.reconstruction_err_**2 == pytest.approx(pgd.objective_[-1], rel=1e-4)
    default = fit_quietly(QuantizedSparseDecomposition(**params), X)
    assert default.reconstruction_err_ <= pgd.reconstruction_err_ * (1 + 1e-6)


def test_plain_pgd_solver_reaches_the_svd_and_refuses_weights():
    X = low_rank_plus_noise()
    svd = np.linalg.svd(X, compute_uv=False)
    pgd = fit_quietly(QuantizedSparseDecomposition(n_components=3, solver="pgd", max_iter=500,
                                                   tol=1e-12, random_state=0), X)
    assert pgd.reconstruction_err_**2 == pytest.approx(np.sum(svd[3:] ** 2), rel=1e-6)
    with pytest.raises(ValueError, match="pgd"):
        QuantizedSparseDecomposition(n_components=3, solver="pgd").fit(
            X, sample_weight=np.arange(1.0, X.shape[0] + 1))


@pytest.mark.parametrize("fit_algorithm", ["cd", pytest.param("lars", marks=pytest.mark.slow)])
def test_overcomplete_sparse_codes_beat_dictionary_learning_with_omp(fit_algorithm):
    """Issue #10: three times more components than features (correlated Gaussian rows), the
    default fit against MiniBatchDictionaryLearning with OMP codes, as the issue ran it
    (``"lars"``, the default; ``"cd"`` reaches the same error in a quarter of the time).
    Greedy codes with coordinate sweeps stopped at poor supports here (75.9 against 75.3 from
    one start, 54.9 from eight); least squares with exchanges of one position reach 44.6."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 8)) @ rng.standard_normal((8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # scikit-learn's inner lasso
        dl = MiniBatchDictionaryLearning(
            24, transform_algorithm="omp", transform_n_nonzero_coefs=3,
            fit_algorithm=fit_algorithm, max_iter=30, random_state=0,
        ).fit(X)
    dl_error = np.linalg.norm(X - dl.transform(X) @ dl.components_)
    est = fit_quietly(QuantizedSparseDecomposition(n_components=24, n_nonzero=3,
                                                   random_state=0), X)
    codes = est.transform(X)
    assert np.count_nonzero(codes, axis=1).max() <= 3
    error = np.linalg.norm(X - codes @ est.components_)
    assert est.reconstruction_err_ == pytest.approx(error, rel=1e-12)
    assert error <= dl_error
    # The code step alone, on the same codebook (some rows): better than OMP's codes.
    atoms = est.components_ / np.linalg.norm(est.components_, axis=1, keepdims=True)
    omp_codes = sparse_encode(X[:500], atoms, algorithm="omp", n_nonzero_coefs=3)
    assert sq_error(X[:500], codes[:500] @ est.components_) <= sq_error(X[:500], omp_codes @ atoms)


@pytest.mark.parametrize("name", ["blobs", "digits"])
@pytest.mark.parametrize("k", [2, 3])
def test_sparse_components_beat_sparse_pca(name, k):
    X = DATASETS[name]()
    X = X - X.mean(axis=0)
    spca = SparsePCA(n_components=k, alpha=1.0, random_state=0).fit(X)
    nonzeros = int(np.count_nonzero(spca.components_, axis=1).max())
    # SparsePCA's components with their best (least-squares) codes: its best possible error.
    V = spca.components_
    U = np.linalg.lstsq(V.T, X.T, rcond=None)[0].T
    spca_error = sq_error(X, U @ V)
    est = fit_quietly(
        QuantizedSparseDecomposition(
            n_components=k, component_nonzero=nonzeros, max_iter=2000, tol=1e-9, random_state=0
        ),
        X,
    )
    assert np.count_nonzero(est.components_, axis=1).max() <= nonzeros
    assert est.reconstruction_err_**2 <= spca_error * (1 + 1e-9)


def test_quantized_svd_is_close_to_svd_at_high_precision():
    X = low_rank_plus_noise()
    exact = QuantizedSparseDecomposition(n_components=3, random_state=0).fit(X)
    quantized = fit_quietly(
        QuantizedSparseDecomposition(n_components=3, code_bits=10, codebook_bits=10, random_state=0),
        X,
    )
    assert quantized.reconstruction_err_ <= exact.reconstruction_err_ * 1.01


# -- invariants ------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_objective_never_increases(setting, seed, dtype):
    X = gaussian(200, 6, seed=seed).astype(dtype)
    est = fit_quietly(
        QuantizedSparseDecomposition(max_iter=30, tol=0, random_state=seed, **SETTINGS[setting]),
        X,
    )
    objective = est.objective_
    assert len(objective) == est.n_iter_ + 1
    slack = 1e-12 if dtype == np.float64 else 1e-6
    assert np.all(np.diff(objective) <= slack * objective[:-1])


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_constraints_hold(setting, dtype):
    params = SETTINGS[setting]
    X = gaussian(150, 6).astype(dtype)
    est = fit_quietly(QuantizedSparseDecomposition(max_iter=10, random_state=0, **params), X)
    codes = est.transform(X)
    assert codes.dtype == dtype and est.components_.dtype == dtype
    k = params["n_components"]
    if params.get("n_nonzero"):
        assert np.all(np.count_nonzero(codes, axis=1) <= params["n_nonzero"])
    if params.get("code_bits") is not None:
        bits = params["code_bits"]
        allowed = [1.0] if bits == 0 else np.arange(2**bits) - 2 ** (bits - 1) + 0.5
        assert np.all(np.isin(codes[codes != 0], allowed))
    if params.get("codebook_bits") is not None:
        ratio = est.components_.astype(np.float64) / est.codebook_scales_[:, None]
        levels = np.rint(2 * ratio) / 2
        np.testing.assert_allclose(ratio, levels, atol=1e-4)
        top = 2 ** (params["codebook_bits"] - 1) - 0.5
        nonzero = levels[est.components_ != 0]
        np.testing.assert_array_equal(nonzero * 2 % 2, np.ones_like(nonzero))  # half-integers
        assert np.abs(nonzero).max() <= top
        # the codebook is exactly levels * scale in the data type (what the codec decodes)
        np.testing.assert_array_equal(
            levels.astype(dtype) * est.codebook_scales_[:, None], est.components_
        )
    if params.get("component_nonzero"):
        assert np.all(np.count_nonzero(est.components_, axis=1) <= params["component_nonzero"])
    assert est.components_.shape == (k, 6)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_same_seed_gives_identical_results(setting):
    X = gaussian(120, 6, seed=3)
    a = fit_quietly(QuantizedSparseDecomposition(random_state=7, **SETTINGS[setting]), X)
    b = fit_quietly(QuantizedSparseDecomposition(random_state=7, **SETTINGS[setting]), X)
    np.testing.assert_array_equal(a.components_, b.components_)
    np.testing.assert_array_equal(a.objective_, b.objective_)
    np.testing.assert_array_equal(a.transform(X), b.transform(X))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                    reason="numba has one thread here: both runs would use one thread")
@pytest.mark.parametrize("setting", ["qsd", "sparse-float", "vq"])
def test_thread_count_does_not_change_results(setting):
    X = gaussian(700, 6, seed=4)
    one = fit_quietly(QuantizedSparseDecomposition(random_state=0, n_threads=1, **SETTINGS[setting]), X)
    two = fit_quietly(QuantizedSparseDecomposition(random_state=0, n_threads=2, **SETTINGS[setting]), X)
    np.testing.assert_array_equal(one.components_, two.components_)
    np.testing.assert_array_equal(one.transform(X), two.transform(X))


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_transform_of_training_rows_reproduces_the_fitted_error(setting, dtype):
    X = gaussian(150, 6, seed=5).astype(dtype)
    est = QuantizedSparseDecomposition(random_state=0, max_iter=20, **SETTINGS[setting])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        codes_fit = est.fit_transform(X)
    codes = est.transform(X)
    np.testing.assert_array_equal(codes, codes_fit)
    error = np.sqrt(sq_error(X, est.inverse_transform(codes)))
    assert error == pytest.approx(est.reconstruction_err_, rel=1e-6 if dtype == np.float64 else 1e-4)
    assert est.score(X) == pytest.approx(-(error**2) / X.size, rel=1e-4)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("fit", ["plain", "weights", "metric", "pgd", "subnormal"])
def test_the_codes_of_a_fit_are_those_encode_gives(setting, fit, dtype):
    """``_fit_codes`` (which ``compress_weights`` packs instead of encoding the rows fitted a
    second time) packs to the bytes of ``encode``, and ``fit_transform`` gives ``transform``:
    row weights, zeros among them, leave the codes as they are; a metric of blocks and the
    plain method are encoded again; data among subnormal numbers, whose codebook rounds as it
    is scaled back, get the codes of the codebook stored."""
    X = gaussian(150, 6, seed=7)
    if fit == "subnormal":
        X = X * (1e-39 if dtype == np.float32 else 1e-310)
    X = X.astype(dtype)
    params = dict(SETTINGS[setting])
    fit_params = {}
    if fit == "weights":
        fit_params["sample_weight"] = np.random.default_rng(1).choice([0.0, 0.5, 3.0], size=150)
    elif fit == "metric":
        A = np.random.default_rng(2).normal(size=(6, 6))
        fit_params["metric"] = A @ A.T
    elif fit == "pgd":
        params["solver"] = "pgd"
    est = QuantizedSparseDecomposition(random_state=0, max_iter=5, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        codes = est._fit_codes(X, **fit_params)
        fit_transform = clone(est).fit_transform(X, **fit_params)
    assert est._pack(codes).to_bytes() == est.encode(X).to_bytes()
    if fit != "pgd":  # the plain method returns its own last iterate (see ``solver``)
        np.testing.assert_array_equal(fit_transform, est.transform(X, fit_params.get("metric")))


def test_transform_new_rows_is_row_independent():
    X = gaussian(200, 6)
    est = fit_quietly(QuantizedSparseDecomposition(random_state=0, **SETTINGS["qsd"]), X)
    X_new = gaussian(50, 6, seed=9)
    whole = est.transform(X_new)
    parts = np.vstack([est.transform(X_new[i : i + 7]) for i in range(0, 50, 7)])
    np.testing.assert_array_equal(whole, parts)


def test_user_initialization_is_used():
    X = gaussian(100, 4)
    C0 = np.eye(4)[:3] * 2
    est = QuantizedSparseDecomposition(
        n_components=3, n_nonzero=1, code_bits=0, codebook_init=C0, max_iter=0
    )
    est.fit(X)  # no iteration: the codebook stays as given
    np.testing.assert_array_equal(est.components_, C0)
    Z0 = np.zeros((100, 3))
    Z0[:, 0] = 1.0
    est = QuantizedSparseDecomposition(
        n_components=3, n_nonzero=1, code_bits=0, codebook_init=C0, code_init=Z0, max_iter=1
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X)
    assert est.objective_[0] <= sq_error(X, Z0 @ C0)


def test_convergence_warning_when_max_iter_is_reached():
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        QuantizedSparseDecomposition(**SETTINGS["qsd"], max_iter=1, tol=0, random_state=0).fit(
            gaussian()
        )


def test_more_code_bits_lower_the_error():
    X = gaussian(400, 8)
    errors = []
    for bits in [1, 2, 4]:
        est = fit_quietly(
            QuantizedSparseDecomposition(
                n_components=16, n_nonzero=2, code_bits=bits, codebook_bits=8, random_state=0
            ),
            X,
        )
        errors.append(est.reconstruction_err_)
    assert errors[0] > errors[1] > errors[2]


def test_verbose_prints_objective(capsys):
    fit_quietly(QuantizedSparseDecomposition(n_components=2, verbose=1, random_state=0), gaussian())
    assert "objective" in capsys.readouterr().out


# -- numerical robustness: offset and scale (issue #14) --------------------------------------


def _blobs_far_from_the_origin():
    """400 rows of 4 features: four integer centres in [-2, 2] plus 0.01 noise, offset by 1e4."""
    rng = np.random.default_rng(7)
    centers = rng.integers(-2, 3, size=(4, 4)).astype(np.float64)
    labels = rng.integers(0, 4, size=400)
    return 1e4 + centers[labels] + 0.01 * rng.standard_normal((400, 4))


def test_vq_setting_on_float32_data_far_from_the_origin():
    """Distances as ||x||^2 - 2 x.c + ||c||^2 in float32 lose everything here; the fit must
    reach the float64 error, keep its objective monotone and assign every row to its nearest
    codeword."""
    X = _blobs_far_from_the_origin()
    params = dict(n_components=4, n_nonzero=1, code_bits=0, n_init=3, random_state=0)
    reference = QuantizedSparseDecomposition(**params).fit(X)
    assert reference.reconstruction_err_ < 0.5
    X32 = X.astype(np.float32)
    est = QuantizedSparseDecomposition(**params).fit(X32)
    assert est.reconstruction_err_ == pytest.approx(reference.reconstruction_err_, rel=1e-2)
    assert np.all(np.diff(est.objective_) <= 0)
    distances = ((X32.astype(np.float64)[:, None] - est.components_.astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(est.transform(X32).argmax(axis=1), distances.argmin(axis=1))


_SCALE_SETTINGS = {
    "vq": dict(n_components=16, n_nonzero=1, code_bits=0),
    "qsd": dict(n_components=32, n_nonzero=2, code_bits=2, codebook_bits=8),
    "svd": dict(n_components=3),
}


def _relative_error(est, X):
    return est.reconstruction_err_ / np.linalg.norm(X.astype(np.float64))


@pytest.mark.parametrize("scale", [1e20, 1e-30])
@pytest.mark.parametrize("setting", sorted(_SCALE_SETTINGS))
def test_float32_fits_do_not_depend_on_the_scale(setting, scale):
    """The same float32 matrix at unit scale and multiplied by 1e20 or 1e-30 (whose squares
    leave float32's range) gives the same relative error, and reconstruction_err_ is the true
    error at that scale."""
    X = gaussian(2000, 8).astype(np.float32)
    X_scaled = X * np.float32(scale)
    assert np.all(np.isfinite(X_scaled)) and np.all(X_scaled[X != 0] != 0)
    fits = [fit_quietly(QuantizedSparseDecomposition(random_state=0, max_iter=20,
                                                     **_SCALE_SETTINGS[setting]), data)
            for data in (X, X_scaled)]
    assert _relative_error(fits[0], X) < 0.8
    assert _relative_error(fits[1], X_scaled) == pytest.approx(_relative_error(fits[0], X),
                                                               rel=1e-3)
    X_hat = fits[1].inverse_transform(fits[1].transform(X_scaled)).astype(np.float64)
    true_error = np.linalg.norm((X_scaled.astype(np.float64) - X_hat) / scale) * scale
    assert fits[1].reconstruction_err_ == pytest.approx(true_error, rel=1e-4)


@pytest.mark.parametrize("exponent", [70, -100])
@pytest.mark.parametrize("setting", ["vq", "qsd", "sparse-float"])
def test_power_of_two_scaling_is_exact(setting, exponent, dtype):
    """Scaling the data by a power of two scales the codebook exactly and leaves the codes
    unchanged: the solver normalises by a power of two, so both fits compute the same thing."""
    X = gaussian(300, 6, seed=8).astype(dtype)
    X_scaled = np.ldexp(X, exponent).astype(dtype)
    fits = [fit_quietly(QuantizedSparseDecomposition(random_state=0, max_iter=10,
                                                     **SETTINGS[setting]), data)
            for data in (X, X_scaled)]
    np.testing.assert_array_equal(np.ldexp(fits[0].components_, exponent), fits[1].components_)
    np.testing.assert_array_equal(fits[0].transform(X), fits[1].transform(X_scaled))
    np.testing.assert_array_equal(np.ldexp(fits[0].objective_, 2 * exponent), fits[1].objective_)


# -- bad parameters and bad input ------------------------------------------------------------


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(n_components=0), "n_components"),
        (dict(n_components=2.5), "n_components"),
        (dict(n_nonzero=0), "n_nonzero"),
        (dict(code_bits=-1), "code_bits"),
        (dict(codebook_bits=0), "codebook_bits"),
        (dict(codebook_bits=40), "codebook_bits"),
        (dict(init="pca"), "init"),
        (dict(max_iter=-1), "max_iter"),
        (dict(tol=-1.0), "tol"),
        (dict(n_threads=0), "n_threads"),
        (dict(n_components=4, n_nonzero=5), "exceeds n_components"),
        (dict(n_components=4, component_nonzero=9), "exceeds n_features"),
        (dict(n_components=4, code_bits=0), "needs n_nonzero"),
        (dict(n_components=3, codebook_init=np.ones((2, 6))), r"codebook_init has shape"),
        (dict(n_components=3, code_init=np.ones((5, 3))), r"code_init has shape"),
        (dict(n_components=3, codebook_init=np.full((3, 6), np.nan)), "NaN"),
    ],
)
def test_bad_parameters_raise_value_error(params, match):
    with pytest.raises(ValueError, match=match):
        QuantizedSparseDecomposition(**params).fit(gaussian(50, 6))


@pytest.mark.parametrize("name", ["n_components", "n_nonzero", "code_bits", "codebook_bits",
                                  "component_nonzero", "n_init", "max_iter", "tol",
                                  "search_width", "n_threads"])
def test_a_bool_for_a_numeric_parameter_is_refused(name):
    """scikit-learn's checks take a bool for 0 or 1 (``code_bits=True`` would be one bit; it
    crashed as ``n_nonzero``)."""
    params = {**dict(n_components=4, n_nonzero=2, code_bits=1, codebook_bits=4), name: True}
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter.*not a bool"):
        QuantizedSparseDecomposition(**params).fit(gaussian(50, 6))


@pytest.mark.parametrize("name, value, error", [
    ("search_width", 0, ValueError), ("search_width", True, TypeError),
    ("search_width", "8", TypeError), ("n_threads", 0, ValueError), ("n_threads", -5, ValueError),
    ("n_threads", True, TypeError), ("n_threads", "x", TypeError),
])
def test_transform_checks_the_counts_set_after_fit(name, value, error):
    """fit's parameter validation does not see set_params after it: n_threads=0, -5 and True
    were clamped silently, "x" raised a comparison's TypeError."""
    X = gaussian(50, 6)
    est = QuantizedSparseDecomposition(n_components=4, n_nonzero=2, code_bits=1, max_iter=2,
                                       random_state=0).fit(X)
    est.set_params(**{name: value})
    with pytest.raises(error, match=f"{name} must be a positive integer"):
        est.transform(X)


@pytest.mark.parametrize(
    "X, error, match",
    [
        (np.array([[1.0, np.nan], [2.0, 3.0]]), ValueError, "NaN"),
        (np.array([[1.0, np.inf], [2.0, 3.0]]), ValueError, "infinity"),
        (np.empty((0, 3)), ValueError, "0 sample"),
        (np.empty((3, 0)), ValueError, "0 feature"),
        (np.arange(5.0), ValueError, "Expected 2D array"),
        (np.ones((3, 2), dtype=complex), ValueError, "[Cc]omplex"),
        (np.array([["a", "b"], ["c", "d"]], dtype=object), ValueError, "float|convert"),
    ],
)
def test_bad_input_raises(X, error, match):
    with pytest.raises(error, match=match):
        QuantizedSparseDecomposition(n_components=1).fit(X)


def test_wrong_width_at_transform_and_inverse_transform():
    est = QuantizedSparseDecomposition(n_components=2, random_state=0).fit(gaussian(50, 6))
    with pytest.raises(ValueError, match="features"):
        est.transform(gaussian(5, 5))
    with pytest.raises(ValueError, match="n_components"):
        est.inverse_transform(np.ones((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        est.transform(np.full((2, 6), np.nan))


def test_unfitted_transform_raises():
    with pytest.raises(NotFittedError):
        QuantizedSparseDecomposition().transform(gaussian(5, 3))
    with pytest.raises(NotFittedError):  # an AttributeError on components_ before
        QuantizedSparseDecomposition().encode(gaussian(5, 3))


def test_one_codeword_of_one_hot_codes_is_vector_quantization_with_dense_codes_too():
    """Constraints(1, code_bits=0) is one-hot (its one slot is the codebook row); the
    estimator refused it with n_nonzero=None. It fits the weighted mean, as k-means of one
    codeword."""
    X = gaussian(40, 3)
    est = QuantizedSparseDecomposition(1, code_bits=0, random_state=0).fit(X)
    np.testing.assert_allclose(est.components_[0], X.mean(axis=0), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="code_bits=0 .* needs n_nonzero"):
        QuantizedSparseDecomposition(2, code_bits=0).fit(X)
    # n_components=None (min(n, d) = 3 here): a ValueError, not a comparison of None
    with pytest.raises(ValueError, match="code_bits=0 .* needs n_nonzero"):
        QuantizedSparseDecomposition(code_bits=0).fit(X)


def test_a_metric_of_the_wrong_shape_is_named_as_given():
    """The shape in the message is the one passed, not with the block axis added inside."""
    with pytest.raises(ValueError, match=r"metric has shape \(4, 4\); expected \(8, 8\)"):
        QuantizedSparseDecomposition(n_components=2).fit(gaussian(20, 8), metric=np.eye(4))


def test_a_codebook_beyond_the_memory_is_refused_before_any_work(monkeypatch):
    """n_components=10**5 once died in the code step with NumPy's MemoryError (74.5 GiB), and
    10**8 one-hot codewords of 8 features took every byte of the machine until the system
    killed the process; the fit now says which parameter to change before it starts. One-hot
    codes form no Gram matrix: only their codebook's copies count."""
    from qsdlearn import _estimator

    X = np.random.default_rng(0).standard_normal((40, 4))
    monkeypatch.setattr(_estimator, "_physical_memory", lambda: 8 * 30 * 30)
    with pytest.raises(ValueError, match=r"n_components=31 needs a 31 x 31 float64 Gram"):
        QuantizedSparseDecomposition(n_components=31, n_nonzero=2, code_bits=2).fit(X)
    QuantizedSparseDecomposition(n_components=30, n_nonzero=2, code_bits=2, max_iter=1).fit(X)
    QuantizedSparseDecomposition(n_components=31, n_nonzero=1, code_bits=0, max_iter=1).fit(X)
    with pytest.raises(ValueError, match=r"n_components=40 codewords of 4 features need"):
        QuantizedSparseDecomposition(n_components=40, n_nonzero=1, code_bits=0).fit(X)
    monkeypatch.setattr(_estimator, "_physical_memory", lambda: None)  # the platform is silent
    QuantizedSparseDecomposition(n_components=31, n_nonzero=2, code_bits=2, max_iter=1).fit(X)
    QuantizedSparseDecomposition(n_components=40, n_nonzero=1, code_bits=0, max_iter=1).fit(X)


def test_sparse_input_is_rejected_with_a_clear_message():
    import scipy.sparse

    with pytest.raises(TypeError, match="dense"):
        QuantizedSparseDecomposition(n_components=1).fit(scipy.sparse.random(10, 4, format="csr"))
