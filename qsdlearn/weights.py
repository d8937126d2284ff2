"""Layer-wise compression of a model's exported weights.

Reshape rule
------------
A tensor of shape ``(out, in, *kernel)`` is viewed as the matrix ``(out, in * prod(kernel))``
in C order (a 2-D weight ``(out, in)`` as it is; a convolution's input channel and kernel
positions are flattened together). Each matrix row is cut into consecutive sub-vectors of
``vector_size`` elements, which become the rows of ``X``; when ``vector_size`` does not divide
the row length, every row is padded with zeros at its end up to the next multiple (the padding
is encoded, counted in the bits, and dropped on decompression).

Tensors with fewer than two dimensions, integer or boolean tensors, tensors with fewer than
:data:`MIN_COMPRESSED_SIZE` elements and tensors whose name matches a ``keep`` pattern are kept
verbatim in their dtype, and counted.

Dtypes
------
float16, bfloat16, float32 and float64 tensors are fitted and decoded in float32, then cast
back to their own dtype; integers and booleans are kept verbatim; any other dtype is refused
before anything is fitted (:mod:`qsdlearn._dtypes`), and so is a tensor to compress that holds
a magnitude of :data:`MAX_MAGNITUDE` (2**64) or more.

Tied tensors
------------
Tensors with the same dtype, shape and content (tied embeddings, or any exact copy) are
compressed once; the file stores the others as ``tied`` to the first, and decompression
restores every name.

Rate
----
``bits_per_weight`` is that of the whole file: ``8 * file bytes / number of weights``, the
header, every stream's rounding to bytes and every kept tensor included. The budget is spent
by :func:`qsdlearn._allocation.allocate`.
"""

import glob
import json
import math
import os
import sys
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from typing import NamedTuple

import joblib
import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, validate_params

from ._allocation import allocate, may_enter, next_steps, options_hull, saving_per_byte
from ._calibration import LayerCalibration, check_entry
from ._checkpoint import matching, open_checkpoint
from ._checks import MAX_BITS_PER_WEIGHT, check_positive_int
from ._constraints import Constraints
from ._container import (FileImage, check_declared_elements, container_size, json_field,
                         write_container)
from ._dtypes import (FLOAT_DTYPES, NUMPY_NAMES, SAFETENSORS_NAMES, cast_reconstruction,
                      float8_e5m2, from_little_endian_bytes, is_float, numpy_dtype,
                      to_little_endian_bytes)
from ._estimator import QuantizedSparseDecomposition
from ._jit import blas_single_thread
from ._kernels import INDEX_DTYPE
from ._params import refuse_bools
from ._sampling import importance_sample
from ._solver import Codes, kmeans_plusplus_seeds, resolve_init
from .codec import (MAX_FEATURES, STREAMS, CompressedMatrix, MatrixSettings, encode_factors,
                    matrix_from_payload, matrix_from_tensors, matrix_payload)
from .metrics import sqnr

__all__ = ["CompressedModel", "LayerSetting", "compress_weights", "default_candidates",
           "output_row_scales", "read_weights"]

MIN_COMPRESSED_SIZE = 1024
#: Tensors to compress must hold magnitudes below this (about 1.8e19): they are fitted and
#: decoded in float32, where the product of two such values, and a sum of fewer than 2**64
#: of them, stay finite (at the top of float32's range the fitted factors and their products
#: overflow; the kernels themselves work on data divided by a power of two).
MAX_MAGNITUDE = 2.0**64
#: The largest ``calibration_damping``: beyond it the weight error is all the objective
#: weighs in float64, and the damped Gram matrix could overflow.
MAX_DAMPING = 1e12
#: ``calibration_damping`` when calibration is given without it.
DEFAULT_DAMPING = 0.1
#: Bytes the planner sets aside, before it allocates the budget, for a layer's entry in the
#: header to grow from that of its smallest candidate to that of the chosen one (the digits
#: and nulls of the stored setting), and for the file (the digits of the payload's size, the
#: padding of the header to 8 bytes). The size of the planned file is then checked exactly.
ENTRY_MARGIN, FILE_MARGIN = 12, 16
#: Bytes of one output row's scale in a file: a ``float8_e5m2`` (files of format version 3
#: stored float16 scales, :data:`ROW_SCALE_DTYPES`).
ROW_SCALE_BYTES = 1
#: Rows of a layer a candidate setting is fitted on to estimate its error: at least this many,
#: and ESTIMATE_ROWS_PER_CODEWORD per codebook row (a codebook fitted on a few rows per
#: codeword fits them far better than it fits the others).
ESTIMATE_ROWS = 1024
ESTIMATE_ROWS_PER_CODEWORD = 8
#: The same for vector quantization (one-hot codes), whose estimate is a few Lloyd passes and
#: cheap on many rows: at least ESTIMATE_ONE_HOT_ROWS, and ESTIMATE_ONE_HOT_ROWS_PER_CODEWORD
#: per codeword up to ESTIMATE_ONE_HOT_MAX_ROWS (beyond, as many as the other candidates: the
#: 4,096 codewords of ``large_codebooks`` would take 131,072 rows). On 8 rows per codeword its
#: estimates were optimistic by 0.2 to 0.4 dB on MiniLM's matrices at 64 to 256 codewords (up
#: to 1.5 dB on rows of very different scales), which drew the planner to vector quantization
#: over better settings; on 32 per codeword and at least 4,096 rows they lie within -0.35 to
#: +0.35 dB of the final fit's on MiniLM's matrices (-0.7 to +0.7 dB on the row-scaled ones).
ESTIMATE_ONE_HOT_ROWS = 4096
ESTIMATE_ONE_HOT_ROWS_PER_CODEWORD = 32
ESTIMATE_ONE_HOT_MAX_ROWS = 8192
#: Rows, besides those fitted, on which the estimate is measured when the layer has them.
ESTIMATE_HELD_OUT_ROWS = 1024
#: Of the rows not fitted, this many of the largest (weighted) squared norm are always among
#: those measured, and count once; the others are a uniform sample that counts for the rest.
#: Weights with outlier features (MiniLM's output layers: one sub-vector position holds
#: values 150 times its standard deviation) have a few sub-vectors that hold much of the
#: error, which a uniform sample of 1,024 misses: dense 3-bit codes on MiniLM's layer-0
#: output.dense were estimated at about 14 dB and gave 9.9.
ESTIMATE_HEAVIEST_ROWS = 64
#: With a Gram matrix an estimate is measured on whole output rows: at least this many (a
#: tensor of 1536 inputs cut into single weights has 1536 sub-vectors a row).
ESTIMATE_OUTPUT_ROWS = 16
ESTIMATE_MAX_ITER = 8
#: Where a candidate's estimate lies, in dB, from its error on held-out rows (pessimistic: the
#: final fit has all of a layer's rows, or up to ``max_fit_rows``) towards its error on the
#: rows fitted (optimistic). The final fit's error lies between, the gap widest for large
#: codebooks on few rows and heavy-tailed data. Measured over the default candidates (final
#: fits of 50 iterations against the estimates of one seed), the spread of estimate minus
#: final error in dB, held-out alone / one third of the way: 4.15 / 2.10 on a 256 x 256
#: matrix of 5 % nonzero Gaussian weights, 0.80 / 0.52 on rows scaled by 10**U(-2, 1),
#: 0.51 / 0.26 on MiniLM's layer-0 query, 0.27 / 0.15 on Gaussian weights (0.3 to 0.35 of
#: the way do as well). Measured before k-means estimates took 32 rows per codeword.
ESTIMATE_TOWARDS_FITTED = 1 / 3
#: A candidate whose codebook takes more than this share of its bytes on a tensor is not
#: estimated there when a smaller candidate fits it (see :func:`_estimate_candidates`).
MAX_CODEBOOK_SHARE = 0.25
#: The same for vector quantization (one-hot codes), whose estimates cost a few Lloyd passes:
#: the setting that finds tensors made of repeated sub-vectors.
MAX_ONE_HOT_CODEBOOK_SHARE = 0.5
#: Bits per weight above the target up to which every tensor's candidates are estimated first;
#: those of more bits on a tensor are estimated only where the allocation or the fill of the
#: budget could take them (:func:`_plan`): the same plan as estimating every candidate, with
#: fewer estimates where the target is low beside the candidates' rates. all-MiniLM-L6-v2 with
#: 2 jobs: at 1 b/w the same file in 47 s instead of 84 s; at 2 b/w, 171 s either way.
FIRST_ROUND_MARGIN = 1.0
_CODEBOOK_STREAMS = ("codebook_support", "codebook_values", "codebook_scales")


