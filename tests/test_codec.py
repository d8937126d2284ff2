"""The codec: exact sizes, bit-exact round trips, the file format and damaged files."""

import json
import os
import struct
import warnings
import zlib
from math import comb

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import qsdlearn
from qsdlearn import QuantizedSparseDecomposition
from qsdlearn._bits import pack_fields, support_bits, unpack_fields
from qsdlearn._container import _metadata_checksum
from qsdlearn.codec import HEADER_BYTES, STREAMS, CompressedMatrix

from ._data import SETTINGS, factorization_problems, gaussian

from_bytes = CompressedMatrix.from_bytes


def to_bytes(compressed):
    return compressed.to_bytes()


def fitted(setting, dtype=np.float64, n=120, d=6, seed=0):
    X = gaussian(n, d, seed=seed).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = QuantizedSparseDecomposition(random_state=0, max_iter=15, **SETTINGS[setting]).fit(X)
    return est, X


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_round_trip_is_bit_exact(setting, dtype, tmp_path):
    est, X = fitted(setting, dtype)
    compressed = est.encode(X)
    reference = est.inverse_transform(est.transform(X))
    decoded = compressed.decode()
    assert decoded.dtype == dtype and decoded.shape == X.shape
    np.testing.assert_array_equal(decoded, reference)
    path = tmp_path / "matrix.bin"
    qsdlearn.save(compressed, path)
    loaded = qsdlearn.load(path)
    assert isinstance(loaded, CompressedMatrix)
    np.testing.assert_array_equal(loaded.decode(), reference)
    assert loaded.streams == compressed.streams


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_payload_has_exactly_the_counted_bits(setting, dtype, tmp_path):
    est, X = fitted(setting, dtype)
    compressed = est.encode(X)
    assert compressed.bits == est.bits_
    assert compressed.bits_per_element == est.bits_per_element_
    counted = est.bit_budget_.stream_bits()
    assert sorted(counted) == sorted(STREAMS)
    for name in STREAMS:
        assert len(compressed.streams[name]) == (counted[name] + 7) // 8, name
    qsdlearn.save(compressed, tmp_path / "m")
    assert os.path.getsize(tmp_path / "m") == 8 + HEADER_BYTES + compressed.nbytes


