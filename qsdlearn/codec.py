"""Encoding of fitted factors into bit streams, and the on-disk format.

A :class:`CompressedMatrix` holds the factors of one ``(n, d)`` matrix as five byte streams,
each exactly as long as the bit account of :mod:`qsdlearn._bits` says (rounded up to bytes):

=====================  ==========================================================================
``code_support``       per row, the rank of its slot positions among the ``s``-subsets of
                       ``range(k)`` (``support_bits(k, s)`` bits), or ``s`` fixed-width positions
                       beyond 64-bit ranks; absent for dense codes
``code_values``        per slot, its level index (``code_bits`` bits, level ``i`` is
                       ``i - 2**(b-1) + 1/2``), or its float value; absent with ``code_bits=0``
``codebook_support``   per codebook row, the rank of its nonzero positions among the ``t``-subsets
                       of ``range(d)``; absent for dense codebook rows
``codebook_values``    per kept codebook entry, its level index or float value
``codebook_scales``    per codebook row, its grid scale as a float; only with ``codebook_bits``
=====================  ==========================================================================

Floats are little-endian in the dtype of the data. Decoding computes ``level * scale`` and the
slot sums in that dtype, in the same order as
:meth:`QuantizedSparseDecomposition.inverse_transform`, so both agree bit for bit.

File format
-----------
A file is a `safetensors <https://github.com/huggingface/safetensors>`_ file: an 8-byte
little-endian header length ``N``, ``N`` bytes of JSON, then the byte buffer. Every stream is
a ``U8`` tensor; ``__metadata__`` holds ``format = "qsdlearn"``, ``format_version``, ``kind``,
the settings as JSON and a CRC-32 of every stream. The fixed header of the format is the
8-byte length plus :data:`HEADER_BYTES` of space-padded JSON, so a file has exactly
``8 + 1024`` bytes more than its streams. Reading never uses pickle and checks, in order: the header
length against a cap and the file size, the JSON structure, the format name and version, the
settings (types and ranges), that the streams are contiguous, in order and cover the buffer,
that each has the size the settings imply, its checksum, and after unpacking that every index
is in range and every float is finite.
"""

import json
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from math import comb

import numba
import numpy as np

from . import _bits
from ._bits import factorization_bits, support_bits, support_is_enumerative
from ._kernels import _njit

FORMAT_NAME = "qsdlearn"
FORMAT_VERSION = 1
#: Size of the JSON header that :func:`save` writes (space-padded), so that a file is exactly
#: ``8 + HEADER_BYTES`` bytes plus its streams.
HEADER_BYTES = 1024
#: Largest JSON header accepted when reading (bytes).
MAX_HEADER_BYTES = 64 * 2**20
STREAMS = ("code_support", "code_values", "codebook_support", "codebook_values", "codebook_scales")
_DTYPES = {"float32": np.float32, "float64": np.float64}


# -- reconstruction (shared with inverse_transform) ---------------------------------------------


@_njit(parallel=True)
def reconstruct_from_slots(idx, val, C, out):
    """``out[i] = sum_a val[i, a] * C[idx[i, a]]`` over nonzero values, in slot order.

    Dense codes go through the same loop with :func:`all_positions`, so decoding and
    ``inverse_transform`` perform the same operations in the same order.
    """
    m, n = idx.shape
    d = C.shape[1]
    for i in numba.prange(m):
        for t in range(d):
            out[i, t] = 0
        for a in range(n):
            v = val[i, a]
            if v == 0:
                continue
            j = idx[i, a]
            for t in range(d):
                out[i, t] += v * C[j, t]


def all_positions(n_rows, n_components):
    """Slot positions of dense codes: every row uses every component, in order."""
    return np.broadcast_to(np.arange(n_components, dtype=np.int64), (n_rows, n_components))


# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixSettings:
    """What a decoder must know besides the streams."""

    n_rows: int
    n_features: int
    n_components: int
    n_nonzero: int | None
    code_bits: int | None
    codebook_bits: int | None
    component_nonzero: int | None
    dtype: str

    @property
    def float_bits(self):
        return 8 * np.dtype(self.dtype).itemsize

    @property
    def budget(self):
        return factorization_bits(
            self.n_rows, self.n_features, self.n_components, self.n_nonzero, self.code_bits,
            self.codebook_bits, self.component_nonzero, self.float_bits,
        )

    def stream_sizes(self):
        """Expected byte size of every stream (0 when absent)."""
        return {name: (bits + 7) // 8 for name, bits in self.budget.stream_bits().items()}

    @classmethod
    def from_setting(cls, setting, n_rows, n_features, dtype):
        """Settings of an ``(n_rows, n_features)`` matrix factorized under a solver
        :class:`~qsdlearn._solver.Setting` (dense codes store no support)."""
        return cls(
            n_rows=n_rows,
            n_features=n_features,
            n_components=setting.n_components,
            n_nonzero=None if setting.dense_codes else setting.n_nonzero,
            code_bits=setting.code_bits,
            codebook_bits=setting.codebook_bits,
            component_nonzero=setting.component_nonzero,
            dtype=np.dtype(dtype).name,
        )

    def to_json(self):
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        try:
            raw = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"damaged file: settings are not valid JSON ({exc})") from None
        if not isinstance(raw, dict) or set(raw) != set(cls.__dataclass_fields__):
            raise ValueError("damaged file: settings do not have the expected fields")
        settings = cls(**raw)
        settings.validate()
        return settings

    def validate(self):
        """Reject settings outside the ranges the estimator can produce."""

        def is_int(value, low, high=None, optional=False):
            if value is None:
                return optional
            return (
                isinstance(value, int)
                and not isinstance(value, bool)
                and value >= low
                and (high is None or value <= high)
            )

        checks = [
            ("n_rows", is_int(self.n_rows, 0, 2**40)),
            ("n_features", is_int(self.n_features, 1, 2**31)),
            ("n_components", is_int(self.n_components, 1, 2**31)),
            ("n_nonzero", is_int(self.n_nonzero, 1, self.n_components, optional=True)),
            ("code_bits", is_int(self.code_bits, 0, 16, optional=True)),
            ("codebook_bits", is_int(self.codebook_bits, 1, 32, optional=True)),
            (
                "component_nonzero",
                is_int(self.component_nonzero, 1, self.n_features, optional=True),
            ),
            ("dtype", self.dtype in _DTYPES),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"damaged file: setting {name}={getattr(self, name)!r} is invalid")
        if self.n_rows * self.n_features > 2**48:
            raise ValueError("damaged file: the declared matrix is too large")


def _level_indices(levels, nbits):
    """Half-integer levels -> indices ``0 .. 2**nbits - 1``."""
    return np.rint(np.asarray(levels, dtype=np.float64) + 2 ** (nbits - 1) - 0.5).astype(np.uint64)


def _level_values(indices, nbits, dtype):
    return (indices.astype(np.float64) - 2 ** (nbits - 1) + 0.5).astype(dtype)


