"""Degenerate data, what a dtype can hold, hostile files and interrupted saves."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

import qsdlearn
from qsdlearn import CompressedMatrix, Constraints, QuantizedSparseDecomposition
from qsdlearn._container import TEMPORARY_PREFIX, TEMPORARY_SUFFIX
from qsdlearn.codec import MatrixSettings
from qsdlearn.metrics import sqnr

from ._data import SETTINGS, fit_quietly, gaussian

# -- all-zero data ----------------------------------------------------------------------------


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_zero_in_zero_out(setting, dtype):
    X = np.zeros((60, 6), dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = QuantizedSparseDecomposition(random_state=0, **SETTINGS[setting]).fit(X)
    assert est.reconstruction_err_ == 0.0 and est.converged_
    np.testing.assert_array_equal(est.inverse_transform(est.transform(X)), X)
    np.testing.assert_array_equal(est.encode(X).decode(), X)
    # rows that are not zero are still encoded against the zero codebook, without NaN
    assert np.all(np.isfinite(est.transform(gaussian(5, 6).astype(dtype))))


def test_an_all_zero_layer_is_reported_exact():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = qsdlearn.compress_weights({"w": np.zeros((128, 128), np.float32)},
                                          bits_per_weight=2.0, random_state=0)
    np.testing.assert_array_equal(model.decompress()["w"], 0.0)
    assert model.report()[0]["sqnr_db"] == float("inf")


def test_sqnr_of_zeros():
    assert sqnr(np.zeros(3), np.zeros(3)) == float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sqnr(np.zeros(3), np.ones(3)) == float("-inf")


# -- what a dtype can hold ----------------------------------------------------------------------


def test_codebook_bits_beyond_the_dtype_are_rejected_at_fit():
    X = gaussian(200, 8).astype(np.float32)
    for bits in (23, 24, 32):
        with pytest.raises(ValueError, match="up to codebook_bits=22"):
            QuantizedSparseDecomposition(16, n_nonzero=1, code_bits=0, codebook_bits=bits).fit(X)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype, bits", [(np.float32, 22), (np.float64, 32)])
def test_the_widest_codebook_the_dtype_holds_decodes_bit_for_bit(dtype, bits, seed):
    X = gaussian(300, 8, seed=seed).astype(dtype)
    est = fit_quietly(QuantizedSparseDecomposition(
        16, n_nonzero=1, code_bits=0, codebook_bits=bits, random_state=0, max_iter=5), X)
    np.testing.assert_array_equal(est.encode(X).decode(), est.inverse_transform(est.transform(X)))


# -- hostile files ------------------------------------------------------------------------------


def _huge_vq_file(n_rows):
    """A valid-looking file of a one-codeword VQ matrix whose settings declare ``n_rows``
    rows: its code streams are empty, so only the declared shape is large."""
    X = np.ones((4, 4), dtype=np.float32)
    est = QuantizedSparseDecomposition(1, n_nonzero=1, code_bits=0, random_state=0).fit(X)
    small = est.encode(X)
    settings = MatrixSettings(n_rows, 4, "float32", small.settings.constraints)
    return CompressedMatrix(settings, small.streams).to_bytes()


def test_a_file_declaring_a_huge_matrix_is_refused_before_allocating(tmp_path):
    data = _huge_vq_file(2**40)
    assert len(data) < 1100
    path = tmp_path / "huge.qsd"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="max_elements"):
        qsdlearn.load(path)
    with pytest.raises(ValueError, match="max_elements"):
        CompressedMatrix.from_bytes(data)
    # the caller can raise the limit for files it trusts
    small = _huge_vq_file(1000)
    assert CompressedMatrix.from_bytes(small, max_elements=4000).decode().shape == (1000, 4)
    with pytest.raises(ValueError, match="max_elements=3999"):
        CompressedMatrix.from_bytes(small, max_elements=3999)


def test_a_model_file_declaring_huge_layers_is_refused():
    model = qsdlearn.compress_weights(
        {"w": gaussian(64, 64).astype(np.float32)},
        settings=qsdlearn.LayerSetting(8, Constraints(4, n_nonzero=1, code_bits=0)),
        random_state=0, max_iter=2)
    data = model.to_bytes()
    with pytest.raises(ValueError, match="max_elements=100"):
        qsdlearn.CompressedModel.from_bytes(data, max_elements=100)
    assert qsdlearn.CompressedModel.from_bytes(data, max_elements=4096).n_weights == 4096


# -- interrupted saves --------------------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from qsdlearn._container import write_atomic
    path = sys.argv[1]
    for i in range(10**6):
        write_atomic(path, bytes([i % 251]) * (8 << 20), overwrite=True)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")
def test_a_killed_save_never_leaves_a_partial_file(tmp_path):
    """Kill a process that keeps saving 8 MiB files at random moments: the destination always
    holds a whole file, and the next save removes the dead writer's temporary file."""
    path = tmp_path / "model.qsd"
    path.write_bytes(b"\x07" * (8 << 20))
    rng = np.random.default_rng(0)
    for delay in rng.uniform(0.3, 1.5, size=4):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)])
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        data = path.read_bytes()
        assert len(data) == 8 << 20 and len(set(data)) == 1
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(TEMPORARY_PREFIX)]
    qsdlearn._container.write_atomic(path, b"new", overwrite=True)
    assert path.read_bytes() == b"new"
    remaining = [n for n in os.listdir(tmp_path) if n.startswith(TEMPORARY_PREFIX)]
    assert remaining == [] and all(n.endswith(TEMPORARY_SUFFIX) for n in leftovers)


