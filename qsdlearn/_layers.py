"""What a layer of a model is compressed with: its setting (:class:`LayerSetting`, the default
candidate settings), the reshape rule from a tensor to the rows of its matrix, and the per-row
(output-channel) scales; which tensors are compressed at all (:data:`MIN_COMPRESSED_SIZE`)."""

import math
from dataclasses import dataclass, field, replace

import numpy as np

from ._checks import check_positive_int
from ._constraints import Constraints
from ._dtypes import float8_e5m2, is_float
from ._estimator import QuantizedSparseDecomposition
from .codec import MAX_FEATURES, MatrixSettings


MIN_COMPRESSED_SIZE = 1024
#: Bytes of one output row's scale in a file: a ``float8_e5m2`` (files of format version 3
#: stored float16 scales, :data:`ROW_SCALE_DTYPES`).
ROW_SCALE_BYTES = 1


@dataclass(frozen=True)
class LayerSetting:
    """How one tensor is compressed: its sub-vector length and the constraints of its
    factorization.

    Parameters
    ----------
    vector_size : int, default=8
        Length ``d`` of the sub-vectors the tensor's rows are cut into (see
        :func:`~qsdlearn.weights.to_rows`): the rows of the factorized matrix.
    constraints : Constraints, default=Constraints(256, 2, 2, 8)
        The factorization of the ``(rows, vector_size)`` matrix: 256 codebook rows, two
        2-bit code values per sub-vector, 8-bit codebook entries by default.
    row_scales : bool, default=False
        Whether every output row of the tensor (along axis 0) has a scale of its own, stored
        as an 8-bit float (8 bits per output row, counted): the decoded tensor's rows are
        multiplied by their scales (see :class:`~qsdlearn.weights.CompressedLayer` and
        :func:`~qsdlearn.weights.output_row_scales`).

    Raises
    ------
    ValueError
        If ``vector_size`` is below 1 or above 2**31, or a constraint is out of the range a
        file can store (e.g. fewer than one codebook row).
    TypeError
        If ``vector_size`` is not an integer, ``constraints`` not a :class:`Constraints` or
        ``row_scales`` not a bool.

    Examples
    --------
    >>> from qsdlearn import Constraints, LayerSetting
    >>> vq = LayerSetting(4, Constraints(256, n_nonzero=1, code_bits=0, codebook_bits=8))
    >>> vq.describe()
    'd=4 k=256 1 of 256 codes=0b codebook=8b'
    >>> LayerSetting(4, vq.constraints, row_scales=True).describe()
    'd=4 k=256 1 of 256 codes=0b codebook=8b rowscale'
    """

    vector_size: int = 8
    constraints: Constraints = field(
        default_factory=lambda: Constraints(256, n_nonzero=2, code_bits=2, codebook_bits=8)
    )
    row_scales: bool = False

    def __post_init__(self):
        if not isinstance(self.row_scales, (bool, np.bool_)):
            raise TypeError(f"row_scales must be True or False, got {self.row_scales!r}")
        object.__setattr__(self, "row_scales", bool(self.row_scales))
        vector_size = check_positive_int("vector_size", self.vector_size)
        if vector_size > MAX_FEATURES:
            raise ValueError(f"vector_size must be at most 2**31 (the file format's largest "
                             f"sub-vector), got {vector_size!r}")
        object.__setattr__(self, "vector_size", vector_size)
        if not isinstance(self.constraints, Constraints):
            raise TypeError(f"constraints must be a Constraints, got "
                            f"{type(self.constraints).__name__}")
        MatrixSettings(1, self.vector_size, "float32", self.constraints).validate(
            "LayerSetting: constraint")

    def describe(self):
        """A short human-readable form of the setting.

        Returns
        -------
        str
            For example ``"d=8 k=256 2 of 256 codes=2b codebook=8b"``, followed by
            ``" rowscale"`` with row scales.
        """
        text = f"d={self.vector_size} {self.constraints.describe()}"
        return f"{text} rowscale" if self.row_scales else text

    def estimator(self, **params):
        """An estimator with these constraints.

        Parameters
        ----------
        **params
            Further parameters of :class:`QuantizedSparseDecomposition` (``random_state``,
            ``max_iter``, ...).

        Returns
        -------
        QuantizedSparseDecomposition
            Unfitted.
        """
        return QuantizedSparseDecomposition(**self.constraints.to_dict(), **params)

    def matrix_settings(self, shape, dtype=np.float32):
        """Settings of the matrix :func:`~qsdlearn.weights.to_rows` makes of a tensor, known
        before fitting.

        Parameters
        ----------
        shape : tuple of int
            Shape of the tensor.
        dtype : dtype, default=numpy.float32
            Dtype of the encoded matrix (what :func:`compress_weights` encodes in).

        Returns
        -------
        MatrixSettings
            Its shape, dtype and constraints.
        """
        return MatrixSettings(rows_of(shape, self.vector_size), self.vector_size,
                              np.dtype(dtype).name, self.constraints)

    def stream_bytes(self, shape):
        """Bytes of the streams of a tensor under this setting.

        Parameters
        ----------
        shape : tuple of int
            Shape of the tensor.

        Returns
        -------
        int
            The bytes its streams take in a file (each rounded up to a whole byte), its
            row scales (:data:`ROW_SCALE_BYTES` per output row, as :func:`compress_weights`
            makes them; a layer read from a file of format version 3 has float16 ones, two
            bytes each, :attr:`~qsdlearn.weights.CompressedLayer.nbytes`) included.
        """
        scales = ROW_SCALE_BYTES * shape[0] if self.row_scales else 0
        return sum(self.matrix_settings(shape).stream_sizes().values()) + scales


