"""The compressed forms of one tensor of a model (:class:`CompressedLayer`, :class:`SplitLayer`
of :class:`RowSplit` blocks, :class:`KeptTensor`) and the entries they write in a model file's
layer list."""

import math
from dataclasses import dataclass

import numpy as np

from ._dtypes import SAFETENSORS_NAMES, cast_reconstruction, to_little_endian_bytes
from ._layers import LayerSetting, _check_row_scales, from_rows
from .codec import CompressedMatrix, matrix_payload


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
    ``row_scales`` the bytes of a row scale,
    :data:`~qsdlearn._layers.ROW_SCALE_DTYPES`, or 0 without; in
    format version 3 it was 1 for float16 scales)."""
    setting = layer.setting
    c = setting.constraints
    fields = [setting.vector_size, c.n_components, c.n_nonzero, c.code_bits, c.codebook_bits,
              c.component_nonzero, layer.matrix.settings.float_bits,
              0 if layer.row_scales is None else layer.row_scales.itemsize]
    return [None if value is None else int(value) for value in fields]


def _decode_once(matrix):
    """Decode ``matrix`` without keeping its unpacked factors: they take several times the
    streams' size, and a model decoded layer by layer must not hold every layer's."""
    return CompressedMatrix(matrix.settings, matrix.streams).decode()


@dataclass
class CompressedLayer:
    """One compressed tensor: its matrix, original shape and dtype, setting and fit record.

    The entries of :attr:`CompressedModel.layers <qsdlearn.CompressedModel>` that
    :func:`~qsdlearn.compress_weights` compresses under one setting are of this class.

    Parameters
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
        SQNR of the decompressed tensor against the original, in dB, measured on what
        :meth:`decompress` returns (in the tensor's dtype, its rounding included).
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
        :func:`~qsdlearn.weights.output_row_scales`); stored in files and counted in
        :attr:`nbytes` and the report's bits (8 bits per output row; 16 for the float16 scales
        of files of format version 3). Kept as a read-only copy. ``None`` without.

    Raises
    ------
    TypeError
        If ``row_scales`` are neither float8_e5m2 nor float16.
    ValueError
        If the matrix is not what ``setting`` makes of a tensor of ``shape``, or
        ``row_scales`` are given without ``setting.row_scales`` or missing with it, have
        another shape than ``(shape[0],)``, or hold a scale that is not positive and finite.

    See Also
    --------
    SplitLayer : A tensor whose output rows are split between two settings.
    KeptTensor : A tensor stored verbatim.

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn import LayerSetting, compress_weights
    >>> W = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    >>> model = compress_weights({"w": W}, settings=LayerSetting(), random_state=0)
    >>> layer = model.layers["w"]
    >>> type(layer).__name__, layer.shape, layer.dtype, layer.nbytes
    ('CompressedLayer', (64, 64), 'float32', 4288)
    >>> layer.decompress().shape
    (64, 64)
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
        """Bytes of its streams and row scales in a file (int)."""
        return self.matrix.nbytes + self._scale_bytes()

    def _scale_bytes(self):
        return 0 if self.row_scales is None else self.row_scales.nbytes

    def decompress(self):
        """The reconstructed tensor (decoded in float32), in its original shape and dtype.

        With row scales, every decoded output row is multiplied by its scale (in the dtype of
        the encoded matrix, float32 for every layer :func:`compress_weights` makes) before
        the cast to the tensor's dtype.

        Returns
        -------
        ndarray of shape ``shape``
            In the dtype named by ``dtype`` (an ml_dtypes ``bfloat16`` array for bfloat16).

        Raises
        ------
        ValueError
            If the rows times their row scales pass the range of float32 (only in a damaged
            or crafted file).
        """
        return cast_reconstruction(self.decompressed_float(), self.dtype)

    def decompressed_float(self):
        """The reconstructed tensor in the encoded matrix's dtype, before the cast of
        :meth:`decompress`.

        Returns
        -------
        ndarray of shape ``shape``
            float32 (float64 for a matrix encoded from float64 rows).

        Raises
        ------
        ValueError
            As :meth:`decompress`.
        """
        decoded = from_rows(_decode_once(self.matrix), self.shape)
        if self.row_scales is not None:
            scales = self.row_scales.astype(decoded.dtype)
            with np.errstate(over="ignore"):  # past the dtype's range only in a crafted file
                decoded = decoded * scales.reshape((-1,) + (1,) * (decoded.ndim - 1))
            if decoded.size and not (np.isfinite(decoded.min()) and np.isfinite(decoded.max())):
                # refused as a matrix whose factors decode past the range is (CompressedMatrix)
                raise ValueError(f"damaged file: a layer's rows times their row scales pass the "
                                 f"range of {decoded.dtype}")
        return decoded

    def record(self):
        """What :meth:`CompressedModel.report` shows of this tensor.

        Returns
        -------
        dict
            ``setting`` (str, :meth:`LayerSetting.describe`), ``payload_bits`` (int: its
            streams' and row scales' bits), ``sqnr_db``, ``n_iter``, ``converged`` and
            ``output_sqnr_db``, as the attributes.
        """
        scales = 8 * self._scale_bytes()
        return dict(setting=self.setting.describe(), payload_bits=self.matrix.bits + scales,
                    sqnr_db=self.sqnr_db, n_iter=self.n_iter, converged=self.converged,
                    output_sqnr_db=self.output_sqnr_db)

    def _file_entry(self, name):
        """The layer's entry in a file's layer list: ``[1, name, dtype, shape, sqnr_db,
        setting]`` (see :meth:`CompressedModel.to_bytes`)."""
        return [_COMPRESSED, name, SAFETENSORS_NAMES[self.dtype], _shape_list(self.shape),
                _stored_sqnr(self.sqnr_db), _setting_fields(self)]

    def _payload(self):
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
    is how a point between two vertices of the operational rate–distortion hull is reached;
    :func:`~qsdlearn.compress_weights` splits one tensor so to spend what is left of its
    budget (the ``setting`` of a :class:`SplitLayer`).

    Parameters
    ----------
    first : LayerSetting
        The setting of the first block of rows.
    second : LayerSetting
        The setting of the other rows.
    rows : int
        Output rows of the first block.

    See Also
    --------
    SplitLayer : A tensor compressed in two blocks of rows.

    Examples
    --------
    >>> from qsdlearn import Constraints, LayerSetting
    >>> from qsdlearn.weights import RowSplit
    >>> split = RowSplit(LayerSetting(), LayerSetting(4, Constraints(256, 1, 0, 8)), rows=10)
    >>> [(block, rows) for _, block, rows in split.blocks((64, 32))]
    [((10, 32), slice(0, 10, None)), ((54, 32), slice(10, 64, None))]
    """

    first: LayerSetting
    second: LayerSetting
    rows: int

    def blocks(self, shape):
        """Both blocks of a tensor of ``shape``.

        Parameters
        ----------
        shape : tuple of int
            The tensor's shape (more than ``rows`` output rows).

        Returns
        -------
        list of tuple
            ``(setting, block shape, row slice)`` of the first block, then of the second.
        """
        rest = tuple(shape[1:])
        return [(self.first, (self.rows, *rest), slice(0, self.rows)),
                (self.second, (shape[0] - self.rows, *rest), slice(self.rows, shape[0]))]

    def describe(self):
        """A short human-readable form of the split.

        Returns
        -------
        str
            ``"<rows> rows <first> + rest <second>"``, each setting as
            :meth:`LayerSetting.describe` gives it.
        """
        return f"{self.rows} rows {self.first.describe()} + rest {self.second.describe()}"


@dataclass
class SplitLayer:
    """One tensor compressed in two blocks of output rows (see :class:`RowSplit`), with the
    interface of :class:`CompressedLayer`.

    Parameters
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

    See Also
    --------
    CompressedLayer : A tensor compressed under one setting.

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn import Constraints, LayerSetting
    >>> from qsdlearn.weights import CompressedLayer, SplitLayer
    >>> W = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    >>> parts = []
    >>> for setting, rows in ((LayerSetting(8, Constraints(32, 2, 2, 8)), W[:32]),
    ...                       (LayerSetting(4, Constraints(64, 1, 0, 8)), W[32:])):
    ...     matrix = setting.estimator(random_state=0).fit(rows.reshape(-1, setting.vector_size))
    ...     parts.append(CompressedLayer(matrix.encode(rows.reshape(-1, setting.vector_size)),
    ...                                  rows.shape, "float32", setting, sqnr_db=0.0))
    >>> layer = SplitLayer(parts, W.shape, "float32", sqnr_db=0.0)
    >>> layer.setting.describe()
    '32 rows d=8 k=32 2 of 32 codes=2b codebook=8b + rest d=4 k=64 1 of 64 codes=0b codebook=8b'
    >>> layer.decompress().shape
    (64, 64)
    """

    parts: list
    shape: tuple
    dtype: str
    sqnr_db: float
    output_sqnr_db: float | None = None

    @property
    def setting(self):
        """The :class:`RowSplit` of the tensor (RowSplit)."""
        first, second = self.parts
        return RowSplit(first.setting, second.setting, first.shape[0])

    @property
    def nbytes(self):
        """Bytes of its streams in a file (int)."""
        return sum(part.nbytes for part in self.parts)

    def decompress(self):
        """The reconstructed tensor, in its original shape and dtype.

        Returns
        -------
        ndarray of shape ``shape``
            Both blocks decompressed (:meth:`CompressedLayer.decompress`), in row order.
        """
        return np.concatenate([part.decompress() for part in self.parts], axis=0)

    def record(self):
        """What :meth:`CompressedModel.report` shows of this tensor.

        Returns
        -------
        dict
            As :meth:`CompressedLayer.record`, over both blocks (``n_iter`` the larger,
            ``converged`` whether both did).
        """
        records = [part.record() for part in self.parts]
        n_iter = [r["n_iter"] for r in records]
        converged = [r["converged"] for r in records]
        return dict(
            setting=self.setting.describe(), payload_bits=sum(r["payload_bits"] for r in records),
            sqnr_db=self.sqnr_db, n_iter=None if None in n_iter else max(n_iter),
            converged=None if None in converged else all(converged),
            output_sqnr_db=self.output_sqnr_db,
        )

    def _file_entry(self, name):
        """The tensor's entry in a file's layer list: ``[2, name, dtype, shape, sqnr_db,
        parts]``, each part ``[rows, sqnr_db, setting]`` (see :meth:`CompressedModel.to_bytes`)."""
        parts = [[int(part.shape[0]), _stored_sqnr(part.sqnr_db), _setting_fields(part)]
                 for part in self.parts]
        return [_SPLIT, name, SAFETENSORS_NAMES[self.dtype], _shape_list(self.shape),
                _stored_sqnr(self.sqnr_db), parts]

    def _payload(self):
        """Its bytes in a file: those of its parts, in row order."""
        return b"".join(part._payload() for part in self.parts)


@dataclass
class KeptTensor:
    """A tensor stored verbatim (1-D, integer, boolean or small), with the interface of
    :class:`CompressedLayer`.

    Parameters
    ----------
    array : ndarray
        The tensor itself.

    See Also
    --------
    CompressedLayer : A compressed tensor.

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn import compress_weights
    >>> model = compress_weights({"bias": np.ones(64, np.float32)}, random_state=0)
    >>> kept = model.layers["bias"]
    >>> type(kept).__name__, kept.shape, kept.dtype, kept.nbytes
    ('KeptTensor', (64,), 'float32', 256)
    """

    array: np.ndarray

    @property
    def shape(self):
        """Shape of the tensor (tuple of int)."""
        return self.array.shape

    @property
    def dtype(self):
        """Its dtype name (str)."""
        return self.array.dtype.name

    @property
    def nbytes(self):
        """Bytes of the tensor in a file (int)."""
        return self.array.nbytes

    def decompress(self):
        """A copy of the tensor.

        Returns
        -------
        ndarray
            The array, copied.
        """
        return self.array.copy()

    def record(self):
        """What :meth:`CompressedModel.report` shows of this tensor.

        Returns
        -------
        dict
            As :meth:`CompressedLayer.record`: ``setting`` ``"kept (<dtype>)"``, its bits,
            an infinite SQNR and ``None`` for the rest.
        """
        return dict(setting=f"kept ({self.dtype})", payload_bits=8 * self.nbytes,
                    sqnr_db=float("inf"), n_iter=None, converged=None, output_sqnr_db=None)

    def _file_entry(self, name):
        """The tensor's entry in a file's layer list: ``[0, name, dtype, shape]`` (see
        :meth:`CompressedModel.to_bytes`)."""
        return [_KEPT, name, SAFETENSORS_NAMES[self.dtype], _shape_list(self.shape)]

    def _payload(self):
        """Its bytes in a file: the little-endian values of its dtype, in C order."""
        return to_little_endian_bytes(self.array)