def test_a_write_error_that_names_no_file_names_the_one_asked_for(tmp_path, capsys):
    """A full disk or a file-size limit fails a write with an OSError of no file name: the
    command line printed "[Errno 27] File too large" without saying which file. It names the
    file asked for (not the temporary one), and leaves neither of them."""
    import errno

    from qsdlearn.cli import _message

    def too_large(temporary):
        raise OSError(errno.EFBIG, "File too large")

    target = tmp_path / "out.qsd"
    with pytest.raises(OSError) as caught:
        qsdlearn._container.replace_atomically(target, too_large)
    assert caught.value.errno == errno.EFBIG and caught.value.filename == str(target)
    assert _message(caught.value) == f"{target}: File too large"
    assert os.listdir(tmp_path) == []


def test_a_running_writers_temporary_file_is_left_alone(tmp_path):
    tag = qsdlearn._container.host_tag()
    mine = tmp_path / f"{TEMPORARY_PREFIX}{os.getpid()}-{tag}-abc{TEMPORARY_SUFFIX}"
    mine.write_bytes(b"in progress")
    qsdlearn._container.write_atomic(tmp_path / "other.qsd", b"x")
    assert mine.exists()


def test_temporary_files_of_other_hosts_and_names_are_left_alone(tmp_path):
    """A folder shared between machines (or containers of separate pid namespaces) holds
    temporary files whose pid this host cannot see (a fresh user's trial: they were removed
    as stale, failing the other machine's save). Only this host's files of ended writers
    go."""
    dead = 2**22 + 12345  # above Linux's largest pid: no such process
    tag = qsdlearn._container.host_tag()
    other_tag = f"{(int(tag, 16) + 1) % 2**32:08x}"
    names = {f"{TEMPORARY_PREFIX}{dead}-{tag}-abc{TEMPORARY_SUFFIX}": False,
             f"{TEMPORARY_PREFIX}{dead}-{other_tag}-abc{TEMPORARY_SUFFIX}": True,
             f"{TEMPORARY_PREFIX}{dead}-abc{TEMPORARY_SUFFIX}": True}
    for name in names:
        (tmp_path / name).write_bytes(b"in progress")
    qsdlearn._container.write_atomic(tmp_path / "other.qsd", b"x")
    assert {name: (tmp_path / name).exists() for name in names} == names


