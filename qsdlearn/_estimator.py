"""The scikit-learn estimator: validation and bookkeeping around :mod:`qsdlearn._solver`."""

import math
import os
from numbers import Integral, Real

import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import (
    _check_sample_weight,
    check_array,
    check_is_fitted,
    validate_data,
)

from . import _metric, _solver
from ._checks import check_positive_int
from ._constraints import Constraints
from ._dtypes import in_native_byte_order
from ._jit import kernel_threads
from ._kernels import all_positions, reconstruct_from_slots
from ._params import refuse_bools
from .codec import MatrixSettings, encode_factors


def _check_metric(metric, n_features):
    """The metric as ``(m, d, d)`` float64 blocks (None when not given).

    Raises a ValueError for a wrong shape, a non-symmetric block or one with a clearly
    negative eigenvalue (beyond rounding: ``1e-8`` of the block's largest)."""
    if metric is None:
        return None
    blocks = check_array(metric, dtype=np.float64, ensure_2d=False, allow_nd=True,
                         input_name="metric")
    given = blocks.shape
    if blocks.ndim == 2:
        blocks = blocks[None]
    if blocks.ndim != 3 or blocks.shape[1:] != (n_features, n_features) or not blocks.shape[0]:
        raise ValueError(
            f"metric has shape {given}; expected ({n_features}, {n_features}) or "
            f"(m, {n_features}, {n_features}), n_features={n_features} (row i uses block i mod m)."
        )
    scale = np.max(np.abs(blocks), axis=(1, 2))
    asymmetry = np.max(np.abs(blocks - np.swapaxes(blocks, 1, 2)), axis=(1, 2))
    bad = np.flatnonzero(asymmetry > 1e-8 * scale)
    if bad.size:
        raise ValueError(f"metric block {bad[0]} is not symmetric; give (H + H.T) / 2.")
    lowest = np.linalg.eigvalsh(blocks)
    bad = np.flatnonzero(lowest[:, 0] < -1e-8 * np.maximum(lowest[:, -1], 0.0) - 1e-300)
    if bad.size:
        raise ValueError(
            f"metric block {bad[0]} is not positive semi-definite (smallest eigenvalue "
            f"{lowest[bad[0], 0]:.3g}); a metric is a Gram matrix A.T @ A of inputs."
        )
    if not blocks.any():
        raise ValueError("metric is zero: no error would count; give a nonzero Gram matrix.")
    return blocks


def _check_weights(sample_weight, X):
    """Row weights as float64 (None when not given); all zero is refused."""
    if sample_weight is None:
        return None
    weights = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
    if not weights.any():
        raise ValueError("sample_weight is zero for every row: there is nothing to fit.")
    return weights