def test_vq_and_dense_codes_are_idempotent():
    est, X = fitted("vq")
    first = est.encode(X)
    again = est.encode(first.decode())
    assert again.streams == first.streams
    est, X = fitted("svd")
    once = est.encode(X).decode()
    twice = est.encode(once).decode()
    np.testing.assert_allclose(twice, once, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(est.transform(once), est.transform(X), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("setting", sorted(set(SETTINGS) - {"vq", "svd"}))
def test_reencoding_never_increases_the_error(setting):
    est, X = fitted(setting)
    once = est.encode(X).decode()
    twice = est.encode(once).decode()
    assert np.sum((once - twice) ** 2) <= np.sum((X - once) ** 2)


def test_repr_and_shape():
    est, X = fitted("qsd")
    compressed = est.encode(X[:10])
    assert compressed.shape == (10, 6)
    assert "CompressedMatrix" in repr(compressed) and "bits_per_element" in repr(compressed)


def check_round_trip_and_size(problem):
    n, d, params, dtype, seed = problem
    X = np.random.default_rng(seed).normal(size=(n, d)).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = QuantizedSparseDecomposition(random_state=seed, max_iter=3, **params).fit(X)
    compressed = est.encode(X)
    np.testing.assert_array_equal(compressed.decode(), est.inverse_transform(est.transform(X)))
    assert compressed.bits == est.bits_
    loaded = from_bytes(to_bytes(compressed))
    np.testing.assert_array_equal(loaded.decode(), compressed.decode())
    assert len(to_bytes(compressed)) == 8 + HEADER_BYTES + compressed.nbytes


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(factorization_problems())
def test_round_trip_and_size_property(problem):
    check_round_trip_and_size(problem)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(factorization_problems())
def test_round_trip_and_size_property_many_examples(problem):
    check_round_trip_and_size(problem)


# -- bit packing --------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 2, 3, 7, 8, 9, 15, 31, 33, 63, 64])
def test_pack_unpack_round_trip(width):
    rng = np.random.default_rng(width)
    values = rng.integers(0, 2 ** min(width, 62), size=5003, dtype=np.uint64)
    if width == 64:
        values |= np.uint64(1) << np.uint64(63)
    stream = pack_fields(values, width)
    assert len(stream) == (5003 * width + 7) // 8
    np.testing.assert_array_equal(unpack_fields(stream, width, 5003), values)


def test_pack_matches_a_plain_bit_string():
    values = [5, 0, 7, 3, 1]
    bits = "".join(format(v, "03b") for v in values)
    bits += "0" * (-len(bits) % 8)
    expected = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
    assert pack_fields(np.array(values), 3) == expected


def test_pack_rejects_values_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        pack_fields(np.array([8]), 3)
    with pytest.raises(ValueError, match="expected"):
        unpack_fields(b"\x00", 3, 5)


# -- damaged files ------------------------------------------------------------------------------


def _image(setting="qsd"):
    est, X = fitted(setting)
    return to_bytes(est.encode(X))


def _rewrite(data, edit_header=None, edit_streams=None, fix_checksums=True):
    """Re-serialize a file image after editing its header and/or streams."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    buffer = data[8 + length :]
    streams = {
        name: bytearray(buffer[header[name]["data_offsets"][0] : header[name]["data_offsets"][1]])
        for name in STREAMS
    }
    if edit_streams:
        edit_streams(streams, header)
    offset = 0
    for name in STREAMS:
        header[name]["data_offsets"] = [offset, offset + len(streams[name])]
        header[name]["shape"] = [len(streams[name])]
        offset += len(streams[name])
    if fix_checksums:
        header["__metadata__"]["checksums"] = json.dumps(
            {name: f"{zlib.crc32(bytes(streams[name])):08x}" for name in STREAMS}
        )
    if edit_header:
        edit_header(header)
    if fix_checksums:  # a crafted file: the deeper checks must catch it, not the checksum
        meta = header["__metadata__"]
        meta["metadata_checksum"] = _metadata_checksum(
            {k: v for k, v in meta.items() if k not in ("checksums", "metadata_checksum")})
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(bytes(streams[n]) for n in STREAMS)


def _settings_edit(**changes):
    def edit(header):
        meta = header["__metadata__"]
        settings_ = json.loads(meta["settings"])
        settings_.update(changes)
        meta["settings"] = json.dumps(settings_)

    return edit


def test_truncated_files_are_rejected():
    data = _image()
    for size in [0, 3, 8, 100, 8 + HEADER_BYTES, len(data) - 1]:
        with pytest.raises(ValueError, match="short|truncated|damaged|not a qsdlearn"):
            from_bytes(data[:size])


def test_every_flipped_byte_is_rejected_or_harmless():
    """Flip each byte of a small file in turn: the reader must reject it with ValueError or
    (for a flip inside JSON whitespace padding) read the same matrix."""
    est, X = fitted("qsd", n=12)
    data = to_bytes(est.encode(X))
    reference = from_bytes(data).decode()
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x41
        try:
            decoded = from_bytes(bytes(damaged)).decode()
        except ValueError:
            continue
        np.testing.assert_array_equal(decoded, reference)


def test_checksum_mismatch_names_the_stream():
    data = bytearray(_image())
    data[-1] ^= 0xFF
    with pytest.raises(ValueError, match="checksum mismatch in stream codebook_scales"):
        from_bytes(bytes(data))


def test_unknown_version_and_foreign_files_are_rejected(tmp_path):
    data = _image()
    newer = _rewrite(data, lambda h: h["__metadata__"].update(format_version="99"))
    with pytest.raises(ValueError, match="unsupported qsdlearn format version"):
        from_bytes(newer)
    foreign = _rewrite(data, lambda h: h["__metadata__"].update(format="other"))
    with pytest.raises(ValueError, match="not a qsdlearn file"):
        from_bytes(foreign)
    with pytest.raises(ValueError, match="not a qsdlearn file"):
        from_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    path = tmp_path / "weights.npz"
    np.savez(path, a=np.ones(3))
    with pytest.raises(ValueError, match="not a qsdlearn file"):
        qsdlearn.load(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX devices and FIFOs")
def test_load_refuses_devices_pipes_and_foreign_files_before_reading_them(tmp_path,
                                                                          monkeypatch):
    """/dev/zero once ended in MemoryError and a FIFO in a hang; a large foreign file was read
    whole before its header was refused."""
    with pytest.raises(ValueError, match="not a regular file"):
        qsdlearn.load("/dev/zero")
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match="not a regular file"):
        qsdlearn.load(tmp_path / "pipe")
    header = b'{"a": {"dtype": "F32", "shape": [262144], "data_offsets": [0, 1048576]}}'
    foreign = tmp_path / "plain.safetensors"
    foreign.write_bytes(struct.pack("<Q", len(header)) + header + bytes(1 << 20))
    reads = []
    real_open = open

    def spy(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        original = file.read
        file.read = lambda n=-1: reads.append(n) or original(n)
        return file

    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(ValueError, match="not a qsdlearn file: the header has no metadata"):
        qsdlearn.load(foreign)
    assert -1 not in reads and sum(reads) < 1000, reads  # the header alone was read


def test_a_npz_file_of_weights_is_named_as_such(tmp_path):
    """``qsdlearn info weights.npz`` said "header length 193340853072 exceeds the cap"."""
    np.savez(tmp_path / "w.npz", w=np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"a zip archive \(a \.npz file of weights\?\); compress it"):
        qsdlearn.load(tmp_path / "w.npz")


def test_declared_sizes_larger_than_the_file_are_rejected():
    data = _image()
    huge_header = struct.pack("<Q", 2**40) + data[8:]
    with pytest.raises(ValueError, match="exceeds the cap"):
        from_bytes(huge_header)
    long_header = struct.pack("<Q", len(data)) + data[8:]
    with pytest.raises(ValueError, match="longer than the file"):
        from_bytes(long_header)
    (length,) = struct.unpack("<Q", data[:8])
    with pytest.raises(ValueError, match="truncated|ends at byte"):
        from_bytes(data[: 8 + length + 3])


def test_shapes_that_do_not_match_the_streams_are_rejected():
    data = _image()
    for change in [dict(n_rows=121), dict(n_components=17), dict(n_features=7), dict(code_bits=3)]:
        with pytest.raises(ValueError, match="settings imply"):
            from_bytes(_rewrite(data, _settings_edit(**change)))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(n_nonzero=99), "n_nonzero"),
        (dict(code_bits=-1), "code_bits"),
        (dict(codebook_bits=64), "codebook_bits"),
        (dict(dtype="object"), "dtype"),
        (dict(n_rows="12"), "n_rows"),
        (dict(n_rows=True), "n_rows"),
        (dict(extra=1), "expected fields"),
    ],
)
def test_invalid_settings_are_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        from_bytes(_rewrite(_image(), _settings_edit(**change)))


def test_overlapping_or_gapped_streams_are_rejected():
    data = _image()

    def overlap(header):
        header["code_values"]["data_offsets"][0] -= 1

    with pytest.raises(ValueError, match="contiguous|settings imply|invalid offsets"):
        from_bytes(_rewrite(data, overlap))

    def negative(header):
        header["code_support"]["data_offsets"] = [-1, 5]

    with pytest.raises(ValueError, match="invalid offsets"):
        from_bytes(_rewrite(data, negative))

    with pytest.raises(ValueError, match="after the last stream"):
        from_bytes(data + b"\x00")


def test_support_rank_out_of_range_is_rejected():
    """A rank >= comb(k, s) would make the decoder index past the codebook: rejected first."""
    data = _image()  # qsd: k=16, s=2 -> ranks of support_bits(16, 2) = 7 bits, comb = 120

    def bad_rank(streams, header):
        width = support_bits(16, 2)
        ranks = unpack_fields(bytes(streams["code_support"]), width, 120)
        ranks[5] = comb(16, 2)  # one past the last valid rank
        streams["code_support"] = bytearray(pack_fields(ranks, width))

    with pytest.raises(ValueError, match="support rank is out of range"):
        from_bytes(_rewrite(data, edit_streams=bad_rank))


def test_fixed_width_position_out_of_range_is_rejected():
    """Beyond 64-bit ranks positions are stored as fields; one >= k is rejected."""
    X = gaussian(40, 40, seed=1)
    est = QuantizedSparseDecomposition(n_components=40, n_nonzero=30, code_bits=1, max_iter=2,
                                       random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X)
    assert comb(40, 30) <= 2**64  # still a rank here: use a sparse codebook beyond the limit
    X = gaussian(30, 80, seed=2)
    est = QuantizedSparseDecomposition(n_components=2, component_nonzero=40, max_iter=2,
                                       random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X)
    assert comb(80, 40) > 2**64
    data = to_bytes(est.encode(X))

    def bad_position(streams, header):
        width = support_bits(80, 40) // 40
        positions = unpack_fields(bytes(streams["codebook_support"]), width, 80)
        positions[39] = 127  # >= n_features = 80
        streams["codebook_support"] = bytearray(pack_fields(positions, width))

    with pytest.raises(ValueError, match="position is out of range"):
        from_bytes(_rewrite(data, edit_streams=bad_position))


def test_non_finite_floats_are_rejected():
    data = _image()

    def nan_scale(streams, header):
        scales = np.frombuffer(bytes(streams["codebook_scales"]), dtype="<f8").copy()
        scales[0] = np.nan
        streams["codebook_scales"] = bytearray(scales.tobytes())

    with pytest.raises(ValueError, match="non-finite"):
        from_bytes(_rewrite(data, edit_streams=nan_scale))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_new_file_is_named_by_the_file_asked_for():
    """/proc exists but takes no new file: the error named the temporary file instead."""
    from qsdlearn._container import write_atomic

    with pytest.raises(OSError) as caught:
        write_atomic("/proc/x.qsd", b"data")
    assert caught.value.filename == "/proc/x.qsd"
    assert "cannot create a file in its folder" in caught.value.strerror
    assert ".tmp" not in str(caught.value)


def test_save_is_atomic_and_never_damages_an_existing_file(tmp_path, monkeypatch):
    est, X = fitted("vq")
    path = tmp_path / "model.qsd"
    qsdlearn.save(est.encode(X), path)
    before = path.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.raises(FileExistsError, match="overwrite=True"):  # not replaced unasked
        qsdlearn.save(est.encode(X[:5]), path)
    with pytest.raises(TypeError, match="True or False"):
        qsdlearn.save(est.encode(X[:5]), path, overwrite="yes")
    assert path.read_bytes() == before
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        qsdlearn.save(est.encode(X[:5]), path, overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.qsd"]  # no temporary left behind
    monkeypatch.undo()
    qsdlearn.save(est.encode(X[:5]), path, overwrite=True)
    assert qsdlearn.load(path).shape == (5, X.shape[1])


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name != "posix", reason="POSIX modes")
def test_overwrite_replaces_a_link_and_a_read_only_file_as_documented(tmp_path):
    est, X = fitted("vq")
    target = tmp_path / "kept.qsd"
    target.write_bytes(b"not to be touched")
    link = tmp_path / "link.qsd"
    link.symlink_to(target)
    qsdlearn.save(est.encode(X), link, overwrite=True)
    # the link itself is replaced by the new file; the file it pointed to is left as it was
    assert not link.is_symlink() and qsdlearn.load(link).shape == X.shape
    assert target.read_bytes() == b"not to be touched"
    read_only = tmp_path / "read_only.qsd"
    read_only.write_bytes(b"old")
    read_only.chmod(0o444)
    qsdlearn.save(est.encode(X), read_only, overwrite=True)
    umask = os.umask(0)
    os.umask(umask)
    assert read_only.stat().st_mode & 0o777 == 0o666 & ~umask  # the mode of a new file


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_save_never_writes_over_a_pipe(tmp_path):
    est, X = fitted("vq")
    pipe = tmp_path / "pipe.qsd"
    os.mkfifo(pipe)
    with pytest.raises(ValueError, match="device or a pipe"):
        qsdlearn.save(est.encode(X), pipe, overwrite=True)
    assert pipe.is_fifo()


def test_save_rejects_other_objects(tmp_path):
    with pytest.raises(TypeError, match="CompressedMatrix"):
        qsdlearn.save(np.ones(3), tmp_path / "x")


def test_files_are_readable_by_the_safetensors_library(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    est, X = fitted("qsd")
    compressed = est.encode(X)
    path = tmp_path / "m.safetensors"
    qsdlearn.save(compressed, path)
    tensors = safetensors_numpy.load_file(str(path))
    for name in STREAMS:
        assert tensors[name].tobytes() == compressed.streams[name]
    with safe_open(str(path), framework="numpy") as file:
        assert file.metadata()["format"] == "qsdlearn"


def test_an_edited_metadata_field_is_caught_by_its_checksum():
    """Stream checksums do not cover the header: its metadata has a checksum of its own."""
    data = _image()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"]["settings"] = header["__metadata__"]["settings"].replace(": ", ":")
    text = json.dumps(header).encode()
    with pytest.raises(ValueError, match="checksum mismatch in the metadata"):
        from_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


def _scaled_codebook_image(target):
    """A float32 matrix file whose codebook entries reach ``target`` (a crafted file: no fit
    of data within float32's range makes one): two rows, each the largest code value (3/2)
    times codeword 0 plus 1/2 times codeword 1, both codewords ``[127.5, ...]`` times
    ``target / 127.5``."""
    from qsdlearn import Constraints
    from qsdlearn.codec import MatrixSettings, encode_factors

    settings = MatrixSettings(2, 4, "float32", Constraints(2, n_nonzero=2, code_bits=2,
                                                           codebook_bits=8))
    idx = np.array([[0, 1], [0, 1]], dtype=np.int32)
    val = np.array([[1.5, 0.5], [1.5, 0.5]], dtype=np.float32)
    scales = np.float32([1.0, 1.0])
    data = to_bytes(encode_factors(settings, idx, val, np.full((2, 4), 127.5, np.float32),
                                   scales))

    def scale(streams, header):
        streams["codebook_scales"] = bytearray(np.full(2, target / 127.5, "<f4").tobytes())

    return _rewrite(data, edit_streams=scale)


def test_a_codebook_scale_whose_levels_overflow_is_rejected_at_load():
    with pytest.raises(ValueError, match="damaged file: a codebook scale times its levels "
                                         "overflows float32"):
        from_bytes(_scaled_codebook_image(4e38))


def test_factors_whose_product_passes_the_range_are_rejected_at_decode():
    top = float(np.finfo(np.float32).max)
    matrix = from_bytes(_scaled_codebook_image(0.9 * top))  # the factors themselves are finite
    assert np.isfinite(matrix.factors()[2]).all()
    with pytest.raises(ValueError, match="decode to values beyond the range of float32"):
        matrix.decode()
    # just within the range: decoded as it is
    np.testing.assert_allclose(from_bytes(_scaled_codebook_image(0.45 * top)).decode(),
                               np.full((2, 4), 0.9 * top, np.float32), rtol=1e-6)


def _sparse_fit_and_matrix():
    """A quick sparse quantized fit on 64 x 8 float32 rows and their encoding."""
    X = gaussian(64, 8).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = QuantizedSparseDecomposition(16, n_nonzero=2, code_bits=2, codebook_bits=8,
                                           random_state=0, max_iter=2).fit(X)
    matrix = est.encode(X)
    return est, matrix


def test_the_factors_kept_for_decode_are_read_only():
    """An edit of the arrays factors() returned changed every later decode (a fresh user's
    trial); they are read-only, and decode is what the streams hold."""
    _, matrix = _sparse_fit_and_matrix()
    expected = matrix.decode().copy()
    for array in matrix.factors():
        with pytest.raises(ValueError, match="read-only"):
            array[...] = 0
    np.testing.assert_array_equal(matrix.decode(), expected)


def test_a_matrix_of_no_rows_is_refused_as_damaged():
    """encode refuses zero rows, so a matrix of none is crafted, in a file or in memory: it
    loaded, then its repr and bits_per_element divided by zero (a fresh user's trial)."""
    from dataclasses import replace

    from qsdlearn.codec import encode_factors

    est, matrix = _sparse_fit_and_matrix()
    idx, val, _ = matrix.factors()
    with pytest.raises(ValueError, match="n_rows=0 is invalid"):
        encode_factors(replace(matrix.settings, n_rows=0), idx[:0], val[:0],
                       est.components_, est.codebook_scales_)
    with pytest.raises(ValueError, match="damaged file: setting n_rows=0 is invalid"):
        from_bytes(_rewrite(_image(), _settings_edit(n_rows=0)))
