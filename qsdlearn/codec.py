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
is in range and every float is finite. Matrix files have this layout in every format version.
A model file (format version 3 on) stores each compressed layer's five streams back to back
(:func:`matrix_payload`, without the absent ones' names or offsets) inside its one
``payload`` tensor, its settings in the layer list (see :class:`qsdlearn.CompressedModel`).
"""

import json
from dataclasses import dataclass
from math import comb

import numpy as np

from . import _bits
from ._bits import support_bits, support_is_enumerative
from ._constraints import Constraints
from ._container import FileImage, check_declared_elements, write_container
from ._jit import kernel_threads
from ._kernels import INDEX_DTYPE, all_positions, reconstruct_from_slots
from ._levels import largest_level, level_indices, level_values

__all__ = ["CompressedMatrix", "MatrixSettings"]

#: Size of the JSON header of a matrix file (space-padded), so that a file is exactly
#: ``8 + HEADER_BYTES`` bytes plus its streams.
HEADER_BYTES = 1024
STREAMS = ("code_support", "code_values", "codebook_support", "codebook_values", "codebook_scales")
_DTYPES = {"float32": np.float32, "float64": np.float64}
#: The largest row length (sub-vector size) a stored matrix may declare.
MAX_FEATURES = 2**31
#: Order of the fields of the flat settings form files store.
_SETTINGS_FIELDS = ("n_rows", "n_features", "n_components", "n_nonzero", "code_bits",
                    "codebook_bits", "component_nonzero", "dtype")


# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixSettings:
    """What a decoder must know besides the streams: the shape, the dtype and the
    constraints of the factorization.

    Parameters
    ----------
    n_rows, n_features : int
        Shape of the encoded matrix.
    dtype : str
        ``"float32"`` or ``"float64"``: the dtype of float values and of the decoded matrix.
    constraints : Constraints
        The constraints of the factorization (codebook size, nonzeros, code and codebook
        bits).

    Examples
    --------
    >>> from qsdlearn import Constraints
    >>> from qsdlearn.codec import MatrixSettings
    >>> settings = MatrixSettings(1000, 8, "float32", Constraints(256, n_nonzero=1, code_bits=0))
    >>> settings.budget.total, settings.stream_sizes()["codebook_values"]
    (73536, 8192)
    """

    n_rows: int
    n_features: int
    dtype: str
    constraints: Constraints

    @property
    def float_bits(self):
        """Width of a float value in bits."""
        return 8 * np.dtype(self.dtype).itemsize

    @property
    def budget(self):
        """The exact bit account (:class:`~qsdlearn._bits.BitBudget`) of the streams."""
        return self.constraints.bits(self.n_rows, self.n_features, self.float_bits)

    @property
    def declared_elements(self):
        """Elements a decoder allocates: the matrix and its code slots (the larger)."""
        return self.n_rows * max(self.n_features, self.constraints.slots)

    def stream_sizes(self):
        """Expected byte size of every stream.

        Returns
        -------
        dict of str to int
            Stream name to its size in bytes (0 when the settings have no such stream).
        """
        return {name: (bits + 7) // 8 for name, bits in self.budget.stream_bits().items()}

    def to_dict(self):
        """The flat form files store: shape, constraints and dtype in one mapping.

        Returns
        -------
        dict
            Field name to value (int, str or None), in the order files store them.
        """
        flat = {"n_rows": self.n_rows, "n_features": self.n_features,
                **self.constraints.to_dict(), "dtype": self.dtype}
        return {name: flat[name] for name in _SETTINGS_FIELDS}

    @classmethod
    def from_dict(cls, raw):
        """Rebuild and validate settings from :meth:`to_dict`'s form (as read from a file).

        Parameters
        ----------
        raw : dict
            The fields of :meth:`to_dict`.

        Returns
        -------
        MatrixSettings
            The settings, validated (:meth:`validate`).

        Raises
        ------
        ValueError
            If a field is missing, unexpected, of the wrong type or out of range.
        """
        if not isinstance(raw, dict) or set(raw) != set(_SETTINGS_FIELDS):
            raise ValueError("damaged file: settings do not have the expected fields")
        raw = dict(raw)
        shape = {name: raw.pop(name) for name in ("n_rows", "n_features", "dtype")}
        _validate_flat({**shape, **raw})
        return cls(constraints=Constraints(**raw), **shape)

    def to_json(self):
        """:meth:`to_dict` as JSON text with sorted keys.

        Returns
        -------
        str
            The JSON text.
        """
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        """Rebuild and validate settings from :meth:`to_json`'s text.

        Parameters
        ----------
        text : str
            JSON text of :meth:`to_json`.

        Returns
        -------
        MatrixSettings
            The settings, validated.

        Raises
        ------
        ValueError
            If the text is not JSON or its fields are not valid settings.
        """
        try:
            raw = json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"damaged file: settings are not valid JSON ({exc})") from None
        return cls.from_dict(raw)

    def validate(self, problem="damaged file: setting"):
        """Reject settings outside the ranges the estimator can produce.

        Parameters
        ----------
        problem : str, default="damaged file: setting"
            How the error message starts (it goes on with the field and its value).

        Raises
        ------
        ValueError
            If a field is of the wrong type or out of range.
        """
        _validate_flat(self.to_dict(), problem)


def _validate_flat(raw, problem="damaged file: setting"):
    """Check the flat settings of a matrix (types and ranges) before they size anything;
    errors start with ``problem``."""

    def is_int(value, low, high=None, optional=False):
        if value is None:
            return optional
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value >= low
            and (high is None or value <= high)
        )

    n_components = raw["n_components"] if is_int(raw["n_components"], 1) else 1
    n_features = raw["n_features"] if is_int(raw["n_features"], 1) else 1
    checks = [  # (field, whether it is valid, what is expected)
        ("n_rows", is_int(raw["n_rows"], 1, 2**40),  # encode refuses a matrix of no rows
         "an integer from 1 to 2**40"),
        ("n_features", is_int(raw["n_features"], 1, MAX_FEATURES),
         "an integer from 1 to 2**31"),
        ("n_components", is_int(raw["n_components"], 1, 2**31), "an integer from 1 to 2**31"),
        ("n_nonzero", is_int(raw["n_nonzero"], 1, n_components, optional=True),
         f"None or an integer from 1 to n_components, {n_components}"),
        ("code_bits", is_int(raw["code_bits"], 0, 16, optional=True),
         "None or an integer from 0 to 16"),
        ("codebook_bits", is_int(raw["codebook_bits"], 1, 32, optional=True),
         "None or an integer from 1 to 32"),
        ("component_nonzero", is_int(raw["component_nonzero"], 1, n_features, optional=True),
         f"None or an integer from 1 to the row length, {n_features}"),
        ("dtype", raw["dtype"] in _DTYPES, f"one of {sorted(_DTYPES)}"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"{problem} {name}={raw[name]!r} is invalid (expected {expected})")
    if raw["n_rows"] * raw["n_features"] > 2**48:
        raise ValueError("damaged file: the declared matrix is too large")


def _encode_support(idx, n_positions):
    """Pack sorted slot positions (rows of ``idx``) as ranks or fixed-width positions."""
    n_keep = idx.shape[1]
    width = support_bits(n_positions, n_keep)
    if support_is_enumerative(n_positions, n_keep):
        ranks = np.empty(idx.shape[0], dtype=np.uint64)
        _bits.rank_subsets(np.ascontiguousarray(idx, dtype=INDEX_DTYPE),
                           _bits.binomial_table(n_positions, n_keep), ranks)
        return _bits.pack_fields(ranks, width)
    return _bits.pack_fields(idx.ravel(), width // n_keep)


def _decode_support(stream, n_rows, n_positions, n_keep, what):
    width = support_bits(n_positions, n_keep)
    if support_is_enumerative(n_positions, n_keep):
        ranks = _bits.unpack_fields(stream, width, n_rows)
        if ranks.size and int(ranks.max()) >= comb(n_positions, n_keep):
            raise ValueError(f"damaged file: a {what} support rank is out of range")
        idx = np.empty((n_rows, n_keep), dtype=INDEX_DTYPE)
        _bits.unrank_subsets(ranks, n_positions, _bits.binomial_table(n_positions, n_keep), idx)
        return idx
    idx = _bits.unpack_fields(stream, width // n_keep, n_rows * n_keep).reshape(n_rows, n_keep)
    if idx.size and (int(idx.max()) >= n_positions or np.any(np.diff(idx.astype(np.int64)) <= 0)):
        raise ValueError(f"damaged file: a {what} position is out of range or repeated")
    return idx.astype(INDEX_DTYPE)


def _float_stream(values, dtype):
    return np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def _read_floats(stream, dtype, count, what):
    values = np.frombuffer(stream, dtype=np.dtype(dtype).newbyteorder("<"), count=count)
    values = values.astype(dtype)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"damaged file: {what} holds a non-finite value")
    return values


# -- the compressed matrix -----------------------------------------------------------------------


class CompressedMatrix(FileImage):
    """A matrix encoded as bit streams of its sparse, quantized factors.

    Build one with :meth:`QuantizedSparseDecomposition.encode`, or read one with
    :func:`qsdlearn.load` or :meth:`from_bytes`. Streams hold the whole matrix and are
    read as a whole (they are made for storage, not for access to single rows).

    Parameters
    ----------
    settings : MatrixSettings
        Shape, dtype and constraints of the encoded factorization.
    streams : dict of str to bytes
        The packed streams by name (absent streams may be left out).

    Attributes
    ----------
    settings : MatrixSettings
        Shape, dtype and constraints of the encoded factorization.
    streams : dict of str to bytes
        The packed streams, each exactly as long as the bit account says (rounded up to
        whole bytes).

    Raises
    ------
    ValueError
        If a stream's size differs from what the settings imply.

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn import CompressedMatrix, QuantizedSparseDecomposition
    >>> X = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
    >>> qsd = QuantizedSparseDecomposition(16, n_nonzero=1, code_bits=0, codebook_bits=8,
    ...                                    random_state=0).fit(X)
    >>> compressed = qsd.encode(X)
    >>> compressed.bits == qsd.bits_, compressed.bits_per_element
    (True, 0.884)
    >>> again = CompressedMatrix.from_bytes(compressed.to_bytes())
    >>> bool(np.array_equal(again.decode(), qsd.inverse_transform(qsd.transform(X))))
    True
    """

    _KIND = "matrix"

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
        """Payload bits: the exact bit account, before rounding streams up to bytes."""
        return self.settings.budget.total

    @property
    def bits_per_element(self):
        """Payload bits per matrix element."""
        return self.bits / (self.shape[0] * self.shape[1])

    @property
    def compression_ratio(self):
        """The matrix in its dtype over its payload.

        ``float_bits * n_rows * n_features / bits``.
        """
        return self.settings.float_bits * self.shape[0] * self.shape[1] / self.bits

    @property
    def nbytes(self):
        """Bytes of the streams (each rounded up to a whole byte)."""
        return sum(len(stream) for stream in self.streams.values())

    def factors(self):
        """Unpack and validate the streams into the factors.

        The arrays are read-only: they are kept for :meth:`decode` (copy them to edit).

        Returns
        -------
        idx : ndarray of shape (n_rows, n_nonzero), int32, or None
            Sorted codebook rows of every code row; ``None`` for dense codes.
        val : ndarray of shape (n_rows, n_nonzero) or (n_rows, n_components)
            Code values (unit levels, ones or floats), in the data's dtype.
        codebook : ndarray of shape (n_components, n_features)
            The dequantized codebook, in the data's dtype.

        Raises
        ------
        ValueError
            If an index is out of range, a float is not finite or a codebook scale times
            its levels passes the dtype's range (a damaged file).
        """
        if self._factors is None:
            with kernel_threads():
                factors = _unpack_factors(self.settings, self.streams)
            for array in factors:  # kept for decode: a caller's edit would change it
                if array is not None:
                    array.setflags(write=False)
            self._factors = factors
        return self._factors

    def decode(self):
        """Reconstruct the matrix from its factors.

        Returns
        -------
        ndarray of shape (n_rows, n_features)
            ``Z @ C`` in the dtype of the data, bit for bit what
            ``inverse_transform(transform(X))`` of the encoding estimator gives.

        Raises
        ------
        ValueError
            If the factors are damaged (see :meth:`factors`), or their product passes the
            dtype's range (factors no fit produces: a crafted file).
        """
        idx, val, codebook = self.factors()
        out = np.empty(self.shape, dtype=_DTYPES[self.settings.dtype])
        if idx is None:
            idx = all_positions(*val.shape)
        with kernel_threads():
            reconstruct_from_slots(idx, val, codebook, out)
        if _may_overflow(self.settings, val, codebook) and not (
                np.isfinite(out.min()) and np.isfinite(out.max())):
            raise ValueError(f"damaged file: the factors decode to values beyond the range of "
                             f"{self.settings.dtype}")
        return out

    # file image -----------------------------------------------------------------------------

    def to_bytes(self):
        """The file image of the matrix.

        Returns
        -------
        bytes
            A safetensors file: 8 + :data:`HEADER_BYTES` bytes of header, then the streams.
        """
        metadata = {"kind": self._KIND, "settings": self.settings.to_json()}
        return write_container(matrix_tensors(self), metadata, header_bytes=HEADER_BYTES)

    @classmethod
    def _from_container(cls, meta, tensors, max_elements=None):
        """:meth:`FileImage._from_container <qsdlearn._container.FileImage._from_container>`
        of a matrix file: its five streams, settings and declared sizes checked."""
        cls._check_kind(meta)
        if list(tensors) != list(STREAMS):
            raise ValueError(
                f"damaged file: expected the streams {list(STREAMS)}, found {list(tensors)}"
            )
        settings = MatrixSettings.from_json(meta.get("settings"))
        check_declared_elements(settings.declared_elements, max_elements, "a matrix")
        return matrix_from_tensors(settings, tensors)

    def __repr__(self):
        c = self.settings.constraints
        return (
            f"CompressedMatrix(shape={self.shape}, n_components={c.n_components}, "
            f"n_nonzero={c.n_nonzero}, code_bits={c.code_bits}, codebook_bits={c.codebook_bits}, "
            f"bits_per_element={self.bits_per_element:.4f})"
        )


def encode_factors(settings, idx, val, codebook, codebook_scales, codebook_levels=None):
    """Pack fitted factors into a :class:`CompressedMatrix`.

    Parameters
    ----------
    settings : MatrixSettings
    idx : ndarray of shape (n, s) or None
        Sorted slot positions (``None`` for dense codes).
    val : ndarray of shape (n, s) or (n, k)
        Slot values: unit levels, ones, or floats.
    codebook : ndarray of shape (k, d)
        The dequantized codebook.
    codebook_scales : ndarray of shape (k,) or None
        Grid scales of a quantized codebook.
    codebook_levels : ndarray of shape (k, d), optional
        Its half-integer levels (``codebook == levels * scales[:, None]``); recovered from
        ``codebook / scales`` when not given, which is exact unless the products round (among
        subnormal numbers).

    Returns
    -------
    CompressedMatrix
        The encoded factors.
    """
    with kernel_threads():
        return _pack_factors(settings, idx, val, codebook, codebook_scales, codebook_levels)


def _pack_factors(settings, idx, val, codebook, codebook_scales, codebook_levels):
    s = settings.constraints
    dtype = _DTYPES[settings.dtype]
    streams = {}
    if s.n_nonzero is not None:
        streams["code_support"] = _encode_support(idx, s.n_components)
    if s.code_bits is None:
        streams["code_values"] = _float_stream(val, dtype)
    elif s.code_bits > 0:
        streams["code_values"] = _bits.pack_fields(level_indices(val, s.code_bits), s.code_bits)

    codebook = np.asarray(codebook, dtype=dtype)
    if s.codebook_bits is not None:
        scales = np.asarray(codebook_scales, dtype=dtype)
        streams["codebook_scales"] = _float_stream(scales, dtype)
        if codebook_levels is None:
            codebook_levels = codebook.astype(np.float64) / np.where(scales > 0, scales, 1)[:, None]
        codebook = np.asarray(codebook_levels, dtype=np.float64)  # the values to store
    if s.component_nonzero is not None:
        t = s.component_nonzero
        # The t slots of a row: its nonzeros, then zero positions in order (a float row may have
        # fewer nonzeros than slots).
        cb_idx = np.sort(np.argsort(codebook == 0, axis=1, kind="stable")[:, :t], axis=1)
        streams["codebook_support"] = _encode_support(cb_idx, settings.n_features)
        kept = np.take_along_axis(codebook, cb_idx, axis=1)
    else:
        kept = codebook
    if s.codebook_bits is None:
        streams["codebook_values"] = _float_stream(kept, dtype)
    else:
        streams["codebook_values"] = _bits.pack_fields(
            level_indices(kept, s.codebook_bits), s.codebook_bits
        )
    return CompressedMatrix(settings, streams)


def _unpack_factors(settings, streams):
    s = settings.constraints
    dtype = _DTYPES[settings.dtype]
    n, d, k = settings.n_rows, settings.n_features, s.n_components
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
        val = level_values(indices, s.code_bits, dtype)
    val = val.reshape(n, slots)

    t = d if s.component_nonzero is None else s.component_nonzero
    if s.codebook_bits is None:
        kept = _read_floats(streams["codebook_values"], dtype, k * t, "codebook_values")
    else:
        indices = _bits.unpack_fields(streams["codebook_values"], s.codebook_bits, k * t)
        scales = _read_floats(streams["codebook_scales"], dtype, k, "codebook_scales")
        if np.any(scales < 0):
            raise ValueError("damaged file: a codebook scale is negative")
        with np.errstate(over="ignore"):
            kept = level_values(indices, s.codebook_bits, dtype).reshape(k, t) * scales[:, None]
        if not np.all(np.isfinite(kept)):
            raise ValueError(f"damaged file: a codebook scale times its levels overflows "
                             f"{settings.dtype}")
    kept = kept.reshape(k, t)
    if s.component_nonzero is None:
        codebook = np.ascontiguousarray(kept)
    else:
        cb_idx = _decode_support(streams["codebook_support"], k, d, t, "codebook")
        codebook = np.zeros((k, d), dtype=dtype)
        np.put_along_axis(codebook, cb_idx, kept, axis=1)
    return idx, np.ascontiguousarray(val), codebook


def _may_overflow(settings, val, codebook):
    """Whether ``Z @ C`` may pass the dtype's range: the largest code value times the
    largest codebook entry times the slots of a row does (never for factors a fit of data
    within the range produces, so that their decode needs no check of its own)."""
    if val.size == 0 or codebook.size == 0:
        return False
    bits = settings.constraints.code_bits
    if bits is None:
        largest_value = float(np.max(np.abs(val)))
    else:
        largest_value = 1.0 if bits == 0 else largest_level(bits)
    bound = largest_value * float(np.max(np.abs(codebook))) * val.shape[1]
    return not bound <= float(np.finfo(_DTYPES[settings.dtype]).max)


# -- container tensors and the payload of a model file -------------------------------------------


def matrix_tensors(compressed, prefix=""):
    """The streams of a :class:`CompressedMatrix` as container tensors."""
    return [
        (prefix + name, "U8", (len(compressed.streams[name]),), compressed.streams[name])
        for name in STREAMS
    ]


def matrix_payload(compressed):
    """The streams of a :class:`CompressedMatrix` back to back, in :data:`STREAMS` order: the
    form a model file (format version 3 on) stores them in."""
    return b"".join(compressed.streams[name] for name in STREAMS)


def matrix_from_payload(settings, data, what):
    """Rebuild and fully validate a :class:`CompressedMatrix` from :func:`matrix_payload`'s
    bytes, cut into streams by the sizes ``settings`` imply (``what`` names it in errors)."""
    expected = settings.stream_sizes()
    if len(data) != sum(expected.values()):
        raise ValueError(
            f"damaged file: {what} holds {len(data)} bytes of streams, its settings imply "
            f"{sum(expected.values())}"
        )
    streams, offset = {}, 0
    for name in STREAMS:
        streams[name] = bytes(data[offset:offset + expected[name]])
        offset += expected[name]
    compressed = CompressedMatrix(settings, streams)
    compressed.factors()  # validate indices and floats now, not at first decode
    return compressed


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