def default_candidates(vector_size=8, large_codebooks=False):
    """Candidate settings spanning about 0.5 to 5 bits per weight, dense in rate.

    Vector quantization (k-means, 8-bit codebook) with 16, 32, 64, 128 and 256 codewords on
    sub-vectors of ``vector_size``, half and a quarter of it (steps of one bit per
    sub-vector: a split between two settings far apart in rate loses to a point between
    them), with 1,024 and 2,048 codewords on half of it (about 2.5 to 3 bits per weight at
    ``vector_size=8``; on weights with outlier features, such as MiniLM's layer-0 output,
    2,048 codewords of 4 gave 14.9 dB at 3 bits per weight where the other candidates gave
    14.3), and with 4 to 32 levels on single weights (a Lloyd–Max scalar quantizer of the
    tensor), so that the special cases the factorization contains are candidates too; two
    1-bit code values among 128, 181, 256 and 362 codewords (as many as 13 to 16 bits of
    support address: about 1.9 to 2.3 bits per weight at ``vector_size=8``), two and three
    2-bit values among 256; dense
    2- to 5-bit codes. Each also with per-output-row scales (``row_scales=True``), estimated
    only on tensors whose rows differ enough in scale to pay for them.

    Parameters
    ----------
    vector_size : int, default=8
        Sub-vector length of the sparse and dense settings, and the largest of the k-means
        settings (which also use half and a quarter of it, where those exceed 1).
    large_codebooks : bool, default=False
        Also k-means with 1,024 and 4,096 codewords on sub-vectors of ``vector_size`` (1.25
        and 1.5 bits per weight at ``vector_size=8``, between 256 codewords and the sparse
        settings), for large tensors whose codebook is small beside their codes, such as
        embedding tables. Measured (``benchmarks/README.md``): on all-MiniLM-L6-v2 at 2 bits
        per weight, data-aware with operating-point sensitivities, the mean embedding cosine
        rose from 0.897 to 0.911 and the similarity Spearman fell from 0.837 to 0.831; on a
        4096 x 4096 Gaussian matrix at 2 bits per weight the fit took about 70 % longer and
        lost 0.1 dB. Off by default.

    Returns
    -------
    list of LayerSetting
        62 settings at ``vector_size=8`` (66 with ``large_codebooks``): 31 (33) without row
        scales, then the same with them.

    Raises
    ------
    TypeError
        If ``large_codebooks`` is not a bool or ``vector_size`` not an integer.
    ValueError
        If ``vector_size`` is below 1.

    Examples
    --------
    >>> from qsdlearn.weights import default_candidates
    >>> candidates = default_candidates(8)
    >>> len(candidates), candidates[0].describe()
    (62, 'd=8 k=128 2 of 128 codes=1b codebook=8b')
    >>> len(default_candidates(8, large_codebooks=True))
    66
    """
    if not isinstance(large_codebooks, (bool, np.bool_)):
        raise TypeError(f"large_codebooks must be a bool, got {large_codebooks!r}")
    d = check_positive_int("vector_size", vector_size)
    sparse = [(k, 2, 1) for k in (128, 181, 256, 362)] + [(256, 2, 2), (256, 3, 2)]
    dense = [(d, None, b) for b in (2, 3, 4, 5)]
    candidates = [LayerSetting(d, Constraints(k, s, b, 8)) for k, s, b in sparse + dense]
    for size in sorted({d, max(1, d // 2), max(1, d // 4)} - {1}, reverse=True):
        candidates += [LayerSetting(size, Constraints(k, 1, 0, 8))
                       for k in (16, 32, 64, 128, 256)]
    if d // 2 > 1:
        candidates += [LayerSetting(d // 2, Constraints(k, 1, 0, 8)) for k in (1024, 2048)]
    if large_codebooks:
        candidates += [LayerSetting(d, Constraints(k, 1, 0, 8)) for k in (1024, 4096)]
    candidates += [LayerSetting(1, Constraints(k, 1, 0, 8)) for k in (4, 8, 16, 32)]
    return candidates + [replace(c, row_scales=True) for c in candidates]


def rows_of(shape, vector_size):
    """Number of sub-vectors :func:`to_rows` cuts a tensor of ``shape`` into."""
    return shape[0] * (-(-math.prod(shape[1:]) // vector_size))


def to_rows(weight, vector_size):
    """The matrix of ``vector_size``-element sub-vectors of a weight tensor: the rows that
    :func:`compress_weights` factorizes.

    Axis 0 is the output axis (output channels, a linear layer's ``out_features``). Each
    output row, flattened in C order (a convolution's input channels and kernel positions
    together), is padded with zeros to a multiple of ``vector_size`` and cut into consecutive
    sub-vectors; so a sub-vector never spans two output rows.

    Parameters
    ----------
    weight : array-like of shape (out, ...)
        A tensor of at least one axis, of any dtype.
    vector_size : int
        The sub-vector length ``d`` (at least 1).

    Returns
    -------
    ndarray of shape (out * ceil(prod(shape[1:]) / vector_size), vector_size)
        The sub-vectors, in the weight's dtype, C-contiguous.

    Raises
    ------
    TypeError
        If ``vector_size`` is not an integer.
    ValueError
        If ``vector_size`` is below 1, or ``weight`` has no axis (a scalar).

    See Also
    --------
    from_rows : The inverse.

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn.weights import from_rows, to_rows
    >>> W = np.arange(10.0).reshape(2, 5)
    >>> to_rows(W, 4)
    array([[0., 1., 2., 3.],
           [4., 0., 0., 0.],
           [5., 6., 7., 8.],
           [9., 0., 0., 0.]])
    >>> bool(np.array_equal(from_rows(to_rows(W, 4), W.shape), W))
    True
    """
    vector_size = check_positive_int("vector_size", vector_size)
    weight = np.asarray(weight)
    if weight.ndim == 0:
        raise ValueError("to_rows needs a tensor of at least one axis (its output rows), "
                         "got a scalar")
    matrix = weight.reshape(weight.shape[0], -1)
    pad = (-matrix.shape[1]) % vector_size
    if pad:
        matrix = np.pad(matrix, ((0, 0), (0, pad)))
    return np.ascontiguousarray(matrix.reshape(-1, vector_size))


def from_rows(rows, shape):
    """Inverse of :func:`to_rows`: drop the padding and restore ``shape``.

    Parameters
    ----------
    rows : array-like of shape (n, vector_size)
        The sub-vectors of a tensor of ``shape``, as :func:`to_rows` cuts it.
    shape : tuple of int
        The tensor's shape.

    Returns
    -------
    ndarray of shape ``shape``
        The tensor, in the dtype of ``rows``.

    Raises
    ------
    ValueError
        If ``rows`` is not the sub-vectors :func:`to_rows` cuts a tensor of ``shape`` into
        (for the vector size ``rows.shape[1]``: ``shape[0] * ceil(prod(shape[1:]) /
        rows.shape[1])`` of them).

    See Also
    --------
    to_rows : The sub-vectors of a tensor.

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn.weights import from_rows, to_rows
    >>> kernel = np.arange(54.0).reshape(2, 3, 3, 3)  # a convolution (out, in, kh, kw)
    >>> rows = to_rows(kernel, 8)  # 27 weights per output channel, padded to 32
    >>> rows.shape
    (8, 8)
    >>> bool(np.array_equal(from_rows(rows, kernel.shape), kernel))
    True
    """
    rows = np.asarray(rows)
    shape = tuple(int(n) for n in shape)
    if (not shape or shape[0] == 0 or rows.ndim != 2 or rows.shape[1] == 0
            or rows.shape[0] != rows_of(shape, rows.shape[1])):
        raise ValueError(f"rows of shape {rows.shape} are not the sub-vectors of a tensor of "
                         f"shape {shape} (see to_rows)")
    return rows.reshape(shape[0], -1)[:, :math.prod(shape[1:])].reshape(shape)


def _is_compressible(info):
    return len(info.shape) >= 2 and is_float(info.dtype) and info.size >= MIN_COMPRESSED_SIZE


#: Range of a row scale: the normal ``float8_e5m2`` numbers (float16's exponent range), so
#: that every scale keeps its 3 significant bits.
ROW_SCALE_RANGE = (2.0**-14, 57344.0)
#: Dtypes of stored row scales by their bytes: ``float8_e5m2`` (written from format version 4
#: on) and float16 (format version 3, still read and written as they are).
ROW_SCALE_DTYPES = {1: "float8_e5m2", 2: "float16"}


def output_row_scales(weight):
    """One 8-bit scale per output row of a tensor: the root mean square of the row.

    The rows are those of axis 0 (a linear layer's outputs, a convolution's output
    channels). The RMS is computed in float64 without overflow (each row divided by its
    largest magnitude first) and rounded to the nearest ``float8_e5m2`` (ml_dtypes; the
    OCP 8-bit float with five exponent bits and two mantissa bits, the upper byte of a
    float16), so a scale is within 12.5 % of its row's RMS: enough to bring rows of very
    different scales to about one, for 8 bits a row. Every scale is positive and finite,
    as :class:`~qsdlearn.weights.CompressedLayer` requires: an all-zero row (a pruned channel)
    gets the smallest one, ``2**-14``, so that whatever code it is given decodes to almost nothing,
    and RMS values outside the normal range, ``[2**-14, 57344]``, are clamped to it (rather
    than rounded to a subnormal with fewer significant bits, to zero or to infinity).

    Parameters
    ----------
    weight : array-like of shape (rows, ...)
        A tensor of at least one dimension, of finite floats.

    Returns
    -------
    ndarray of shape (rows,), float8_e5m2
        The scale of every output row.

    Raises
    ------
    TypeError
        If the tensor is complex.
    ValueError
        If the tensor is 0-d or holds NaN or infinity.

    See Also
    --------
    qsdlearn.weights.CompressedLayer : Stores the scales and multiplies the decoded rows by them.

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn.weights import output_row_scales
    >>> weight = np.array([[3.0, -4.0], [0.0, 0.0], [1e-9, 0.0], [1e6, 1e6]])
    >>> output_row_scales(weight).astype(float).tolist()  # sqrt(12.5), 0, 1e-9, 1e6
    [3.5, 6.103515625e-05, 6.103515625e-05, 57344.0]
    """
    weight = np.asarray(weight)
    if weight.ndim == 0:
        raise ValueError("output_row_scales needs a tensor of at least one dimension")
    if np.iscomplexobj(weight):
        raise TypeError("output_row_scales needs real weights, got a complex tensor")
    rows = weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))
    peak, rms = np.empty(rows.shape[0]), np.empty(rows.shape[0])
    step = max(1, _SCALE_BLOCK // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        block = slice(start, start + step)
        peak[block], rms[block] = _peak_and_rms(rows[block].astype(np.float64))
    low, high = ROW_SCALE_RANGE
    return np.where(peak > 0, np.clip(rms, low, high), low).astype(float8_e5m2())


#: Elements of a tensor :func:`output_row_scales` reads at a time (8 MiB in float64: a
#: float64 copy of a whole 4096 x 4096 matrix and its temporaries took about 256 MiB).
_SCALE_BLOCK = 1 << 20


def _peak_and_rms(rows):
    """The largest magnitude and the root mean square of every row of ``rows`` (float64), the
    RMS computed on the row divided by its largest magnitude (no overflow)."""
    if not np.all(np.isfinite(rows)):
        raise ValueError("the tensor holds NaN or infinity: its rows have no scale")
    peak = np.max(np.abs(rows), axis=1, initial=0.0)
    safe = np.where(peak > 0, peak, 1.0)
    rms = safe * np.sqrt(np.mean((rows / safe[:, None]) ** 2, axis=1)) if rows.shape[1] else peak
    return peak, rms


def _check_row_scales(scales, rows):
    """``scales`` as a read-only copy in native byte order if they are ``rows`` positive
    finite values of a dtype of :data:`ROW_SCALE_DTYPES`.

    Raises
    ------
    TypeError
        If they are neither float8_e5m2 nor float16.
    ValueError
        If their shape is not ``(rows,)`` or a scale is not positive and finite.
    """
    scales = np.asarray(scales)
    if scales.dtype.name not in ROW_SCALE_DTYPES.values():
        raise TypeError(f"row scales must be float8_e5m2 (see output_row_scales) or float16, "
                        f"got {scales.dtype}")
    if scales.shape != (rows,):
        raise ValueError(f"row scales must have shape ({rows},), one per output row; got "
                         f"{scales.shape}")
    if not _positive_and_finite(scales):
        raise ValueError("every row scale must be positive and finite")
    scales = scales.astype(scales.dtype.newbyteorder("="))  # a copy, in native byte order
    scales.flags.writeable = False
    return scales


def _positive_and_finite(scales):
    values = scales.astype(np.float32)
    return bool(np.all(np.isfinite(values) & (values > 0)))


def _row_scales_from_bytes(data, scale_bytes):
    """Row scales of ``scale_bytes`` bytes each (:data:`ROW_SCALE_DTYPES`, float16 little
    endian) from a file's bytes."""
    if scale_bytes == 1:
        return np.frombuffer(data, dtype=np.uint8).view(float8_e5m2())
    return np.frombuffer(data, dtype="<f2").astype(np.float16)
