"""Layer-wise compression of a model's exported weights.

Reshape rule
------------
A tensor of shape ``(out, in, *kernel)`` is viewed as the matrix ``(out, in * prod(kernel))``
in C order (a 2-D weight ``(out, in)`` as it is; a convolution's input channel and kernel
positions are flattened together). Each matrix row is cut into consecutive sub-vectors of
``vector_size`` elements, which become the rows of ``X``; when ``vector_size`` does not divide
the row length, every row is padded with zeros at its end up to the next multiple (the padding
is encoded, counted in the bits, and dropped on decompression).

Tensors with fewer than two dimensions, integer or boolean tensors, and tensors with fewer than
:data:`MIN_COMPRESSED_SIZE` elements are kept verbatim in their dtype, and counted.

Rate
----
``bits_per_weight`` is that of the whole file: ``8 * file bytes / number of weights``, the
header, every stream's rounding to bytes and every kept tensor included. The budget is spent
by :func:`qsdlearn._allocation.allocate`.
"""

import json
import math
import os
import sys
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real

import joblib
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, validate_params
from threadpoolctl import threadpool_limits

from ._allocation import allocate
from ._constraints import Constraints
from ._container import FileImage, check_declared_elements, json_field, write_container
from ._estimator import QuantizedSparseDecomposition
from .codec import STREAMS, CompressedMatrix, MatrixSettings, matrix_from_tensors, matrix_tensors
from .metrics import sqnr

MIN_COMPRESSED_SIZE = 1024
#: Rows of a layer used to estimate the error of a candidate setting.
ESTIMATE_ROWS = 1024
ESTIMATE_MAX_ITER = 8

_KEPT_DTYPES = {
    "float16": "F16", "float32": "F32", "float64": "F64", "int8": "I8", "uint8": "U8",
    "int16": "I16", "uint16": "U16", "int32": "I32", "uint32": "U32", "int64": "I64",
    "uint64": "U64", "bool": "BOOL",
}
_KEPT_DTYPE_NAMES = {container: name for name, container in _KEPT_DTYPES.items()}


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

    Examples
    --------
    >>> from qsdlearn import Constraints, LayerSetting
    >>> vq = LayerSetting(4, Constraints(256, n_nonzero=1, code_bits=0, codebook_bits=8))
    >>> vq.describe()
    'd=4 k=256 1 of 256 codes=0b codebook=8b'
    """

    vector_size: int = 8
    constraints: Constraints = field(
        default_factory=lambda: Constraints(256, n_nonzero=2, code_bits=2, codebook_bits=8)
    )

    def describe(self):
        """A short human-readable form of the setting."""
        return f"d={self.vector_size} {self.constraints.describe()}"

    def estimator(self, **params):
        """A :class:`QuantizedSparseDecomposition` with these constraints and ``params``."""
        return QuantizedSparseDecomposition(**self.constraints.to_dict(), **params)

    def matrix_settings(self, shape, dtype=np.float32):
        """Settings of the matrix :func:`to_rows` makes of a tensor of ``shape`` (what
        :func:`compress_weights` encodes), known before fitting."""
        return MatrixSettings(rows_of(shape, self.vector_size), self.vector_size,
                              np.dtype(dtype).name, self.constraints)

    def stream_bytes(self, shape):
        """Bytes of the streams of a tensor of ``shape`` under this setting."""
        return sum(self.matrix_settings(shape).stream_sizes().values())


def default_candidates(vector_size=8):
    """Candidate settings spanning about 0.5 to 5 bits per weight for ``vector_size``."""
    d = vector_size
    grid = [
        (16, 1, 0), (256, 1, 0), (256, 1, 2), (64, 2, 2), (256, 2, 2), (256, 2, 3),
        (256, 3, 3), (256, 4, 3), (d, None, 2), (d, None, 3), (d, None, 4), (d, None, 5),
    ]
    return [LayerSetting(d, Constraints(k, s, b, 8)) for k, s, b in grid]


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


def _is_compressible(array):
    return (
        array.ndim >= 2
        and np.issubdtype(array.dtype, np.floating)
        and array.size >= MIN_COMPRESSED_SIZE
    )


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
        Its dtype, restored on decompression.
    setting : LayerSetting
        How it was compressed.
    sqnr_db : float
        SQNR of the decompressed tensor against the original, in dB.
    n_iter : int or None
        Iterations of the final fit (``None`` when not recorded, e.g. read from a file).
    converged : bool or None
        Whether the final fit met its tolerance before ``max_iter`` (``None``: not recorded).
    """

    matrix: CompressedMatrix
    shape: tuple
    dtype: str
    setting: LayerSetting
    sqnr_db: float
    n_iter: int | None = None
    converged: bool | None = None

    @property
    def nbytes(self):
        """Bytes of its streams in a file."""
        return self.matrix.nbytes

    def decompress(self):
        """The reconstructed tensor, in its original shape and dtype."""
        rows = self.matrix.decode()
        return from_rows(rows, self.shape).astype(self.dtype)

    def record(self):
        """What :meth:`CompressedModel.report` shows of this tensor."""
        return dict(setting=self.setting.describe(), payload_bits=self.matrix.bits,
                    sqnr_db=self.sqnr_db, n_iter=self.n_iter, converged=self.converged)

    def header_entry(self, name):
        """The layer's entry in the file header."""
        return dict(name=name, kind="compressed", shape=list(self.shape), dtype=self.dtype,
                    matrix=self.matrix.settings.to_dict(), sqnr_db=self.sqnr_db)

    def tensors(self, key):
        """Its container tensors, named ``key.<stream>``."""
        return matrix_tensors(self.matrix, prefix=f"{key}.")


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
                    sqnr_db=float("inf"), n_iter=None, converged=None)

    def header_entry(self, name):
        """The tensor's entry in the file header."""
        return dict(name=name, kind="kept")

    def tensors(self, key):
        """Its container tensor, named ``key`` (little-endian bytes of its dtype)."""
        array = self.array
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        return [(key, _KEPT_DTYPES[self.dtype], array.shape, data)]