def _encode_support(idx, n_positions):
    """Pack sorted slot positions (rows of ``idx``) as ranks or fixed-width positions."""
    n_keep = idx.shape[1]
    width = support_bits(n_positions, n_keep)
    if support_is_enumerative(n_positions, n_keep):
        ranks = np.empty(idx.shape[0], dtype=np.uint64)
        _bits.rank_subsets(np.ascontiguousarray(idx, dtype=np.int64),
                           _bits.binomial_table(n_positions, n_keep), ranks)
        return _bits.pack_fields(ranks, width)
    return _bits.pack_fields(idx.ravel(), width // n_keep)


def _decode_support(stream, n_rows, n_positions, n_keep, what):
    width = support_bits(n_positions, n_keep)
    if support_is_enumerative(n_positions, n_keep):
        ranks = _bits.unpack_fields(stream, width, n_rows)
        if ranks.size and int(ranks.max()) >= comb(n_positions, n_keep):
            raise ValueError(f"damaged file: a {what} support rank is out of range")
        idx = np.empty((n_rows, n_keep), dtype=np.int64)
        _bits.unrank_subsets(ranks, n_positions, _bits.binomial_table(n_positions, n_keep), idx)
        return idx
    idx = _bits.unpack_fields(stream, width // n_keep, n_rows * n_keep).reshape(n_rows, n_keep)
    if idx.size and (int(idx.max()) >= n_positions or np.any(np.diff(idx.astype(np.int64)) <= 0)):
        raise ValueError(f"damaged file: a {what} position is out of range or repeated")
    return idx.astype(np.int64)


def _float_stream(values, dtype):
    return np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def _read_floats(stream, dtype, count, what):
    values = np.frombuffer(stream, dtype=np.dtype(dtype).newbyteorder("<"), count=count)
    values = values.astype(dtype)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"damaged file: {what} holds a non-finite value")
    return values


# -- the compressed matrix -----------------------------------------------------------------------


class CompressedMatrix:
    """A matrix encoded as bit streams of its sparse, quantized factors.

    Build one with :meth:`QuantizedSparseDecomposition.encode` or :func:`qsdlearn.load`.

    Attributes
    ----------
    settings : MatrixSettings
    streams : dict of str to bytes
        The packed streams, each exactly as long as the bit account says.
    """

    def __init__(self, settings, streams):
        settings.validate()
        expected = settings.stream_sizes()
        for name in STREAMS:
            size = len(streams.get(name, b""))
            if size != expected[name]:
                raise ValueError(
                    f"damaged file: stream {name} has {size} bytes, the settings imply "
                    f"{expected[name]}"
                )
        self.settings = settings
        self.streams = {name: bytes(streams.get(name, b"")) for name in STREAMS}
        self._factors = None

    @property
    def shape(self):
        """``(n_rows, n_features)`` of the encoded matrix."""
        return (self.settings.n_rows, self.settings.n_features)

    @property
    def bits(self):
        """Payload bits (the exact bit account, before rounding streams up to bytes)."""
        return self.settings.budget.total

    @property
    def bits_per_element(self):
        """Payload bits per matrix element."""
        return self.bits / (self.shape[0] * self.shape[1])

    @property
    def nbytes(self):
        """Bytes of the streams (each rounded up to a whole byte)."""
        return sum(len(stream) for stream in self.streams.values())

    def factors(self):
        """Unpack and validate the streams into ``(idx, val, codebook)``.

        ``idx`` is ``None`` for dense codes; ``val`` has the data's dtype.
        """
        if self._factors is None:
            self._factors = _unpack_factors(self.settings, self.streams)
        return self._factors

    def decode(self):
        """The reconstructed ``(n_rows, n_features)`` matrix, in the dtype of the data."""
        idx, val, codebook = self.factors()
        s = self.settings
        out = np.empty(self.shape, dtype=_DTYPES[s.dtype])
        if idx is None:
            idx = all_positions(*val.shape)
        reconstruct_from_slots(idx, val, codebook, out)
        return out

    def __repr__(self):
        s = self.settings
        return (
            f"CompressedMatrix(shape={self.shape}, n_components={s.n_components}, "
            f"n_nonzero={s.n_nonzero}, code_bits={s.code_bits}, codebook_bits={s.codebook_bits}, "
            f"bits_per_element={self.bits_per_element:.4f})"
        )


def encode_factors(settings, idx, val, codebook, codebook_scales):
    """Pack fitted factors into a :class:`CompressedMatrix`.

    Parameters
    ----------
    settings : MatrixSettings
    idx : ndarray of shape (n, s) or None
        Sorted slot positions (``None`` for dense codes).
    val : ndarray of shape (n, s) or (n, k)
        Slot values: unit levels, ones, or floats.
    codebook : ndarray of shape (k, d)
    codebook_scales : ndarray of shape (k,) or None
    """
    s = settings
    dtype = _DTYPES[s.dtype]
    streams = {}
    if s.n_nonzero is not None:
        streams["code_support"] = _encode_support(idx, s.n_components)
    if s.code_bits is None:
        streams["code_values"] = _float_stream(val, dtype)
    elif s.code_bits > 0:
        streams["code_values"] = _bits.pack_fields(_level_indices(val, s.code_bits), s.code_bits)

    codebook = np.asarray(codebook, dtype=dtype)
    if s.component_nonzero is not None:
        t = s.component_nonzero
        # The t slots of a row: its nonzeros, then zero positions in order (a float row may have
        # fewer nonzeros than slots).
        cb_idx = np.sort(np.argsort(codebook == 0, axis=1, kind="stable")[:, :t], axis=1)
        streams["codebook_support"] = _encode_support(cb_idx, s.n_features)
        kept = np.take_along_axis(codebook, cb_idx, axis=1)
    else:
        kept = codebook
    if s.codebook_bits is None:
        streams["codebook_values"] = _float_stream(kept, dtype)
    else:
        scales = np.asarray(codebook_scales, dtype=dtype)
        levels = kept.astype(np.float64) / np.where(scales > 0, scales, 1)[:, None]
        streams["codebook_values"] = _bits.pack_fields(
            _level_indices(levels, s.codebook_bits), s.codebook_bits
        )
        streams["codebook_scales"] = _float_stream(scales, dtype)
    return CompressedMatrix(settings, streams)


def _unpack_factors(s, streams):
    dtype = _DTYPES[s.dtype]
    n, d, k = s.n_rows, s.n_features, s.n_components
    slots = k if s.n_nonzero is None else s.n_nonzero
    idx = None
    if s.n_nonzero is not None:
        idx = _decode_support(streams["code_support"], n, k, slots, "code")
    if s.code_bits is None:
        val = _read_floats(streams["code_values"], dtype, n * slots, "code_values")
    elif s.code_bits == 0:
        val = np.ones(n * slots, dtype=dtype)
    else:
        indices = _bits.unpack_fields(streams["code_values"], s.code_bits, n * slots)
        val = _level_values(indices, s.code_bits, dtype)
    val = val.reshape(n, slots)

    t = d if s.component_nonzero is None else s.component_nonzero
    if s.codebook_bits is None:
        kept = _read_floats(streams["codebook_values"], dtype, k * t, "codebook_values")
    else:
        indices = _bits.unpack_fields(streams["codebook_values"], s.codebook_bits, k * t)
        scales = _read_floats(streams["codebook_scales"], dtype, k, "codebook_scales")
        if np.any(scales < 0):
            raise ValueError("damaged file: a codebook scale is negative")
        kept = _level_values(indices, s.codebook_bits, dtype).reshape(k, t) * scales[:, None]
    kept = kept.reshape(k, t)
    if s.component_nonzero is None:
        codebook = np.ascontiguousarray(kept)
    else:
        cb_idx = _decode_support(streams["codebook_support"], k, d, t, "codebook")
        codebook = np.zeros((k, d), dtype=dtype)
        np.put_along_axis(codebook, cb_idx, kept, axis=1)
    return idx, np.ascontiguousarray(val), codebook


# -- files ---------------------------------------------------------------------------------------


#: safetensors dtype names of the tensors a container may hold.
_CONTAINER_DTYPES = {
    "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32,
    "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16, "F32": np.float32,
    "F64": np.float64, "BOOL": np.bool_,
}


def write_container(tensors, metadata, header_bytes=None):
    """A safetensors file image.

    Parameters
    ----------
    tensors : list of (name, dtype, shape, bytes)
        In file order; ``dtype`` is a safetensors dtype name.
    metadata : dict of str to str
        ``format``, ``format_version`` and CRC-32 ``checksums`` are added.
    header_bytes : int, optional
        Pad the JSON header with spaces to exactly this size.
    """
    header = {}
    offset = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    header["__metadata__"] = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        **metadata,
        "checksums": json.dumps(
            {name: f"{zlib.crc32(data):08x}" for name, _, _, data in tensors}, sort_keys=True
        ),
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    if header_bytes is None:
        header_bytes = len(text) + (-len(text) % 8)  # align the buffer, as safetensors does
    if len(text) > header_bytes:
        raise ValueError(f"header of {len(text)} bytes exceeds the fixed {header_bytes}")
    text += b" " * (header_bytes - len(text))
    return struct.pack("<Q", len(text)) + text + b"".join(data for _, _, _, data in tensors)


def read_container(data):
    """Parse and check a file image: header, offsets, sizes against shapes and checksums.

    Returns
    -------
    metadata : dict
    tensors : dict of str to (dtype name, shape tuple, bytes), in file order
    """
    header, meta, buffer = _parse_header(bytes(data))
    checksums = json_field(meta, "checksums", dict)
    tensors = {}
    offset = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in _CONTAINER_DTYPES:
            raise ValueError(f"damaged file: tensor {name} has no supported dtype")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**48 for v in shape
        ):
            raise ValueError(f"damaged file: tensor {name} has an invalid shape")
        begin, end = _offsets(entry, name)
        if begin != offset:
            raise ValueError(f"damaged file: tensor {name} is not contiguous with the others")
        itemsize = np.dtype(_CONTAINER_DTYPES[entry["dtype"]]).itemsize
        if end - begin != int(np.prod(shape, dtype=object)) * itemsize:
            raise ValueError(f"damaged file: tensor {name} size does not match its shape")
        if end > len(buffer):
            raise ValueError(
                f"damaged file: tensor {name} ends at byte {end} of a {len(buffer)}-byte buffer; "
                "the file is probably truncated"
            )
        chunk = buffer[begin:end]
        if checksums.get(name) != f"{zlib.crc32(chunk):08x}":
            raise ValueError(f"damaged file: checksum mismatch in stream {name}")
        tensors[name] = (entry["dtype"], tuple(shape), chunk)
        offset = end
    if offset != len(buffer):
        raise ValueError(f"damaged file: {len(buffer) - offset} bytes after the last stream")
    if set(checksums) != set(tensors):
        raise ValueError("damaged file: the checksums do not name the tensors of the file")
    return meta, tensors


