"""Estimating a candidate setting's error on a layer, for the rate allocation: a short fit on
a sample of the layer's rows (its outlying rows always among them, as in the final fit),
measured on rows held out (the heaviest always among them), with the samples, rankings and
seeds a layer's candidates share."""

import numpy as np
from sklearn.utils import check_random_state

from ._jit import blas_single_thread
from ._layer_fit import (_feedback_error, _feedback_pass, _fit_inputs, _fit_quietly, _layout,
                         _read_calibration, _scaled_rows)
from ._layers import ROW_SCALE_BYTES, output_row_scales, rows_of, to_rows
from ._sampling import _RANKED_ROWS, _ranked_rows, _row_energies, outlier_rows, with_outliers
from ._solver import kmeans_plusplus_seeds, resolve_init


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
#: At 1,024 and 2,048 codewords of 4 (final fits of at least 131,072 rows), 8,192 rows gave
#: estimates 0.4 and 0.2 dB above the final fit on a 1024 x 1024 Gaussian matrix, which drew
#: the planner to 2,048 codewords at 3 bits per weight for 0.1 dB less than 2-D k-means;
#: 32,768 rows gave +0.04 and -0.09 dB there, and -0.02 and -0.19 dB on MiniLM's layer-0
#: output.dense.
ESTIMATE_ONE_HOT_ROWS = 4096
ESTIMATE_ONE_HOT_ROWS_PER_CODEWORD = 32
ESTIMATE_ONE_HOT_MAX_ROWS = 32768
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
_CODEBOOK_STREAMS = ("codebook_support", "codebook_values", "codebook_scales")


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
    """The share of a candidate's ``nbytes`` on a tensor (its
    :meth:`~qsdlearn.LayerSetting.stream_bytes`, row scales included) that its codebook
    takes."""
    return _codebook_bytes(setting, shape) / max(nbytes, 1)


#: The most rows a candidate of ``default_candidates()`` fits for its estimate (8,192: vector
#: quantization with 256 codewords; see _estimate_rows).
_MOST_FIT_ROWS = max(512 * ESTIMATE_ROWS_PER_CODEWORD, ESTIMATE_ONE_HOT_MAX_ROWS)
#: Rows of a layer drawn once for its candidates' estimates (see _held_out_split).
_ROWS_DRAWN = _MOST_FIT_ROWS + ESTIMATE_HELD_OUT_ROWS


def _held_out_split(n_rows, fit_rows, seed, shared=None):
    """Rows to fit and disjoint rows to measure an estimate on, drawn with ``seed``; None
    when the layer has too few rows to hold any out (the estimate is then measured on the
    rows fitted, as the final fit of all rows is). Both are the start of one uniform draw
    without replacement, in random order, of as many rows as every default candidate needs
    (more for a candidate that needs more): a function of ``n_rows``, ``seed`` and that
    number alone, kept in ``shared`` (a dict) for the other candidates of the layer. The draw
    takes memory in proportion to the rows drawn (NumPy's ``Generator.choice``, Floyd's
    algorithm on large layers), not to ``n_rows``: a permutation of all the sub-vectors of a
    4096 x 4096 matrix cut into single weights took 128 MiB for the 9,216 rows kept."""
    needed = fit_rows + ESTIMATE_HELD_OUT_ROWS
    if n_rows < needed:
        return None
    shared = {} if shared is None else shared
    # as many rows as the default candidate that fits the most rows needs (8,192: vector
    # quantization with 256 codewords), so that one draw serves every default candidate
    size = min(n_rows, max(needed, _ROWS_DRAWN))
    key = ("row draw", n_rows, size)
    if key not in shared:
        shared[key] = np.random.default_rng(seed).choice(n_rows, size, replace=False)
    order = shared[key]
    return order[:fit_rows], order[fit_rows:needed]


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
        rows, energy = (_ranked_rows(X, weights, n + fitted.shape[0]) if ranked is None
                        else ranked)[:2]
        energy = np.where(np.isin(rows, fitted), -1.0, energy)
    top = np.argpartition(energy, energy.shape[0] - n)[energy.shape[0] - n:]
    return np.sort(top if rows is None else rows[top])


def _held_out_error(est, X, split, weights=None, energies=None, ranked=None, outliers=None):
    """Squared error (weighted by ``weights``, all rows', when given) of ``est`` on rows it
    was not fitted on, for all of ``X``'s rows: that of the heaviest rows
    (:func:`_heaviest_rows`, given the rows' ``energies`` or ``ranked`` rows, or neither)
    and of the ``outliers`` (:func:`_outlier_rows`, fitted, as the final fit fits them),
    plus that of the other held-out rows of ``split`` scaled to the other rows of ``X``."""
    heavy = _heaviest_rows(X, split, weights, energies, ranked)
    if outliers is not None:
        heavy = np.concatenate([outliers, heavy])
    others = np.setdiff1d(split[1], heavy, assume_unique=True)
    rows = np.concatenate([heavy, others])
    measured = X[rows]
    errors = np.sum((measured.astype(np.float64) - est.encode(measured).decode()) ** 2, axis=1)
    if weights is not None:
        errors = errors * weights[rows]
    rest = X.shape[0] - heavy.shape[0]
    return float(errors[:heavy.shape[0]].sum() + errors[heavy.shape[0]:].sum() * rest
                 / max(others.shape[0], 1))


