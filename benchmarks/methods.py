"""The compression methods compared by the rate–distortion benchmark, with exact bit counts.

Every method takes an ``(out, in)`` weight matrix and returns its reconstruction and the number
of bits needed to store it, counted with the same rules for all of them:

- a float value costs 32 bits (the data are float32), a float16 value 16 bits;
- an index into ``m`` choices costs ``ceil(log2 m)`` bits (fixed width, no entropy coding);
  the positions of ``s`` nonzeros among ``k`` cost :func:`qsdlearn._bits.support_bits` (as in
  qsdlearn's own codec);
- everything a decoder needs besides the method itself is counted: codebooks, scales, means
  and per-row counts; nothing is shared between matrices.

Methods that work on short sub-vectors cut the matrix into rows of ``vector_size`` elements with
:func:`qsdlearn.weights.to_rows` (the adapter's reshape rule). Learned codebooks are fitted on
at most ``budget.fit_rows`` rows (:meth:`FitBudget.sample`: the sample ``compress_weights``
draws, outlying rows included for certain) and then every row is encoded, the same for all
methods.
"""

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from qsdlearn import Constraints, LayerSetting, compress_weights
from qsdlearn._bits import ceil_log2, support_bits
from qsdlearn._levels import fit_level_scales, quantize
from qsdlearn._layer_fit import _fit_inputs
from qsdlearn.weights import MIN_COMPRESSED_SIZE, from_rows, to_rows

FLOAT_BITS = 32
#: Rows MiniBatchDictionaryLearning learns from at most (and a quarter of the others' rows): its
#: LARS coding step runs in Python row by row (about 2 ms a row here).
DICTIONARY_FIT_ROWS = 4096


class NotApplicable(Exception):
    """The method cannot run on this matrix (e.g. more codewords than rows)."""


@dataclass(frozen=True)
class FitBudget:
    """Effort given to every learned method.

    Attributes
    ----------
    fit_rows : int or None
        Codebooks are learned on at most this many rows (None: every row), drawn by
        :meth:`sample`.
    max_iter : int
        Iterations of the iterative fits (QSD, k-means, sparse PCA, dictionary-learning epochs).
    seed : int
    """

    fit_rows: int | None = 16384
    max_iter: int = 25
    seed: int = 0

    def sample(self, rows):
        """The rows a learned method fits, and their weights.

        At most ``fit_rows`` of ``rows``, drawn as ``compress_weights`` draws its
        ``max_fit_rows`` (``qsdlearn._layer_fit._fit_inputs`` without calibration, that is
        :func:`qsdlearn._sampling.uniform_sample`): uniformly with this budget's seed, except
        the few rows holding much of the energy, taken for certain and weighted for themselves
        alone. A uniform draw alone misses them, and a codebook fitted
        without them decodes them as noise (on MiniLM's layer-0 attention output, k-means d = 2,
        k = 64 fitted on 16,384 uniformly drawn rows gives 10.6 dB, on every row 14.5 dB).

        Returns
        -------
        sample : ndarray of shape (m, d)
        weights : ndarray of shape (m,), or None
            The sample weights to fit with (None: unit weights). Methods that take no sample
            weights fit ``sample`` unweighted.
        """
        sample = _fit_inputs(rows, None, self.fit_rows, self.seed)
        return sample.rows, sample.weights


@dataclass(frozen=True)
class Method:
    """One point of a method family's grid.

    ``run(weight, budget)`` returns ``(reconstruction, bits)``.
    """

    family: str
    setting: str
    run: Callable


def _rows_or_skip(weight, vector_size, n_codewords, budget=None):
    """``weight`` cut into rows of ``vector_size``; :class:`NotApplicable` where they, or the
    rows ``budget`` fits (when given), are fewer than ``n_codewords``."""
    rows = to_rows(weight, vector_size)
    fitted = rows.shape[0] if budget is None or budget.fit_rows is None else min(
        rows.shape[0], budget.fit_rows)
    if fitted < n_codewords:
        raise NotApplicable(f"{fitted} rows fitted < {n_codewords} codewords")
    return rows