@dataclass(frozen=True)
class LayerSetting:
    """How one tensor is compressed: its sub-vector length and the constraints of its
    factorization.

    Parameters
    ----------
    vector_size : int, default=8
        Length ``d`` of the sub-vectors the tensor's rows are cut into (see
        :func:`to_rows`): the rows of the factorized matrix.
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
        """Settings of the matrix :func:`to_rows` makes of a tensor, known before fitting.

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
            bytes each, :attr:`CompressedLayer.nbytes`) included.
        """
        scales = ROW_SCALE_BYTES * shape[0] if self.row_scales else 0
        return sum(self.matrix_settings(shape).stream_sizes().values()) + scales


def default_candidates(vector_size=8, large_codebooks=False):
    """Candidate settings spanning about 0.5 to 5 bits per weight, dense in rate.

    Vector quantization (k-means, 8-bit codebook) with 16, 32, 64, 128 and 256 codewords on
    sub-vectors of ``vector_size``, half and a quarter of it (steps of one bit per
    sub-vector: a split between two settings far apart in rate loses to a point between
    them), and with 4 to 32 levels on single weights (a Lloyd–Max scalar quantizer of the
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
        58 settings at ``vector_size=8`` (62 with ``large_codebooks``): 29 (31) without row
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
    (58, 'd=8 k=128 2 of 128 codes=1b codebook=8b')
    >>> len(default_candidates(8, large_codebooks=True))
    62
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
    if large_codebooks:
        candidates += [LayerSetting(d, Constraints(k, 1, 0, 8)) for k in (1024, 4096)]
    candidates += [LayerSetting(1, Constraints(k, 1, 0, 8)) for k in (4, 8, 16, 32)]
    return candidates + [replace(c, row_scales=True) for c in candidates]


# -- reshape rules -------------------------------------------------------------------------------


def rows_of(shape, vector_size):
    """Number of sub-vectors :func:`to_rows` cuts a tensor of ``shape`` into."""
    return shape[0] * (-(-math.prod(shape[1:]) // vector_size))


def to_rows(weight, vector_size):
    """The matrix of ``vector_size``-element sub-vectors of a weight (see the module notes)."""
    matrix = np.asarray(weight).reshape(weight.shape[0], -1)
    pad = (-matrix.shape[1]) % vector_size
    if pad:
        matrix = np.pad(matrix, ((0, 0), (0, pad)))
    return np.ascontiguousarray(matrix.reshape(-1, vector_size))


def from_rows(rows, shape):
    """Inverse of :func:`to_rows`: drop the padding and restore ``shape``."""
    out = shape[0]
    width = int(np.prod(shape[1:], dtype=np.int64))
    return rows.reshape(out, -1)[:, :width].reshape(shape)


def _is_compressible(info):
    return len(info.shape) >= 2 and is_float(info.dtype) and info.size >= MIN_COMPRESSED_SIZE


def _decode_once(matrix):
    """Decode ``matrix`` without keeping its unpacked factors: they take several times the
    streams' size, and a model decoded layer by layer must not hold every layer's."""
    return CompressedMatrix(matrix.settings, matrix.streams).decode()


# -- row scales ----------------------------------------------------------------------------------

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
    as :class:`CompressedLayer` requires: an all-zero row (a pruned channel) gets the
    smallest one, ``2**-14``, so that whatever code it is given decodes to almost nothing,
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
    CompressedLayer : Stores the scales and multiplies the decoded rows by them.

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
    rows = weight.reshape(weight.shape[0], math.prod(weight.shape[1:])).astype(np.float64)
    if not np.all(np.isfinite(rows)):
        raise ValueError("the tensor holds NaN or infinity: its rows have no scale")
    peak = np.max(np.abs(rows), axis=1, initial=0.0)
    safe = np.where(peak > 0, peak, 1.0)
    rms = safe * np.sqrt(np.mean((rows / safe[:, None]) ** 2, axis=1)) if rows.shape[1] else peak
    low, high = ROW_SCALE_RANGE
    return np.where(peak > 0, np.clip(rms, low, high), low).astype(float8_e5m2())


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


# -- the compressed model ------------------------------------------------------------------------


@dataclass
class CompressedLayer:
    """One compressed tensor: its matrix, original shape and dtype, setting and fit record.

    Attributes
    ----------
    matrix : CompressedMatrix
        The encoded ``(rows, vector_size)`` matrix of the tensor's sub-vectors.
    shape : tuple of int
        Shape of the original tensor.
    dtype : str
        Its dtype name (``"bfloat16"`` included), restored on decompression.
    setting : LayerSetting
        How it was compressed.
    sqnr_db : float
        SQNR of the decompressed tensor against the original, in dB, measured on
        :meth:`decompressed_float` (before the cast to a 16-bit dtype, whose rounding it
        leaves out).
    n_iter : int or None
        Iterations of the final fit (``None`` when not recorded, e.g. read from a file).
    converged : bool or None
        Whether the final fit met its tolerance before ``max_iter`` (``None``: not recorded).
    output_sqnr_db : float or None
        SQNR of the layer's output on its calibration data, in dB: ``10 log10`` of
        ``tr(W H W^T) / tr(E H E^T)`` with ``E`` the weight error and ``H`` the full Gram
        matrix (or the row-weighted SQNR for row weights). ``None`` without calibration; not
        stored in files.
    row_scales : ndarray of shape (shape[0],), float8_e5m2 or float16, or None
        With ``setting.row_scales``: one positive, finite scale per output row (axis 0 of the
        tensor), by which :meth:`decompress` multiplies the decoded rows (see
        :func:`output_row_scales`); stored in files and counted in :attr:`nbytes` and the
        report's bits (8 bits per output row; 16 for the float16 scales of files of format
        version 3). Kept as a read-only copy. ``None`` without.

    Raises
    ------
    TypeError
        If ``row_scales`` are neither float8_e5m2 nor float16.
    ValueError
        If the matrix is not what ``setting`` makes of a tensor of ``shape``, or
        ``row_scales`` are given without ``setting.row_scales`` or missing with it, have
        another shape than ``(shape[0],)``, or hold a scale that is not positive and finite.
    """

    matrix: CompressedMatrix
    shape: tuple
    dtype: str
    setting: LayerSetting
    sqnr_db: float
    n_iter: int | None = None
    converged: bool | None = None
    output_sqnr_db: float | None = None
    row_scales: np.ndarray | None = None

    def __post_init__(self):
        self.shape = tuple(self.shape)
        if self.setting.matrix_settings(self.shape, self.matrix.settings.dtype) != \
                self.matrix.settings:
            raise ValueError(
                f"the matrix ({self.matrix.settings}) is not what the setting "
                f"({self.setting.describe()}) makes of a tensor of shape {self.shape}")
        if self.setting.row_scales != (self.row_scales is not None):
            raise ValueError(
                "row_scales are given without setting.row_scales" if self.row_scales is not None
                else "setting.row_scales needs row_scales: one scale per output row (see "
                     "output_row_scales)")
        if self.row_scales is not None:
            self.row_scales = _check_row_scales(self.row_scales, self.shape[0])

    @property
    def nbytes(self):
        """Bytes of its streams and row scales in a file."""
        return self.matrix.nbytes + self._scale_bytes()

    def _scale_bytes(self):
        return 0 if self.row_scales is None else self.row_scales.nbytes

    def decompress(self):
        """The reconstructed tensor (decoded in float32), in its original shape and dtype.

        With row scales, every decoded output row is multiplied by its scale (in the dtype of
        the encoded matrix, float32 for every layer :func:`compress_weights` makes) before
        the cast to the tensor's dtype.
        """
        return cast_reconstruction(self.decompressed_float(), self.dtype)

    def decompressed_float(self):
        """The reconstructed tensor in the encoded matrix's dtype (before the cast of
        :meth:`decompress`)."""
        decoded = from_rows(_decode_once(self.matrix), self.shape)
        if self.row_scales is not None:
            scales = self.row_scales.astype(decoded.dtype)
            with np.errstate(over="ignore"):  # past the dtype's range only in a crafted file
                decoded = decoded * scales.reshape((-1,) + (1,) * (decoded.ndim - 1))
            top = np.finfo(decoded.dtype).max  # clipped, as the decoded matrix itself is
            np.clip(decoded, -top, top, out=decoded)
        return decoded

    def record(self):
        """What :meth:`CompressedModel.report` shows of this tensor."""
        scales = 8 * self._scale_bytes()
        return dict(setting=self.setting.describe(), payload_bits=self.matrix.bits + scales,
                    sqnr_db=self.sqnr_db, n_iter=self.n_iter, converged=self.converged,
                    output_sqnr_db=self.output_sqnr_db)

    def file_entry(self, name):
        """The layer's entry in a file's layer list: ``[1, name, dtype, shape, sqnr_db,
        setting]`` (see :meth:`CompressedModel.to_bytes`)."""
        return [_COMPRESSED, name, SAFETENSORS_NAMES[self.dtype], _shape_list(self.shape),
                _stored_sqnr(self.sqnr_db), _setting_fields(self)]

    def payload(self):
        """Its bytes in a file: the matrix's streams back to back, then the row scales (a
        byte each, or little-endian float16), if any."""
        data = matrix_payload(self.matrix)
        if self.row_scales is not None:
            data += to_little_endian_bytes(self.row_scales)
        return data


@dataclass(frozen=True)
class RowSplit:
    """Two settings sharing one tensor: its first ``rows`` output rows (axis 0) under
    ``first``, the others under ``second``. The mix of two settings, at any share of rows,
    is how a point between two vertices of the operational rate–distortion hull is reached.

    Attributes
    ----------
    first, second : LayerSetting
        The settings of the two blocks of rows.
    rows : int
        Output rows of the first block.
    """

    first: LayerSetting
    second: LayerSetting
    rows: int

    def blocks(self, shape):
        """``(setting, block shape, row slice)`` of both blocks of a tensor of ``shape``."""
        rest = tuple(shape[1:])
        return [(self.first, (self.rows, *rest), slice(0, self.rows)),
                (self.second, (shape[0] - self.rows, *rest), slice(self.rows, shape[0]))]

    def describe(self):
        """A short human-readable form of the split."""
        return f"{self.rows} rows {self.first.describe()} + rest {self.second.describe()}"


@dataclass
class SplitLayer:
    """One tensor compressed in two blocks of output rows (see :class:`RowSplit`), with the
    interface of :class:`CompressedLayer`.

    Attributes
    ----------
    parts : list of CompressedLayer
        The blocks, in row order.
    shape : tuple of int
        Shape of the original tensor.
    dtype : str
        Its dtype name, restored on decompression.
    sqnr_db : float
        SQNR of the whole decompressed tensor, in dB.
    output_sqnr_db : float or None
        SQNR of the whole layer's output on its calibration data (see
        :class:`CompressedLayer`).
    """

    parts: list
    shape: tuple
    dtype: str
    sqnr_db: float
    output_sqnr_db: float | None = None

    @property
    def setting(self):
        """The :class:`RowSplit` of the tensor."""
        first, second = self.parts
        return RowSplit(first.setting, second.setting, first.shape[0])

    @property
    def nbytes(self):
        """Bytes of its streams in a file."""
        return sum(part.nbytes for part in self.parts)

    def decompress(self):
        """The reconstructed tensor, in its original shape and dtype."""
        return np.concatenate([part.decompress() for part in self.parts], axis=0)

    def record(self):
        """What :meth:`CompressedModel.report` shows of this tensor."""
        records = [part.record() for part in self.parts]
        n_iter = [r["n_iter"] for r in records]
        converged = [r["converged"] for r in records]
        return dict(
            setting=self.setting.describe(), payload_bits=sum(r["payload_bits"] for r in records),
            sqnr_db=self.sqnr_db, n_iter=None if None in n_iter else max(n_iter),
            converged=None if None in converged else all(converged),
            output_sqnr_db=self.output_sqnr_db,
        )

    def file_entry(self, name):
        """The tensor's entry in a file's layer list: ``[2, name, dtype, shape, sqnr_db,
        parts]``, each part ``[rows, sqnr_db, setting]`` (see :meth:`CompressedModel.to_bytes`)."""
        parts = [[int(part.shape[0]), _stored_sqnr(part.sqnr_db), _setting_fields(part)]
                 for part in self.parts]
        return [_SPLIT, name, SAFETENSORS_NAMES[self.dtype], _shape_list(self.shape),
                _stored_sqnr(self.sqnr_db), parts]

    def payload(self):
        """Its bytes in a file: those of its parts, in row order."""
        return b"".join(part.payload() for part in self.parts)


@dataclass
class KeptTensor:
    """A tensor stored verbatim (1-D, integer, boolean or small), with the interface of
    :class:`CompressedLayer`.

    Attributes
    ----------
    array : ndarray
        The tensor itself.
    """

    array: np.ndarray

    @property
    def shape(self):
        """Shape of the tensor."""
        return self.array.shape

    @property
    def dtype(self):
        """Its dtype name."""
        return self.array.dtype.name

    @property
    def nbytes(self):
        """Bytes of the tensor in a file."""
        return self.array.nbytes

    def decompress(self):
        """A copy of the tensor."""
        return self.array.copy()

    def record(self):
        """What :meth:`CompressedModel.report` shows of this tensor."""
        return dict(setting=f"kept ({self.dtype})", payload_bits=8 * self.nbytes,
                    sqnr_db=float("inf"), n_iter=None, converged=None, output_sqnr_db=None)

    def file_entry(self, name):
        """The tensor's entry in a file's layer list: ``[0, name, dtype, shape]`` (see
        :meth:`CompressedModel.to_bytes`)."""
        return [_KEPT, name, SAFETENSORS_NAMES[self.dtype], _shape_list(self.shape)]

    def payload(self):
        """Its bytes in a file: the little-endian values of its dtype, in C order."""
        return to_little_endian_bytes(self.array)


class CompressedModel(FileImage):
    """The compressed weights of a model: compressed layers and tensors kept verbatim.

    Build one with :func:`compress_weights`, or read one with :func:`qsdlearn.load` or
    :meth:`from_bytes`. Decompression restores every tensor's name, shape (0-d included) and
    dtype (bfloat16 included); :meth:`decompress` with a name decodes that tensor alone.

    Parameters
    ----------
    layers : mapping of str to CompressedLayer, SplitLayer or KeptTensor
        In the model's order. Names that map to the same object are tied: stored once, and
        counted once in :attr:`n_weights`.

    Attributes
    ----------
    layers : dict of str to CompressedLayer, SplitLayer or KeptTensor
        The tensors, in the original order.

    Notes
    -----
    The file (format version 4, :meth:`to_bytes`) is a safetensors file of one ``U8`` tensor,
    ``payload``, that holds the bytes of every stored tensor back to back, and of a layer
    list in its metadata with one JSON array per tensor: ``[0, name, dtype, shape]`` for a
    kept tensor (its little-endian values), ``[1, name, dtype, shape, sqnr_db, setting]`` for
    a compressed one (its matrix's streams, then its row scales if it has any, a byte each),
    ``[2, name, dtype, shape, sqnr_db, parts]`` for a split one (its parts' bytes in row
    order) and ``[3, name, index]`` for one tied to an earlier entry (no bytes). A
    ``setting`` is ``[d, k, s, code_bits, codebook_bits, t, float_bits, row_scales]``
    (``row_scales``: the bytes of one row scale, 0 without); the size of every tensor's
    bytes follows from its entry, so no offsets are stored and a compressed tensor costs a
    few dozen bytes of header besides its name. Files of format versions 1 to 3 are read too
    (version 3 is this layout with float16 row scales, 1 in ``row_scales``). The user
    guide's section on the file format describes it byte by byte, with what a reader checks.

    Examples
    --------
    >>> import numpy as np
    >>> import qsdlearn
    >>> rng = np.random.default_rng(0)
    >>> weights = {"fc.weight": rng.standard_normal((128, 64)), "fc.bias": np.zeros(128)}
    >>> setting = qsdlearn.LayerSetting(8, qsdlearn.Constraints(16, n_nonzero=1, code_bits=0))
    >>> model = qsdlearn.compress_weights(weights, settings=setting, random_state=0)
    >>> [record["setting"] for record in model.report()]
    ['d=8 k=16 1 of 16 codes=0b codebook=float', 'kept (float64)']
    >>> restored = model.decompress()
    >>> restored["fc.weight"].shape, restored["fc.bias"].dtype
    ((128, 64), dtype('float64'))
    >>> model.decompress("fc.bias").shape
    (128,)
    """

    _KIND = "model"

    def __init__(self, layers):
        self.layers = dict(layers)
        self._image = None

    def tied_to(self, name):
        """The tensor a tied tensor shares its entry with.

        Parameters
        ----------
        name : str
            A tensor's name.

        Returns
        -------
        str
            The first name whose entry tensor ``name`` shares (``name`` itself when none).
        """
        return self._firsts()[name]

    def _firsts(self):
        """Every name to the first name of its entry."""
        seen = {}
        return {name: seen.setdefault(id(entry), name) for name, entry in self.layers.items()}

    def _distinct(self):
        """The entries, each tied group once."""
        return list({id(entry): entry for entry in self.layers.values()}.values())

    # size ---------------------------------------------------------------------------------------

    @property
    def n_weights(self):
        """Number of weights of all tensors (tied tensors counted once)."""
        return sum(math.prod(entry.shape) for entry in self._distinct())

    @property
    def original_nbytes(self):
        """Bytes of the weights in their original dtypes (tied tensors counted once)."""
        return sum(math.prod(entry.shape) * numpy_dtype(entry.dtype).itemsize
                   for entry in self._distinct())

    @property
    def original_dtypes(self):
        """Names of the original dtypes of the compressed layers (of all tensors when none
        is compressed), most weights first.
        """
        counts = {}
        compressed = [e for e in self._distinct() if isinstance(e, (CompressedLayer, SplitLayer))]
        for entry in compressed or self._distinct():
            counts[entry.dtype] = counts.get(entry.dtype, 0) + math.prod(entry.shape)
        return sorted(counts, key=lambda name: -counts[name])

    @property
    def nbytes(self):
        """Size of the file :meth:`save` writes, in bytes.

        Computed from the entries' sizes, without building the file.
        """
        if self._image is not None:
            return len(self._image)
        entries, stored = self._file_layers()
        size = sum(entry.nbytes for entry in stored)
        return container_size([(PAYLOAD, "U8", (size,), size)], self._file_metadata(entries))

    @property
    def bits_per_weight(self):
        """``8 * file bytes / n_weights``: everything counted."""
        return 8 * self.nbytes / self.n_weights

    @property
    def compression_ratio(self):
        """:attr:`original_nbytes` over the file's bytes: how much smaller the file is than
        the weights in their own dtypes (a bfloat16 model counts 16 bits a weight).
        """
        return self.original_nbytes / self.nbytes

    # content ------------------------------------------------------------------------------------

    def decompress(self, name=None):
        """The decompressed tensors, or one of them.

        Parameters
        ----------
        name : str, optional
            Decode only this tensor (memory: that tensor alone).

        Returns
        -------
        dict of str to ndarray, or ndarray
            Name to array with the original shapes and dtypes, in order; or the array of
            ``name``.

        Raises
        ------
        TypeError
            If ``name`` is not a string (one name: for several, call it once per name).
        KeyError
            If the model has no tensor ``name``.
        """
        if name is not None:
            if not isinstance(name, str):
                raise TypeError(f"name is one tensor's name (a str), got {type(name).__name__}; "
                                "call decompress once per name for several")
            if name not in self.layers:
                raise KeyError(f"no tensor named {name!r}")
            return self.layers[name].decompress()
        decoded = {}
        for key, first in self._firsts().items():
            decoded[key] = decoded[first] if first != key else self.layers[key].decompress()
        return decoded

    def report(self):
        """Per-tensor records.

        Returns
        -------
        list of dict
            One per tensor, in order: ``name``, ``shape``, ``dtype`` (original),
            ``setting`` (text), ``payload_bits`` (exact bits of its streams or of the kept
            tensor), ``stored_bits`` (what the file holds for it: streams rounded up to whole
            bytes; 0 for a tensor tied to an earlier one), ``bits_per_weight``
            (``stored_bits`` per weight), ``sqnr_db`` (``inf`` for kept tensors), ``n_iter``
            and ``converged`` of the final fit (``None`` when not recorded), and
            ``output_sqnr_db``, the SQNR of the layer's output on its calibration data
            (``None`` for layers without calibration, and in models read from files).
        """
        records = []
        firsts = self._firsts()
        for name, entry in self.layers.items():
            size = math.prod(entry.shape)
            record = entry.record()
            stored = 8 * entry.nbytes
            first = firsts[name]
            if first != name:
                record = dict(record, setting=f"tied to {first}", payload_bits=0)
                stored = 0
            records.append(dict(
                name=name, shape=tuple(entry.shape), dtype=entry.dtype,
                setting=record["setting"], payload_bits=record["payload_bits"],
                stored_bits=stored, bits_per_weight=stored / max(size, 1),
                sqnr_db=record["sqnr_db"], n_iter=record["n_iter"],
                converged=record["converged"], output_sqnr_db=record["output_sqnr_db"],
            ))
        return records

    def report_table(self):
        """The report and the totals as printable text.

        Returns
        -------
        str
            One line per tensor, then the totals. Bits per weight are over the whole file;
            the ratio is over the weights in their original dtypes, which the last line names.
        """
        rows = self.report()
        width = max([len(r["name"]) for r in rows] + [4])
        shape_width = max([len(str(r["shape"])) for r in rows] + [18])
        dtype_width = max([len(r["dtype"]) for r in rows] + [8])
        setting_width = max([len(r["setting"]) for r in rows] + [7])
        calibrated = any(r["output_sqnr_db"] is not None for r in rows)
        lines = [
            f"{'name':<{width}}  {'shape':<{shape_width}} {'dtype':<{dtype_width}} "
            f"{'setting':<{setting_width}} {'bits/weight':>11} "
            f"{'SQNR dB':>8}" + (f" {'output dB':>9}" if calibrated else "")
        ]
        for r in rows:
            note = "" if r["converged"] is not False else f"  (not converged in {r['n_iter']})"
            output = ""
            if calibrated:
                output = (f" {r['output_sqnr_db']:>9.2f}" if r["output_sqnr_db"] is not None
                          else f" {'-':>9}")
            lines.append(
                f"{r['name']:<{width}}  {str(r['shape']):<{shape_width}} "
                f"{r['dtype']:<{dtype_width}} "
                f"{r['setting']:<{setting_width}} {r['bits_per_weight']:>11.3f} "
                f"{r['sqnr_db']:>8.2f}"
                f"{output}{note}"
            )
        lines.append(
            f"total: {self.n_weights} weights, {self.nbytes} bytes, "
            f"{self.bits_per_weight:.3f} bits/weight (header included), "
            f"ratio {self.compression_ratio:.1f}x over the original "
            f"({', '.join(self.original_dtypes)})"
        )
        return "\n".join(lines)

    # file image ---------------------------------------------------------------------------------

    def to_bytes(self):
        """The file image (format version 4).

        Returns
        -------
        bytes
            A safetensors file of one ``U8`` tensor, ``payload``: the bytes of every stored
            tensor back to back, in order (a compressed layer's five streams and its row
            scales, a split tensor's parts, a kept tensor's values; nothing for a tied
            tensor); the metadata's ``layers`` list describes them, one short JSON array per
            tensor (see the user guide's section on the file format).
        """
        if self._image is None:
            entries, stored = self._file_layers()
            payload = b"".join(entry.payload() for entry in stored)
            self._image = write_container([(PAYLOAD, "U8", (len(payload),), payload)],
                                          self._file_metadata(entries))
        return self._image

    def _file_layers(self):
        """The file's layer list (one entry per tensor) and the entries whose bytes it stores,
        in order (a tied tensor stores none)."""
        entries, stored, position = [], [], {}
        firsts = self._firsts()
        for i, (name, entry) in enumerate(self.layers.items()):
            first = firsts[name]
            if first != name:
                entries.append([_TIED, name, position[first]])
                continue
            position[name] = i
            entries.append(entry.file_entry(name))
            stored.append(entry)
        return entries, stored

    def _file_metadata(self, entries):
        return {"kind": self._KIND, "layers": json.dumps(entries, separators=(",", ":"))}

    @classmethod
    def _from_container(cls, meta, tensors, max_elements=None):
        """Rebuild from a parsed container (format versions 1 to 4).

        Every layer's entry is checked, the declared sizes against ``max_elements`` and the
        payload's length, before any stream is decoded.

        Parameters
        ----------
        meta : dict
            The file's metadata (:func:`qsdlearn._container.read_container`).
        tensors : dict
            Its tensors by name.
        max_elements : int, optional
            Largest number of elements the layers may declare in all (default ``2**32``).

        Returns
        -------
        CompressedModel
            The validated model.
        """
        cls._check_kind(meta)
        version = int(meta["format_version"])  # one of READ_VERSIONS (read_container)
        if version <= 2:
            return cls(_layers_of_version_2(meta, tensors, max_elements))
        return cls(_layers_of_compact_list(meta, tensors, max_elements, version))

    def __repr__(self):
        return (
            f"CompressedModel({len(self.layers)} tensors, {self.n_weights} weights, "
            f"{self.bits_per_weight:.3f} bits/weight)"
        )


# -- the model file, format versions 3 and 4 -----------------------------------------------------

#: Name of the one tensor of a model file.
PAYLOAD = "payload"
#: First field of an entry of a model file's layer list: its kind.
_KEPT, _COMPRESSED, _SPLIT, _TIED = 0, 1, 2, 3
#: SQNRs are stored rounded to 0.01 dB and within +-_SQNR_LIMIT dB (the SQNR of float64
#: data stays within about +-6,400 dB), infinities and NaN as they are, so that a stored
#: SQNR takes at most 9 characters.
_SQNR_LIMIT = 99999.99
#: The widest SQNR a file stores ("-99999.99", as wide as "-Infinity"): the placeholders that
#: size a planned file carry it, so that the size is an upper bound.
_WIDEST_SQNR = -_SQNR_LIMIT
#: Width of the floats of a stored setting to the dtype of its matrix.
_MATRIX_DTYPES = {32: "float32", 64: "float64"}
_MAX_NDIM = 32
_MAX_DIM = 2**48


def _stored_sqnr(value):
    """An SQNR as a file stores it (see :data:`_SQNR_LIMIT`)."""
    value = float(value)
    if math.isfinite(value):
        return round(min(max(value, -_SQNR_LIMIT), _SQNR_LIMIT), 2)
    return value


def _shape_list(shape):
    return [int(v) for v in shape]


def _setting_fields(layer):
    """A compressed layer's setting as a file stores it: ``[vector_size, n_components,
    n_nonzero, code_bits, codebook_bits, component_nonzero, float_bits, row_scales]``
    (``null`` for ``None``, ``float_bits`` 32 or 64: the dtype of the encoded matrix,
    ``row_scales`` the bytes of a row scale, :data:`ROW_SCALE_DTYPES`, or 0 without; in
    format version 3 it was 1 for float16 scales)."""
    setting = layer.setting
    c = setting.constraints
    fields = [setting.vector_size, c.n_components, c.n_nonzero, c.code_bits, c.codebook_bits,
              c.component_nonzero, layer.matrix.settings.float_bits,
              0 if layer.row_scales is None else layer.row_scales.itemsize]
    return [None if value is None else int(value) for value in fields]


def _is_int(value, low=0, high=None):
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))


@dataclass(frozen=True)
class _Block:
    """A checked compressed block (a layer, or a part of a split one) of a file, before its
    bytes are read."""

    setting: LayerSetting
    settings: MatrixSettings
    shape: tuple
    dtype: str
    sqnr_db: float
    scale_bytes: int  # of one row scale (ROW_SCALE_DTYPES), 0 without

    @property
    def stream_bytes(self):
        return sum(self.settings.stream_sizes().values())

    @property
    def nbytes(self):
        return self.stream_bytes + self.scale_bytes * self.shape[0]

    def read(self, data, what):
        """The :class:`CompressedLayer` of this block from its ``nbytes`` bytes ``data``."""
        matrix = matrix_from_payload(self.settings, data[:self.stream_bytes], what)
        scales = None
        if self.setting.row_scales:
            scales = _row_scales_from_bytes(data[self.stream_bytes:], self.scale_bytes)
            if scales.shape != (self.shape[0],):
                raise ValueError(f"damaged file: {what} has {scales.size} row scales for "
                                 f"{self.shape[0]} rows")
            if not _positive_and_finite(scales):
                raise ValueError(f"damaged file: {what} has a row scale that is not positive "
                                 "and finite")
        return CompressedLayer(matrix, self.shape, self.dtype, self.setting, self.sqnr_db,
                               row_scales=scales)


def _shape_field(raw, name, compressed):
    """A checked stored shape: at least 2 positive dimensions for a compressed tensor."""
    if (not isinstance(raw, list) or len(raw) > _MAX_NDIM
            or not all(_is_int(v, 1 if compressed else 0, _MAX_DIM) for v in raw)
            or (compressed and len(raw) < 2)):
        raise ValueError(f"damaged file: layer {name!r} has an invalid shape")
    return tuple(raw)


def _sqnr_field(raw, name):
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ValueError(f"damaged file: layer {name!r} has an invalid SQNR")
    return float(raw)


def _block_field(raw, shape, dtype, sqnr_db, name, version):
    """A checked stored setting (see :func:`_setting_fields`) of a block of ``shape`` in a file
    of format ``version`` (3 or 4)."""
    scale_bytes = {0: 0, 1: 2} if version == 3 else {0: 0, **{b: b for b in ROW_SCALE_DTYPES}}
    if (not isinstance(raw, list) or len(raw) != 8 or not _is_int(raw[0], 1, 2**31)
            or not _is_int(raw[6]) or raw[6] not in _MATRIX_DTYPES
            or not _is_int(raw[7]) or raw[7] not in scale_bytes):
        raise ValueError(f"damaged file: layer {name!r} has invalid settings")
    d, k, s, code_bits, codebook_bits, t, float_bits, row_scales = raw
    flat = dict(n_rows=rows_of(shape, d), n_features=d, n_components=k, n_nonzero=s,
                code_bits=code_bits, codebook_bits=codebook_bits, component_nonzero=t,
                dtype=_MATRIX_DTYPES[float_bits])
    try:
        settings = MatrixSettings.from_dict(flat)
    except ValueError as exc:
        raise ValueError(f"damaged file: layer {name!r} has invalid settings ({exc})") from None
    setting = LayerSetting(d, settings.constraints, row_scales=bool(row_scales))
    return _Block(setting, settings, shape, dtype, sqnr_db, scale_bytes[row_scales])


def _float_dtype_field(raw, name):
    if not isinstance(raw, str) or NUMPY_NAMES.get(raw) not in FLOAT_DTYPES:
        raise ValueError(f"damaged file: layer {name!r} has an invalid dtype")
    return NUMPY_NAMES[raw]


def _entry_field(raw, i, version):
    """A checked entry of the layer list of a file of format ``version`` (3 or 4):
    ``(name, kind, spec, payload bytes)``."""
    lengths = {_KEPT: 4, _COMPRESSED: 6, _SPLIT: 6, _TIED: 3}
    if (not isinstance(raw, list) or len(raw) < 2 or not _is_int(raw[0])
            or raw[0] not in lengths or not isinstance(raw[1], str)):
        raise ValueError(f"damaged file: entry {i} of the layer list is invalid")
    kind, name = raw[0], raw[1]
    if len(raw) != lengths[kind]:
        raise ValueError(f"damaged file: layer {name!r} has {len(raw)} fields, its kind "
                         f"{lengths[kind]}")
    if kind == _TIED:
        if not _is_int(raw[2], 0, i - 1):
            raise ValueError(f"damaged file: layer {name!r} is tied to no earlier layer")
        return name, kind, raw[2], 0
    if kind == _KEPT:
        if not isinstance(raw[2], str) or raw[2] not in NUMPY_NAMES:
            raise ValueError(f"damaged file: layer {name!r} has an invalid dtype")
        dtype = NUMPY_NAMES[raw[2]]
        shape = _shape_field(raw[3], name, compressed=False)
        return name, kind, (dtype, shape), math.prod(shape) * numpy_dtype(dtype).itemsize
    dtype = _float_dtype_field(raw[2], name)
    shape = _shape_field(raw[3], name, compressed=True)
    sqnr_db = _sqnr_field(raw[4], name)
    if kind == _COMPRESSED:
        block = _block_field(raw[5], shape, dtype, sqnr_db, name, version)
        return name, kind, block, block.nbytes
    parts = raw[5]
    if (not isinstance(parts, list) or len(parts) != 2
            or not all(isinstance(p, list) and len(p) == 3 and _is_int(p[0], 1) for p in parts)
            or sum(p[0] for p in parts) != shape[0]):
        raise ValueError(f"damaged file: the parts of layer {name!r} do not add up to its rows")
    blocks = [_block_field(setting, (rows, *shape[1:]), dtype, _sqnr_field(sqnr, name), name,
                           version) for rows, sqnr, setting in parts]
    return name, kind, (shape, dtype, sqnr_db, blocks), sum(b.nbytes for b in blocks)


def _layers_of_compact_list(meta, tensors, max_elements, version):
    """The layers of a model file of format ``version`` 3 or 4 (one payload, a compact layer
    list), every entry checked, the declared elements against ``max_elements`` and the
    payload's length, before any is decoded."""
    if list(tensors) != [PAYLOAD] or tensors[PAYLOAD][0] != "U8":
        raise ValueError(f"damaged file: a model file holds one U8 tensor, {PAYLOAD!r}; "
                         f"found {list(tensors)}")
    entries, seen = [], set()
    for i, raw in enumerate(json_field(meta, "layers", list)):
        entry = _entry_field(raw, i, version)
        if entry[0] in seen:
            raise ValueError(f"damaged file: layer {entry[0]!r} appears twice")
        seen.add(entry[0])
        entries.append(entry)
    blocks = [block for _, kind, spec, _ in entries if kind in (_COMPRESSED, _SPLIT)
              for block in ([spec] if kind == _COMPRESSED else spec[3])]
    check_declared_elements(sum(b.settings.declared_elements for b in blocks), max_elements,
                            "compressed layers")
    payload = memoryview(tensors[PAYLOAD][2])
    expected = sum(size for *_, size in entries)
    if expected != len(payload):
        raise ValueError(f"damaged file: the layers take {expected} bytes, the payload holds "
                         f"{len(payload)}")
    layers, names, offset = {}, [], 0
    for name, kind, spec, size in entries:
        data = payload[offset:offset + size]
        offset += size
        if kind == _TIED:
            layers[name] = layers[names[spec]]
        elif kind == _KEPT:
            layers[name] = KeptTensor(from_little_endian_bytes(data, *spec))
        elif kind == _COMPRESSED:
            layers[name] = spec.read(data, f"layer {name!r}")
        else:
            shape, dtype, sqnr_db, parts = spec
            start, read = 0, []
            for j, block in enumerate(parts):
                read.append(block.read(data[start:start + block.nbytes],
                                       f"layer {name!r} (part {j})"))
                start += block.nbytes
            layers[name] = SplitLayer(read, shape, dtype, sqnr_db)
        names.append(name)
    return layers


# -- the model file, format versions 1 and 2 -----------------------------------------------------


def _layers_of_version_2(meta, tensors, max_elements):
    """The layers of a model file of format version 1 or 2: a container tensor per stream
    (``<i>.<stream>``, ``<i>.<part>.<stream>``) or kept tensor (``<i>``), a JSON object per
    layer."""
    headers = {}
    for i, entry in enumerate(json_field(meta, "layers", list)):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"damaged file: layer {i} has no name")
        name = entry["name"]
        if name in headers:
            raise ValueError(f"damaged file: layer {name!r} appears twice")
        if entry.get("kind") == "kept":
            if f"{i}" not in tensors:
                raise ValueError(f"damaged file: tensor of layer {name!r} is missing")
            headers[name] = (f"{i}", "kept")
        elif entry.get("kind") == "compressed":
            headers[name] = (f"{i}", _layer_header(entry, name))
        elif entry.get("kind") == "split":
            headers[name] = (f"{i}", _split_header(entry, name))
        elif entry.get("kind") == "tied":
            target = entry.get("to")
            if not isinstance(target, str) or target not in headers:
                raise ValueError(f"damaged file: layer {name!r} is tied to no earlier layer")
            headers[name] = (target, "tied")
        else:
            raise ValueError(f"damaged file: layer {name!r} has an unknown kind")
    declared = sum(part[0].declared_elements for _, header in headers.values()
                   if isinstance(header, (tuple, list))
                   for part in (header[:-1] if isinstance(header, list) else [header]))
    check_declared_elements(declared, max_elements, "compressed layers")
    layers = {}
    used = set()
    for name, (key, header) in headers.items():
        if header == "tied":
            layers[name] = layers[key]
        elif header == "kept":
            dtype_name, shape, chunk = tensors[key]
            layers[name] = KeptTensor(from_little_endian_bytes(chunk, NUMPY_NAMES[dtype_name],
                                                               shape))
            used.add(key)
        elif isinstance(header, list):  # a split: its parts, then the whole
            parts = [_layer_from_header(part, tensors, f"{key}.{j}", used)
                     for j, part in enumerate(header[:-1])]
            layers[name] = SplitLayer(parts, *header[-1])
        else:
            layers[name] = _layer_from_header(header, tensors, key, used)
    if used != set(tensors):
        raise ValueError("damaged file: tensors that no layer uses")
    return layers