def test_save_takes_a_bytes_path_and_refuses_a_trailing_separator(tmp_path):
    """A bytes path raised a TypeError from the removal of stale temporary files (load took
    it); a name ending with a separator raised NotADirectoryError naming the temporary file."""
    path = os.fsencode(tmp_path / "b.qsd")
    qsdlearn._container.write_atomic(path, b"x")
    assert (tmp_path / "b.qsd").read_bytes() == b"x"
    for tail in (os.sep, os.sep + os.curdir, os.sep + os.pardir):
        with pytest.raises(ValueError, match="it names a folder"):
            qsdlearn._container.write_atomic(str(tmp_path / "new.qsd") + tail, b"x")
    assert not (tmp_path / "new.qsd").exists()
    assert sorted(os.listdir(tmp_path)) == ["b.qsd"]  # no temporary file written anywhere


# -- input dtypes and file modes ----------------------------------------------------------------


@pytest.mark.parametrize("dtype, expected", [
    (np.float16, np.float32), ("bfloat16", np.float32), (">f4", np.float32),
    (np.float32, np.float32), (">f8", np.float64)])
def test_half_and_byte_swapped_input_keep_their_precision(dtype, expected):
    if dtype == "bfloat16":
        import ml_dtypes

        dtype = ml_dtypes.bfloat16
    X = gaussian(120, 4)
    est = fit_quietly(QuantizedSparseDecomposition(4, n_nonzero=1, code_bits=0, random_state=0),
                      X.astype(dtype))
    assert est.components_.dtype == expected
    assert est.transform(X.astype(dtype)).dtype == expected


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_saved_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        qsdlearn._container.write_atomic(tmp_path / "a.qsd", b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.qsd").stat().st_mode & 0o777 == 0o644


def test_save_errors_name_the_path_the_user_gave(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nodir"):
        qsdlearn._container.write_atomic(tmp_path / "nodir" / "x.qsd", b"x")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        qsdlearn._container.write_atomic(tmp_path, b"x")
    # an empty name was the folder above the working one: the file written there, then the
    # rename refused
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(ValueError, match="the file name is empty"):
        qsdlearn.save(qsdlearn.CompressedModel({}), "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_score_of_float32_data_is_finite_where_float32_squares_overflow():
    """Rows near 1e19 in float32: differences beyond 2**64 squared overflow float32 (score was
    -inf) though the mean square, about 1e37, is a float32 number."""
    X = gaussian(200, 6)
    params = dict(n_components=8, n_nonzero=2, code_bits=2, codebook_bits=8, random_state=0,
                  max_iter=5)
    unit = fit_quietly(QuantizedSparseDecomposition(**params), X.astype(np.float32))
    big = fit_quietly(QuantizedSparseDecomposition(**params), (X * 1e19).astype(np.float32))
    score = big.score((X * 1e19).astype(np.float32))
    assert np.isfinite(score) and score < 0
    assert score / 1e38 == pytest.approx(unit.score(X.astype(np.float32)), rel=1e-3)


@pytest.mark.parametrize("scale", [1e-300, 1e200, 1e300])
def test_reconstruction_error_is_exact_where_its_square_overflows(scale):
    X = gaussian(200, 6)
    params = dict(n_components=8, n_nonzero=2, code_bits=2, codebook_bits=8, random_state=0,
                  max_iter=5)
    unit = fit_quietly(QuantizedSparseDecomposition(**params), X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        scaled = fit_quietly(QuantizedSparseDecomposition(**params), X * scale)
        X_hat = scaled.inverse_transform(scaled.transform(X * scale))
    assert scaled.reconstruction_err_ / scale == pytest.approx(unit.reconstruction_err_, rel=1e-9)
    assert np.all(np.isfinite(X_hat))
    np.testing.assert_allclose(X_hat / scale, unit.inverse_transform(unit.transform(X)),
                               rtol=1e-9, atol=1e-12)


def test_an_error_norm_beyond_float64_is_inf_not_an_overflow_error():
    """The Frobenius norm of the error of many rows of 5e305 passes float64's range (a fresh
    user's trial, on data of 1e308: OverflowError from math.ldexp); it is inf, as the
    objective is, and the factors are finite."""
    X = np.sign(gaussian(50000, 8)) * 5e305
    est = fit_quietly(QuantizedSparseDecomposition(n_components=4, random_state=0), X)
    assert est.reconstruction_err_ == np.inf
    assert np.all(np.isfinite(est.components_))


@pytest.mark.parametrize("dtype, magnitude", [(np.float32, 2e38), (np.float64, 1e308)])
def test_data_within_a_factor_256_of_the_largest_value_is_refused(dtype, magnitude):
    """Its reconstruction passed the range (a fresh user's trial: float32 data of 2e38 fitted,
    and reconstructed to inf, so that score was -inf and encode(X).decode() refused its own
    factors as damaged). Refused by fit, and by transform of a fitted estimator; data 2**9
    below the largest value fit and reconstruct finite."""
    sign = np.sign(gaussian(50, 8))
    with pytest.raises(ValueError, match=r"within a factor 2\*\*8 of the largest"):
        QuantizedSparseDecomposition(4, random_state=0).fit((sign * magnitude).astype(dtype))
    fine = (sign * np.ldexp(float(np.finfo(dtype).max), -9)).astype(dtype)
    est = fit_quietly(QuantizedSparseDecomposition(4, random_state=0), fine)
    assert np.all(np.isfinite(est.inverse_transform(est.transform(fine))))
    with pytest.raises(ValueError, match=r"within a factor 2\*\*8 of the largest"):
        est.transform((sign * magnitude).astype(dtype))


def test_encode_refuses_rows_beyond_the_range_of_the_dtype_fitted():
    """An estimator fitted on float32 encodes in float32: float64 rows beyond its range
    became inf after the check for finite values and crashed the code search (a fresh
    user's trial: a segmentation fault in most runs). Refused, naming the dtype."""
    X = gaussian(300, 8).astype(np.float32)
    est = fit_quietly(QuantizedSparseDecomposition(16, n_nonzero=2, code_bits=2,
                                                   codebook_bits=8, random_state=0,
                                                   max_iter=5), X)
    with pytest.raises(ValueError, match=r"magnitude of inf, within a factor 2\*\*8"):
        est.encode(X.astype(np.float64) * 1e39)
    assert est.encode(X.astype(np.float64) * 1e30).decode().dtype == np.float32


@pytest.mark.parametrize("setting", [dict(n_nonzero=2), dict(n_nonzero=2, code_bits=2),
                                     dict(n_nonzero=None, component_nonzero=3)])
@pytest.mark.parametrize("norm", [1e-155, 1e-160])
def test_a_start_codeword_of_subnormal_squared_norm_acts_as_an_empty_one(setting, norm):
    """A codebook start with a row so small that its squared norm is subnormal fits as if
    that row were zero: the code search would divide by that squared norm (sparse float codes
    gave an all-NaN codebook, sparse components an error from SciPy's pseudo-inverse)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 8))
    k = 4 if "component_nonzero" in setting else 16
    C = rng.standard_normal((k, 8))
    scores = []
    for value in (norm, 0.0):
        C[3] = value
        est = fit_quietly(QuantizedSparseDecomposition(n_components=k, codebook_init=C,
                                                       random_state=0, max_iter=10, **setting), X)
        assert np.all(np.isfinite(est.components_)) and np.isfinite(est.reconstruction_err_)
        scores.append(est.score(X))
    assert scores[0] == pytest.approx(scores[1], rel=1e-9)
    assert scores[0] > -0.6  # fitted, not left at zero (score -1)