def _physical_memory():
    """Bytes of physical memory, or None where the platform does not say (``os.sysconf``)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


#: Headroom below the dtype's largest value that data must keep (a factor of 2**8): a
#: reconstruction adds slots of codebook rows times code values, and of data within a few
#: times the largest value it passed the range (float32 data of 2e38 reconstructed to inf).
_HEADROOM_BITS = 8


def _check_headroom(X):
    """``X`` (validated, float32 or float64) if its magnitudes stay :data:`_HEADROOM_BITS`
    below its dtype's largest value; a ValueError otherwise (inf included: float64 rows cast
    to float32 by :meth:`QuantizedSparseDecomposition.encode`)."""
    if X.size:
        largest = max(float(np.max(X)), -float(np.min(X)))
        limit = math.ldexp(float(np.finfo(X.dtype).max), -_HEADROOM_BITS)
        if not largest < limit:
            upcast = " pass float64 data, or" if X.dtype == np.float32 else ""
            raise ValueError(
                f"X holds a magnitude of {largest:.3g}, within a factor 2**{_HEADROOM_BITS} of "
                f"the largest {X.dtype.name} ({np.finfo(X.dtype).max:.3g}): its reconstruction "
                f"could pass that range;{upcast} scale X down")
    return X


#: Copies of the ``(n_components, n_features)`` float64 codebook a fit holds at once (starts,
#: iterates, statistics; measured: 3.9 GB for 10**7 one-hot codewords of 8 features).
_CODEBOOK_COPIES = 6


def _check_memory(constraints, n_features):
    """Refuse, before any work, a codebook whose float64 arrays alone would exceed the
    machine's memory: the ``(n_components, n_components)`` Gram matrix of the code step of
    every setting but one-hot codes, and :data:`_CODEBOOK_COPIES` copies of the codebook."""
    k = constraints.n_components
    memory = _physical_memory()
    if memory is None:
        return
    if not constraints.one_hot and 8 * k * k > memory:
        raise ValueError(
            f"n_components={k} needs a {k} x {k} float64 Gram matrix of "
            f"{8 * k * k / 2**30:.1f} GiB, more than this machine's {memory / 2**30:.1f} GiB of "
            "memory: give fewer components")
    codebooks = _CODEBOOK_COPIES * 8 * k * n_features
    if codebooks > memory:
        raise ValueError(
            f"n_components={k} codewords of {n_features} features need about "
            f"{codebooks / 2**30:.1f} GiB (a fit holds {_CODEBOOK_COPIES} float64 copies of the "
            f"codebook), more than this machine's {memory / 2**30:.1f} GiB of memory: give "
            "fewer components")


def _prepared_metric(blocks, weights, n_rows):
    """A solver metric, or None for the plain objective (:func:`qsdlearn._metric.prepare`)."""
    if blocks is None and weights is None:
        return None
    return _metric.prepare(blocks, weights, n_rows)


def _native_float(X):
    """float16 and bfloat16 arrays as float32 and non-native byte orders as native, so that
    ``validate_data`` keeps them in single precision (it would upcast them to float64)."""
    dtype = getattr(X, "dtype", None)
    if not isinstance(X, np.ndarray) or dtype is None:
        return X
    if dtype.name == "bfloat16":  # ml_dtypes' type, of kind "V" for NumPy
        return X.astype(np.float32)
    if dtype.kind != "f":
        return X
    if dtype.itemsize <= 2:
        return X.astype(np.float32)
    return in_native_byte_order(X)


class QuantizedSparseDecomposition(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Sparse, quantized matrix factorization ``X ~ Z C``.

    Every row of ``X`` is approximated by a combination of at most ``n_nonzero`` rows of a
    codebook ``C`` (``components_``) with coefficients on a small level set, while the codebook
    entries themselves lie on a per-row uniform grid. The factors are found by alternating
    projected gradient descent with exact projections onto the constraint sets, exact block
    minimisers where they are cheap, and a check that no step raises the objective (Kuzmin
    et al., 2022). Truncated SVD, k-means vector quantization, sparse coding and sparse PCA are
    special settings.

    Parameters
    ----------
    n_components : int, default=None
        Number of codebook rows ``k``. ``None`` uses ``min(n_samples, n_features)``.
    n_nonzero : int, default=None
        Number of code slots per row ``s`` (at most ``n_components``). ``None`` means dense
        codes: every row uses every component and no support is stored. Rows have exactly
        ``s`` slots; with quantized code values every slot is nonzero.
    code_bits : int, default=None
        Bits per code value. ``None``: float values. ``0``: every value is 1 (with
        ``n_nonzero=1`` this is vector quantization). ``b >= 1``: the ``2**b`` symmetric
        mid-rise levels ``±1/2, ±3/2, ...`` (their scale is folded into the codebook rows).
    codebook_bits : int, default=None
        Bits per codebook entry: the entries of codebook row ``j`` lie on the mid-rise grid of
        ``2**codebook_bits`` levels times a scale of that row. ``None``: float codebook. At most
        22 for float32 data: beyond, a level times its scale is not exact in float32, and
        ``fit`` raises a ValueError.
    component_nonzero : int, default=None
        Nonzeros per codebook row (sparse loadings, as in sparse PCA). ``None``: dense rows.
    init : {"auto", "svd", "k-means++", "random"}, default="auto"
        Start of the codebook. ``"auto"`` is ``"svd"`` when ``n_components <= min(n_samples,
        n_features)`` and the codes are not one-hot, ``"k-means++"`` otherwise.
    code_init : array-like of shape (n_samples, n_components), default=None
        Starting codes, projected onto the code constraints.
    codebook_init : array-like of shape (n_components, n_features), default=None
        Starting codebook, projected onto the codebook constraints; overrides ``init``.
    n_init : int, default=1
        Number of starts with different seeds; the one with the lowest objective is kept.
        Only random starts are repeated: an ``"svd"`` start (also when ``"auto"`` resolves to
        it) or a ``codebook_init`` is run once.
    max_iter : int, default=100
        Maximum number of alternating iterations.
    tol : float, default=1e-4
        Stop when an iteration lowers the objective by less than ``tol`` times its value.
    solver : {"descent", "pgd"}, default="descent"
        ``"pgd"``: the plain method of Kuzmin et al. (2022), alternating projected gradient
        steps of size ``1 / L`` with the exact projections and nothing else (the codes start
        at zero, the codebook's grid scales stay those of the start, codes are held as a
        dense ``(n_samples, n_components)`` array; :meth:`fit` then takes no
        ``sample_weight`` or ``metric`` other than unit weights and the identity, and its
        codes and ``reconstruction_err_`` are its own last iterate's, not :meth:`transform`'s).
        It is the
        reference the default is measured against. ``"descent"`` adds exact block
        minimisers where they are cheap (Lloyd's step for one-hot codes, least squares for a
        float codebook, exact coordinate sweeps over code slots and codebook rows, closed-form
        grid scales) and the multi-start code search below; only it holds the special-case
        equivalences (k-means, SVD). Both never increase the objective. :meth:`transform`
        always uses the code search.
    search_width : int, default=8
        Starts of the code search of every row with two or more sparse slots: from each of
        the ``search_width`` codebook rows that alone fit the row best, a greedy fill of the
        other slots then exact coordinate sweeps (codes on a level set), or an orthogonal
        least-squares fill then exchanges of one codebook row for another with least-squares
        values while one lowers the error (float codes); the best result is kept. Work per
        row grows linearly with it. ``1`` is the plain greedy start. One-slot codes and dense
        float codes are solved exactly, and dense quantized codes from a single greedy start
        (then sweeps): they ignore it.
    random_state : int, RandomState instance or None, default=None
        Seed of the random starts and of the randomized SVD. Results are bit-identical for a
        fixed seed, whatever the number of threads.
    n_threads : int, default=None
        Threads of the compiled kernels; ``None`` uses all of numba's threads.
    verbose : int, default=0
        Print the objective of every iteration when positive.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        The codebook ``C`` (dequantized): float32 for float32 training data (and float16
        or bfloat16, fitted in float32), float64 for any other.
    codebook_scales_ : ndarray of shape (n_components,) or None
        Per-row grid scales of the codebook: ``components_ / codebook_scales_[:, None]`` are
        half-integer levels. ``None`` for a float codebook.
    n_components_ : int
        The number of components actually used.
    n_iter_ : int
        Number of iterations run by the best start.
    converged_ : bool
        Whether the best start met ``tol`` within ``max_iter`` iterations (when it did not
        and ``max_iter > 0``, ``fit`` also warns with a
        :class:`~sklearn.exceptions.ConvergenceWarning`).
    objective_ : ndarray
        Squared error ``||X - Z C||_F**2`` after initialization and after every iteration; it
        never increases. (A squared error beyond float64's range, for data above about 1e154,
        is ``inf`` here; ``reconstruction_err_`` stays exact.) With ``sample_weight`` or
        ``metric`` given to :meth:`fit`, the weighted error in the metric instead.
    reconstruction_err_ : float
        Frobenius norm ``||X - Z C||_F`` of the training data with the final codes, those that
        :meth:`transform` gives (solved from scratch against the final codebook, they can be
        worse than the last iterate: with the default ``search_width``, by 1-2 % in squared
        error for 2 of 256 codewords with 2- or 3-bit codes, 10 % for 3 with 3-bit codes, on
        Gaussian rows; dense quantized codes on heavy-tailed data can be much worse). With
        ``sample_weight`` or ``metric`` given to :meth:`fit`, the square root of the weighted
        error (``sqrt(sum_i w_i ||x_i - z_i C||**2)``, or the error in the metric), as
        ``objective_``. With ``solver="pgd"``, the error of its last iterate.
    bits_ : int
        Payload bits of the codes of the training data and of the codebook.
    bit_budget_ : BitBudget
        ``bits_`` stream by stream: ``code_support``, ``code_values``, ``codebook_support``,
        ``codebook_values`` and ``codebook_scales`` (bits each, exact), as the codec writes
        them; ``bit_budget_.total == bits_``.
    bits_per_element_ : float
        ``bits_ / (n_samples * n_features)``.
    compression_ratio_ : float
        ``w * n_samples * n_features / bits_`` with ``w`` the width of the data's dtype (32
        for float32, 64 for float64): the size of the matrix in its own dtype over its encoded
        size, as :attr:`CompressedMatrix.compression_ratio` and
        :attr:`CompressedModel.compression_ratio` count it.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during fit, when they are all strings.

    See Also
    --------
    sklearn.decomposition.TruncatedSVD : The dense, float setting.
    sklearn.cluster.KMeans : The setting ``n_nonzero=1, code_bits=0``.
    sklearn.decomposition.MiniBatchDictionaryLearning : Sparse float codes.
    sklearn.decomposition.SparsePCA : Sparse codebook rows.

    Notes
    -----
    With ``n`` rows, ``k`` components, ``s`` slots, ``d`` features, ``t`` nonzeros per codebook
    row and float width ``w`` (32 or 64, the dtype of the data), the payload is

    ``bits_ = n * (support(k, s) + s * code_bits)``
    ``+ k * (support(d, t) + t * codebook_bits) + k * w``

    where a float value costs ``w`` bits instead of its ``*_bits``, the ``k * w`` scales are
    there only with ``codebook_bits``, and ``support(m, r)`` is 0 for dense rows
    (``r = m``), else ``ceil(log2(comb(m, r)))`` while ``comb(m, r) <= 2**64`` (the rank of the
    subset) and ``r * ceil(log2(m))`` beyond. The codec writes exactly these streams.

    For the vector-quantization setting (``n_nonzero=1, code_bits=0``) the fit is Lloyd's
    algorithm, and ``reconstruction_err_ ** 2`` is the k-means inertia (``KMeans.inertia_``)
    of the training data: the error after the final assignment (with a float codebook, also
    ``objective_[-1]``).

    References
    ----------
    .. [1] A. Kuzmin, M. van Baalen, M. Nagel, A. Behboodi, "Quantized Sparse Weight
       Decomposition for Neural Network Compression", arXiv:2207.11048, 2022.

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn import QuantizedSparseDecomposition
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((1000, 8))
    >>> qsd = QuantizedSparseDecomposition(n_components=32, n_nonzero=2, code_bits=2,
    ...                                    codebook_bits=8, random_state=0)
    >>> codes = qsd.fit_transform(X)
    >>> codes.shape, int((codes != 0).sum(axis=1).max())
    ((1000, 32), 2)
    >>> float(qsd.bits_per_element_)
    2.137
    >>> X_hat = qsd.inverse_transform(codes)
    >>> bool(np.mean((X - X_hat) ** 2) < np.mean(X ** 2))
    True
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 1, None, closed="left"), None],
        "n_nonzero": [Interval(Integral, 1, None, closed="left"), None],
        "code_bits": [Interval(Integral, 0, 16, closed="both"), None],
        "codebook_bits": [Interval(Integral, 1, 32, closed="both"), None],
        "component_nonzero": [Interval(Integral, 1, None, closed="left"), None],
        "init": [StrOptions({"auto", "svd", "k-means++", "random"})],
        "code_init": ["array-like", None],
        "codebook_init": ["array-like", None],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "solver": [StrOptions({"descent", "pgd"})],
        "search_width": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "n_threads": [Interval(Integral, 1, None, closed="left"), None],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        n_components=None,
        *,
        n_nonzero=None,
        code_bits=None,
        codebook_bits=None,
        component_nonzero=None,
        init="auto",
        code_init=None,
        codebook_init=None,
        n_init=1,
        max_iter=100,
        tol=1e-4,
        solver="descent",
        search_width=8,
        random_state=None,
        n_threads=None,
        verbose=0,
    ):
        self.n_components = n_components
        self.n_nonzero = n_nonzero
        self.code_bits = code_bits
        self.codebook_bits = codebook_bits
        self.component_nonzero = component_nonzero
        self.init = init
        self.code_init = code_init
        self.codebook_init = codebook_init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.solver = solver
        self.search_width = search_width
        self.random_state = random_state
        self.n_threads = n_threads
        self.verbose = verbose

    # -- helpers -----------------------------------------------------------------------------

    def _constraints(self, n_samples, n_features, dtype):
        """Resolve and cross-check the parameters for data of the given shape and dtype."""
        k = min(n_samples, n_features) if self.n_components is None else self.n_components
        if self.n_nonzero is not None and self.n_nonzero > k:
            raise ValueError(
                f"n_nonzero={self.n_nonzero} exceeds n_components={k}: a row cannot use more "
                "components than there are; lower n_nonzero or raise n_components."
            )
        if self.component_nonzero is not None and self.component_nonzero > n_features:
            raise ValueError(
                f"component_nonzero={self.component_nonzero} exceeds n_features={n_features}."
            )
        # a level (b bits, half-integer) times a scale must be exact in the dtype, with one bit
        # to spare for the rounding of the scale itself
        precision = np.finfo(dtype).nmant - 1
        if self.codebook_bits is not None and self.codebook_bits > precision:
            raise ValueError(
                f"codebook_bits={self.codebook_bits} needs more precision than {dtype.name} has: "
                f"levels times a scale are exact in {dtype.name} up to codebook_bits={precision}. "
                "Lower codebook_bits or fit float64 data."
            )
        # (Constraints refuses code_bits=0 with dense codes of more than one component)
        return Constraints(
            n_components=k,
            n_nonzero=self.n_nonzero,
            code_bits=self.code_bits,
            codebook_bits=self.codebook_bits,
            component_nonzero=self.component_nonzero,
        )

    def _check_init_array(self, value, name, shape, dtype):
        if value is None:
            return None
        array = check_array(value, dtype=dtype, input_name=name)
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape}; expected {shape}.")
        return array

    # -- scikit-learn API --------------------------------------------------------------------

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, sample_weight=None, metric=None):
        """Fit the codebook (and codes) to ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data; every row is one vector to encode.
        y : Ignored
            Not used, present for API consistency.
        sample_weight : array-like of shape (n_samples,), default=None
            Nonnegative row weights: the objective is ``sum_i w_i e_i``, with ``e_i`` the
            squared error of row ``i`` (an integer weight counts a row that many times in the
            objective). None: unit weights.
        metric : array-like of shape (n_features, n_features) or (m, n_features, n_features), \