class CompressedModel(FileImage):
    """The compressed weights of a model: compressed layers and tensors kept verbatim.

    Build one with :func:`compress_weights`, or read one with :func:`qsdlearn.load` or
    :meth:`from_bytes`.

    Parameters
    ----------
    layers : mapping of str to CompressedLayer or KeptTensor
        In the model's order.

    Attributes
    ----------
    layers : dict of str to CompressedLayer or KeptTensor
        The tensors, in the original order.

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
    """

    KIND = "model"

    def __init__(self, layers):
        self.layers = dict(layers)
        self._image = None

    # size ---------------------------------------------------------------------------------------

    @property
    def n_weights(self):
        """Number of weights of all tensors."""
        return sum(math.prod(entry.shape) for entry in self.layers.values())

    @property
    def nbytes(self):
        """Size of the file :meth:`save` writes, in bytes."""
        return len(self.to_bytes())

    @property
    def bits_per_weight(self):
        """``8 * file bytes / n_weights``: everything counted."""
        return 8 * self.nbytes / self.n_weights

    @property
    def compression_ratio(self):
        """``32 * n_weights / (8 * file bytes)``: the weights as float32 over the file, as
        :attr:`QuantizedSparseDecomposition.compression_ratio_` counts a matrix."""
        return 32.0 / self.bits_per_weight

    # content ------------------------------------------------------------------------------------

    def decompress(self):
        """Name to array, with the original shapes and dtypes."""
        return {name: entry.decompress() for name, entry in self.layers.items()}

    def report(self):
        """Per-tensor records.

        Returns
        -------
        list of dict
            One per tensor, in order: ``name``, ``shape``, ``setting`` (text),
            ``payload_bits`` (exact bits of its streams or of the kept tensor),
            ``stored_bits`` (what the file holds for it: streams rounded up to whole bytes),
            ``bits_per_weight`` (``stored_bits`` per weight), ``sqnr_db`` (``inf`` for kept
            tensors), ``n_iter`` and ``converged`` of the final fit (``None`` when not
            recorded).
        """
        records = []
        for name, entry in self.layers.items():
            size = math.prod(entry.shape)
            record = entry.record()
            stored = 8 * entry.nbytes
            records.append(dict(
                name=name, shape=tuple(entry.shape), setting=record["setting"],
                payload_bits=record["payload_bits"], stored_bits=stored,
                bits_per_weight=stored / max(size, 1), sqnr_db=record["sqnr_db"],
                n_iter=record["n_iter"], converged=record["converged"],
            ))
        return records

    def report_table(self):
        """The report and the totals as printable text."""
        rows = self.report()
        width = max([len(r["name"]) for r in rows] + [4])
        lines = [
            f"{'name':<{width}}  {'shape':<18} {'setting':<44} {'bits/weight':>11} {'SQNR dB':>8}"
        ]
        for r in rows:
            note = "" if r["converged"] is not False else f"  (not converged in {r['n_iter']})"
            lines.append(
                f"{r['name']:<{width}}  {str(r['shape']):<18} {r['setting']:<44} "
                f"{r['bits_per_weight']:>11.3f} {r['sqnr_db']:>8.2f}{note}"
            )
        lines.append(
            f"total: {self.n_weights} weights, {self.nbytes} bytes, "
            f"{self.bits_per_weight:.3f} bits/weight (header included), "
            f"ratio {self.compression_ratio:.1f}x over float32"
        )
        return "\n".join(lines)

    # file image ---------------------------------------------------------------------------------

    def to_bytes(self):
        """The file image (a safetensors file)."""
        if self._image is None:
            tensors, entries = [], []
            for i, (name, entry) in enumerate(self.layers.items()):
                tensors += entry.tensors(f"{i}")
                entries.append(entry.header_entry(name))
            metadata = {"kind": self.KIND, "layers": json.dumps(entries, separators=(",", ":"))}
            self._image = write_container(tensors, metadata)
        return self._image

    @classmethod
    def from_container(cls, meta, tensors, max_elements=None):
        """Rebuild from a parsed container (:func:`qsdlearn._container.read_container`).

        Every layer's header entry is checked, and the declared sizes against
        ``max_elements``, before any stream is decoded."""
        cls.check_kind(meta)
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
                headers[name] = (f"{i}", None)
            elif entry.get("kind") == "compressed":
                headers[name] = (f"{i}", _layer_header(entry, name))
            else:
                raise ValueError(f"damaged file: layer {name!r} has an unknown kind")
        declared = sum(header[0].declared_elements for _, header in headers.values() if header)
        check_declared_elements(declared, max_elements, "compressed layers")
        layers = {}
        used = set()
        for name, (key, header) in headers.items():
            if header is None:
                dtype_name, shape, chunk = tensors[key]
                dtype = _KEPT_DTYPE_NAMES[dtype_name]
                array = np.frombuffer(chunk, dtype=np.dtype(dtype).newbyteorder("<"))
                layers[name] = KeptTensor(array.astype(dtype).reshape(shape))
                used.add(key)
            else:
                settings, shape, dtype, quality = header
                matrix = matrix_from_tensors(settings, tensors, prefix=f"{key}.")
                layers[name] = CompressedLayer(matrix, shape, dtype, LayerSetting(
                    settings.n_features, settings.constraints), quality)
                used.update(f"{key}.{stream}" for stream in STREAMS)
        if used != set(tensors):
            raise ValueError("damaged file: tensors that no layer uses")
        return cls(layers)

    def __repr__(self):
        return (
            f"CompressedModel({len(self.layers)} tensors, {self.n_weights} weights, "
            f"{self.bits_per_weight:.3f} bits/weight)"
        )