def matrix_tensors(compressed, prefix=""):
    """The streams of a :class:`CompressedMatrix` as container tensors."""
    return [
        (prefix + name, "U8", (len(compressed.streams[name]),), compressed.streams[name])
        for name in STREAMS
    ]


def matrix_from_tensors(settings, tensors, prefix=""):
    """Rebuild and fully validate a :class:`CompressedMatrix` from container tensors."""
    expected = settings.stream_sizes()
    streams = {}
    for name in STREAMS:
        if prefix + name not in tensors:
            raise ValueError(f"damaged file: stream {prefix + name} is missing")
        dtype, _, data = tensors[prefix + name]
        if dtype != "U8":
            raise ValueError(f"damaged file: stream {prefix + name} is not a U8 tensor")
        if len(data) != expected[name]:
            raise ValueError(
                f"damaged file: stream {prefix + name} declares {len(data)} bytes, the settings "
                f"imply {expected[name]}"
            )
        streams[name] = data
    compressed = CompressedMatrix(settings, streams)
    compressed.factors()  # validate indices and floats now, not at first decode
    return compressed


def to_bytes(compressed):
    """The file image of a :class:`CompressedMatrix` (a safetensors file)."""
    metadata = {"kind": "matrix", "settings": compressed.settings.to_json()}
    return write_container(matrix_tensors(compressed), metadata, header_bytes=HEADER_BYTES)