default=None
            Symmetric positive semi-definite blocks ``H_b`` in which the error of a row is
            measured: ``e_i = r_i H_b r_i^T`` with ``r_i`` its residual and ``b = i mod m``.
            For a linear layer ``y = W a`` cut into sub-vectors along its input, the blocks
            are the diagonal blocks of the Gram matrix ``A^T A`` of calibration inputs ``A``
            (see :func:`compress_weights`), and the objective is the block-diagonal part of
            the output error ``||(W - W_hat) A^T||_F^2``. None (or identity blocks): the
            squared error.

        Returns
        -------
        self : QuantizedSparseDecomposition
            The fitted estimator.

        Raises
        ------
        ValueError
            If ``X`` holds NaN or infinity or a magnitude within a factor ``2**8`` of its
            dtype's largest value, ``sample_weight`` is negative or all zero,
            ``metric`` has the wrong shape or is not symmetric positive semi-definite, or the
            codebook's float64 arrays (with codes other than one-hot, its
            ``(n_components, n_components)`` Gram matrix) would not fit in the machine's
            memory.
        sklearn.utils._param_validation.InvalidParameterError
            (a ValueError and a TypeError) If a parameter has the wrong type or range, or a
            numeric one is a bool.
        """
        self._fit(X, sample_weight, metric)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_transform(self, X, y=None, sample_weight=None, metric=None):
        """Fit to ``X`` and return its codes (the same as ``fit(X).transform(X)``, except with
        ``solver="pgd"``, whose codes are its last iterate's).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data.
        y : Ignored
            Not used, present for API consistency.
        sample_weight : array-like of shape (n_samples,), default=None
            Row weights, as in :meth:`fit`.
        metric : array-like of shape (n_features, n_features) or (m, n_features, n_features), \
default=None
            Metric blocks, as in :meth:`fit`; the codes are those of ``transform(X, metric)``.

        Returns
        -------
        codes : ndarray of shape (n_samples, n_components)
            Dequantized codes ``Z``: float32 for float32 ``X`` (and float16 or
            bfloat16), float64 for any other.

        Raises
        ------
        ValueError
            As :meth:`fit`.
        """
        return self._fit(X, sample_weight, metric).to_dense(self.n_components_)

    @_fit_context(prefer_skip_nested_validation=True)
    def _fit_codes(self, X, sample_weight=None, metric=None):
        """Fit to ``X`` and return its codes as :meth:`encode` gives them without a metric
        (:class:`~qsdlearn._solver.Codes`), so that a caller who packs the rows fitted does
        not solve their codes a second time. Arguments as in :meth:`fit`.

        The fit ends with these codes (:func:`~qsdlearn._solver.fit_factorization`; row
        weights do not change a row's minimiser). A fit in a ``metric``, whose codes minimise
        the error in it, and the plain method (``solver="pgd"``), which ends with its own
        iterate, are encoded again."""
        codes = self._fit(X, sample_weight, metric)
        if self.solver == "pgd" or metric is not None:
            codes = self._encode(self._validate_new(X))
        return codes

    def _fit(self, X, sample_weight=None, metric=None):
        refuse_bools(type(self).__name__, **{name: getattr(self, name) for name in (
            "n_components", "n_nonzero", "code_bits", "codebook_bits", "component_nonzero",
            "n_init", "max_iter", "tol", "search_width", "n_threads")})
        X = validate_data(self, _native_float(X), dtype=[np.float64, np.float32],
                          ensure_min_samples=1)
        X = np.ascontiguousarray(_check_headroom(X))
        n, d = X.shape
        prepared = _prepared_metric(_check_metric(metric, d), _check_weights(sample_weight, X), n)
        if self.solver == "pgd" and prepared is not None:
            raise ValueError("solver='pgd' (the plain method) takes no sample_weight or metric; "
                             "use solver='descent'")
        constraints = self._constraints(n, d, X.dtype)
        _check_memory(constraints, d)
        k = constraints.n_components
        codebook_init = self._check_init_array(self.codebook_init, "codebook_init", (k, d), X.dtype)
        code_init = self._check_init_array(self.code_init, "code_init", (n, k), X.dtype)
        with kernel_threads(self.n_threads):
            result = _solver.fit_factorization(
                X,
                constraints,
                init=self.init,
                code_init=code_init,
                codebook_init=codebook_init,
                n_init=self.n_init,
                max_iter=self.max_iter,
                tol=self.tol,
                random_state=check_random_state(self.random_state),
                verbose=self.verbose,
                metric=prepared,
                search_width=check_positive_int("search_width", self.search_width),
                solver=self.solver,
            )
        self.components_ = result.codebook
        self.codebook_scales_ = result.codebook_scales
        self._codebook_levels = result.codebook_levels
        self.n_components_ = k
        self.n_iter_ = result.n_iter
        self.converged_ = result.converged
        self.objective_ = np.asarray(result.objective)
        self.reconstruction_err_ = result.error_norm
        budget = constraints.bits(n, d, 8 * X.dtype.itemsize)
        self.bit_budget_ = budget
        self.bits_ = budget.total
        self.bits_per_element_ = budget.per_element
        self.compression_ratio_ = 8.0 * X.dtype.itemsize * n * d / budget.total
        self._constraints_ = constraints
        return result.codes

    def transform(self, X, metric=None):
        """Codes of ``X`` against the fitted codebook, solved row by row.

        Sparse codes are searched from ``search_width`` starts, the best kept: codes on a
        level set by a greedy fill and exact coordinate sweeps, float codes by least squares
        on a support found by orthogonal least squares and exchanges of one codebook row for
        another while one lowers the error.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data.
        metric : array-like of shape (n_features, n_features) or (m, n_features, n_features), \
default=None
            Metric blocks in which each row's error is minimised, as in :meth:`fit` (row
            ``i`` uses block ``i mod m``). None: the squared error.

        Returns
        -------
        codes : ndarray of shape (n_samples, n_components)
            Dequantized codes: float32 for float32 ``X`` (and float16 or bfloat16),
            float64 for any other.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the estimator is not fitted.
        ValueError
            If ``X`` has another number of features than the data fitted, or holds NaN or
            infinity or a magnitude within a factor ``2**8`` of its dtype's largest value, or
            ``metric`` has the wrong shape or is not symmetric positive semi-definite.
        """
        X = self._validate_new(X)
        return self._encode(X, metric).to_dense(self.n_components_)

    def _validate_new(self, X, dtype=None):
        """``X`` validated for a fitted estimator, cast to ``dtype`` when given (values beyond
        its range become inf, which the check of headroom refuses)."""
        check_is_fitted(self)
        X = validate_data(self, _native_float(X), dtype=[np.float64, np.float32], reset=False)
        if dtype is not None:
            with np.errstate(over="ignore"):
                X = np.asarray(X, dtype=dtype)
        return _check_headroom(X)

    def _encode(self, X, metric=None):
        """Codes of validated rows ``X`` (see :meth:`transform`)."""
        X = np.ascontiguousarray(X)
        prepared = _prepared_metric(_check_metric(metric, X.shape[1]), None, X.shape[0])
        width = check_positive_int("search_width", self.search_width)
        with kernel_threads(check_positive_int("n_threads", self.n_threads, none_allowed=True)):
            codes, _ = _solver.solve_codes(X, self.components_.astype(X.dtype), self._constraints_,
                                           metric=prepared, search_width=width)
        return codes

    def inverse_transform(self, X):
        """Reconstruct data from codes: ``X @ components_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_components)
            Codes, as returned by :meth:`transform`.

        Returns
        -------
        X_original : ndarray of shape (n_samples, n_features)
            The reconstruction.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the estimator is not fitted.
        ValueError
            If ``X`` has another number of columns than ``n_components_``, or holds NaN or
            infinity.
        """
        check_is_fitted(self)
        codes = check_array(_native_float(X), dtype=[np.float64, np.float32], input_name="X",
                            order="C")
        if codes.shape[1] != self.n_components_:
            raise ValueError(
                f"X has {codes.shape[1]} columns, but codes of this estimator have "
                f"{self.n_components_} (n_components)."
            )
        out = np.empty((codes.shape[0], self.components_.shape[1]), dtype=codes.dtype)
        # The codec's decoder runs the same kernel, so decoding is bit-identical to this.
        reconstruct_from_slots(
            all_positions(*codes.shape), codes, self.components_.astype(codes.dtype), out
        )
        return out

    def encode(self, X, metric=None):
        """Encode ``X`` into bit-packed factors: its codes plus the codebook.

        ``X`` is encoded in the dtype the estimator was fitted on.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data.
        metric : array-like of shape (n_features, n_features) or (m, n_features, n_features), \
