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
header, every stream's rounding to bytes and every kept tensor included.
"""

import json
import numbers
import os
import sys
import warnings
import zlib
from dataclasses import dataclass

import joblib
import numpy as np
from sklearn.utils import check_random_state
from threadpoolctl import threadpool_limits

from ._estimator import QuantizedSparseDecomposition
from ._solver import Setting
from .codec import (
    STREAMS,
    CompressedMatrix,
    MatrixSettings,
    json_field,
    matrix_from_tensors,
    matrix_tensors,
    read_container,
    write_container,
)
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
    """How one layer is compressed (see :class:`QuantizedSparseDecomposition`)."""

    vector_size: int = 8
    n_components: int = 256
    n_nonzero: int | None = 2
    code_bits: int | None = 2
    codebook_bits: int | None = 8

    def describe(self):
        slots = "dense" if self.n_nonzero is None else f"{self.n_nonzero} of {self.n_components}"
        return (
            f"d={self.vector_size} k={self.n_components} {slots} "
            f"codes={self.code_bits}b codebook={self.codebook_bits}b"
        )

    def estimator(self, **params):
        return QuantizedSparseDecomposition(
            n_components=self.n_components,
            n_nonzero=self.n_nonzero,
            code_bits=self.code_bits,
            codebook_bits=self.codebook_bits,
            **params,
        )


def default_candidates(vector_size=8):
    """Candidate settings spanning about 0.5 to 5 bits per weight for ``vector_size``."""
    d = vector_size
    grid = [
        (16, 1, 0), (256, 1, 0), (256, 1, 2), (64, 2, 2), (256, 2, 2), (256, 2, 3),
        (256, 3, 3), (256, 4, 3), (d, None, 2), (d, None, 3), (d, None, 4), (d, None, 5),
    ]
    return [LayerSetting(d, k, s, b, 8) for k, s, b in grid]


# -- reshape rules -------------------------------------------------------------------------------


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
    """One compressed tensor: its matrix, original shape and dtype, setting and SQNR."""

    matrix: object  # CompressedMatrix
    shape: tuple
    dtype: str
    setting: LayerSetting
    sqnr_db: float

    def decompress(self):
        rows = self.matrix.decode()
        return from_rows(rows, self.shape).astype(self.dtype)


class CompressedModel:
    """The compressed weights of a model: compressed layers and tensors kept verbatim.

    Attributes
    ----------
    layers : dict
        Name to :class:`CompressedLayer` or to the kept ``ndarray``, in the original order.
    """

    def __init__(self, layers):
        self.layers = dict(layers)
        self._image = None

    # size ---------------------------------------------------------------------------------------

    @property
    def n_weights(self):
        """Number of weights of all tensors."""
        return sum(int(np.prod(entry.shape, dtype=np.int64)) for entry in self.layers.values())

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
        """Size of the original tensors in their dtypes over the file size."""
        original = sum(
            int(np.prod(entry.shape, dtype=np.int64)) * np.dtype(entry.dtype).itemsize
            for entry in self.layers.values()
        )
        return original / self.nbytes

    # content ------------------------------------------------------------------------------------

    def decompress(self):
        """Name to array, with the original shapes and dtypes."""
        return {
            name: entry.decompress() if isinstance(entry, CompressedLayer) else entry.copy()
            for name, entry in self.layers.items()
        }

    def report(self):
        """Per-tensor records: name, shape, setting, bits, bits_per_weight, sqnr_db."""
        records = []
        for name, entry in self.layers.items():
            size = int(np.prod(entry.shape, dtype=np.int64))
            if isinstance(entry, CompressedLayer):
                bits = 8 * entry.matrix.nbytes
                setting, quality = entry.setting.describe(), entry.sqnr_db
            else:
                bits = 8 * entry.nbytes
                setting, quality = f"kept ({entry.dtype})", float("inf")
            records.append(
                dict(
                    name=name,
                    shape=tuple(entry.shape),
                    setting=setting,
                    bits=bits,
                    bits_per_weight=bits / max(size, 1),
                    sqnr_db=quality,
                )
            )
        return records

    def report_table(self):
        """The report and the totals as printable text."""
        rows = self.report()
        width = max([len(r["name"]) for r in rows] + [4])
        lines = [
            f"{'name':<{width}}  {'shape':<18} {'setting':<44} {'bits/weight':>11} {'SQNR dB':>8}"
        ]
        for r in rows:
            lines.append(
                f"{r['name']:<{width}}  {str(r['shape']):<18} {r['setting']:<44} "
                f"{r['bits_per_weight']:>11.3f} {r['sqnr_db']:>8.2f}"
            )
        lines.append(
            f"total: {self.n_weights} weights, {self.nbytes} bytes, "
            f"{self.bits_per_weight:.3f} bits/weight (header included), "
            f"ratio {self.compression_ratio:.1f}x"
        )
        return "\n".join(lines)

    # file image ---------------------------------------------------------------------------------

    def _container(self):
        tensors, entries = [], []
        for i, (name, entry) in enumerate(self.layers.items()):
            if isinstance(entry, CompressedLayer):
                tensors += matrix_tensors(entry.matrix, prefix=f"{i}.")
                entries.append(
                    dict(
                        name=name, kind="compressed", shape=list(entry.shape), dtype=entry.dtype,
                        matrix=entry.matrix.settings.__dict__, sqnr_db=entry.sqnr_db,
                    )
                )
            else:
                data = np.ascontiguousarray(entry).astype(entry.dtype.newbyteorder("<")).tobytes()
                tensors.append((f"{i}", _KEPT_DTYPES[entry.dtype.name], entry.shape, data))
                entries.append(dict(name=name, kind="kept"))
        return tensors, {"kind": "model", "layers": json.dumps(entries, separators=(",", ":"))}

    def to_bytes(self):
        """The file image (a safetensors file)."""
        if self._image is None:
            tensors, metadata = self._container()
            self._image = write_container(tensors, metadata)
        return self._image

    def save(self, path):
        """Write to ``path`` atomically (see :func:`qsdlearn.save`)."""
        from .codec import save

        save(self, path)

    @classmethod
    def from_bytes(cls, data):
        """Read and validate a file image written by :meth:`to_bytes`."""
        meta, tensors = read_container(data)
        if meta.get("kind") != "model":
            raise ValueError(f"not a compressed model: kind {meta.get('kind')!r}")
        entries = json_field(meta, "layers", list)
        layers = {}
        used = set()
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ValueError(f"damaged file: layer {i} has no name")
            name = entry["name"]
            if name in layers:
                raise ValueError(f"damaged file: layer {name!r} appears twice")
            if entry.get("kind") == "kept":
                if f"{i}" not in tensors:
                    raise ValueError(f"damaged file: tensor of layer {name!r} is missing")
                dtype_name, shape, chunk = tensors[f"{i}"]
                dtype = _KEPT_DTYPE_NAMES[dtype_name]
                layers[name] = np.frombuffer(chunk, dtype=np.dtype(dtype).newbyteorder("<")).astype(
                    dtype
                ).reshape(shape)
                used.add(f"{i}")
            elif entry.get("kind") == "compressed":
                layers[name] = _layer_from_entry(entry, tensors, i, name)
                used.update(f"{i}.{stream}" for stream in STREAMS)
            else:
                raise ValueError(f"damaged file: layer {name!r} has an unknown kind")
        if used != set(tensors):
            raise ValueError("damaged file: tensors that no layer uses")
        return cls(layers)

    def __repr__(self):
        return (
            f"CompressedModel({len(self.layers)} tensors, {self.n_weights} weights, "
            f"{self.bits_per_weight:.3f} bits/weight)"
        )


def _layer_from_entry(entry, tensors, i, name):
    try:
        settings = MatrixSettings(**entry["matrix"])
        setting = LayerSetting(
            settings.n_features, settings.n_components, settings.n_nonzero, settings.code_bits,
            settings.codebook_bits,
        )
        shape = tuple(entry["shape"])
        dtype = np.dtype(entry["dtype"])
        quality = float(entry["sqnr_db"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"damaged file: layer {name!r} has invalid settings") from None
    settings.validate()
    if (
        not all(isinstance(v, int) and v > 0 for v in shape)
        or len(shape) < 2
        or dtype.kind != "f"
        or settings.n_features != setting.vector_size
    ):
        raise ValueError(f"damaged file: layer {name!r} has an invalid shape or dtype")
    width = int(np.prod(shape[1:], dtype=object))
    rows = shape[0] * (-(-width // setting.vector_size))
    if settings.n_rows != rows:
        raise ValueError(f"damaged file: layer {name!r} shape does not match its codes")
    matrix = matrix_from_tensors(settings, tensors, prefix=f"{i}.")
    return CompressedLayer(matrix, shape, dtype.name, setting, quality)


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


def sample_rows(X, max_rows, seed):
    """At most ``max_rows`` rows of ``X`` (all when ``None``), drawn uniformly without
    replacement with ``seed`` and kept in their order."""
    if max_rows is None or X.shape[0] <= max_rows:
        return X
    rows = np.random.default_rng(seed).choice(X.shape[0], max_rows, replace=False)
    return X[np.sort(rows)]


def _fit_layer(name, weight, setting, seed, n_threads, max_iter, max_fit_rows):
    """Fit one layer's codebook (on at most ``max_fit_rows`` rows drawn at random) and encode
    all its rows. Runs in a joblib worker: numba and BLAS threads are capped there so that
    workers x threads stay within the cores (joblib's Dask backend does not do it)."""
    X = to_rows(weight.astype(np.float32), setting.vector_size)
    est = setting.estimator(random_state=seed, n_threads=n_threads, max_iter=max_iter)
    sample = sample_rows(X, max_fit_rows, seed)
    with threadpool_limits(limits=n_threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(sample)
        matrix = est.encode(X)
    decoded = from_rows(matrix.decode(), weight.shape)
    return CompressedLayer(matrix, weight.shape, weight.dtype.name, setting, sqnr(weight, decoded))


def _estimate(name, weight, setting, seed, n_threads):
    """Bytes of the layer's streams (exact) and its squared error (from a row sample)."""
    X = to_rows(weight.astype(np.float32), setting.vector_size)
    if setting.n_nonzero is not None and setting.n_nonzero > setting.n_components:
        return None
    rng = np.random.default_rng(seed)
    sample = X if X.shape[0] <= ESTIMATE_ROWS else X[rng.choice(X.shape[0], ESTIMATE_ROWS, False)]
    if setting.n_components > sample.shape[0]:
        return None
    est = setting.estimator(random_state=seed, n_threads=n_threads, max_iter=ESTIMATE_MAX_ITER)
    with threadpool_limits(limits=n_threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(sample)
    error = est.reconstruction_err_**2 * X.shape[0] / sample.shape[0]
    return _stream_bytes(weight, setting), error


def _allocate(estimates, budget_bytes):
    """Greedy marginal-return allocation over each layer's lower convex hull.

    ``estimates[name]`` is a list of (bytes, error, setting). Returns name -> setting, or
    None when even the smallest choices exceed the budget.
    """
    hulls = {}
    for name, options in estimates.items():
        options = sorted(options, key=lambda o: (o[0], o[1]))
        hull = []
        for option in options:
            if hull and option[1] >= hull[-1][1]:
                continue  # more bytes, no less error
            while len(hull) >= 2:
                (b0, e0, _), (b1, e1, _) = hull[-2], hull[-1]
                if (e0 - e1) * (option[0] - b1) <= (e1 - option[1]) * (b1 - b0):
                    hull.pop()  # hull[-1] is above the segment: not on the convex hull
                else:
                    break
            hull.append(option)
        hulls[name] = hull
    position = {name: 0 for name in hulls}
    used = sum(hull[0][0] for hull in hulls.values())
    if used > budget_bytes:
        return None
    while True:
        best, best_slope = None, 0.0
        for name, hull in hulls.items():
            i = position[name]
            if i + 1 >= len(hull):
                continue
            extra = hull[i + 1][0] - hull[i][0]
            if used + extra > budget_bytes:
                continue
            slope = (hull[i][1] - hull[i + 1][1]) / max(extra, 1)
            if slope > best_slope:
                best, best_slope = name, slope
        if best is None:
            break
        i = position[best]
        used += hulls[best][i + 1][0] - hulls[best][i][0]
        position[best] = i + 1
    return {name: hulls[name][position[name]][2] for name in hulls}


def _progress(iterable, total, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - optional dependency
        return iterable
    return tqdm(iterable, total=total, desc="layers", unit="layer")


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
        Target for the whole file (header and kept tensors included). Each compressible
        tensor gets the candidate setting that minimises the total squared weight error under
        that budget (greedy marginal returns on estimates from a row sample).
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
    random_state : int, optional
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
    """
    tensors = read_weights(weights)
    if not tensors:
        raise ValueError("no tensors to compress")
    if bits_per_weight is not None and not (
        isinstance(bits_per_weight, numbers.Real) and bits_per_weight > 0
    ):
        raise ValueError(f"bits_per_weight must be a positive number, got {bits_per_weight!r}")
    if not isinstance(vector_size, numbers.Integral) or vector_size < 1:
        raise ValueError(f"vector_size must be a positive integer, got {vector_size!r}")
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
            name, tensors[name], fixed[name], _layer_seed(base, name), n_threads, max_iter,
            max_fit_rows,
        )
        for name in compressible
    )
    fitted = dict(zip(compressible, _progress(parallel(jobs), len(compressible), verbose)))
    return CompressedModel(
        {name: fitted.get(name, tensors[name]) for name in tensors}
    )


def _plan(tensors, compressible, free, fixed, bits_per_weight, candidates, base, n_jobs,
          n_threads):
    n_weights = sum(array.size for array in tensors.values())
    budget = int(bits_per_weight * n_weights // 8)
    # Feasibility needs no fitting: the sizes are known from the settings alone.
    smallest = {name: min(candidates, key=lambda c: _stream_bytes(tensors[name], c)) for name in free}
    least_bytes = _file_bytes(tensors, compressible, {**fixed, **smallest})
    if least_bytes > budget:
        raise ValueError(
            f"bits_per_weight={bits_per_weight} is below what the candidates can reach "
            f"({8 * least_bytes / n_weights:.3f} bits/weight at the least); raise it or add "
            "cheaper candidates"
        )
    pairs = [(name, c) for name in free for c in candidates]
    results = joblib.Parallel(n_jobs=n_jobs)(
        joblib.delayed(_estimate)(name, tensors[name], c, _layer_seed(base, name), n_threads)
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
    overhead -= sum(_stream_bytes(tensors[name], smallest[name]) for name in free)
    overhead += 32 * len(tensors)
    for _ in range(5):
        plan = _allocate(estimates, budget - overhead)
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


def _matrix_settings(weight, setting):
    """Settings of the matrix :func:`to_rows` makes of ``weight`` (what :func:`_fit_layer`
    encodes), known before fitting."""
    width = int(np.prod(weight.shape[1:], dtype=np.int64))
    rows = weight.shape[0] * (-(-width // setting.vector_size))
    constraints = Setting(
        setting.n_components, setting.n_nonzero, setting.code_bits, setting.codebook_bits
    )
    return MatrixSettings.from_setting(constraints, rows, setting.vector_size, np.float32)


def _stream_bytes(weight, setting):
    return sum(_matrix_settings(weight, setting).stream_sizes().values())


#: A stand-in SQNR with the longest JSON form a float can take, for sizing headers.
_WIDEST_FLOAT = -1.2345678901234567e-100


def _file_bytes(tensors, compressible, plan):
    """Exact size of the file of a plan (SQNRs at their widest), without fitting anything."""
    layers = {}
    for name, array in tensors.items():
        if name in compressible:
            settings = _matrix_settings(array, plan[name])
            streams = {k: bytes(v) for k, v in settings.stream_sizes().items()}
            layers[name] = CompressedLayer(
                CompressedMatrix(settings, streams), array.shape, array.dtype.name, plan[name],
                _WIDEST_FLOAT,
            )
        else:
            layers[name] = array
    return CompressedModel(layers).nbytes