def _layer_header(entry, name):
    """The checked header entry of a compressed layer: its matrix settings, shape, dtype name
    and SQNR."""
    try:
        settings = MatrixSettings.from_dict(entry["matrix"])
        shape = tuple(entry["shape"])
        dtype = np.dtype(entry["dtype"])
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
        or dtype.kind != "f"
    ):
        raise ValueError(f"damaged file: layer {name!r} has an invalid shape or dtype")
    if settings.n_rows != rows_of(shape, settings.n_features):
        raise ValueError(f"damaged file: layer {name!r} shape does not match its codes")
    return settings, shape, dtype.name, quality


# -- reading weights -----------------------------------------------------------------------------


def read_weights(source):
    """Name to array from a mapping or a ``.npz`` / ``.safetensors`` file (never pickle)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ValueError(f"no such file: {path}")
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        if path.endswith(".safetensors"):
            try:
                from safetensors.numpy import load_file
            except ImportError as exc:  # pragma: no cover - optional dependency
                raise ImportError("reading .safetensors needs: pip install safetensors") from exc
            return dict(load_file(path))
        raise ValueError(f"cannot read {path}: expected a .npz or .safetensors file")
    if not hasattr(source, "items"):
        raise TypeError(f"weights must be a mapping name -> array or a path, got {type(source)}")
    weights = {}
    for name, value in source.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        array = np.asarray(value)
        if array.dtype.name not in _KEPT_DTYPES:
            raise TypeError(f"tensor {name!r} has unsupported dtype {array.dtype}")
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise ValueError(f"tensor {name!r} holds NaN or infinity")
        weights[name] = array
    return weights


# -- fitting -------------------------------------------------------------------------------------


def _layer_seed(base, name):
    return (base + zlib.crc32(name.encode())) % 2**32


def sample_rows(X, max_rows, seed, keep_order=True):
    """At most ``max_rows`` rows of ``X`` (all when ``None``), drawn uniformly without
    replacement with ``seed``; kept in their order unless ``keep_order=False`` (then in the
    order drawn)."""
    if max_rows is None or X.shape[0] <= max_rows:
        return X
    rows = np.random.default_rng(seed).choice(X.shape[0], max_rows, replace=False)
    return X[np.sort(rows) if keep_order else rows]


def _fit_quietly(estimator, X):
    """Fit without the :class:`~sklearn.exceptions.ConvergenceWarning`, which the layer's
    record reports instead (``converged_``); other warnings reach the caller.

    Python's warning filters are process-wide: under joblib's threading backend a filter set
    by one layer may not cover another's fit, so the warning can still show there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        return estimator.fit(X)