def _outlier_rows(X, weights, energies, ranked, n_fit, shared=None, setting=None):
    """The rows of ``X`` fitted for certain by an estimate that fits ``n_fit`` of them
    (:func:`~qsdlearn._sampling.outlier_rows`), found among the ``energies`` of all rows
    (:func:`~qsdlearn._sampling._row_energies`) when given, else among the ``ranked``
    heaviest rows (:func:`~qsdlearn._sampling._ranked_rows`, at least ``n_fit`` of them),
    ranked here when neither is given. Found once per sub-vector size, row scaling and
    ``n_fit`` and kept in ``shared`` (a dict, with the candidate ``setting``) for the other
    candidates of the layer."""
    key = None if shared is None else ("outliers", setting.vector_size, setting.row_scales,
                                       n_fit)
    if key is not None and key in shared:
        return shared[key]
    if energies is not None:
        found = outlier_rows(None, energies, float(energies.sum()), X.shape[0], n_fit)
    else:
        rows, energy, total = _ranked_rows(X, weights, n_fit) if ranked is None else ranked
        found = outlier_rows(rows, energy, total, X.shape[0], n_fit)
    if key is not None:
        shared[key] = found
    return found


def _between(held_out, fitted):
    """A candidate's estimate from its errors on held-out rows and on the rows fitted (both
    scaled to the whole layer): :data:`ESTIMATE_TOWARDS_FITTED` of the way in dB from the
    first towards the second; the held-out error where either is zero."""
    if held_out <= 0.0 or fitted <= 0.0:
        return held_out
    return held_out ** (1.0 - ESTIMATE_TOWARDS_FITTED) * fitted ** ESTIMATE_TOWARDS_FITTED


def _estimate(ref, candidates, seed, n_threads, relative=False, calibration=None, wanted=None):
    """For each candidate: bytes of the layer's streams (exact) and its error (from a row
    sample), or ``None`` when it is not estimated on the layer (it does not fit it, or is
    skipped: see :func:`_estimate_candidates`) or its position in ``candidates`` is not
    among ``wanted`` (a collection of ints; None: all). Reads the layer once.

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
    given; only those at the positions ``wanted`` when given, the others None).

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
    shared = {}  # k-means++ starts, row draws and energies, for all the candidates

    def eligible(setting):
        return _fits(setting, weight.shape) and not (setting.row_scales and (
            not scales_pay or (calibration is not None and calibration.gram is not None)))

    sizes = [c.stream_bytes(weight.shape) if eligible(c) else None for c in candidates]
    smallest = min((n for n in sizes if n is not None), default=0)
    for position, (setting, nbytes) in enumerate(zip(candidates, sizes)):
        if nbytes is None or (wanted is not None and position not in wanted) or (
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
    """The error of one candidate on the sub-vectors ``X`` of a layer (see :func:`_estimate`;
    the layer has at least as many sub-vectors as the candidate has codewords). ``shared``
    (a dict, kept across the candidates of a layer) shares their k-means++ starts
    (:func:`_shared_seeds`), row draws (:func:`_held_out_split`) and the rows' energies
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
        energies = _shared_energies(shared, setting, X, weights)
        ranked = _shared_ranking(shared, setting, X, weights, ESTIMATE_HEAVIEST_ROWS + fit_rows)
        outliers = _outlier_rows(X, weights, energies, ranked, fit_rows, shared, setting)
        row_weights = None if weights is None else weights[split[0]]
        if outliers.shape[0]:  # fitted for certain, each for itself alone
            fitted_rows, row_weights, _ = with_outliers(split[0], outliers, X.shape[0])
            split = fitted_rows, split[1][~np.isin(split[1], outliers)]
            if weights is not None:
                row_weights = row_weights * weights[fitted_rows]
        rows = X[split[0]]
        if shared is not None:
            est.set_params(codebook_init=_shared_seeds(shared, setting, rows, row_weights, seed))
        _fit_quietly(est, rows, sample_weight=row_weights)
        held_out = _held_out_error(est, X, split, weights, energies, ranked, outliers)
        drawn = rows.shape[0] - outliers.shape[0]
        fitted = est.reconstruction_err_**2 * (X.shape[0] - outliers.shape[0]) / drawn
        return _between(held_out, fitted)
    # (row weights with zeros may leave fewer rows than codewords: fitted all the same, as
    # the final fit does, rather than left unestimated)
    sample, metric, weights, factor, _ = _fit_inputs(X, calibration, fit_rows, seed,
                                                     keep_order=False)
    _fit_quietly(est, sample, sample_weight=weights, metric=metric)
    if not gram:
        return est.reconstruction_err_**2 * factor
    # the sample is whole output rows: encode them as the final fit will
    n_rows = sample.shape[0] // calibration.subvectors_per_row
    codes, _ = _feedback_pass(est, sample, n_rows, calibration.feedback(setting.vector_size))
    return _feedback_error(est, codes, sample.reshape(n_rows, -1), calibration) * factor
