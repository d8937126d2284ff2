"""The layer-wise adapter: reshape rules, rate targets, files, parallel and distributed runs."""

import warnings

import numpy as np
import pytest

import qsdlearn
from qsdlearn import CompressedModel, Constraints, LayerSetting, compress_weights
from qsdlearn._demo import train_digits_mlp
from qsdlearn.weights import MIN_COMPRESSED_SIZE, KeptTensor, from_rows, read_weights, to_rows

FAST = LayerSetting(8, Constraints(16, n_nonzero=1, code_bits=0, codebook_bits=8))
# A short candidate list keeps the rate tests fast; the digits test uses the default one.
QUICK = [
    FAST,
    LayerSetting(8, Constraints(64, 2, 2, 8)),
    LayerSetting(8, Constraints(8, None, 3, 8)),
    LayerSetting(8, Constraints(8, None, 5, 8)),
]


def small_model(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.normal(size=(512, 64)).astype(np.float32),
        "conv.weight": rng.normal(size=(32, 6, 3, 3)).astype(np.float32),  # 54 per row: padded
        "conv.bias": rng.normal(size=32).astype(np.float32),
        "head.weight": rng.normal(size=(64, 128)).astype(np.float16),
        "tiny.weight": rng.normal(size=(4, 4)).astype(np.float64),
        "step": np.array(7, dtype=np.int64),
    }


@pytest.fixture(scope="module")
def mlp():
    model, X_test, y_test = train_digits_mlp(random_state=0)
    return model, X_test, y_test