def _fit_layer(weight, setting, seed, n_threads, max_iter, max_fit_rows):
    """Fit one layer's codebook (on at most ``max_fit_rows`` rows drawn at random) and encode
    all its rows. Runs in a joblib worker: numba and BLAS threads are capped there so that
    workers x threads stay within the cores (joblib's Dask backend does not do it)."""
    X = to_rows(weight.astype(np.float32), setting.vector_size)
    est = setting.estimator(random_state=seed, n_threads=n_threads, max_iter=max_iter)
    sample = sample_rows(X, max_fit_rows, seed)
    with threadpool_limits(limits=n_threads):
        _fit_quietly(est, sample)
        matrix = est.encode(X)
    decoded = from_rows(matrix.decode(), weight.shape)
    return CompressedLayer(matrix, weight.shape, weight.dtype.name, setting, sqnr(weight, decoded),
                           n_iter=est.n_iter_, converged=est.converged_)


def _estimate(weight, setting, seed, n_threads):
    """Bytes of the layer's streams (exact) and its squared error (from a row sample)."""
    X = to_rows(weight.astype(np.float32), setting.vector_size)
    sample = sample_rows(X, ESTIMATE_ROWS, seed, keep_order=False)
    if setting.constraints.n_components > sample.shape[0]:
        return None
    est = setting.estimator(random_state=seed, n_threads=n_threads, max_iter=ESTIMATE_MAX_ITER)
    with threadpool_limits(limits=n_threads):
        _fit_quietly(est, sample)
    error = est.reconstruction_err_**2 * X.shape[0] / sample.shape[0]
    return setting.stream_bytes(weight.shape), error


