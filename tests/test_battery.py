"""The bad-input battery: every kind of input at every entry point of the estimator and the
file reader gives a correct result or a ValueError/TypeError saying what to fix — never a
crash, a hang, NaN in the output or a silent wrong result."""

import numpy as np
import pytest
import scipy.sparse

import qsdlearn
from qsdlearn import QuantizedSparseDecomposition

from ._data import SETTINGS, fit_quietly, gaussian

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

G = gaussian(40, 6, seed=1)

#: name -> (input, what must happen: "ok" or the exception type)
INPUTS = {
    "nan": (np.where(np.eye(40, 6) > 0, np.nan, G), ValueError),
    "inf": (np.where(np.eye(40, 6) > 0, np.inf, G), ValueError),
    "-inf": (np.where(np.eye(40, 6) > 0, -np.inf, G), ValueError),
    "no rows": (np.empty((0, 6)), ValueError),
    "no columns": (np.empty((40, 0)), ValueError),
    "1-D": (G[:, 0], ValueError),
    "3-D": (G.reshape(40, 2, 3), ValueError),
    "complex": (G.astype(complex), ValueError),
    "object": (G.astype(object), "ok"),
    "strings": (np.full((40, 6), "a"), ValueError),
    "booleans": (G > 0, "ok"),
    "integers": ((G * 10).astype(np.int64), "ok"),
    "float16": (G.astype(np.float16), "ok"),
    "big-endian float32": (G.astype(">f4"), "ok"),
    "smallest subnormal": (np.full((40, 6), np.finfo(np.float64).smallest_subnormal) * np.sign(G),
                           "ok"),
    "tiny float32": ((G * 1e-30).astype(np.float32), "ok"),
    "large float32": ((G * 1e30).astype(np.float32), "ok"),
    "all zero": (np.zeros((40, 6)), "ok"),
    "constant": (np.full((40, 6), 3.5), "ok"),
    "rank one": (np.outer(G[:, 0], G[0]), "ok"),
    "duplicate rows": (np.repeat(G[:5], 8, axis=0), "ok"),
    "one row": (G[:1], "ok"),
    "Fortran order": (np.asfortranarray(G), "ok"),
    "non-contiguous": (gaussian(80, 12, seed=2)[::2, ::2], "ok"),
    "read-only": (np.array(G, copy=True), "ok"),
    "memory-mapped": (None, "ok"),
    "scipy sparse": (scipy.sparse.csr_matrix(G), TypeError),
    "list of lists": (G.tolist(), "ok"),
}
INPUTS["read-only"][0].setflags(write=False)


@pytest.fixture
def data(request, tmp_path):
    name = request.param
    X, expected = INPUTS[name]
    if name == "memory-mapped":
        np.save(tmp_path / "x.npy", G)
        X = np.load(tmp_path / "x.npy", mmap_mode="r")
    return name, X, expected


def _as_float(X):
    return np.asarray(X.toarray() if scipy.sparse.issparse(X) else X, dtype=np.float64)


@pytest.mark.parametrize("setting", ["svd", "vq", "qsd"])
@pytest.mark.parametrize("data", sorted(INPUTS), indirect=True)
def test_fit_transform_encode(data, setting):
    name, X, expected = data
    params = dict(SETTINGS[setting])
    if name == "one row" and setting != "vq":
        params["n_components"] = 1
        params.pop("n_nonzero", None)
    est = QuantizedSparseDecomposition(random_state=0, max_iter=5, **params)
    if expected != "ok":
        with pytest.raises(expected):
            est.fit(X)
        return
    est = fit_quietly(est, X)
    codes = est.transform(X)
    X_hat = est.inverse_transform(codes)
    assert np.all(np.isfinite(codes)) and np.all(np.isfinite(X_hat)), name
    assert X_hat.shape == np.shape(X)
    reference = _as_float(X)
    error = np.sum((reference - X_hat.astype(np.float64)) ** 2)
    assert error <= np.sum(reference**2) * (1 + 1e-6) + 1e-300, name  # never worse than zero
    np.testing.assert_array_equal(est.encode(X).decode(), X_hat)


@pytest.mark.parametrize("data", sorted(INPUTS), indirect=True)
def test_transform_and_inverse_transform_of_a_fitted_estimator(data):
    name, X, expected = data
    fitted = fit_quietly(QuantizedSparseDecomposition(random_state=0, **SETTINGS["qsd"]), G)
    if expected != "ok" or np.shape(X)[-1:] != (6,) or np.ndim(X) != 2:
        with pytest.raises((ValueError, TypeError)):
            fitted.transform(X)
        return
    codes = fitted.transform(X)
    assert np.all(np.isfinite(fitted.inverse_transform(codes)))


@pytest.mark.parametrize("codes, error", [
    (np.ones((3, 5)), ValueError), (np.ones(16), ValueError), (np.full((3, 16), np.nan), ValueError),
    (np.ones((3, 16), dtype=complex), ValueError), (scipy.sparse.csr_matrix(np.ones((3, 16))), TypeError),
])
def test_inverse_transform_rejects_bad_codes(codes, error):
    fitted = fit_quietly(QuantizedSparseDecomposition(random_state=0, **SETTINGS["qsd"]), G)
    with pytest.raises(error):
        fitted.inverse_transform(codes)


@pytest.mark.parametrize("content", [
    b"", b"\x00" * 7, b"\xff" * 8, b"not a file at all", b"PK\x03\x04" + b"\x00" * 100,
    b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14,
])
def test_load_rejects_files_that_are_not_qsdlearn_files(tmp_path, content):
    path = tmp_path / "x.qsd"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        qsdlearn.load(path)


def test_load_of_missing_paths_and_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        qsdlearn.load(tmp_path / "missing.qsd")
    with pytest.raises(IsADirectoryError):
        qsdlearn.load(tmp_path)