# -- reshape rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, d", [((6, 16), 8), ((5, 7), 4), ((4, 3, 3, 3), 8), ((2, 9), 1)])
def test_rows_round_trip(shape, d):
    weight = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1
    rows = to_rows(weight, d)
    assert rows.shape[1] == d
    width = int(np.prod(shape[1:]))
    assert rows.shape[0] == shape[0] * -(-width // d)
    np.testing.assert_array_equal(from_rows(rows, shape), weight)
    # padding is zeros at the end of every output row
    padded = rows.reshape(shape[0], -1)
    np.testing.assert_array_equal(padded[:, width:], 0)
    np.testing.assert_array_equal(padded[:, :width], weight.reshape(shape[0], -1))


# -- end to end on a real network -------------------------------------------------------------------


def _accuracy_with(model, X_test, y_test, arrays):
    original = [c.copy() for c in model.coefs_]
    try:
        for i in range(len(original)):
            model.coefs_[i] = arrays[f"coefs_{i}"].T.astype(original[i].dtype)
        return model.score(X_test, y_test)
    finally:
        model.coefs_ = original


@pytest.mark.slow
@pytest.mark.parametrize("bits, floor", [(4.0, 0.01), (2.0, 0.03)])
def test_digits_mlp_keeps_its_accuracy(mlp, bits, floor):
    """Test accuracy of the digits MLP with its compressed weights put back. The floors are
    the accuracy points the network may lose: measured losses are 0 points at 4 and about
    1 point at 2 bits per weight (benchmarks/README.md), so each floor leaves a margin for
    platform differences and fails on a real regression."""
    model, X_test, y_test = mlp
    weights = {f"coefs_{i}": c.T.astype(np.float32) for i, c in enumerate(model.coefs_)}
    compressed = compress_weights(weights, bits_per_weight=bits, random_state=0, max_iter=30)
    assert compressed.bits_per_weight <= bits
    original = model.score(X_test, y_test)
    accuracy = _accuracy_with(model, X_test, y_test, compressed.decompress())
    assert accuracy >= original - floor


# -- rate targets, names, shapes, dtypes, files -----------------------------------------------------


@pytest.mark.parametrize("bits", [2.5, 3.5, 6.0])
def test_whole_model_meets_the_target(bits):
    weights = small_model()
    compressed = compress_weights(
        weights, bits_per_weight=bits, candidates=QUICK, random_state=0, max_iter=5
    )
    assert compressed.bits_per_weight <= bits
    assert compressed.bits_per_weight == 8 * len(compressed.to_bytes()) / compressed.n_weights


def test_unreachable_target_is_reported():
    with pytest.raises(ValueError, match="below what the candidates can reach"):
        compress_weights(small_model(), bits_per_weight=0.5, candidates=QUICK, random_state=0)


def test_decompress_restores_names_shapes_and_dtypes(tmp_path):
    weights = small_model()
    compressed = compress_weights(weights, settings=FAST, random_state=0, max_iter=5)
    arrays = compressed.decompress()
    assert list(arrays) == list(weights)
    for name, array in weights.items():
        assert arrays[name].shape == array.shape and arrays[name].dtype == array.dtype, name
    # kept verbatim: 1-D, integer and tiny tensors
    for name in ["conv.bias", "step", "tiny.weight"]:
        assert isinstance(compressed.layers[name], KeptTensor)
        np.testing.assert_array_equal(arrays[name], weights[name])
    assert weights["tiny.weight"].size < MIN_COMPRESSED_SIZE
    path = tmp_path / "model.qsd"
    compressed.save(path)
    loaded = qsdlearn.load(path)
    assert isinstance(loaded, CompressedModel)
    for name, array in loaded.decompress().items():
        np.testing.assert_array_equal(array, arrays[name])
        assert array.dtype == arrays[name].dtype
    assert loaded.to_bytes() == compressed.to_bytes()


def test_report_has_a_record_per_tensor():
    compressed = compress_weights(small_model(), settings=FAST, random_state=0, max_iter=5)
    records = compressed.report()
    assert [r["name"] for r in records] == list(small_model())
    embed = records[0]
    assert embed["shape"] == (512, 64) and "k=16" in embed["setting"]
    assert embed["stored_bits"] == 8 * compressed.layers["embed.weight"].matrix.nbytes
    assert embed["payload_bits"] == compressed.layers["embed.weight"].matrix.bits
    assert np.isfinite(embed["sqnr_db"])
    assert embed["n_iter"] <= 5 and embed["converged"] in (True, False)
    kept = next(r for r in records if r["name"] == "conv.bias")
    assert kept["n_iter"] is None and kept["converged"] is None  # a kept tensor has no fit
    table = compressed.report_table()
    assert "embed.weight" in table and "bits/weight" in table and "total" in table


def test_unconverged_layers_are_reported_not_warned():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ConvergenceWarning escaping would fail here
        compressed = compress_weights(small_model(), settings=FAST, random_state=0, max_iter=1)
    embed = compressed.report()[0]
    assert embed["converged"] is False and embed["n_iter"] == 1
    assert "not converged in 1" in compressed.report_table()


def test_per_layer_settings(tmp_path):
    weights = small_model()
    other = LayerSetting(4, Constraints(8, n_nonzero=2, code_bits=1, codebook_bits=4))
    compressed = compress_weights(
        weights, settings={"embed.weight": other}, bits_per_weight=8.0, candidates=QUICK,
        random_state=0, max_iter=5,
    )
    assert compressed.layers["embed.weight"].setting == other
    with pytest.raises(ValueError, match="not compressible"):
        compress_weights(weights, settings={"conv.bias": other})


def test_files_and_bad_sources(tmp_path):
    weights = small_model()
    npz = tmp_path / "w.npz"
    np.savez(npz, **weights)
    from_npz = compress_weights(str(npz), settings=FAST, random_state=0, max_iter=5)
    from_dict = compress_weights(weights, settings=FAST, random_state=0, max_iter=5)
    assert from_npz.to_bytes() == from_dict.to_bytes()
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    st = tmp_path / "w.safetensors"
    safetensors_numpy.save_file(weights, str(st))
    from_st = compress_weights(st, settings=FAST, random_state=0, max_iter=5).decompress()
    expected = from_dict.decompress()
    assert set(from_st) == set(expected)  # the safetensors file orders tensors by name
    for name, array in expected.items():
        np.testing.assert_array_equal(from_st[name], array)
    with pytest.raises(ValueError, match="no such file"):
        read_weights(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=".npz or .safetensors"):
        read_weights(__file__)
    with pytest.raises(ValueError, match="NaN"):
        read_weights({"w": np.full((4, 4), np.nan)})
    with pytest.raises(TypeError, match="mapping"):
        read_weights([np.ones(3)])
    with pytest.raises(ValueError, match="bits_per_weight"):
        compress_weights(weights, bits_per_weight=-1)


def test_damaged_model_files_are_rejected(tmp_path):
    compressed = compress_weights(small_model(), settings=FAST, random_state=0, max_iter=5)
    data = compressed.to_bytes()
    for position in range(0, len(data), 97):
        damaged = bytearray(data)
        damaged[position] ^= 0x41
        try:
            restored = CompressedModel.from_bytes(bytes(damaged)).decompress()
        except ValueError:
            continue
        for name, array in compressed.decompress().items():
            np.testing.assert_array_equal(restored[name], array)
    with pytest.raises(ValueError):
        CompressedModel.from_bytes(data[:-5])


# -- parallel and distributed ---------------------------------------------------------------------


@pytest.mark.slow
def test_serial_joblib_and_dask_give_identical_models():
    weights = small_model()
    serial = compress_weights(weights, settings=FAST, random_state=3, max_iter=5, n_jobs=1)
    processes = compress_weights(weights, settings=FAST, random_state=3, max_iter=5, n_jobs=2)
    assert processes.to_bytes() == serial.to_bytes()

    distributed = pytest.importorskip("distributed")
    import joblib

    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster, distributed.Client(cluster):
        with joblib.parallel_config(backend="dask"):
            on_dask = compress_weights(weights, settings=FAST, random_state=3, max_iter=5, n_jobs=2)
    assert on_dask.to_bytes() == serial.to_bytes()
