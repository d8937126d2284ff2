"""Fuzzing: random mutations of real files against the reader, random problems against the
estimator. A short run in the default suite; thousands of cases under the ``slow`` marker."""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qsdlearn
from qsdlearn import CompressedMatrix, CompressedModel, Constraints, QuantizedSparseDecomposition

from ._data import SETTINGS, factorization_problems, gaussian


def _real_files():
    """File images of one matrix per main setting (both dtypes) and of a small model."""
    images = []
    for dtype in (np.float32, np.float64):
        X = gaussian(40, 6, seed=3).astype(dtype)
        for params in SETTINGS.values():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est = QuantizedSparseDecomposition(random_state=0, max_iter=3, **params).fit(X)
            images.append(est.encode(X).to_bytes())
    weights = {"a.weight": gaussian(32, 40).astype(np.float32), "a.bias": np.arange(32.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qsdlearn.compress_weights(
            weights, settings=qsdlearn.LayerSetting(8, Constraints(8, 2, 2, 4)), max_iter=2,
            random_state=0)
    images.append(model.to_bytes())
    images.append(_model_with_every_entry().to_bytes())
    return images


def _model_with_every_entry():
    """A model file with a compressed layer with row scales, a split one, a kept and a tied
    tensor."""
    from qsdlearn.weights import CompressedLayer, SplitLayer, output_row_scales

    weight = gaussian(64, 40, seed=4).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = [qsdlearn.compress_weights(
            {"w": block}, settings=qsdlearn.LayerSetting(4, Constraints(4, 1, 0, 4)),
            max_iter=2, random_state=0).layers["w"] for block in (weight[:32], weight[32:])]
    scaled = qsdlearn.LayerSetting(4, Constraints(4, 1, 0, 4), row_scales=True)
    first = parts[0]
    scaled_layer = CompressedLayer(first.matrix, first.shape, "bfloat16", scaled, first.sqnr_db,
                                   row_scales=output_row_scales(weight[:32]))
    split = SplitLayer([scaled_layer, parts[1]], weight.shape, "bfloat16", 1.0)
    layers = {"scaled": scaled_layer, "split": split,
              "kept": qsdlearn.weights.KeptTensor(np.arange(5, dtype=np.int16))}
    layers["tied"] = layers["scaled"]
    return CompressedModel(layers)


FILES = _real_files()


@st.composite
def mutations(draw):
    """A real file with a few random edits: byte changes, a cut, an insertion or a deletion."""
    data = bytearray(draw(st.sampled_from(FILES)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "xor", "truncate", "insert", "delete"]))
        position = draw(st.integers(0, len(data) - 1))
        if kind == "set":
            data[position] = draw(st.integers(0, 255))
        elif kind == "xor":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[position:position + draw(st.integers(1, 16))]
        if not data:
            break
    return bytes(data)


def check_mutated_file(data):
    """The reader either refuses the file with a ValueError or returns an object that
    decodes to finite arrays of the declared shapes."""
    for reader in (CompressedMatrix.from_bytes, CompressedModel.from_bytes):
        try:
            obj = reader(data, max_elements=10**6)
        except ValueError:
            continue
        if isinstance(obj, CompressedMatrix):
            decoded = obj.decode()
            assert decoded.shape == obj.shape and np.all(np.isfinite(decoded))
        else:
            for name, array in obj.decompress().items():
                assert array.shape == obj.layers[name].shape
                if array.dtype.kind == "f":
                    assert np.all(np.isfinite(array)), name


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_mutated_files(data):
    check_mutated_file(data)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_mutated_files_many(data):
    check_mutated_file(data)


@st.composite
def problems(draw):
    """Random estimator problems (see :func:`factorization_problems`) at magnitudes from
    1e-30 to 1e30."""
    n, d, params, dtype, seed = draw(factorization_problems(60, 9, 12))
    return n, d, params, dtype, draw(st.integers(-30, 30)), seed


def check_problem(problem):
    """A fit gives a finite factorization whose bits and files are consistent, or a
    ValueError (for settings the data cannot take, e.g. more components than rows allow)."""
    n, d, params, dtype, exponent, seed = problem
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, d)) * 10.0**exponent).astype(dtype)
    est = QuantizedSparseDecomposition(random_state=seed, max_iter=5, **params)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            codes = est.fit_transform(X)
    except ValueError:
        return
    X_hat = est.inverse_transform(codes)
    assert X_hat.shape == X.shape and np.all(np.isfinite(X_hat))
    assert np.all(np.isfinite(est.objective_)) and np.isfinite(est.reconstruction_err_)
    compressed = est.encode(X)
    assert compressed.bits == est.bits_
    np.testing.assert_array_equal(compressed.decode(), est.inverse_transform(est.transform(X)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_problems(problem):
    check_problem(problem)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_problems_many(problem):
    check_problem(problem)