def json_field(meta, key, kind):
    """Decode the JSON text of metadata field ``key``; it must hold a ``kind`` (dict/list)."""
    try:
        value = json.loads(meta.get(key, ""))
    except (TypeError, ValueError):
        raise ValueError(f"damaged file: the {key} are not valid JSON") from None
    if not isinstance(value, kind):
        raise ValueError(f"damaged file: the {key} are not a {kind.__name__}")
    return value


def _parse_header(data):
    if len(data) < 8:
        raise ValueError(f"not a qsdlearn file: {len(data)} bytes is too short for a header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"not a qsdlearn file: header length {length} exceeds the cap")
    if 8 + length > len(data):
        raise ValueError(
            f"damaged file: header of {length} bytes is longer than the file ({len(data)} bytes); "
            "the file is probably truncated"
        )
    try:
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("not a qsdlearn file: the header is not valid JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise ValueError("not a qsdlearn file: the header has no metadata")
    meta = header["__metadata__"]
    if meta.get("format") != FORMAT_NAME:
        raise ValueError("not a qsdlearn file: the metadata does not name the qsdlearn format")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
            f"unsupported qsdlearn format version {meta.get('format_version')!r}; this version "
            f"reads version {FORMAT_VERSION}"
        )
    return header, meta, data[8 + length :]


def from_bytes(data):
    """Read a :class:`CompressedMatrix` from a file image, validating everything."""
    meta, tensors = read_container(data)
    if meta.get("kind") != "matrix":
        raise ValueError(f"unsupported kind of qsdlearn file: {meta.get('kind')!r}")
    if list(tensors) != list(STREAMS):
        raise ValueError(f"damaged file: expected the streams {list(STREAMS)}, found {list(tensors)}")
    return matrix_from_tensors(MatrixSettings.from_json(meta.get("settings")), tensors)


def _offsets(entry, name):
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(f"damaged file: stream {name} has invalid offsets")
    return offsets


def save(obj, path):
    """Write a compressed object to ``path`` atomically (whatever its extension).

    The file is written to a temporary file in the same folder and renamed over ``path``, so
    an interrupted save leaves either the old file or the new one, never a partial file.

    Parameters
    ----------
    obj : CompressedMatrix or CompressedModel
    path : str or path-like
    """
    if hasattr(obj, "to_bytes"):
        data = obj.to_bytes()
    elif isinstance(obj, CompressedMatrix):
        data = to_bytes(obj)
    else:
        raise TypeError(
            f"save takes a CompressedMatrix or a CompressedModel, got {type(obj).__name__}"
        )
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".qsdlearn-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def load(path):
    """Read a file written by :func:`save`; the kind of object is recognised from the content.

    Returns
    -------
    CompressedMatrix or CompressedModel
    """
    with open(path, "rb") as file:
        data = file.read()
    header, meta, _ = _parse_header(data)
    if meta.get("kind") == "model":
        from .weights import CompressedModel

        return CompressedModel.from_bytes(data)
    return from_bytes(data)
