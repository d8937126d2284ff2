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
a magnitude of :data:`MAX_MAGNITUDE` (2**64) or more, or a float64 tensor whose values are not
all zero but all below :data:`MIN_MAGNITUDE` (float32's smallest normal number).

Tied tensors
------------
Tensors with the same dtype, shape and content (tied embeddings, or any exact copy) are
compressed once; the file stores the others as ``tied`` to the first, and decompression
restores every name. Names that match a ``keep`` pattern are tied only among themselves: a
copy of a compressed tensor that ``keep`` names is stored verbatim.

Rate
----
``bits_per_weight`` is that of the whole file: ``8 * file bytes / number of weights``, the
header, every stream's rounding to bytes and every kept tensor included. The budget is spent
by :func:`qsdlearn._allocation.allocate`.

Modules
-------
This module holds :func:`compress_weights` with its checks and :func:`read_weights`; the rest
of the adapter is in modules below it, each importing only from those before it: the layer
settings, reshape rule (:func:`to_rows`) and row scales (``_layers``), the compressed layers
and the entries they write in a file's layer list (``_compressed_layers``), the reading of
that list (``_model_headers``), the model and its file image (``_model``), the fit of one
layer (``_layer_fit``), the candidates' error estimates (``_estimates``) and the plan
(``_planning``).
"""

import functools
import glob
import math
import os
import sys
import warnings
from collections.abc import Mapping
from numbers import Integral, Real

import joblib
import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, validate_params

from ._calibration import check_entry
from ._checkpoint import matching, open_checkpoint
from ._checks import MAX_BITS_PER_WEIGHT
from ._layer_fit import _CalibrationSource, _fit_layer, _layer_seed
from ._model import CompressedModel
from ._params import refuse_bools
from ._planning import (_below_reach, _budget_bytes, _fixed_share, _largest_first, _Layout,
                        _plan, _warn_if_unspent)
# Names that lived in this module before the adapter was split by topic, importable from it as
# before (the noqa ones are not used here). The planner's tunables (ESTIMATE_*,
# FIRST_ROUND_MARGIN, ...) are not: set on this module they would change nothing.
from ._compressed_layers import (PAYLOAD, CompressedLayer, KeptTensor,  # noqa: F401
                                 RowSplit, SplitLayer)
from ._layer_fit import sample_rows  # noqa: F401
from ._layers import (MIN_COMPRESSED_SIZE, ROW_SCALE_BYTES, ROW_SCALE_DTYPES,  # noqa: F401
                      ROW_SCALE_RANGE, LayerSetting, _is_compressible, default_candidates,
                      from_rows, output_row_scales, rows_of, to_rows)


__all__ = ["CompressedLayer", "CompressedModel", "KeptTensor", "LayerSetting", "RowSplit",
           "SplitLayer", "compress_weights", "default_candidates", "from_rows",
           "output_row_scales", "read_weights", "to_rows"]


#: Tensors to compress must hold magnitudes below this (about 1.8e19): they are fitted and
#: decoded in float32, where the product of two such values, and a sum of fewer than 2**64
#: of them, stay finite (at the top of float32's range the fitted factors and their products
#: overflow; the kernels themselves work on data divided by a power of two).
MAX_MAGNITUDE = 2.0**64
#: A float64 tensor to compress must hold a magnitude of at least this (2**-126, about
#: 1.2e-38, float32's smallest normal number) unless it is all zeros: cast to float32, smaller
#: values keep fewer significant bits, and below about 1e-45 none (the tensor would come back
#: as zeros).
MIN_MAGNITUDE = 2.0**-126
#: The largest ``calibration_damping``: beyond it the weight error is all the objective
#: weighs in float64, and the damped Gram matrix could overflow.
MAX_DAMPING = 1e12
#: ``calibration_damping`` when calibration is given without it.
DEFAULT_DAMPING = 0.1


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


def _check_vector_size(vector_size, shortest, checkpoint, names):
    """Refuse a ``vector_size`` whose sub-vectors (``shortest``: the shortest it makes) are all
    longer than the rows of every tensor in ``names``: each row would be one sub-vector padded
    with zeros, which no budget pays for (it was reported as a budget the candidates cannot
    reach, or left to the scalar candidates alone)."""
    longest = max((math.prod(checkpoint.infos[name].shape[1:]) for name in names), default=0)
    if names and shortest > longest:
        # the largest vector_size whose shortest sub-vectors fit: d itself, or d // 4 (planned)
        largest = longest if shortest == vector_size else 4 * longest + 3
        raise ValueError(f"vector_size={vector_size} is longer than the rows of every tensor to "
                         f"compress (at most {longest} elements): give vector_size <= {largest}")


def _progress(results, names, enabled, desc="layers"):
    """``results`` with a progress bar named ``desc`` naming the layer just done (tqdm, when
    installed)."""
    if not enabled:
        yield from results
        return
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - optional dependency
        yield from results
        return
    with tqdm(total=len(names), desc=desc, unit="layer", file=sys.stderr) as bar:
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
    the tensors to compress, magnitudes below 2**64, which float32 arithmetic takes, and
    float64 values not all below float32's normal range unless all zero (a
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
        are split between two settings (a :class:`~qsdlearn.weights.RowSplit`, in a
        :class:`~qsdlearn.weights.SplitLayer`), so that the file lands close under the
        target. At most 64 (the bits of a float64).
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
        e.g. ``["*embed*", "lm_head.*", "*norm*"]``; a name that matches is stored verbatim
        even where its tensor is a copy of one compressed (a tied ``lm_head``).
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
        Progress bars over layers with the layer's name and the time left (tqdm, when
        installed): one per round of the planner's estimates ("estimates"), then one over
        the final fits ("layers"); default: when standard error is a terminal.

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
        a magnitude of 2**64 (about 1.8e19) or more, or is float64 with nonzero values all
        below 2**-126 (about 1.2e-38; rescale it, or keep it), ``settings`` or
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

    tied = _ties(checkpoint, digests, keep)
    distinct = [name for name in checkpoint.names if tied[name] == name]
    compressible = [name for name in distinct if _fitted(checkpoint, name, keep)]
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
                                  n_workers, n_threads, calibrations, sensitivity,
                                  progress=functools.partial(_progress, enabled=verbose,
                                                             desc="estimates"))
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


def _fitted(checkpoint, name, keep):
    """Whether tensor ``name`` is compressed when it is the first of its tied group: it can
    be (:func:`~qsdlearn._layers._is_compressible`) and no ``keep`` pattern names it."""
    return _is_compressible(checkpoint.infos[name]) and not matching(name, keep or ())


def _ties(checkpoint, digests, keep):
    """Every name to the name whose entry it shares: the first with the same digest; except
    that a name ``keep`` matches is not tied to a first that is compressed (a tied lm_head
    that keep names is kept verbatim as asked, not tied to the lossy embedding): it goes to
    the first such name of its group instead. Copies of a tensor stored verbatim stay tied
    to it."""
    first_of, first_kept, tied = {}, {}, {}
    for name in checkpoint.names:
        first = first_of.setdefault(digests[name], name)
        if _fitted(checkpoint, first, keep) and matching(name, keep or ()):
            first = first_kept.setdefault(digests[name], name)
        tied[name] = first
    return tied


def _check_magnitudes(checkpoint, names):
    """Refuse, naming it, a tensor of ``names`` (those to compress) that holds a magnitude of
    :data:`MAX_MAGNITUDE` or more, or a float64 one whose largest magnitude is positive and
    below :data:`MIN_MAGNITUDE` (magnitudes noted by
    :meth:`qsdlearn._checkpoint.Checkpoint.check`)."""
    for name in names:
        largest = checkpoint.largest[name]
        if largest >= MAX_MAGNITUDE:
            reach = f"takes magnitudes below 2**64 (about {MAX_MAGNITUDE:.2g})"
        elif 0 < largest < MIN_MAGNITUDE and checkpoint.infos[name].dtype == np.float64:
            reach = (f"needs a magnitude of at least 2**-126 (about {MIN_MAGNITUDE:.2g}, "
                     f"float32's smallest normal number) to keep the values' precision")
        else:
            continue
        raise ValueError(
            f"tensor {name!r} in {checkpoint.source} holds values up to {largest:.3g} in "
            f"magnitude; compression works in float32 and {reach}: rescale the tensor, or "
            f"store it as it is with keep=[{glob.escape(name)!r}] (--keep on the command line)")


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