def _layer_from_header(header, tensors, key, used):
    """The :class:`CompressedLayer` of a checked header, its streams named ``key.<stream>``
    (recorded in ``used``)."""
    settings, shape, dtype, quality = header
    matrix = matrix_from_tensors(settings, tensors, prefix=f"{key}.")
    used.update(f"{key}.{stream}" for stream in STREAMS)
    return CompressedLayer(matrix, shape, dtype, LayerSetting(settings.n_features,
                                                              settings.constraints), quality)


def _split_header(entry, name):
    """The checked header entry of a split tensor: one :func:`_layer_header` per block of
    rows, then ``(shape, dtype, sqnr_db)`` of the whole."""
    parts = entry.get("parts")
    shape = entry.get("shape")
    if (not isinstance(parts, list) or len(parts) != 2 or not isinstance(shape, list)
            or not shape or not all(isinstance(p, dict) for p in parts)):
        raise ValueError(f"damaged file: split layer {name!r} has invalid parts")
    rows = [part.get("rows") for part in parts]
    if (not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in rows)
            or not isinstance(shape[0], int) or sum(rows) != shape[0]):
        raise ValueError(f"damaged file: the parts of layer {name!r} do not add up to its rows")
    headers = [
        _layer_header(dict(part, shape=[rows_j, *shape[1:]], dtype=entry.get("dtype")), name)
        for part, rows_j in zip(parts, rows)
    ]
    try:
        quality = float(entry["sqnr_db"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"damaged file: layer {name!r} has invalid settings") from None
    return headers + [(tuple(shape), headers[0][2], quality)]


def _layer_header(entry, name):
    """The checked header entry of a compressed layer: its matrix settings, shape, dtype name
    and SQNR."""
    try:
        settings = MatrixSettings.from_dict(entry["matrix"])
        shape = tuple(entry["shape"])
        dtype = entry["dtype"]
        quality = float(entry["sqnr_db"])
    except (KeyError, TypeError):
        raise ValueError(f"damaged file: layer {name!r} has invalid settings") from None
    except ValueError as exc:
        if str(exc).startswith("damaged file"):
            raise
        raise ValueError(f"damaged file: layer {name!r} has invalid settings") from None
    if (
        not all(isinstance(v, int) and v > 0 for v in shape)
        or len(shape) < 2
        or dtype not in FLOAT_DTYPES
    ):
        raise ValueError(f"damaged file: layer {name!r} has an invalid shape or dtype")
    if settings.n_rows != rows_of(shape, settings.n_features):
        raise ValueError(f"damaged file: layer {name!r} shape does not match its codes")
    return settings, shape, dtype, quality


# -- reading weights -----------------------------------------------------------------------------


def read_weights(source):
    """Name to array from a mapping or a file, checked as :func:`qsdlearn.compress_weights`
    checks them (dtypes, then finiteness, naming the tensor); never pickle.

    Parameters
    ----------
    source : mapping or str or path-like
        What :func:`qsdlearn.compress_weights` accepts: a mapping, a ``.npz`` or
        ``.safetensors`` file, a ``*.safetensors.index.json`` index of shards or a folder of shards.

    Returns
    -------
    dict of str to ndarray
        Name to array, in the source's order, with the stored shapes and dtypes (bfloat16
        as ``ml_dtypes.bfloat16``).

    Raises
    ------
    ValueError
        If the source is not a readable checkpoint or a tensor holds NaN or infinity.
    TypeError
        If a tensor's dtype cannot be stored (it is named), a name is not a string, or the
        source is neither a mapping nor a path.

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn.weights import read_weights
    >>> read_weights({"fc.weight": np.ones((2, 3), dtype=np.float32)})["fc.weight"].shape
    (2, 3)
    """
    checkpoint = open_checkpoint(source)
    checkpoint.check()
    return {name: checkpoint.read(name) for name in checkpoint.names}


# -- fitting -------------------------------------------------------------------------------------


def _layer_seed(base, name):
    return (base + zlib.crc32(name.encode())) % 2**32


def sample_rows(X, max_rows, seed, keep_order=True):
    """At most ``max_rows`` rows of ``X`` (all when ``None``), drawn uniformly without
    replacement with ``seed``; kept in their order unless ``keep_order=False`` (then in the
    order drawn)."""
    if max_rows is None or X.shape[0] <= max_rows:
        return X
    return X[_uniform_rows(X.shape[0], max_rows, seed, keep_order)]


def _uniform_rows(n, size, seed, keep_order):
    """``size`` of ``n`` row indices, drawn uniformly without replacement with ``seed``;
    sorted unless ``keep_order=False`` (then in the order drawn)."""
    rows = np.random.default_rng(seed).choice(n, size, replace=False)
    return np.sort(rows) if keep_order else rows


class _FitSample(NamedTuple):
    """What :func:`_fit_inputs` returns."""

    #: the sub-vectors to fit
    rows: np.ndarray
    #: their metric blocks (None: the squared error)
    metric: np.ndarray | None
    #: their weights (None: unit weights)
    weights: np.ndarray | None
    #: the factor from the sample's error to the whole tensor's
    factor: float
    #: the index in ``X`` of every sub-vector of ``rows`` (None: ``rows`` is ``X``)
    taken: np.ndarray | None


def _fit_inputs(X, calibration, max_rows, seed, keep_order=True):
    """The sub-vectors to fit (all, or a sample of at most about ``max_rows``), with their
    metric, weights and indices, and the factor from the sample's error to the whole
    tensor's (a :class:`_FitSample`).

    With calibration the sample is of whole output rows, so that sub-vector ``i`` of the
    sample still uses metric block ``i mod m``: drawn uniformly, or with row weights with
    probability proportional to the weights (rows of weight zero never) and fitted with unit
    weights, except rows heavy enough to be taken for certain, fitted with their weight over
    their inclusion probability (:func:`~qsdlearn._sampling.importance_sample`). Without a
    sample, the fit is weighted. Rows are kept in their order unless ``keep_order=False``."""
    if calibration is None:
        if max_rows is None or X.shape[0] <= max_rows:
            return _FitSample(X, None, None, 1.0, None)
        taken = _uniform_rows(X.shape[0], max_rows, seed, keep_order)
        return _FitSample(X[taken], None, None, X.shape[0] / max_rows, taken)
    d = X.shape[1]
    m = calibration.subvectors_per_row
    n_out = X.shape[0] // m
    row_weights = calibration.row_weights
    pool = n_out if row_weights is None else int(np.count_nonzero(row_weights))

    def output_rows(rows, metric, weights, factor):
        taken = (rows[:, None] * m + np.arange(m)).reshape(-1)
        return _FitSample(X[taken], metric, weights, factor, taken)

    if max_rows is None or pool * m <= max_rows:
        if pool == n_out:
            return _FitSample(X, calibration.metric(d), calibration.sample_weight(m), 1.0, None)
        rows = np.flatnonzero(row_weights)  # every row of positive weight: weighted
        return output_rows(rows, None, np.repeat(row_weights[rows], m), 1.0)
    size = max(1, -(-max_rows // m))
    if row_weights is None:
        rows = _uniform_rows(n_out, size, seed, keep_order)
        return output_rows(rows, calibration.metric(d), None, n_out / size)
    rows, weights, factor = importance_sample(row_weights, size, np.random.default_rng(seed),
                                              keep_order)
    return output_rows(rows, None, None if weights is None else np.repeat(weights, m), factor)


def _fit_quietly(estimator, X, method="fit", **fit_params):
    """Fit (by the estimator's ``method``) without the
    :class:`~sklearn.exceptions.ConvergenceWarning`, which the layer's record reports instead
    (``converged_``); other warnings reach the caller.

    Python's warning filters are process-wide: under joblib's threading backend a filter set
    by one layer may not cover another's fit, so the warning can still show there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        return getattr(estimator, method)(X, **fit_params)


def _codes_of_all_rows(est, X, taken, codes):
    """The codes of every row of ``X`` from ``codes`` of the rows ``taken`` (None: all), the
    fit's, which are those ``est.encode`` gives (see ``_fit_codes``); the other rows are
    encoded."""
    if taken is None:
        return codes
    rest = np.ones(X.shape[0], dtype=bool)
    rest[taken] = False
    parts = [(taken, codes)]
    if rest.any():
        parts.append((np.flatnonzero(rest), est._encode(X[rest])))
    return Codes.of_rows(X.shape[0], parts)


@dataclass(frozen=True)
class _CalibrationSource:
    """Where a tensor's calibration entry is (its name and a reference that loads it), with
    the damping of the objective; sent to the workers, which read and check it again."""

    name: str
    ref: object
    damping: float

    def load(self):
        """The entry as stored."""
        return self.ref.load()

    def read(self, shape):
        """The checked :class:`~qsdlearn._calibration.LayerCalibration` of a tensor of
        ``shape``, damped."""
        return replace(check_entry(self.name, self.load(), shape), damping=self.damping)


def _read_calibration(calibration, shape):
    """The :class:`~qsdlearn._calibration.LayerCalibration` of a tensor of ``shape`` from its
    :class:`_CalibrationSource` (None without calibration)."""
    return None if calibration is None else calibration.read(shape)


def _layout(calibration, shape, vector_size):
    """``calibration`` for the sub-vectors of ``vector_size`` of a tensor of ``shape``."""
    if calibration is None:
        return None
    return calibration.for_layout(rows_of(shape, vector_size) // shape[0])


def _fit_layer(ref, setting, seed, n_threads, max_iter, max_fit_rows, calibration=None):
    """Read one layer (``ref.load()``: a worker reads its own layer, and its calibration
    entry, from the file), fit its codebook (on at most ``max_fit_rows`` rows drawn at random)
    and encode all its rows; a :class:`RowSplit` fits each block of rows on its own.
    Runs in a joblib worker: numba threads are capped to the worker's share of the cores and
    BLAS to one thread, so that workers x threads stay within the cores (joblib's Dask
    backend does not cap them itself)."""
    weight = ref.load()
    calibration = _read_calibration(calibration, weight.shape)
    if not isinstance(setting, RowSplit):
        return _compress_tensor(weight, setting, seed, n_threads, max_iter, max_fit_rows,
                                _layout(calibration, weight.shape, setting.vector_size))
    parts = []
    for j, (block, _, rows) in enumerate(setting.blocks(weight.shape)):
        layer_calibration = _layout(calibration, weight.shape, block.vector_size)
        parts.append(_compress_tensor(
            weight[rows], block, (seed + j) % 2**32, n_threads, max_iter, max_fit_rows,
            None if layer_calibration is None else layer_calibration.for_rows(rows)))
    decoded = np.concatenate([part.decompress() for part in parts], axis=0)
    output = _output_sqnr(weight, decoded, calibration)
    return SplitLayer(parts, weight.shape, weight.dtype.name, sqnr(weight, decoded), output)


def _feedback_pass(est, X, n_out, feedback):
    """Encode the sub-vectors of a layer block by block with error feedback (see
    :class:`~qsdlearn._calibration.Feedback`). Returns the dense codes of every sub-vector
    and the targets they were solved for (the weights as updated by the feedback so far),
    both ``(n_out * m, ...)`` in the row order of ``X``."""
    d = X.shape[1]
    m = X.shape[0] // n_out
    running = X.reshape(n_out, m * d).astype(np.float64)
    targets = np.empty((n_out, m, d), dtype=X.dtype)
    codes = np.empty((n_out, m, est.n_components_), dtype=X.dtype)
    for b in range(m):
        columns = slice(b * d, (b + 1) * d)
        targets[:, b] = running[:, columns]
        codes[:, b] = est.transform(targets[:, b], metric=feedback.metric[b])
        error = targets[:, b].astype(np.float64) - est.inverse_transform(codes[:, b])
        running[:, columns.stop:] -= (error @ feedback.inverse_blocks[b]) @ \
            feedback.upper[columns, columns.stop:]
    return codes.reshape(n_out * m, -1), targets.reshape(n_out * m, d)


def _feedback_error(est, codes, original, calibration):
    """Output error on the calibration data (full Gram matrix) of a layer's codes."""
    n_in = calibration.gram.shape[0]
    decoded = est.inverse_transform(codes).reshape(original.shape[0], -1)[:, :n_in]
    return calibration.energy(original[:, :n_in].astype(np.float64) - decoded)


def _encode_with_feedback(est, setting, shape, X, calibration, rounds=2):
    """Encode a layer's sub-vectors in order with error feedback through its Gram matrix
    (GPTQ's scheme, Frantar et al., 2023, applied to sub-vectors: each block's error is
    absorbed by the blocks after it). Returns the :class:`CompressedMatrix` and the estimator
    whose codebook it holds.

    Each further round refits the codebook (from the current one, in the feedback metric) to
    the targets the last pass solved for and runs the pass again; it is kept only if it lowers
    the layer's output error on the calibration data (full Gram matrix)."""
    n_out = shape[0]
    feedback = calibration.feedback(X.shape[1])
    original = X.reshape(n_out, -1)
    codes, targets = _feedback_pass(est, X, n_out, feedback)
    best = (_feedback_error(est, codes, original, calibration), est, codes)
    for _ in range(rounds - 1):
        refit = clone(est).set_params(codebook_init=best[1].components_)
        _fit_quietly(refit, targets, metric=feedback.metric)
        codes, targets = _feedback_pass(refit, X, n_out, feedback)
        error = _feedback_error(refit, codes, original, calibration)
        if error >= best[0]:
            break
        best = (error, refit, codes)
    _, est, codes = best
    return _matrix_from_codes(setting.matrix_settings(shape), codes, est), est


def _matrix_from_codes(settings, codes, est):
    """The :class:`CompressedMatrix` of dense codes (every slot nonzero, as quantized codes
    are) against the estimator's codebook."""
    s = settings.constraints.n_nonzero
    idx, val = None, codes
    if s is not None:
        idx = np.sort(np.argsort(codes == 0, axis=1, kind="stable")[:, :s], axis=1)
        val = np.take_along_axis(codes, idx, axis=1)
        idx = idx.astype(INDEX_DTYPE)
    return encode_factors(settings, idx, val, est.components_, est.codebook_scales_)


def _output_sqnr(weight, decoded, calibration):
    """SQNR (dB) of a layer's output on its calibration data (None without calibration)."""
    if calibration is None:
        return None
    original = np.asarray(weight, dtype=np.float64).reshape(weight.shape[0], -1)
    error = original - np.asarray(decoded, dtype=np.float64).reshape(original.shape)
    noise = calibration.energy(error, objective=False)
    signal = calibration.energy(original, objective=False)
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")


def _scaled_rows(weight, setting, calibration):
    """What a setting factorises: ``(tensor, calibration, row scales)``.

    Without row scales, the tensor and its calibration as given (scales ``None``). With them
    (:func:`output_row_scales`, ``s``), the tensor's output rows divided by their scales and
    weighted by their squares times the calibration's row weights (if any): the weight error
    of ``s * G_hat`` is the weighted error of ``G_hat``, so the fit minimises the tensor's
    own error. A Gram matrix does not combine with row scales (refused by
    :func:`compress_weights`)."""
    if not setting.row_scales:
        return weight, calibration, None
    scales = output_row_scales(weight)
    s = scales.astype(np.float64)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    rows = (np.asarray(weight, dtype=np.float64) / s.reshape(shape)).astype(np.float32)
    row_weights = s * s if calibration is None else calibration.row_weights * s * s
    m = rows_of(weight.shape, setting.vector_size) // weight.shape[0]
    return rows, LayerCalibration(row_weights=row_weights, subvectors_per_row=m), scales


def _compress_tensor(weight, setting, seed, n_threads, max_iter, max_fit_rows,
                     calibration=None):
    """One tensor (or block of rows) under one setting: a :class:`CompressedLayer`. With a
    Gram matrix as ``calibration`` the codebook is fitted in the metric of the error feedback
    and the codes are chosen with it (:func:`_encode_with_feedback`); with row weights, or
    row scales (:func:`_scaled_rows`), the fit is weighted."""
    rows, fit_calibration, scales = _scaled_rows(weight, setting, calibration)
    X = to_rows(rows.astype(np.float32, copy=False), setting.vector_size)
    est = setting.estimator(random_state=seed, n_threads=n_threads, max_iter=max_iter)
    sample = _fit_inputs(X, fit_calibration, max_fit_rows, seed)
    with blas_single_thread():
        if fit_calibration is None or fit_calibration.gram is None:
            codes = _fit_quietly(est, sample.rows, sample_weight=sample.weights,
                                 metric=sample.metric, method="_fit_codes")
            matrix = est._pack(_codes_of_all_rows(est, X, sample.taken, codes))
        else:
            _fit_quietly(est, sample.rows, metric=sample.metric)
            matrix, est = _encode_with_feedback(est, setting, weight.shape, X, fit_calibration)
    layer = CompressedLayer(matrix, weight.shape, weight.dtype.name, setting, 0.0,
                            n_iter=est.n_iter_, converged=est.converged_, row_scales=scales)
    decoded = layer.decompressed_float()
    layer.sqnr_db = sqnr(weight, decoded)
    layer.output_sqnr_db = _output_sqnr(weight, decoded, calibration)
    return layer


def _estimate_rows(setting):
    """Rows a candidate is fitted on to estimate its error."""
    k = setting.constraints.n_components
    rows = max(ESTIMATE_ROWS, ESTIMATE_ROWS_PER_CODEWORD * k)
    if setting.constraints.one_hot:
        return max(rows, ESTIMATE_ONE_HOT_ROWS,
                   min(ESTIMATE_ONE_HOT_ROWS_PER_CODEWORD * k, ESTIMATE_ONE_HOT_MAX_ROWS))
    return rows


def _fits(setting, shape):
    """Whether a candidate can be estimated on a tensor: no more codebook rows than the
    tensor has sub-vectors."""
    return setting.constraints.n_components <= rows_of(shape, setting.vector_size)


def _codebook_bytes(setting, shape):
    """The bytes of a candidate's codebook streams on a tensor of ``shape``."""
    sizes = setting.matrix_settings(shape).stream_sizes()
    return sum(sizes[name] for name in _CODEBOOK_STREAMS)


def _codebook_share(setting, shape, nbytes):
    """The share of a candidate's ``nbytes`` on a tensor (its :meth:`LayerSetting.stream_bytes`,
    row scales included) that its codebook takes."""
    return _codebook_bytes(setting, shape) / max(nbytes, 1)


#: The most rows a candidate of ``default_candidates()`` fits for its estimate (8,192: vector
#: quantization with 256 codewords; see _estimate_rows).
_MOST_FIT_ROWS = max(512 * ESTIMATE_ROWS_PER_CODEWORD, ESTIMATE_ONE_HOT_MAX_ROWS)
#: Rows of a layer's permutation kept for its candidates' estimates (see _held_out_split).
_PERMUTATION_START = _MOST_FIT_ROWS + ESTIMATE_HELD_OUT_ROWS


def _held_out_split(n_rows, fit_rows, seed, shared=None):
    """Rows to fit and disjoint rows to measure an estimate on, drawn with ``seed``; None
    when the layer has too few rows to hold any out (the estimate is then measured on the
    rows fitted, as the final fit of all rows is). Both are the start of a permutation that
    depends on ``n_rows`` and ``seed`` only; the start in use is kept in ``shared`` (a dict)
    for the other candidates of the layer (the start alone: a whole permutation of a large
    tensor's sub-vectors would add to the peak memory)."""
    needed = fit_rows + ESTIMATE_HELD_OUT_ROWS
    if n_rows < needed:
        return None
    shared = {} if shared is None else shared
    key = ("permutation", n_rows)
    if key not in shared or shared[key].size < needed:
        # a start long enough for every default candidate (the most rows, 8,192, are those
        # of vector quantization with 256 codewords), so that the permutation is drawn once
        # per layer and row count
        kept = max(needed, _PERMUTATION_START)
        shared[key] = np.random.default_rng(seed).permutation(n_rows)[:kept].copy()
    order = shared[key]
    return order[:fit_rows], order[fit_rows:needed]


#: Rows whose energies :func:`_ranked_rows` ranks at a time (16 MB of float64 energies and
#: their indices, where all of a 4096 x 4096 matrix's scalars took 268 MB).
_RANKED_ROWS = 1 << 20


def _row_energies(X, block, weights=None):
    """Squared norms of the rows ``block`` of ``X`` (times ``weights``, all rows', when
    given), in float64 (squares of float32 values beyond 2**64 overflow float32), without a
    copy of ``X``."""
    energy = np.einsum("ij,ij->i", X[block], X[block], dtype=np.float64)
    return energy if weights is None else energy * weights[block]


def _ranked_rows(X, weights, depth):
    """The ``depth`` rows of ``X`` of largest squared norm (times ``weights``, all rows', when
    given) and their energies, in no particular order; ranked :data:`_RANKED_ROWS` at a time,
    each block's heaviest kept for the next (the memory of a block, not of every row)."""
    n_rows = X.shape[0]
    rows, energy = np.empty(0, dtype=np.intp), np.empty(0)
    for start in range(0, n_rows, _RANKED_ROWS):
        block = slice(start, min(n_rows, start + _RANKED_ROWS))
        rows = np.concatenate([rows, np.arange(block.start, block.stop)])
        energy = np.concatenate([energy, _row_energies(X, block, weights)])
        if energy.shape[0] > depth:
            top = np.argpartition(energy, energy.shape[0] - depth)[energy.shape[0] - depth:]
            rows, energy = rows[top], energy[top]
    return rows, energy


def _heaviest_rows(X, split, weights=None, energies=None, ranked=None):
    """The :data:`ESTIMATE_HEAVIEST_ROWS` rows of ``X`` of largest squared norm (times
    ``weights``, all rows', when given) that ``split`` does not fit. Found among the
    ``energies`` of all rows (:func:`_row_energies`) when given, else among the ``ranked``
    heaviest rows (:func:`_ranked_rows`, at least as many as those wanted and those fitted
    together: the fitted ones among them leave the heaviest of the others), ranked here when
    not given. In increasing order, whichever way they are found (the order of a partition
    differs between NumPy versions and between the two ways, and the held-out error sums the
    rows' errors in this order)."""
    fitted = split[0]
    n = min(ESTIMATE_HEAVIEST_ROWS, X.shape[0] - fitted.shape[0])
    if energies is not None:
        rows, energy = None, energies.copy()
        energy[fitted] = -1.0
    else:
        rows, energy = _ranked_rows(X, weights, n + fitted.shape[0]) if ranked is None \
            else ranked
        energy = np.where(np.isin(rows, fitted), -1.0, energy)
    top = np.argpartition(energy, energy.shape[0] - n)[energy.shape[0] - n:]
    return np.sort(top if rows is None else rows[top])


def _held_out_error(est, X, split, weights=None, energies=None, ranked=None):
    """Squared error (weighted by ``weights``, all rows', when given) of ``est`` on rows it
    was not fitted on, for all of ``X``'s rows: that of the heaviest rows
    (:func:`_heaviest_rows`, given the rows' ``energies`` or ``ranked`` rows, or neither)
    plus that of the other held-out rows of ``split`` scaled to the other rows of ``X``."""
    heavy = _heaviest_rows(X, split, weights, energies, ranked)
    others = np.setdiff1d(split[1], heavy, assume_unique=True)
    rows = np.concatenate([heavy, others])
    measured = X[rows]
    errors = np.sum((measured.astype(np.float64) - est.encode(measured).decode()) ** 2, axis=1)
    if weights is not None:
        errors = errors * weights[rows]
    rest = X.shape[0] - heavy.shape[0]
    return float(errors[:heavy.shape[0]].sum() + errors[heavy.shape[0]:].sum() * rest
                 / max(others.shape[0], 1))


def _between(held_out, fitted):
    """A candidate's estimate from its errors on held-out rows and on the rows fitted (both
    scaled to the whole layer): :data:`ESTIMATE_TOWARDS_FITTED` of the way in dB from the
    first towards the second; the held-out error where either is zero."""
    if held_out <= 0.0 or fitted <= 0.0:
        return held_out
    return held_out ** (1.0 - ESTIMATE_TOWARDS_FITTED) * fitted ** ESTIMATE_TOWARDS_FITTED


def _estimate(ref, candidates, seed, n_threads, relative=False, calibration=None, wanted=None):
    """For each candidate: bytes of the layer's streams (exact) and its error (from a row
    sample), or ``None`` when the sample is too small for it or it is not among ``wanted``
    (a collection of settings; None: all). Reads the layer once.

    The error is the squared weight error (weighted by the row weights, or by the squared
    row scales of a setting with them, :func:`_scaled_rows`), fitted on a sample
    (:func:`_estimate_rows`) and, when the layer has enough rows, measured both on other
    rows (:func:`_held_out_split`) and on those fitted (:func:`_between`); with a Gram
    matrix, the output error of the sampled rows encoded with feedback (as the final fit
    encodes them), scaled to all rows. ``relative``
    divides it by the layer's energy (output energy with calibration, ``||W||^2`` without),
    so that layers with and without calibration compare."""
    weight = ref.load()
    calibration = _read_calibration(calibration, weight.shape)
    energy = None
    if relative:
        flat = np.asarray(weight, dtype=np.float64).reshape(weight.shape[0], -1)
        energy = (calibration.energy(flat) if calibration is not None
                  else float(np.einsum("ij,ij->", flat, flat)))
    with blas_single_thread():
        return _estimate_candidates(weight, candidates, seed, n_threads, energy, calibration,
                                    wanted)


def _estimate_candidates(weight, candidates, seed, n_threads, energy, calibration, wanted=None):
    """The loop of :func:`_estimate` over the candidates (relative errors when ``energy`` is
    given; only those in ``wanted`` when given, the others None).

    Candidates with sparse or dense codes whose codebook takes more than
    :data:`MAX_CODEBOOK_SHARE` of their bytes are skipped where a candidate of fewer bytes fits
    the tensor: their codebook usually buys less than the same bytes spent on codes would,
    and theirs are the costliest estimates (large codebooks on small tensors). Vector
    quantization (one-hot codes), whose estimate is a few Lloyd passes, is estimated up to
    :data:`MAX_ONE_HOT_CODEBOOK_SHARE`: it is the setting that finds tensors made of repeated
    sub-vectors (4,096 sub-vectors drawn around 256 points: 39.6 dB at 1.82 b/w, where the
    quarter limit left 9.6 dB at 2 b/w)."""
    results = []
    scales_pay = _row_scales_pay(weight)
    scaled = None  # the normalised rows and their weights, the same for every row-scaled setting
    shared = {}  # k-means++ starts, row permutations and energies, for all the candidates

    def eligible(setting):
        return _fits(setting, weight.shape) and not (setting.row_scales and (
            not scales_pay or (calibration is not None and calibration.gram is not None)))

    sizes = [c.stream_bytes(weight.shape) if eligible(c) else None for c in candidates]
    smallest = min((n for n in sizes if n is not None), default=0)
    for setting, nbytes in zip(candidates, sizes):
        if nbytes is None or (wanted is not None and setting not in wanted) or (
                nbytes > smallest and _codebook_share(setting, weight.shape, nbytes)
                > _share_limit(setting)):
            results.append(None)
            continue
        rows, fit_calibration = weight, calibration
        if setting.row_scales:
            if scaled is None:
                scaled = _scaled_rows(weight, setting, calibration)[:2]
            rows, fit_calibration = scaled
        X = to_rows(rows.astype(np.float32, copy=False), setting.vector_size)
        layer_calibration = _layout(fit_calibration, weight.shape, setting.vector_size)
        error = _estimate_error(setting, X, layer_calibration, seed, n_threads, shared)
        if error is None:
            results.append(None)
            continue
        if energy is not None:
            error = error / energy if energy > 0 else 0.0
        results.append((nbytes, error))
    return results


def _share_limit(setting):
    """The largest share of a candidate's bytes its codebook may take for it to be estimated
    (see :func:`_estimate_candidates`)."""
    return MAX_ONE_HOT_CODEBOOK_SHARE if setting.constraints.one_hot else MAX_CODEBOOK_SHARE


def _row_scales_pay(weight):
    """Whether row scales may pay on a tensor: the high-rate gain of coding every output row
    at its own scale, ``10 log10`` of the arithmetic over the geometric mean of the rows'
    mean squares (the gain of adaptive transform coding), exceeds what their 8 bits per row
    would buy at 6.02 dB per bit. Candidates with row scales are estimated only then."""
    s = output_row_scales(weight).astype(np.float64)
    energy = s * s
    gain = 10 * np.log10(energy.mean()) - 10 * np.mean(np.log10(energy))
    n_in = weight.size // max(weight.shape[0], 1)
    return gain > 6.02 * 8 * ROW_SCALE_BYTES / max(n_in, 1)


def _shared_seeds(shared, setting, fit_rows, weights, seed):
    """The k-means++ start of a candidate fitted on ``fit_rows`` (with sample ``weights`` or
    None) and ``seed``: the codebook its estimator would draw itself (same function, same
    random state; the estimator's weights differ by a power of two, which draws the same
    rows), so the fit is unchanged. Drawn once per sub-vector size, codebook size, row scaling
    and rows fitted, and kept in ``shared`` (a dict) for the other candidates of the layer. None
    where the fit starts otherwise."""
    k = setting.constraints.n_components
    if fit_rows.shape[0] < k or resolve_init("auto", fit_rows.shape,
                                             setting.constraints) != "k-means++":
        return None
    # the rows fitted count too: vector quantization fits more rows than sparse codes of as
    # many codewords, and a start drawn from the other's rows would make each estimate depend
    # on which candidates were estimated before it
    key = ("k-means++", setting.vector_size, k, setting.row_scales, fit_rows.shape[0])
    if key not in shared:
        shared[key] = kmeans_plusplus_seeds(fit_rows, k, check_random_state(seed), weights)
    return shared[key]


def _shared_energies(shared, setting, X, weights):
    """The squared norms of the rows ``X`` of a candidate (:func:`_row_energies`), computed
    once per sub-vector size and row scaling and kept in ``shared`` (a dict, or None: not
    kept) for the other candidates of the layer; None for layers of more than
    :data:`_RANKED_ROWS` rows (see :func:`_shared_ranking`)."""
    if shared is None or X.shape[0] > _RANKED_ROWS:
        return None
    key = ("row energies", setting.vector_size, setting.row_scales)
    if key not in shared:
        shared[key] = _row_energies(X, slice(None), weights)
    return shared[key]


def _shared_ranking(shared, setting, X, weights, depth):
    """The heaviest rows of a layer of more than :data:`_RANKED_ROWS` rows and their energies
    (:func:`_ranked_rows`), at least ``depth`` of them, ranked once per sub-vector size and row
    scaling and kept in ``shared`` (a dict) for the other candidates of the layer: as many as
    the heaviest rows and the fitted rows of every candidate of ``default_candidates()``, or
    ``depth`` if more (then ranked again, as for the 4,096 codewords of ``large_codebooks``).
    None for smaller layers, or without ``shared``."""
    if shared is None or X.shape[0] <= _RANKED_ROWS:
        return None
    key = ("ranked rows", setting.vector_size, setting.row_scales)
    if key not in shared or shared[key][0].shape[0] < min(depth, X.shape[0]):
        most = max(depth, ESTIMATE_HEAVIEST_ROWS + _MOST_FIT_ROWS)
        shared[key] = _ranked_rows(X, weights, most)
    return shared[key]


def _estimate_error(setting, X, calibration, seed, n_threads, shared=None):
    """The error of one candidate on the sub-vectors ``X`` of a layer (see :func:`_estimate`),
    or None when the layer has fewer sub-vectors than the candidate has codewords. ``shared``
    (a dict, kept across the candidates of a layer) shares their k-means++ starts
    (:func:`_shared_seeds`), row permutations (:func:`_held_out_split`) and the rows' energies
    (:func:`_shared_energies`, :func:`_shared_ranking`)."""
    est = setting.estimator(random_state=seed, n_threads=n_threads, max_iter=ESTIMATE_MAX_ITER)
    fit_rows = _estimate_rows(setting)
    gram = calibration is not None and calibration.gram is not None
    if gram:
        fit_rows = max(fit_rows, ESTIMATE_OUTPUT_ROWS * calibration.subvectors_per_row)
    # Held out: rows drawn uniformly, so only where every row counts (row weights with zeros,
    # such as token counts, are sampled in proportion to the weights instead).
    uniform = calibration is None or (not gram and np.all(calibration.row_weights > 0))
    split = _held_out_split(X.shape[0], fit_rows, seed, shared) if uniform else None
    if split is not None:
        weights = None if calibration is None else \
            calibration.sample_weight(calibration.subvectors_per_row)
        rows = X[split[0]]
        row_weights = None if weights is None else weights[split[0]]
        if shared is not None:
            est.set_params(codebook_init=_shared_seeds(shared, setting, rows, row_weights, seed))
        _fit_quietly(est, rows, sample_weight=row_weights)
        held_out = _held_out_error(
            est, X, split, weights, _shared_energies(shared, setting, X, weights),
            _shared_ranking(shared, setting, X, weights, ESTIMATE_HEAVIEST_ROWS + rows.shape[0]))
        fitted = est.reconstruction_err_**2 * X.shape[0] / rows.shape[0]
        return _between(held_out, fitted)
    sample, metric, weights, factor, _ = _fit_inputs(X, calibration, fit_rows, seed,
                                                     keep_order=False)
    if sample.shape[0] < setting.constraints.n_components:
        return None
    _fit_quietly(est, sample, sample_weight=weights, metric=metric)
    if not gram:
        return est.reconstruction_err_**2 * factor
    # the sample is whole output rows: encode them as the final fit will
    n_rows = sample.shape[0] // calibration.subvectors_per_row
    codes, _ = _feedback_pass(est, sample, n_rows, calibration.feedback(setting.vector_size))
    return _feedback_error(est, codes, sample.reshape(n_rows, -1), calibration) * factor


def _check_vector_size(vector_size, shortest, checkpoint, names):
    """Refuse a ``vector_size`` whose sub-vectors (``shortest``: the shortest it makes) are all
    longer than the rows of every tensor in ``names``: each row would be one sub-vector padded
    with zeros, which no budget pays for (it was reported as a budget the candidates cannot
    reach, or left to the scalar candidates alone)."""
    longest = max((math.prod(checkpoint.infos[name].shape[1:]) for name in names), default=0)
    if names and shortest > longest:
        raise ValueError(f"vector_size={vector_size} is longer than the rows of every tensor to "
                         f"compress (at most {longest} elements): give vector_size <= {longest}")


def _largest_first(names, checkpoint):
    """``names`` in the order their layers are given to the workers: most weights first (the
    checkpoint's order among equals), so that the last to run are the smallest and no worker
    waits long for another at the end (longest processing time first). Results do not depend
    on the order: each layer's seed comes from its name."""
    return sorted(names, key=lambda name: -checkpoint.infos[name].size)


def _progress(results, names, enabled):
    """``results`` with a progress bar naming the layer just done (tqdm, when installed)."""
    if not enabled:
        yield from results
        return
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - optional dependency
        yield from results
        return
    with tqdm(total=len(names), desc="layers", unit="layer", file=sys.stderr) as bar:
        for name, result in zip(names, results):
            bar.set_postfix_str(name, refresh=False)
            bar.update()
            yield result


@validate_params(
    {
        "weights": [Mapping, str, os.PathLike],
        "bits_per_weight": [Interval(Real, 0, MAX_BITS_PER_WEIGHT, closed="right"), None],
        "settings": [LayerSetting, dict, None],
        "vector_size": [Interval(Integral, 1, None, closed="left")],
        "candidates": [list, None],
        "keep": [list, tuple, None],
        "calibration": [Mapping, str, os.PathLike, None],
        "calibration_damping": [Interval(Real, 0, MAX_DAMPING, closed="both"), None],
        "sensitivity": [Mapping, None],
        "n_jobs": [Integral, None],
        "random_state": ["random_state"],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "max_fit_rows": [Interval(Integral, 1, None, closed="left"), None],
        "verbose": ["boolean", None],
    },
    prefer_skip_nested_validation=True,
)
def compress_weights(
    weights,
    *,
    bits_per_weight=None,
    settings=None,
    vector_size=8,
    candidates=None,
    keep=None,
    calibration=None,
    calibration_damping=None,
    sensitivity=None,
    n_jobs=None,
    random_state=None,
    max_iter=50,
    max_fit_rows=65536,
    verbose=None,
):
    """Compress every tensor of a model, layer by layer.

    Everything that can be checked is checked before the first fit: names, dtypes (a
    tensor that cannot be stored raises a :class:`TypeError` naming it), finiteness and, for
    the tensors to compress, magnitudes below 2**64, which float32 arithmetic takes (a
    :class:`ValueError` naming the tensor). Files are read one tensor at a time; each layer's
    worker reads its own tensor, so the process holds the results, not the model.

    Parameters
    ----------
    weights : mapping of str to array-like, or str / path-like
        Name to tensor (e.g. ``{k: v.float().numpy() for k, v in
        model.state_dict().items()}``), or a ``.npz`` or ``.safetensors`` file, a sharded
        checkpoint's ``*.safetensors.index.json`` or a folder of ``.safetensors`` shards.
        Floats (float16, bfloat16 from ``ml_dtypes``, float32, float64) may be compressed
        and come back in their dtype; integers and booleans are kept verbatim; complex,
        string, bytes, object and other dtypes are refused.
    bits_per_weight : float, optional
        Target for the whole file in bits per weight (header and kept tensors included).
        Each compressible tensor gets the candidate setting that minimises the total squared
        weight error under that budget (greedy marginal returns on estimates from a row
        sample); the budget the chosen settings leave goes to one tensor whose output rows
        are split between two settings (a :class:`RowSplit`), so that the file lands close
        under the target. At most 64 (the bits of a float64).
    settings : LayerSetting or mapping of str to LayerSetting, optional
        Fixed settings, for all compressible tensors or per name (others then follow
        ``bits_per_weight`` when given, else the default :class:`LayerSetting`).
    vector_size : int, default=8
        Sub-vector length of the default candidates.
    candidates : list of LayerSetting, optional
        Candidate settings for the rate target (default
        :func:`~qsdlearn.weights.default_candidates`).
    keep : list of str, optional
        Glob patterns (:func:`fnmatch.fnmatchcase`) of tensor names to store verbatim,
        e.g. ``["*embed*", "lm_head.*", "*norm*"]``.
    calibration : mapping of str to array-like, or str / path-like, optional
        Data-aware compression: under a tensor's own name, either the Gram matrix ``A^T A``
        of its inputs (shape ``(in, in)``, ``in`` the product of its axes after the first;
        the unfolded input patches of a convolution; see :class:`GramAccumulator`), or row
        weights of shape ``(rows,)`` (for an embedding table, how often each row is used).
        A mapping, or a ``.npz`` or ``.safetensors`` file of them. A tensor with a Gram
        matrix is fitted and encoded for its output error ``||(W - W_hat) A^T||^2``: its
        sub-vectors are encoded in order with GPTQ's error feedback (Frantar et al., 2023),
        each in the metric that the feedback leaves (see the user guide); row weights weight
        the fit. Other tensors keep the weight error. With ``bits_per_weight``, the budget
        then minimises the sum over tensors of the *relative* error (output error over output
        energy for calibrated tensors, weight error over ``||W||^2`` for the others), and the
        report gives every calibrated tensor's output SQNR.
    calibration_damping : float, optional
        The objective of a tensor with a Gram matrix ``H`` is the output error in
        ``H + calibration_damping * mean(diag H) * I``: the output error on the calibration
        inputs plus this fraction of their mean energy per input times the weight error.
        Calibration data spans only some directions of a layer's inputs (fewer samples than
        inputs, or inputs that barely vary); undamped, the fit is free to move the weights
        along the others, which held-out inputs meet. 0 fits the calibration data alone. The
        report's output SQNR is measured with ``H`` itself. (GPTQ damps ``H`` by 0.01 of its
        mean diagonal before inverting it, which the error feedback does on top of this.) At
        most 1e12 (the weight error alone). Given only with ``calibration``; left out, 0.1.
        No effect on tensors calibrated by row weights or not calibrated.
        Measured on all-MiniLM-L6-v2 at 2 bits per weight: see ``benchmarks/README.md``.
    sensitivity : mapping of str to float, optional
        Per-tensor weights of the errors a ``bits_per_weight`` budget trades: each tensor's
        *relative* error (as above, in the damped Gram matrix; weight error over ``||W||^2``
        without calibration) is
        multiplied by its sensitivity, how much the model's loss grows per unit of that
        relative error (the layer sensitivity of mixed-precision quantization, e.g. HAWQ,
        Dong et al., 2019), so that the budget goes where the model needs it. Measure it by
        perturbing one tensor at a time on calibration data (``benchmarks/model_fidelity.py``
        does). Given, every tensor's error is relative, with or without calibration: ``{}``
        weighs all relative errors alike (without it, uncalibrated models trade absolute
        weight errors). Tensors not named weigh 1; only ratios matter; a sensitivity of 0
        gives a tensor its cheapest candidate; a value under a tied name serves the tensor
        it is tied to. Requires ``bits_per_weight``.
    n_jobs : int, optional
        Layers run through ``joblib.Parallel(n_jobs)``, at most one worker per tensor; under
        ``joblib.parallel_config(backend="dask")`` on a Dask cluster (workers given a file
        read their layer from it: they need the path). Results do not depend on it.
    random_state : int, RandomState instance or None, default=None
        Seed; each layer's seed is derived from it and the layer name.
    max_iter : int, default=50
        Iterations of each final fit.
    max_fit_rows : int or None, default=65536
        Fit each codebook on at most this many sub-vectors drawn at random (then encode all
        of them), as vector quantizers are usually trained (faiss's k-means samples at most
        256 rows per centroid: 65,536 for 256 codewords); ``None`` fits on all. With
        calibration, whole output rows are drawn, in proportion to their row weights when
        the calibration gives some.
    verbose : bool, optional
        Progress bar over layers with the layer's name and the time left (tqdm, when
        installed); default: when standard error is a terminal.

    Returns
    -------
    CompressedModel
        Its ``report()`` holds every layer's setting, bits, SQNR (dB) and whether its final
        fit converged. Tensors with the same dtype, shape and content are stored once and
        restored under every name.

    Raises
    ------
    ValueError
        If there are no tensors, a tensor holds NaN or infinity, a tensor to compress holds
        a magnitude of 2**64 (about 1.8e19) or more (rescale it, or keep it), ``settings`` or
        ``sensitivity`` names a tensor that is not compressible, a sensitivity is negative or
        not finite (or given without ``bits_per_weight``), ``bits_per_weight`` is below what
        the candidates reach, a file cannot be read, or a calibration entry names no tensor
        or does not fit its tensor (shape, symmetry, positive semi-definiteness, negative
        weights), or ``calibration_damping`` is outside [0, 1e12] or given without
        ``calibration``.
    TypeError
        If a tensor name or a ``keep`` pattern is not a string, or a dtype is not supported.
    sklearn.utils._param_validation.InvalidParameterError
        (both a ValueError and a TypeError) If a parameter has the wrong type or range, or a
        numeric one (``bits_per_weight``, ``calibration_damping``, ``vector_size``,
        ``max_iter``, ``max_fit_rows``) is a bool.

    See Also
    --------
    CompressedModel : What is returned.
    QuantizedSparseDecomposition : The factorization of every layer.
    GramAccumulator : Calibration statistics from a layer's inputs.

    References
    ----------
    .. [1] E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh, "GPTQ: Accurate Post-Training
       Quantization for Generative Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323).
    .. [2] Z. Dong, Z. Yao, A. Gholami, M. Mahoney, K. Keutzer, "HAWQ: Hessian AWare
       Quantization of Neural Networks with Mixed-Precision", ICCV 2019 (arXiv:1905.03696).

    Examples
    --------
    >>> import ml_dtypes
    >>> import numpy as np
    >>> import qsdlearn
    >>> rng = np.random.default_rng(0)
    >>> weights = {"fc1.weight": rng.standard_normal((256, 64)).astype(ml_dtypes.bfloat16),
    ...            "fc1.bias": np.zeros(256, dtype=ml_dtypes.bfloat16),
    ...            "embed.weight": rng.standard_normal((32, 64)).astype(np.float32)}
    >>> vq = qsdlearn.LayerSetting(8, qsdlearn.Constraints(16, n_nonzero=1, code_bits=0))
    >>> model = qsdlearn.compress_weights(weights, settings=vq, keep=["embed.*"],
    ...                                   random_state=0)
    >>> [record["setting"] for record in model.report()]
    ['d=8 k=16 1 of 16 codes=0b codebook=float', 'kept (bfloat16)', 'kept (float32)']
    >>> small = qsdlearn.compress_weights(weights, bits_per_weight=6.0, keep=["embed.*"],
    ...                                   random_state=0)
    >>> bool(small.bits_per_weight <= 6.0)
    True
    >>> restored = model.decompress()
    >>> restored["fc1.weight"].shape, restored["fc1.weight"].dtype
    ((256, 64), dtype(bfloat16))
    """
    refuse_bools("compress_weights", bits_per_weight=bits_per_weight,
                 calibration_damping=calibration_damping, vector_size=vector_size,
                 max_iter=max_iter, max_fit_rows=max_fit_rows, n_jobs=n_jobs)
    if n_jobs == 0:
        raise ValueError("n_jobs=0 runs nothing: give a number of workers, or -1 for all cores")
    if calibration_damping is not None and calibration is None:
        raise ValueError("calibration_damping applies to data-aware compression: give "
                         "calibration as well, or leave calibration_damping out")
    _check_candidates(candidates, bits_per_weight)
    for pattern in keep or ():
        if not isinstance(pattern, str):
            raise TypeError(f"keep holds name patterns (strings), got {pattern!r}")
    checkpoint = open_checkpoint(weights)
    if not checkpoint.names:
        raise ValueError("no tensors to compress")
    if all(info.size == 0 for info in checkpoint.infos.values()):
        raise ValueError("no weights to compress: every tensor is empty")
    for pattern in keep or ():
        if not any(matching(name, (pattern,)) for name in checkpoint.names):
            warnings.warn(f"keep pattern {pattern!r} matches no tensor", UserWarning, stacklevel=3)
    digests = checkpoint.check()
    if verbose is None:
        verbose = sys.stderr.isatty()
    base = check_random_state(random_state).randint(2**31)

    # Tied tensors: every name to the first name with the same digest.
    first_of = {}
    tied = {name: first_of.setdefault(digests[name], name) for name in checkpoint.names}
    distinct = [name for name in checkpoint.names if tied[name] == name]
    compressible = [
        name for name in distinct
        if _is_compressible(checkpoint.infos[name]) and not matching(name, keep or ())
    ]
    _check_magnitudes(checkpoint, compressible)
    # No more workers than tensors to fit: more would idle while the others' threads share
    # fewer cores (and a huge n_jobs would reach joblib's process semaphores).
    n_workers = min(joblib.effective_n_jobs(n_jobs), max(len(compressible), 1))
    n_threads = max(1, (os.cpu_count() or 1) // n_workers)
    kept = {
        name: KeptTensor(np.asarray(checkpoint.read(name)))
        for name in distinct if name not in compressible
    }
    fixed = {}
    if isinstance(settings, LayerSetting):
        fixed = {name: settings for name in compressible}
    elif settings is not None:
        unknown = set(settings) - set(compressible)
        if unknown:
            raise ValueError(
                f"settings name tensors that are not compressible (kept, tied to an earlier "
                f"tensor or unknown): {sorted(unknown, key=repr)}"
            )
        fixed = dict(settings)
        for name, setting in fixed.items():
            if not isinstance(setting, LayerSetting):
                raise TypeError(
                    f"settings[{name!r}] is a {type(setting).__name__}; give a LayerSetting, "
                    "e.g. LayerSetting(8, Constraints(256, n_nonzero=2, code_bits=2, "
                    "codebook_bits=8))"
                )
    calibrations = _open_calibration(
        calibration, checkpoint, tied, compressible,
        DEFAULT_DAMPING if calibration_damping is None else calibration_damping)
    sensitivity = _check_sensitivity(sensitivity, compressible, tied, fixed, bits_per_weight)
    for name, setting in fixed.items():
        if setting.row_scales and name in calibrations and \
                calibrations[name].load().ndim == 2:
            raise ValueError(
                f"settings[{name!r}] has row_scales, which a Gram matrix calibration does not "
                "combine with: give a setting without row scales, or row weights")
    layout = _Layout(checkpoint, tied, kept)
    free = [name for name in compressible if name not in fixed]
    why_unspent = None
    if bits_per_weight is None:
        _check_vector_size(vector_size, vector_size, checkpoint, free)
    elif candidates is None:  # the default ones cut d, d/2 and d/4 (and single weights)
        _check_vector_size(vector_size, max(1, vector_size // 4), checkpoint, free)
        candidates = default_candidates(vector_size)
    held = _fixed_share(fixed, layout)  # what settings= takes, which no candidate changes
    if free and bits_per_weight is not None:
        plan, why_unspent = _plan(layout, free, fixed, bits_per_weight, candidates, base,
                                  n_workers, n_threads, calibrations, sensitivity)
        fixed.update(plan)
    else:
        fixed.update({name: LayerSetting(vector_size=vector_size) for name in free})
        if bits_per_weight is not None:  # nothing to plan: the file's size is already known
            least = layout.file_bytes(fixed)
            if least > _budget_bytes(bits_per_weight, layout):
                raise _below_reach(
                    bits_per_weight, least, layout, "this model can reach",
                    f"no tensor is left to plan ({len(kept)} kept verbatim: under two "
                    f"dimensions, not floats, fewer than {MIN_COMPRESSED_SIZE} elements or "
                    f"matching keep; {len(fixed)} with fixed settings)")

    parallel = joblib.Parallel(n_jobs=n_workers, return_as="generator")
    order = _largest_first(compressible, checkpoint)
    jobs = (
        joblib.delayed(_fit_layer)(
            checkpoint.ref(name), fixed[name], _layer_seed(base, name), n_threads, max_iter,
            max_fit_rows, calibrations.get(name),
        )
        for name in order
    )
    fitted = dict(zip(order, _progress(parallel(jobs), order, verbose)))
    model = layout.model({**kept, **fitted})
    if why_unspent is not None:  # the size of the file itself, not the plan's
        _warn_if_unspent(why_unspent, bits_per_weight, model.bits_per_weight, held)
    return model


def _fixed_share(fixed, layout):
    """The remark on the tensors of fixed ``settings`` that a warning or refusal about the
    budget appends ("" without any): how many and the bits per weight their streams take."""
    if not fixed:
        return ""
    bits = 8 * sum(setting.stream_bytes(layout.shape(name))
                   for name, setting in fixed.items()) / layout.n_weights
    n, them = len(fixed), "them" if len(fixed) > 1 else "it"
    return (f" ({n} tensor{'s' * (n != 1)} with fixed settings take{'s' * (n == 1)} "
            f"{bits:.3f} bits/weight of it: give {them} cheaper settings=, or leave {them} "
            "to the target)")


def _check_magnitudes(checkpoint, names):
    """Refuse, naming it, a tensor of ``names`` (those to compress) that holds a magnitude of
    :data:`MAX_MAGNITUDE` or more (noted by
    :meth:`qsdlearn._checkpoint.Checkpoint.check`)."""
    for name in names:
        largest = checkpoint.largest[name]
        if largest >= MAX_MAGNITUDE:
            raise ValueError(
                f"tensor {name!r} in {checkpoint.source} holds values up to {largest:.3g} in "
                f"magnitude; compression works in float32 and takes magnitudes below 2**64 "
                f"(about {MAX_MAGNITUDE:.2g}): rescale the tensor, or store it as it is with "
                f"keep=[{glob.escape(name)!r}] (--keep on the command line)")


def _check_sensitivity(sensitivity, compressible, tied, fixed, bits_per_weight):
    """``name -> float`` from the ``sensitivity`` argument of :func:`compress_weights`
    (None when not given), checked before anything is fitted: a value under a tied name
    serves the tensor it is tied to; values for tensors with fixed settings are unused
    (warned)."""
    if sensitivity is None:
        return None
    if bits_per_weight is None:
        raise ValueError("sensitivity weighs the errors of a bits_per_weight budget: give "
                         "bits_per_weight too")
    for name in sensitivity:
        if not isinstance(name, str):
            raise TypeError(f"sensitivity has the key {name!r}; keys are tensor names (str)")
    unknown = sorted(name for name in sensitivity
                     if name not in tied or tied[name] not in compressible)
    if unknown:
        raise ValueError(f"sensitivity names tensors that are not compressible (kept or "
                         f"unknown): {unknown[:5]}" + (" ..." if len(unknown) > 5 else ""))
    checked, given_as = {}, {}
    for name, value in sensitivity.items():
        if isinstance(value, bool) or not isinstance(value, Real):  # NumPy numbers are Real
            raise TypeError(f"sensitivity[{name!r}] is a {type(value).__name__}; give a float")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not (math.isfinite(number) and number >= 0):
            raise ValueError(f"sensitivity[{name!r}] is {value}; give a finite value >= 0")
        first = tied[name]
        if first in checked and checked[first] != number:
            raise ValueError(f"sensitivity for tied tensors {given_as[first]!r} and {name!r} "
                             "differs: give it under one name")
        checked[first], given_as[first] = number, name
    unused = sorted(given_as[first] for first in checked if first in fixed)
    if unused:
        warnings.warn(f"sensitivity for {unused[:5]} is not used: those tensors have fixed "
                      "settings", UserWarning, stacklevel=4)
    return checked


def _sensitivity_factors(sensitivity, names):
    """Every name's sensitivity (1 when not given) over the largest, so that weighted errors
    cannot overflow (the plan depends on their ratios only); None without sensitivities."""
    if sensitivity is None:
        return None
    factors = {name: sensitivity.get(name, 1.0) for name in names}
    top = max(factors.values(), default=0.0)
    if top == 0:
        warnings.warn("every sensitivity is 0: each tensor takes its cheapest candidate and "
                      "the budget is not spent", UserWarning, stacklevel=5)
        return factors
    return {name: value / top for name, value in factors.items()}


def _open_calibration(source, checkpoint, tied, compressible, damping):
    """``name ->`` :class:`_CalibrationSource` for the compressible tensors that have an
    entry (an entry under a tied name serves the tensor it is tied to), every entry checked
    against its tensor here, before anything is fitted."""
    if source is None:
        return {}
    try:
        entries = open_checkpoint(source)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"calibration: {exc}") from None
    if not entries.names:
        warnings.warn("calibration holds no entries: every tensor keeps the weight error",
                      UserWarning, stacklevel=4)
    unknown = [name for name in entries.names if name not in tied]
    if unknown:
        raise ValueError(f"calibration names tensors the model does not have: {unknown[:5]}"
                         + (" ..." if len(unknown) > 5 else ""))
    found = {}
    for name in entries.names:
        first = tied[name]
        if first not in compressible:
            warnings.warn(f"calibration for {name!r} is not used: the tensor is not compressed",
                          UserWarning, stacklevel=4)
            continue
        if first in found:
            raise ValueError(f"calibration for tied tensors {found[first].name!r} and {name!r}: "
                             "give it under one name")
        check_entry(name, entries.read(name), checkpoint.infos[first].shape)
        found[first] = _CalibrationSource(name, entries.ref(name), damping)
    return found


@dataclass
class _Layout:
    """The tensors of a checkpoint with what is decided before fitting: which are kept (and
    their arrays), which are tied to an earlier one, the shapes and dtypes of the others."""

    checkpoint: object
    tied: dict
    kept: dict
    #: Placeholder matrices by (setting, shape): a plan is sized many times over.
    placeholders: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_weights(self):
        return sum(self.checkpoint.infos[name].size for name, first in self.tied.items()
                   if first == name)

    def shape(self, name):
        return self.checkpoint.infos[name].shape

    def model(self, entries):
        """The model of the distinct tensors' ``entries``, tied names sharing them."""
        return CompressedModel({name: entries[first] for name, first in self.tied.items()})

    def file_bytes(self, plan):
        """Exact size of the file of a plan (SQNRs at their widest), without fitting."""
        entries = dict(self.kept)
        for name, setting in plan.items():
            info = self.checkpoint.infos[name]
            if isinstance(setting, RowSplit):  # parts of many shapes: not kept
                parts = [self._placeholder(block, shape, info.dtype.name, keep=False)
                         for block, shape, _ in setting.blocks(info.shape)]
                entries[name] = SplitLayer(parts, info.shape, info.dtype.name, _WIDEST_SQNR)
            else:
                entries[name] = self._placeholder(setting, info.shape, info.dtype.name)
        return self.model(entries).nbytes

    def _placeholder(self, setting, shape, dtype, keep=True):
        """A layer with streams of the right sizes (zeros), row scales (ones) if the setting
        has them and the widest SQNR a file stores, for sizing files. A new layer each time
        (a model takes one layer object twice for tied tensors), around a matrix built once
        per setting and shape with ``keep``."""
        key = (setting, tuple(shape))
        matrix = self.placeholders.get(key)
        if matrix is None:
            settings = setting.matrix_settings(shape)
            streams = {k: bytes(v) for k, v in settings.stream_sizes().items()}
            matrix = CompressedMatrix(settings, streams)
            if keep:
                self.placeholders[key] = matrix
        scales = np.ones(shape[0], dtype=float8_e5m2()) if setting.row_scales else None
        return CompressedLayer(matrix, shape, dtype, setting, _WIDEST_SQNR, row_scales=scales)


def _split_to_fill(layout, plan, name, better, budget, better_first=False, left=None):
    """Spend what ``plan`` leaves of ``budget`` on tensor ``name``: as many of its output rows
    under ``better`` (a more precise setting) as the file can take, the rest as planned; the
    better rows are the last ones, or the first ones with ``better_first``. ``left``: the
    bytes ``plan`` leaves, when known; a split whose streams alone exceed it is refused
    without sizing the file. Returns the plan, with a :class:`RowSplit` for ``name`` when one
    fits."""
    shape = layout.shape(name)
    current = plan[name]

    def enough_rows(setting, rows):  # a block needs at least as many sub-vectors as codewords
        return rows_of((rows, *shape[1:]), setting.vector_size) >= setting.constraints.n_components

    def split(rows_better):
        if better_first:
            return RowSplit(better, current, rows_better)
        return RowSplit(current, better, shape[0] - rows_better)

    def fits(rows_better):  # the file grows with the rows under the better setting
        return layout.file_bytes({**plan, name: split(rows_better)}) <= budget

    low = next((r for r in range(1, shape[0]) if enough_rows(better, r)), shape[0])
    high = next((r for r in range(shape[0] - 1, 0, -1) if enough_rows(current, shape[0] - r)), 0)
    if low > high:
        return plan
    if left is not None:  # the streams of the smallest split alone, without sizing the file
        rest = tuple(shape[1:])
        extra = (better.stream_bytes((low, *rest)) + current.stream_bytes((shape[0] - low, *rest))
                 - current.stream_bytes(shape))
        if extra > left:
            return plan
    if not fits(low):
        return plan
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return {**plan, name: split(low)}


#: Moves with a split that fits whose splits :func:`_fill_budget` compares (in the order of
#: the moves' error decrease per byte) before it keeps the one that lowers the estimated error
#: most.
SPLITS_COMPARED = 8


def _fill_budget(layout, fixed, plan, estimates, budget, calibrations, heavier, pending=None,
                 complete=None):
    """Spend what ``plan`` leaves of ``budget`` with the moves of
    :func:`~qsdlearn._allocation.next_steps`, in their order: a tensor switched whole to a
    more precise setting when that fits (then the moves are tried again on what is left);
    otherwise a split of a tensor's output rows (:func:`_split_to_fill`), its other rows kept
    under the planned setting or one of :func:`_split_bases`. Of the splits of the first
    :data:`SPLITS_COMPARED` moves that have one that fits, the one that lowers the estimated
    error most is kept, and ends the fill: a split's new codebook may take most of what is
    left, so the move that saves most per byte need not save most. Moves whose streams alone
    exceed what is left are skipped without sizing the file. ``heavier`` caches
    :func:`_heavier_first_half` per tensor.

    ``pending`` (name to a list of ``(bytes, setting)``) are candidates not estimated yet and
    ``complete`` estimates some of them into ``estimates`` (see :func:`_plan`). Before a move
    is made, those that could change it are estimated and the moves tried again: any whose
    error decrease per byte could reach that of the last move tried (its error is not
    negative: see :func:`~qsdlearn._allocation.may_enter`), and those of fewer bytes than a
    move tried on the same tensor (:func:`_split_bases` may keep them on the other rows).
    So the fill is the one every candidate's estimate would give."""
    plan = dict(plan)
    while True:
        left = budget - layout.file_bytes({**fixed, **plan})
        best, best_saving, n_splits, switch = None, 0.0, 0, None
        tried = []  # the moves tried: (name, setting's bytes, error decrease per byte)
        for name, better in next_steps(estimates, plan):
            shape = layout.shape(name)
            current = plan[name]
            options = estimates[name]
            current_error = _estimated_error(options, current)
            better_error = _estimated_error(options, better)
            better_bytes = better.stream_bytes(shape)
            extra = better_bytes - current.stream_bytes(shape)
            tried.append((name, better_bytes, saving_per_byte(0, current_error, extra,
                                                              better_error)))
            if n_splits == 0 and extra <= left and \
                    layout.file_bytes({**fixed, **plan, name: better}) <= budget:
                switch = (name, better)
                break
            if name not in heavier:
                heavier[name] = _heavier_first_half(calibrations.get(name))
            found = False
            for base, base_left in _split_bases(options, current, better, left):
                split = _split_to_fill(layout, {**fixed, **plan, name: base}, name, better,
                                       budget, heavier[name], base_left)[name]
                if split == base:
                    continue
                found = True
                rows = split.rows if split.first == better else shape[0] - split.rows
                error = (rows * better_error
                         + (shape[0] - rows) * _estimated_error(options, base)) / shape[0]
                if current_error - error > best_saving:
                    best, best_saving = (name, split), current_error - error
            n_splits += found
            if n_splits == SPLITS_COMPARED:
                break
        wanted = _pending_in_reach(layout, pending, estimates, plan, left, tried,
                                   exhausted=switch is None and n_splits < SPLITS_COMPARED)
        if wanted:
            complete(wanted)
            continue
        if switch is not None:
            plan[switch[0]] = switch[1]
            continue
        if best is not None:
            plan[best[0]] = best[1]
        return plan


def _pending_in_reach(layout, pending, estimates, plan, left, tried, exhausted):
    """The ``pending`` candidates (name to ``(bytes, setting)`` pairs, or None) that could
    change the moves of :func:`_fill_budget` from ``plan``, which leaves ``left`` bytes. Per
    tensor, those whose error decrease per byte from the planned option could reach that of
    the last move ``tried`` (any, if the moves were ``exhausted``) or of fewer bytes than a
    move tried on it, and that a move could take at all: switched whole, its extra bytes over
    the planned option fit in what is left; in a split, its codebook fits in what is left
    plus what the other rows may give back (down to the hull vertex before the planned
    option, see :func:`_split_bases`), where no base of the split has more bytes per row than
    the candidate (otherwise it is kept). Name to a list of settings, for the tensors with
    any."""
    if not pending:
        return {}
    last = -np.inf if exhausted or not tried else tried[-1][2]
    below = {}
    for name, size, _ in tried:
        below[name] = max(below.get(name, 0), size)
    wanted = {}
    for name, options in pending.items():
        if not options:
            continue
        current_bytes, current_error, _ = next(
            option for option in estimates[name] if option[2] == plan[name])
        lower = max((size for size, _, _ in options_hull(estimates[name])
                     if size < current_bytes), default=0)
        room = left + current_bytes - lower
        shape = layout.shape(name)
        known = [(size, setting) for size, _, setting in estimates[name]] + list(options)
        rows_bytes = {setting: size - _codebook_bytes(setting, shape) for size, setting in known}

        def fits(size, setting):
            if size - current_bytes <= left:  # switched whole
                return True
            # A split adds the candidate's codebook, less what its rows save on those of the
            # base (the planned option or one of more bytes than the hull vertex before it):
            # nothing, where no base has more bytes per row than the candidate.
            bases = [rows_bytes[base] for base_size, base in known
                     if base == plan[name] or lower < base_size < size]
            return (max(bases) > rows_bytes[setting]
                    or _codebook_bytes(setting, shape) <= room)

        reach = [setting for size, setting in options
                 if (size < below.get(name, 0) or (
                     current_error > 0
                     and saving_per_byte(current_bytes, current_error, size, 0.0) >= last))
                 and fits(size, setting)]
        if reach:
            wanted[name] = reach
    return wanted


def _split_bases(options, current, better, left):
    """The settings a split of a tensor's rows towards ``better`` may keep on its other rows,
    with the bytes the plan would leave under each: the planned setting ``current`` first,
    then the options of less error than any option of fewer bytes, between the hull vertex
    before ``current`` and ``better`` in bytes (those whose streams fit in the ``left``
    bytes).

    The plan's setting is a vertex of the lower convex hull of the whole tensor's options,
    which passes over the others; but a split gives each part a codebook of its own, so a
    split from one with a smaller codebook can keep more rows under ``better`` and lower the
    error more (2-D k-means with 32 codewords instead of 2 of 256 sparse codes under 2-D
    k-means with 64: 0.5 dB on a MiniLM attention matrix at 3 bits per weight)."""
    known = {setting: (size, error) for size, error, setting in options}
    (current_bytes, _), (better_bytes, better_error) = known[current], known[better]
    lower = max((size for size, _, _ in options_hull(options) if size < current_bytes),
                default=-1)
    bases = [(current, left)]
    least = float("inf")
    for size, error, setting in sorted(options, key=lambda o: (o[0], o[1])):
        if error < least:
            least = error
            if (lower < size < better_bytes and error > better_error and setting != current
                    and size - current_bytes < left):
                bases.append((setting, left - (size - current_bytes)))
    return bases


def _estimated_error(options, setting):
    """The estimated error of ``setting`` among a tensor's ``(bytes, error, setting)``
    options."""
    return next(error for _, error, option in options if option == setting)


def _plan_error(plan, estimates, layout):
    """The estimated total error of a plan (what the allocation minimises)."""
    total = 0.0
    for name, setting in plan.items():
        if isinstance(setting, RowSplit):
            share = setting.rows / layout.shape(name)[0]
            total += (share * _estimated_error(estimates[name], setting.first)
                      + (1.0 - share) * _estimated_error(estimates[name], setting.second))
        else:
            total += _estimated_error(estimates[name], setting)
    return total


def _why_unspent(plan, estimates, layout):
    """Why a plan may leave budget unspent, as the warning :func:`_warn_if_unspent` gives:
    ``"most precise"`` (every tensor at its most precise candidate), ``None`` (the same,
    with an estimated error of zero: nothing to spend more on) or ``"left over"``."""
    at_most_precise = all(
        not isinstance(setting, RowSplit)
        and _estimated_error(estimates[name], setting) == min(e for _, e, _ in estimates[name])
        for name, setting in plan.items())
    if not at_most_precise:
        return "left over"
    return "most precise" if _plan_error(plan, estimates, layout) > 0 else None


def _warn_if_unspent(why, bits_per_weight, used, held=""):
    """Warn when the file takes ``used`` bits per weight, more than 0.05 less than the target,
    saying ``why`` (``"most precise"`` or ``"left over"``, :func:`_why_unspent`) and, where
    ``why`` is the first, ``held`` (:func:`_fixed_share`: what fixed settings take)."""
    if used >= bits_per_weight - 0.05:
        return
    if why == "most precise":
        planned = "every tensor planned" if held else "every tensor"
        warnings.warn(
            f"bits_per_weight={bits_per_weight:g} is more than the candidates can use: the "
            f"file takes {used:.3f} bits/weight with {planned} at its most precise "
            f"candidate{held}; add finer candidate settings (compress_weights' candidates=) "
            "to spend more", UserWarning, stacklevel=4)
        return
    warnings.warn(
        f"bits_per_weight={bits_per_weight:g}: the file takes {used:.3f} bits/weight; what is "
        "left is too small for any tensor's more precise candidate settings, whole or on a "
        "share of its output rows (a split adds the setting's codebook and moves whole rows); "
        "add candidate settings between them (compress_weights' candidates=; e.g. smaller "
        "codebooks) to spend it",
        UserWarning, stacklevel=4)


def _heavier_first_half(calibration):
    """Whether a tensor's row weights (from its calibration entry) weigh more in its first
    half of rows than in its second: then a split gives the better setting to the first
    rows. False without row weights."""
    if calibration is None:
        return False
    weights = np.asarray(calibration.load())
    if weights.ndim != 1:
        return False
    half = weights.shape[0] // 2
    return float(np.sum(weights[:half])) > float(np.sum(weights[half:]))


def _budget_bytes(bits_per_weight, layout):
    """The most bytes a file of the model of ``layout`` may take at ``bits_per_weight``."""
    return int(bits_per_weight * layout.n_weights // 8)


def _check_candidates(candidates, bits_per_weight):
    """``compress_weights(candidates=...)``: a non-empty list of :class:`LayerSetting`, and only
    with a ``bits_per_weight`` to choose among them for."""
    if candidates is None:
        return
    if not candidates:
        raise ValueError("candidates is empty: give LayerSettings to choose from, or None for "
                         "the default candidates")
    for i, candidate in enumerate(candidates):
        if not isinstance(candidate, LayerSetting):
            raise TypeError(
                f"candidates[{i}] is a {type(candidate).__name__}; give LayerSettings, e.g. "
                "LayerSetting(8, Constraints(256, n_nonzero=1, code_bits=0, codebook_bits=8))")
    if bits_per_weight is None:
        raise ValueError("candidates are chosen among for a bits_per_weight target: give "
                         "bits_per_weight, or settings= to fix the settings yourself")


#: What :func:`_below_reach` advises by default.
_CHEAPER_CANDIDATES = "raise it or add cheaper candidate settings (compress_weights' candidates=)"


def _below_reach(bits_per_weight, least_bytes, layout, reach="the candidates can reach",
                 advice=_CHEAPER_CANDIDATES):
    """The ValueError of a budget under the smallest file, ``least_bytes``, that ``reach``
    allows; the least is rounded up, so that a budget of the figure quoted is met."""
    least = math.ceil(8000 * least_bytes / layout.n_weights) / 1000
    return ValueError(
        f"bits_per_weight={bits_per_weight} is below what {reach} "
        f"({least:.3f} bits/weight at the least); {advice}")


def _estimate_layers(layout, wanted, candidates, base, n_jobs, n_threads, calibrations,
                     relative, factors):
    """The estimates (:func:`_estimate`, ``relative`` errors or not) of the ``wanted``
    candidates of each tensor (a dict of name to a list of settings), in parallel, largest
    tensors first: name to a dict of setting to ``(bytes, error)``, the error times the
    tensor's sensitivity factor (``factors``, :func:`_sensitivity_factors`, or None), without
    the candidates that could not be estimated."""
    if not wanted:
        return {}
    order = _largest_first(list(wanted), layout.checkpoint)
    results = joblib.Parallel(n_jobs=n_jobs)(
        joblib.delayed(_estimate)(
            layout.checkpoint.ref(name), candidates, _layer_seed(base, name), n_threads,
            relative, calibrations.get(name), frozenset(wanted[name]),
        )
        for name in order
    )
    found = {}
    for name, per_candidate in zip(order, results):
        factor = 1.0 if factors is None else factors[name]
        found[name] = {candidate: (result[0], factor * result[1])
                       for candidate, result in zip(candidates, per_candidate)
                       if result is not None}
    return found


def _options(found, candidates):
    """The estimates ``found`` (:func:`_estimate_layers`) as each tensor's list of
    ``(bytes, error, setting)`` options, in the order of ``candidates``."""
    return {name: [(*per_setting[c], c) for c in candidates if c in per_setting]
            for name, per_setting in found.items()}


def _plan(layout, free, fixed, bits_per_weight, candidates, base, n_jobs, n_threads,
          calibrations, sensitivity=None):
    """The settings of the ``free`` tensors at ``bits_per_weight`` for the whole file, and why
    it may fall short of it (:func:`_why_unspent`).

    The candidates are estimated in rounds: those of at most :data:`FIRST_ROUND_MARGIN` bits
    per weight above the target on each tensor; then, per tensor, those of more bits that the
    allocation may take (:func:`~qsdlearn._allocation.may_enter`); then those the fill of what
    is left may reach (:func:`_fill_budget`). The plan is the one every candidate's estimate
    would give (the allocation's steps and the fill's moves are the same), at the cost of the
    estimates that can count."""
    budget = _budget_bytes(bits_per_weight, layout)
    # Feasibility needs no fitting: the sizes are known from the settings alone.
    smallest = {}
    for name in free:
        usable = [c for c in candidates if _fits(c, layout.shape(name))]
        if not usable:
            raise ValueError(f"no candidate setting fits the tensor {name!r} "
                             f"(shape {layout.shape(name)}): every one has more components "
                             "than it has sub-vectors")
        smallest[name] = min(usable, key=lambda c: c.stream_bytes(layout.shape(name)))
    least_bytes = layout.file_bytes({**fixed, **smallest})
    if least_bytes > budget:
        advice = _CHEAPER_CANDIDATES
        if layout.kept:  # tensors kept verbatim take their share whatever the candidates
            kept_bits = 8 * sum(t.nbytes for t in layout.kept.values()) / layout.n_weights
            n = len(layout.kept)
            advice += (f" ({n} tensor{'s' * (n != 1)} kept verbatim take{'s' * (n == 1)} "
                       f"{kept_bits:.3f} bits/weight of it: under two dimensions, not floats, "
                       f"fewer than {MIN_COMPRESSED_SIZE} elements or matching keep)")
        advice += _fixed_share(fixed, layout)  # tensors the candidates cannot lower
        raise _below_reach(bits_per_weight, least_bytes, layout, advice=advice)
    relative = bool(calibrations) or sensitivity is not None
    factors = _sensitivity_factors(sensitivity, free)

    def estimate(wanted):
        return _estimate_layers(layout, wanted, candidates, base, n_jobs, n_threads,
                                calibrations, relative, factors)

    # First round: the candidates up to FIRST_ROUND_MARGIN above the target on each tensor;
    # a tensor none of them could be estimated on takes the others at once.
    first, pending = {}, {}  # pending: the (bytes, setting) of the candidates not estimated
    for name in free:
        shape = layout.shape(name)
        sized = [(c.stream_bytes(shape), c) for c in candidates]
        above = [size * 8 > (bits_per_weight + FIRST_ROUND_MARGIN) * math.prod(shape)
                 for size, _ in sized]
        first[name] = [c for (_, c), far in zip(sized, above) if not far]
        pending[name] = [option for option, far in zip(sized, above) if far]
    found = estimate(first)
    found.update(estimate({name: [c for _, c in pending.pop(name)]
                           for name in free if not found[name]}))
    estimates = _options(found, candidates)
    if any(not options for options in estimates.values()):
        empty = sorted(name for name, options in estimates.items() if not options)
        raise ValueError(f"no candidate setting fits the tensors {empty}")
    smallest = {name: min(options, key=lambda o: o[0])[2] for name, options in estimates.items()}
    # Everything but the free layers' streams (header, kept tensors, fixed layers), with a
    # margin for what grows with the chosen settings (their entries in the layer list, the
    # digits of the payload's size); checked exactly below.
    overhead = layout.file_bytes({**fixed, **smallest})
    overhead -= sum(smallest[name].stream_bytes(layout.shape(name)) for name in free)
    overhead += ENTRY_MARGIN * len(free) + FILE_MARGIN
    # Then the others where an allocation may want them (_allocations) and where the fill of
    # the budget may reach them (_fill_budget), as they go.
    pending = {name: options for name, options in pending.items() if options}

    def complete(wanted):
        """Estimate the ``wanted`` pending candidates (name to settings) into ``estimates``."""
        for name, more in estimate(wanted).items():
            found[name].update(more)
            estimates[name][:] = _options({name: found[name]}, candidates)[name]
            pending[name] = [(size, c) for size, c in pending[name] if c not in wanted[name]]

    return _allocate_and_fill(layout, fixed, estimates, smallest, overhead, budget, calibrations,
                              bits_per_weight, pending, complete)


def _allocations(estimates, budget_bytes, pending=None, complete=None):
    """The allocations of ``budget_bytes`` without and with ``stop_when_blocked``
    (:func:`~qsdlearn._allocation.allocate`); with ``pending`` candidates, those they may
    take (:func:`~qsdlearn._allocation.may_enter`) are estimated by ``complete`` and the
    allocations made again, until none is wanted. (Without ``stop_when_blocked`` a step that
    does not fit lets other tensors climb past where they stood before, so every allocation
    is checked, not only the first.) Then each tensor's lower hull up to the step after its
    planned option is the one every estimate would give, and so are the allocations."""
    while True:
        plans = [allocate(estimates, budget_bytes, stop_when_blocked=stop)
                 for stop in (False, True)]
        wanted = may_enter(estimates, plans, pending) if pending else {}
        if not wanted:
            return plans
        complete(wanted)


def _allocate_and_fill(layout, fixed, estimates, smallest, overhead, budget, calibrations,
                       bits_per_weight, pending=None, complete=None):
    """The plan of :func:`_plan` from the ``estimates`` (and the ``smallest`` option of each
    tensor): greedy allocation on ``budget`` less ``overhead`` (raised until the file fits),
    then the fill of what is left (:func:`_fill_budget`, with the ``pending`` candidates and
    ``complete``); and why it may fall short."""
    heavier = {}  # tensor -> whether a split gives its better setting to the first rows

    def fill(plan):
        return _fill_budget(layout, fixed, plan, estimates, budget, calibrations, heavier,
                            pending, complete)

    for _ in range(5):
        # Two ways past a step that does not fit: other layers' smaller steps, or stopping
        # there and splitting that layer's rows towards it. The lower estimated error wins.
        plans = _allocations(estimates, budget - overhead, pending, complete)
        if plans[0] is None:
            # Only the margins are short: the smallest settings fit exactly, and the fill
            # spends what they leave, sizing each move's file exactly.
            least_bytes = layout.file_bytes({**fixed, **smallest})
            if least_bytes > budget:
                raise _below_reach(bits_per_weight, least_bytes, layout)
            plans = [dict(smallest), dict(smallest)]
        excess = max(layout.file_bytes({**fixed, **plan}) for plan in plans) - budget
        if excess <= 0:
            if plans[1] == plans[0]:  # no step was blocked
                plans = plans[:1]
            plan = min((fill(plan) for plan in plans),
                       key=lambda plan: _plan_error(plan, estimates, layout))
            return plan, _why_unspent(plan, estimates, layout)
        overhead += excess
    raise ValueError(f"could not meet bits_per_weight={bits_per_weight}")  # pragma: no cover