# -- QSD -----------------------------------------------------------------------------------------


def qsd(vector_size, n_components, n_nonzero, code_bits, codebook_bits, row_scales=False):
    """QuantizedSparseDecomposition on rows of ``vector_size``; bits = the codec's exact count.

    With ``row_scales``, the matrix's row-scaled setting as :func:`qsdlearn.compress_weights`
    fits it (``LayerSetting(row_scales=True)``: every output row divided by its 8-bit scale,
    the fit weighted by the squared scales); the 8 bits of each row's scale are counted."""

    def run(weight, budget):
        rows = _rows_or_skip(weight, vector_size, n_components, budget)
        if row_scales:
            return _row_scaled_qsd(weight, setting, budget)
        est = setting.estimator(max_iter=budget.max_iter, random_state=budget.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: max_iter is the budget
            sample, weights = budget.sample(rows)
            est.fit(sample, sample_weight=weights)
        compressed = est.encode(rows)
        return from_rows(compressed.decode(), weight.shape), compressed.bits

    setting = LayerSetting(vector_size, Constraints(n_components, n_nonzero=n_nonzero,
                                                    code_bits=code_bits,
                                                    codebook_bits=codebook_bits),
                           row_scales=row_scales)
    values = "one-hot" if code_bits == 0 else (
        "float" if code_bits is None else f"{code_bits}-bit")
    slots = "dense" if n_nonzero is None else f"{n_nonzero} of {n_components}"
    codebook = "float" if codebook_bits is None else f"{codebook_bits}-bit"
    return Method("QSD", f"d={vector_size} k={n_components} {slots} {values} codes, "
                  f"{codebook} codebook" + (", row scales" if row_scales else ""), run)


def _row_scaled_qsd(weight, setting, budget):
    """A row-scaled ``setting`` through :func:`qsdlearn.compress_weights` (its fit on at most
    ``budget.fit_rows`` sub-vectors, ``budget.max_iter`` iterations); the reconstruction and
    the payload bits plus the row scales' bits (8 a row)."""
    if weight.size < MIN_COMPRESSED_SIZE:
        raise NotApplicable(f"{weight.size} weights: compress_weights keeps tensors of fewer "
                            f"than {MIN_COMPRESSED_SIZE}")
    model = compress_weights({"weight": weight}, settings={"weight": setting},
                             max_iter=budget.max_iter, max_fit_rows=budget.fit_rows,
                             random_state=budget.seed, n_jobs=1)
    layer = model.layers["weight"]
    bits = layer.record()["payload_bits"]  # the matrix's and the row scales'
    return layer.decompressed_float().astype(weight.dtype), bits


# -- truncated SVD with quantized factors --------------------------------------------------------

_svd_memo = {}


def _thin_svd(weight):
    """SVD of the last matrix asked for (the grid asks for the same matrix many times)."""
    if _svd_memo.get("weight") is not weight:
        U, S, Vt = np.linalg.svd(np.asarray(weight, dtype=np.float64), full_matrices=False)
        _svd_memo.update(weight=weight, factors=(U, S, Vt))
    return _svd_memo["factors"]


def _quantize_columns(values, nbits):
    """Uniform ``nbits`` quantization with one MSE-optimal scale per column.

    The clipping is searched on a grid of 50 steps from 2 % to 100 % of the full-range step,
    then refined per column on 17 steps within +-2 % of the best one (the squared error is not
    unimodal in the step, so a coarse grid alone can land in the wrong dip).
    """
    values = np.asarray(values, dtype=np.float64)
    full_step = np.max(np.abs(values), axis=0) / (2 ** (nbits - 1) - 0.5)
    coarse = fit_level_scales(values, nbits, fractions=np.linspace(0.02, 1.0, 50))
    fraction = np.where(full_step > 0, coarse / np.where(full_step > 0, full_step, 1), 1.0)
    fine = [fraction * (1 + u) for u in np.linspace(-0.02, 0.02, 17)]
    scales = np.where(full_step > 0, fit_level_scales(values, nbits, fractions=fine), 0.0)
    return quantize(values, scales[None, :], nbits)  # a zero scale keeps a zero column zero


def svd(rate, factor_bits):
    """Rank-r SVD whose rank gives about ``rate`` bits per element with ``factor_bits`` factors.

    16-bit factors are float16; 8-bit factors are uniform with one 32-bit scale per factor column
    (per component). The singular values are split evenly between the two factors.
    """

    def run(weight, budget):
        n, d = weight.shape
        rank = int(round(rate * n * d / ((n + d) * factor_bits)))
        if not 1 <= rank <= min(n, d):
            raise NotApplicable(f"rank {rank} out of range")
        U, S, Vt = _thin_svd(weight)
        root = np.sqrt(S[:rank])
        left, right = U[:, :rank] * root, Vt[:rank].T * root
        if factor_bits == 16:
            left, right = left.astype(np.float16), right.astype(np.float16)
            bits = rank * (n + d) * 16
        else:
            left = _quantize_columns(left, factor_bits)
            right = _quantize_columns(right, factor_bits)
            bits = rank * (n + d) * factor_bits + 2 * rank * FLOAT_BITS
        reconstruction = left.astype(np.float64) @ right.astype(np.float64).T
        return reconstruction.astype(weight.dtype), bits

    return Method(f"SVD {factor_bits}-bit factors", f"about {rate:g} bits/element", run)


# -- scalar round-to-nearest ---------------------------------------------------------------------


def scalar(nbits):
    """Per-row uniform ``nbits`` quantizer (qsdlearn's mid-rise grid) with MSE-optimal clipping
    searched as in :func:`_quantize_columns`; one 32-bit scale per row."""

    def run(weight, budget):
        n, d = weight.shape
        reconstruction = _quantize_columns(weight.T, nbits).T
        return reconstruction.astype(weight.dtype), n * d * nbits + n * FLOAT_BITS

    return Method("scalar RTN (per-row clip)", f"{nbits} bits", run)


# -- k-means vector quantization -----------------------------------------------------------------


def kmeans_bits(n_rows, vector_size, n_clusters):
    """Bits of k-means on ``n_rows`` rows of ``vector_size``: a ``ceil(log2 n_clusters)``-bit
    index per row and ``n_clusters`` float32 codewords."""
    return n_rows * ceil_log2(n_clusters) + n_clusters * vector_size * FLOAT_BITS


def kmeans(vector_size, n_clusters):
    """scikit-learn KMeans on rows of ``vector_size``; float32 codebook, fixed-width indices.

    With ``vector_size=1`` this is a non-uniform scalar quantizer of the whole matrix (Lloyd–Max
    on its values): ``n_clusters`` float32 levels and a ``ceil(log2 n_clusters)``-bit index per
    element.
    """

    def run(weight, budget):
        from sklearn.cluster import KMeans

        rows = _rows_or_skip(weight, vector_size, n_clusters, budget)
        model = KMeans(n_clusters, n_init=1, max_iter=budget.max_iter, random_state=budget.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sample, weights = budget.sample(rows)
            model.fit(sample, sample_weight=weights)
        codebook = model.cluster_centers_.astype(weight.dtype)
        reconstruction = codebook[model.predict(rows)]
        bits = kmeans_bits(rows.shape[0], vector_size, n_clusters)
        return from_rows(reconstruction, weight.shape), bits

    return Method("VQ (sklearn KMeans)", f"d={vector_size} k={n_clusters}", run)


# -- scikit-learn sparse coding and sparse PCA ---------------------------------------------------


def dictionary_omp(vector_size, n_components, n_nonzero):
    """MiniBatchDictionaryLearning, then OMP codes with ``n_nonzero`` float32 values per row.

    Learns from at most :data:`DICTIONARY_FIT_ROWS` rows and a quarter of the budget's (of
    the matrix's rows where the budget fits every row), in ``max_iter // 10`` epochs (at
    least 1).
    """

    def run(weight, budget):
        from sklearn.decomposition import MiniBatchDictionaryLearning

        rows = _rows_or_skip(weight, vector_size, n_components)
        model = MiniBatchDictionaryLearning(
            n_components, transform_algorithm="omp", transform_n_nonzero_coefs=n_nonzero,
            batch_size=256, max_iter=max(1, budget.max_iter // 10), random_state=budget.seed,
        )
        fit_rows = min(len(rows) if budget.fit_rows is None else budget.fit_rows // 4,
                       DICTIONARY_FIT_ROWS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(FitBudget(fit_rows, budget.max_iter, budget.seed).sample(rows)[0])
            codes = model.transform(rows)
        reconstruction = codes @ model.components_
        bits = (rows.shape[0] * (support_bits(n_components, n_nonzero) + n_nonzero * FLOAT_BITS)
                + n_components * vector_size * FLOAT_BITS)
        return from_rows(reconstruction.astype(weight.dtype), weight.shape), bits

    return Method("sparse coding (sklearn DL + OMP)",
                  f"d={vector_size} k={n_components} {n_nonzero} nonzeros", run)


def sparse_pca(n_components, alpha):
    """SparsePCA on the whole matrix; its sparse components with least-squares float32 codes.

    Each component stores its nonzero count, their positions and float32 values.
    """

    def run(weight, budget):
        from sklearn.decomposition import SparsePCA

        n, d = weight.shape
        model = SparsePCA(n_components, alpha=alpha, max_iter=budget.max_iter,
                          random_state=budget.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(budget.sample(weight)[0])
        components = model.components_
        codes = np.linalg.lstsq(components.T, (weight - model.mean_).T.astype(np.float64),
                                rcond=None)[0].T.astype(np.float32)
        reconstruction = codes @ components + model.mean_
        nonzeros = (components != 0).sum(axis=1)
        bits = (n * n_components * FLOAT_BITS + d * FLOAT_BITS  # codes and the mean
                + sum(ceil_log2(d + 1) + support_bits(d, int(t)) + int(t) * FLOAT_BITS
                      for t in nonzeros))
        return reconstruction.astype(weight.dtype), bits

    return Method("sparse PCA (sklearn)", f"{n_components} components, alpha={alpha:g}", run)


# -- faiss additive quantizers (optional) --------------------------------------------------------


def faiss_available():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


#: Beam size of faiss's ResidualQuantizer, in training and encoding (faiss's default is 5).
RQ_BEAM_SIZE = 8


def faiss_quantizer(kind, vector_size, n_books, nbits):
    """faiss ``ProductQuantizer``, ``ResidualQuantizer`` or ``LocalSearchQuantizer``.

    ``n_books`` codebooks of ``2**nbits`` words. Codes cost ``n_books * nbits`` bits per row; PQ
    stores ``n_books`` sub-codebooks of ``vector_size / n_books`` float32 values per word, RQ
    and LSQ (additive quantizers) ``n_books`` full-width codebooks. RQ searches with a beam of
    :data:`RQ_BEAM_SIZE`. The additive quantizers decode without a stored norm, so none is
    counted.
    """

    def run(weight, budget):
        import faiss

        rows = np.ascontiguousarray(_rows_or_skip(weight, vector_size, 2**nbits, budget),
                                    np.float32)
        if kind == "PQ":
            quantizer = faiss.ProductQuantizer(vector_size, n_books, nbits)
            quantizer.cp.min_points_per_centroid = 1  # fewer rows than faiss likes: no warning
            codebook_values = 2**nbits * vector_size
        elif kind == "RQ":
            quantizer = faiss.ResidualQuantizer(vector_size, n_books, nbits)
            quantizer.max_beam_size = RQ_BEAM_SIZE
            quantizer.cp.min_points_per_centroid = 1
            codebook_values = n_books * 2**nbits * vector_size
        elif kind == "LSQ":
            quantizer = faiss.LocalSearchQuantizer(vector_size, n_books, nbits)
            quantizer.train_iters = budget.max_iter
            quantizer.random_seed = budget.seed
            codebook_values = n_books * 2**nbits * vector_size
        else:
            raise ValueError(f"unknown faiss quantizer {kind!r}")
        quantizer.train(np.ascontiguousarray(budget.sample(rows)[0]))
        reconstruction = quantizer.decode(quantizer.compute_codes(rows))
        bits = rows.shape[0] * n_books * nbits + codebook_values * FLOAT_BITS
        return from_rows(reconstruction.astype(weight.dtype), weight.shape), bits

    beam = f", beam {RQ_BEAM_SIZE}" if kind == "RQ" else ""
    return Method(f"faiss {kind}", f"d={vector_size} {n_books} x {nbits} bits{beam}", run)


# -- the grids -----------------------------------------------------------------------------------

#: k-means baselines, (vector size, codewords), of the "full", "model" and "quick" grids: vector
#: size 1 is a per-matrix Lloyd–Max scalar quantizer. The "model" grid has every power of two
#: from 16 to 256 codewords at d = 2, 4 and 8 (one bit per sub-vector apart), as many as
#: ``compress_weights``' default candidates, so that the adapter is not compared with a sparser
#: k-means grid than its own; and 512 to 2048 codewords at d = 4, which a user fitting every
#: row of a 384 x 1536 matrix would try near 3 bits per element (on MiniLM's layer-0 output,
#: d = 4 with 2048 codewords fitted on every sub-vector gives 14.84 dB at 3.19 bits with
#: float32 codewords). ``adapter_frontier.py`` fits them on every row; the rate–distortion
#: benchmark's 4,096 rows per MiniLM matrix (2 per codeword) leave them 1.2 dB weaker there.
KMEANS_GRID = ([(1, k) for k in (2, 4, 8, 16, 32, 64)]
               + [(d, k) for d in (2, 4, 8) for k in (16, 64, 256, 1024)]
               + [(16, 64), (16, 256), (16, 1024)])
KMEANS_GRID_MODEL = ([(1, k) for k in (2, 4, 8, 16, 32)]
                     + [(d, k) for d in (2, 4, 8) for k in (16, 32, 64, 128, 256)]
                     + [(4, 512), (4, 1024), (4, 2048), (16, 64), (16, 256)])
KMEANS_GRID_QUICK = [(1, 4), (1, 16), (8, 256), (4, 256), (2, 256), (16, 256)]

#: Bits per entry of a QSD codebook where it is quantized.
QSD_CODEBOOK_BITS = 8


def qsd_vq_setting(vector_size, n_clusters):
    """QSD's vector-quantization special case (one-hot codes) matching k-means' ``(d, k)``.

    Its codebook is quantized to :data:`QSD_CODEBOOK_BITS` bits with a 32-bit scale per
    codeword where that costs less than k-means' float32 codewords (``8 d + 32 < 32 d``: every
    ``d >= 2``), else it is float like k-means'. At ``d = 1`` an 8-bit codeword would cost 40
    bits against 32 for the same scalar (one level times its own scale), so the float codebook
    is the cheaper setting there, at exactly k-means' bit count. Either way the codes are the
    same fixed-width index, so QSD's setting never costs more bits than k-means'.
    """
    quantized_cost = vector_size * QSD_CODEBOOK_BITS + FLOAT_BITS
    codebook_bits = QSD_CODEBOOK_BITS if quantized_cost < vector_size * FLOAT_BITS else None
    return (vector_size, n_clusters, 1, 0, codebook_bits)


def _unique(settings):
    """``settings`` without repeats, in first-seen order."""
    return list(dict.fromkeys(settings))


#: QSD proper (sparse quantized codes), (vector size, n_components, n_nonzero, code_bits,
#: codebook_bits): from about 0.5 to 4 bits/element.
QSD_SPARSE = [
    (16, 256, 1, 2, 8),
    (16, 64, 4, 1, 8),
    (8, 256, 1, 3, 8),
    (8, 64, 2, 2, 8),
    # two 1-bit values among as many codewords as 13-16 bits of support address (the
    # adapter's default candidates): 1.9-2.3 bits/element
    (8, 128, 2, 1, 8),
    (8, 181, 2, 1, 8),
    (8, 256, 2, 1, 8),
    (8, 362, 2, 1, 8),
    # the same at d = 16: 1.0-1.4 bits/element
    (16, 128, 2, 1, 8),
    (16, 181, 2, 1, 8),
    (16, 256, 2, 1, 8),
    (16, 256, 4, 2, 8),
    (8, 256, 2, 2, 8),
    (8, 256, 3, 2, 8),
    (8, 256, 2, 3, 8),
    (8, 256, 3, 3, 8),
    (8, 256, 4, 3, 8),
]
#: Codebook bits of the second variant of the 1-bit sparse settings at d = 16 (about 1 to 1.5
#: bits per element). Such a row is two (or four) codewords at half their scale, so a coarse
#: codebook's rounding weighs little against the codes' error, while a codebook of 256 x 16
#: takes 0.22 bits per element of a 384 x 384 matrix at 8 bits: on MiniLM's layer-0 query,
#: fitted on all its 9,216 sub-vectors (25 iterations), two of 256 lost 0.10 dB with 4 bits
#: and saved 0.11 bits per element. At d = 8 (2 of 256 on its 18,432 sub-vectors) 4 bits
#: lost 0.33 dB (0.42 in 100 iterations) for 0.056 bits, which does not pay; there only the
#: benchmark's fit on 4,096 sub-vectors hid the loss (0.03 dB), so d = 8 keeps 8 bits.
QSD_COARSE_CODEBOOK_BITS = 4
QSD_SPARSE += [(d, k, s, b, QSD_COARSE_CODEBOOK_BITS)
               for d, k, s, b, _ in QSD_SPARSE if d == 16 and b == 1]
#: Dense quantized codes (a quantized transform of each 8-element sub-vector), 2 to 5 code bits.
QSD_DENSE = [(8, 8, None, b, QSD_CODEBOOK_BITS) for b in (2, 3, 4, 5)]
#: Every QSD grid is its sparse settings, dense settings, and the VQ special case of each k-means
#: baseline of the same grid (:func:`qsd_vq_setting`), so that QSD's hull contains k-means'
#: settings at no more bits.
QSD_GRID = _unique(QSD_SPARSE + QSD_DENSE + [qsd_vq_setting(d, k) for d, k in KMEANS_GRID])
#: The "model" grid, for data sets of many matrices (each setting is fitted per matrix): without
#: four of the slower k=256 sparse settings. The VQ settings are one Lloyd pass per iteration.
QSD_GRID_MODEL = _unique(
    [s for s in QSD_SPARSE if s not in {
        (8, 256, 1, 3, 8), (16, 256, 4, 2, 8), (8, 256, 2, 3, 8), (8, 256, 4, 3, 8)}]
    + QSD_DENSE + [qsd_vq_setting(d, k) for d, k in KMEANS_GRID_MODEL])
QSD_GRID_QUICK = _unique([(8, 64, 2, 2, 8), (8, 256, 2, 2, 8), (8, 8, None, 4, 8)]
                         + [qsd_vq_setting(d, k) for d, k in KMEANS_GRID_QUICK])

#: Settings QSD also runs with row scales (:func:`qsd`), on the data sets of the "model" grid:
#: model weights, whose output rows differ in scale, as ``compress_weights`` offers them.
QSD_ROW_SCALED_MODEL = QSD_GRID_MODEL
QSD_ROW_SCALED_QUICK = [(8, 64, 2, 2, 8), qsd_vq_setting(1, 8)]

#: Per grid ("quick", "model", "full"): settings of every family. k-means runs at vector sizes 1
#: (a per-matrix Lloyd–Max scalar quantizer), 2, 4, 8 and 16; PQ, RQ and LSQ are (vector size,
#: codebooks, bits per codebook).
_GRIDS = {
    "quick": dict(
        qsd=QSD_GRID_QUICK, qsd_row_scaled=QSD_ROW_SCALED_QUICK,
        svd_rates=[0.5, 1, 2, 4], scalar=range(1, 6),
        kmeans=KMEANS_GRID_QUICK,
        dictionary=[(16, 256, 1)], sparse_pca=[(8, 1.0)], pq=[(8, 2, 8)],
        # The additive quantizers' training takes seconds even on small data.
        rq=[(8, 2, 6)], lsq=[(8, 2, 6)],
    ),
    "model": dict(
        qsd=QSD_GRID_MODEL, qsd_row_scaled=QSD_ROW_SCALED_MODEL,
        svd_rates=[0.25, 0.5, 1, 2, 3, 4, 6], scalar=range(1, 7),
        kmeans=KMEANS_GRID_MODEL,
        dictionary=[(16, 256, 1)], sparse_pca=[(8, 1.0)],
        pq=[(16, 2, 8), (8, 1, 8), (8, 2, 8), (8, 4, 8)],
        rq=[(8, 2, 8), (8, 3, 8)], lsq=[(8, 2, 8), (8, 3, 8)],
    ),
    "full": dict(
        qsd=QSD_GRID, svd_rates=[0.25, 0.5, 1, 2, 3, 4, 6], scalar=range(1, 9),
        kmeans=KMEANS_GRID,
        dictionary=[(32, 256, 1), (16, 256, 1)],
        sparse_pca=[(8, 1.0), (16, 1.0)],
        pq=[(16, 2, 8), (8, 1, 8), (16, 4, 8), (8, 2, 8), (8, 4, 8)],
        rq=[(16, 2, 8), (16, 4, 8), (8, 2, 8), (8, 3, 8), (8, 4, 8)],
        lsq=[(16, 2, 8), (8, 2, 8), (8, 3, 8), (8, 4, 8)],
    ),
}


def method_grid(grid="full", with_faiss=None):
    """Every method and setting of the benchmark.

    Parameters
    ----------
    grid : {"full", "model", "quick"}
        ``"model"`` has fewer settings of the slow methods (for data of many matrices),
        ``"quick"`` a few of each.
    with_faiss : bool, optional
        Include faiss's quantizers (PQ, RQ, LSQ) (default: when faiss is installed).
    """
    g = _GRIDS[grid]
    with_faiss = faiss_available() if with_faiss is None else with_faiss
    methods = [qsd(*s) for s in g["qsd"]]
    methods += [qsd(*s, row_scales=True) for s in g.get("qsd_row_scaled", ())]
    methods += [svd(rate, bits) for bits in (16, 8) for rate in g["svd_rates"]]
    methods += [scalar(b) for b in g["scalar"]]
    methods += [kmeans(d, k) for d, k in g["kmeans"]]
    methods += [dictionary_omp(*s) for s in g["dictionary"]]
    methods += [sparse_pca(*s) for s in g["sparse_pca"]]
    if with_faiss:
        methods += [faiss_quantizer("PQ", *s) for s in g["pq"]]
        methods += [faiss_quantizer("RQ", *s) for s in g["rq"]]
        methods += [faiss_quantizer("LSQ", *s) for s in g["lsq"]]
    return methods