default=None
            Metric blocks in which the codes minimise each row's error, as in
            :meth:`transform`.

        Returns
        -------
        CompressedMatrix
            ``decode()`` gives ``inverse_transform(transform(X))`` bit for bit; ``bits`` is
            the bit account of :attr:`bits_` for these rows.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the estimator is not fitted.
        ValueError
            If ``X`` has another number of features than the data fitted, or holds NaN or
            infinity or a magnitude within a factor ``2**8`` of the largest value of the dtype
            fitted on (or beyond it), or ``metric`` is invalid (as in :meth:`transform`).
        """
        check_is_fitted(self)
        X = self._validate_new(X, dtype=self.components_.dtype)
        return self._pack(self._encode(X, metric))

    def _pack(self, codes):
        """The :class:`CompressedMatrix` of ``codes`` (:class:`~qsdlearn._solver.Codes`, in
        the dtype fitted) against the fitted codebook."""
        dtype = self.components_.dtype
        settings = MatrixSettings(codes.val.shape[0], self.components_.shape[1], dtype.name,
                                  self._constraints_)
        return encode_factors(
            settings, codes.idx, codes.val, self.components_, self.codebook_scales_,
            codebook_levels=self._codebook_levels,
        )

    def score(self, X, y=None):
        """Negative mean squared reconstruction error per element (higher is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        score : float
            ``-mean((X - inverse_transform(transform(X)))**2)``.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the estimator is not fitted.
        ValueError
            If ``X`` has another number of features than the data fitted, or holds NaN or
            infinity or a magnitude within a factor ``2**8`` of its dtype's largest value.
        """
        X = self._validate_new(X)
        codes = self._encode(X).to_dense(self.n_components_)
        # in float64: the squares of float32 differences beyond 2**64 overflow float32
        residual = X.astype(np.float64) - self.inverse_transform(codes)
        with np.errstate(over="ignore"):  # beyond float64's range the mean square is inf
            return -float(np.mean(residual**2))

    @property
    def _n_features_out(self):
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.input_tags.allow_nan = False
        tags.array_api_support = False
        return tags
