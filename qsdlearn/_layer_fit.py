"""Fitting one layer: the rows (or the sample of them) to fit with their metric, the fit, the
encoding of every row (with error feedback under a Gram matrix) and the compressed layer."""

import warnings
import zlib
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

from ._calibration import LayerCalibration, check_entry
from ._compressed_layers import CompressedLayer, RowSplit, SplitLayer
from ._jit import blas_single_thread
from ._kernels import INDEX_DTYPE
from ._layers import output_row_scales, rows_of, to_rows
from ._sampling import importance_sample, uniform_rows, uniform_sample
from ._solver import Codes
from .codec import encode_factors
from .metrics import sqnr


def _layer_seed(base, name):
    return (base + zlib.crc32(name.encode())) % 2**32


def sample_rows(X, max_rows, seed, keep_order=True):
    """At most ``max_rows`` rows of ``X`` (all when ``None``), drawn uniformly without
    replacement with ``seed``; kept in their order unless ``keep_order=False`` (then in the
    order drawn)."""
    if max_rows is None or X.shape[0] <= max_rows:
        return X
    return X[uniform_rows(X.shape[0], max_rows, seed, keep_order)]


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
    sample, the fit is weighted. Rows whose row weights are all zero are fitted as without
    calibration. Without calibration the sample is drawn uniformly, except the sub-vectors of
    outlying energy, taken for certain and weighted for themselves alone
    (:func:`~qsdlearn._sampling.uniform_sample`). Rows are kept in their order unless
    ``keep_order=False``."""
    if calibration is not None and calibration.row_weights is not None and not np.any(
            calibration.row_weights > 0):
        # rows no calibration row uses (a split's block of unseen tokens): their error counts
        # for nothing, and they are still encoded, so they are fitted as plain rows
        calibration = None
    if calibration is None:
        if max_rows is None or X.shape[0] <= max_rows:
            return _FitSample(X, None, None, 1.0, None)
        taken, weights, factor = uniform_sample(X, max_rows, seed, keep_order)
        return _FitSample(X[taken], None, weights, factor, taken)
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
        rows = uniform_rows(n_out, size, seed, keep_order)
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


#: Rows a final fit takes per codeword at least, beyond ``max_fit_rows`` where the layer has
#: them: 2,048 codewords at d = 4 fitted on 65,536 of a 1024 x 1024 Gaussian matrix's 262,144
#: sub-vectors (32 a codeword) give 14.44 dB, on all of them 14.72.
FIT_ROWS_PER_CODEWORD = 64


def _fit_rows(setting, max_fit_rows):
    """Rows the final fit of ``setting`` takes at most (None: all): ``max_fit_rows``, or
    :data:`FIT_ROWS_PER_CODEWORD` per codeword where that is more."""
    if max_fit_rows is None:
        return None
    return max(max_fit_rows, FIT_ROWS_PER_CODEWORD * setting.constraints.n_components)


def _compress_tensor(weight, setting, seed, n_threads, max_iter, max_fit_rows,
                     calibration=None):
    """One tensor (or block of rows) under one setting: a :class:`CompressedLayer`. With a
    Gram matrix as ``calibration`` the codebook is fitted in the metric of the error feedback
    and the codes are chosen with it (:func:`_encode_with_feedback`); with row weights, or
    row scales (:func:`_scaled_rows`), the fit is weighted."""
    rows, fit_calibration, scales = _scaled_rows(weight, setting, calibration)
    X = to_rows(rows.astype(np.float32, copy=False), setting.vector_size)
    est = setting.estimator(random_state=seed, n_threads=n_threads, max_iter=max_iter)
    sample = _fit_inputs(X, fit_calibration, _fit_rows(setting, max_fit_rows), seed)
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
    decoded = layer.decompress()  # as stored: the SQNRs are those of what users get back
    layer.sqnr_db = sqnr(weight, decoded)
    layer.output_sqnr_db = _output_sqnr(weight, decoded, calibration)
    return layer