def _progress(iterable, total, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - optional dependency
        return iterable
    return tqdm(iterable, total=total, desc="layers", unit="layer")


@validate_params(
    {
        "weights": [Mapping, str, os.PathLike],
        "bits_per_weight": [Interval(Real, 0, None, closed="neither"), None],
        "settings": [LayerSetting, dict, None],
        "vector_size": [Interval(Integral, 1, None, closed="left")],
        "candidates": [list, None],
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
    n_jobs=None,
    random_state=None,
    max_iter=50,
    max_fit_rows=None,
    verbose=None,
):
    """Compress every tensor of a model, layer by layer.

    Parameters
    ----------
    weights : mapping of str to array-like, or str / path-like
        Name to tensor (e.g. ``{k: v.numpy() for k, v in model.state_dict().items()}``), or
        a ``.npz`` / ``.safetensors`` file.
    bits_per_weight : float, optional
        Target for the whole file in bits per weight (header and kept tensors included).
        Each compressible tensor gets the candidate setting that minimises the total squared
        weight error under that budget (greedy marginal returns on estimates from a row
        sample).
    settings : LayerSetting or mapping of str to LayerSetting, optional
        Fixed settings, for all compressible tensors or per name (others then follow
        ``bits_per_weight`` when given, else the default :class:`LayerSetting`).
    vector_size : int, default=8
        Sub-vector length of the default candidates.
    candidates : list of LayerSetting, optional
        Candidate settings for the rate target (default :func:`default_candidates`).
    n_jobs : int, optional
        Layers run through ``joblib.Parallel(n_jobs)``; under
        ``joblib.parallel_config(backend="dask")`` on a Dask cluster. Results do not depend on
        it.
    random_state : int, RandomState instance or None, default=None
        Seed; each layer's seed is derived from it and the layer name.
    max_iter : int, default=50
        Iterations of each final fit.
    max_fit_rows : int, optional
        Fit each codebook on at most this many sub-vectors drawn at random (then encode all
        of them), as vector quantizers are usually trained; ``None`` fits on all.
    verbose : bool, optional
        Progress bar over layers (tqdm, when installed); default: when run in a terminal.

    Returns
    -------
    CompressedModel
        Its ``report()`` holds every layer's setting, bits, SQNR (dB) and whether its final
        fit converged.

    Raises
    ------
    ValueError
        If there are no tensors, a tensor holds NaN or infinity, ``settings`` names a tensor
        that is not compressible, or ``bits_per_weight`` is below what the candidates reach.
    TypeError
        If a tensor name is not a string or a dtype is not supported.

    See Also
    --------
    CompressedModel : What is returned.
    QuantizedSparseDecomposition : The factorization of every layer.

    Examples
    --------
    >>> import numpy as np
    >>> import qsdlearn
    >>> rng = np.random.default_rng(0)
    >>> weights = {"fc1.weight": rng.standard_normal((256, 64)).astype(np.float32),
    ...            "fc1.bias": np.zeros(256, dtype=np.float32)}
    >>> model = qsdlearn.compress_weights(weights, bits_per_weight=3.0, random_state=0)
    >>> bool(model.bits_per_weight <= 3.0)
    True
    >>> model.decompress()["fc1.weight"].shape
    (256, 64)
    """
    tensors = read_weights(weights)
    if not tensors:
        raise ValueError("no tensors to compress")
    if verbose is None:
        verbose = sys.stderr.isatty()
    base = check_random_state(random_state).randint(2**31)
    n_workers = joblib.effective_n_jobs(n_jobs)
    n_threads = max(1, (os.cpu_count() or 1) // max(n_workers, 1))

    compressible = [name for name, array in tensors.items() if _is_compressible(array)]
    fixed = {}
    if isinstance(settings, LayerSetting):
        fixed = {name: settings for name in compressible}
    elif settings is not None:
        unknown = set(settings) - set(compressible)
        if unknown:
            raise ValueError(f"settings name tensors that are not compressible: {sorted(unknown)}")
        fixed = dict(settings)
    free = [name for name in compressible if name not in fixed]
    if free and bits_per_weight is not None:
        fixed.update(
            _plan(tensors, compressible, free, fixed, bits_per_weight,
                  candidates or default_candidates(vector_size), base, n_jobs, n_threads)
        )
    else:
        fixed.update({name: LayerSetting(vector_size=vector_size) for name in free})

    parallel = joblib.Parallel(n_jobs=n_jobs, return_as="generator")
    jobs = (
        joblib.delayed(_fit_layer)(
            tensors[name], fixed[name], _layer_seed(base, name), n_threads, max_iter,
            max_fit_rows,
        )
        for name in compressible
    )
    fitted = dict(zip(compressible, _progress(parallel(jobs), len(compressible), verbose)))
    return CompressedModel(
        {name: fitted.get(name) or KeptTensor(tensors[name]) for name in tensors}
    )


def _plan(tensors, compressible, free, fixed, bits_per_weight, candidates, base, n_jobs,
          n_threads):
    n_weights = sum(array.size for array in tensors.values())
    budget = int(bits_per_weight * n_weights // 8)
    # Feasibility needs no fitting: the sizes are known from the settings alone.
    smallest = {
        name: min(candidates, key=lambda c: c.stream_bytes(tensors[name].shape)) for name in free
    }
    least_bytes = _file_bytes(tensors, compressible, {**fixed, **smallest})
    if least_bytes > budget:
        raise ValueError(
            f"bits_per_weight={bits_per_weight} is below what the candidates can reach "
            f"({8 * least_bytes / n_weights:.3f} bits/weight at the least); raise it or add "
            "cheaper candidates"
        )
    pairs = [(name, c) for name in free for c in candidates]
    results = joblib.Parallel(n_jobs=n_jobs)(
        joblib.delayed(_estimate)(tensors[name], c, _layer_seed(base, name), n_threads)
        for name, c in pairs
    )
    estimates = {name: [] for name in free}
    for (name, candidate), result in zip(pairs, results):
        if result is not None:
            estimates[name].append((result[0], result[1], candidate))
    if any(not options for options in estimates.values()):
        empty = sorted(name for name, options in estimates.items() if not options)
        raise ValueError(f"no candidate setting fits the tensors {empty}")
    smallest = {name: min(options, key=lambda o: o[0])[2] for name, options in estimates.items()}
    # Everything but the free layers' streams (header, kept tensors, fixed layers), with a
    # margin for the digits of offsets that grow with the chosen sizes; checked exactly below.
    overhead = _file_bytes(tensors, compressible, {**fixed, **smallest})
    overhead -= sum(smallest[name].stream_bytes(tensors[name].shape) for name in free)
    overhead += 32 * len(tensors)
    for _ in range(5):
        plan = allocate(estimates, budget - overhead)
        if plan is None:
            least = 8 * _file_bytes(tensors, compressible, {**fixed, **smallest}) / n_weights
            raise ValueError(
                f"bits_per_weight={bits_per_weight} is below what the candidates can reach "
                f"({least:.3f} bits/weight at the least); raise it or add cheaper candidates"
            )
        excess = _file_bytes(tensors, compressible, {**fixed, **plan}) - budget
        if excess <= 0:
            return plan
        overhead += excess
    raise ValueError(f"could not meet bits_per_weight={bits_per_weight}")  # pragma: no cover


#: A stand-in SQNR with the longest JSON form a float can take, for sizing headers.
_WIDEST_FLOAT = -1.2345678901234567e-100


def _file_bytes(tensors, compressible, plan):
    """Exact size of the file of a plan (SQNRs at their widest), without fitting anything."""
    layers = {}
    for name, array in tensors.items():
        if name in compressible:
            settings = plan[name].matrix_settings(array.shape)
            streams = {k: bytes(v) for k, v in settings.stream_sizes().items()}
            layers[name] = CompressedLayer(
                CompressedMatrix(settings, streams), array.shape, array.dtype.name, plan[name],
                _WIDEST_FLOAT,
            )
        else:
            layers[name] = KeptTensor(array)
    return CompressedModel(layers).nbytes
