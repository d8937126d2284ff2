"""The plan of a model's compression: which candidate setting (or split of two between a
tensor's rows) each tensor gets so that the file fits the budget at the least estimated error.
The candidates' errors are estimated lazily (:func:`_plan`), the budget allocated by
:func:`qsdlearn._allocation.allocate`, what is left filled with splits (:func:`_fill_budget`),
and the planned file's size checked exactly (:class:`_Layout`)."""

import math
import warnings
from dataclasses import dataclass, field

import joblib
import numpy as np

from ._allocation import allocate, may_enter, next_steps, options_hull, saving_per_byte
from ._compressed_layers import _WIDEST_SQNR, CompressedLayer, RowSplit, SplitLayer
from ._dtypes import float8_e5m2
from ._estimates import _codebook_bytes, _estimate, _fits
from ._layer_fit import _layer_seed
from ._layers import MIN_COMPRESSED_SIZE, rows_of
from ._model import CompressedModel
from .codec import CompressedMatrix


#: Bytes the planner sets aside, before it allocates the budget, for a layer's entry in the
#: header to grow from that of its smallest candidate to that of the chosen one (the digits
#: and nulls of the stored setting), and for the file (the digits of the payload's size, the
#: padding of the header to 8 bytes). The size of the planned file is then checked exactly.
ENTRY_MARGIN, FILE_MARGIN = 12, 16
#: Bits per weight above the target up to which every tensor's candidates are estimated first;
#: those of more bits on a tensor are estimated only where the allocation or the fill of the
#: budget could take them (:func:`_plan`): the same plan as estimating every candidate, with
#: fewer estimates where the target is low beside the candidates' rates. all-MiniLM-L6-v2 with
#: 2 jobs: at 1 b/w the same file in 47 s instead of 84 s; at 2 b/w, 171 s either way.
FIRST_ROUND_MARGIN = 1.0


def _largest_first(names, checkpoint):
    """``names`` in the order their layers are given to the workers: most weights first (the
    checkpoint's order among equals), so that the last to run are the smallest and no worker
    waits long for another at the end (longest processing time first). Results do not depend
    on the order: each layer's seed comes from its name."""
    return sorted(names, key=lambda name: -checkpoint.infos[name].size)


def _fixed_share(fixed, layout):
    """The remark on the tensors of fixed ``settings`` that a warning or refusal about the
    budget appends ("" without any): how many and the bits per weight their streams take."""
    if not fixed:
        return ""
    nbytes = sum(setting.stream_bytes(layout.shape(name)) for name, setting in fixed.items())
    them = "them" if len(fixed) > 1 else "it"
    return _share_remark(len(fixed), "with fixed settings", nbytes, layout,
                         f"give {them} cheaper settings=, or leave {them} to the target")


def _kept_share(layout):
    """The remark on the tensors kept verbatim that a refusal of the budget appends ("" without
    any): they take their share of the file whatever the candidates."""
    if not layout.kept:
        return ""
    return _share_remark(len(layout.kept), "kept verbatim",
                         sum(t.nbytes for t in layout.kept.values()), layout,
                         "under two dimensions, not floats, fewer than "
                         f"{MIN_COMPRESSED_SIZE} elements or matching keep")


def _share_remark(n, which, nbytes, layout, why):
    """The remark ``" (<n> tensors <which> take <bits> bits/weight of it: <why>)"``, with
    the bits per weight that ``nbytes`` take in the file of ``layout``."""
    bits = 8 * nbytes / layout.n_weights
    return (f" ({n} tensor{'s' * (n != 1)} {which} take{'s' * (n == 1)} {bits:.3f} "
            f"bits/weight of it: {why})")


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
    plus what the other rows may give back (down to :func:`_split_floor`, see
    :func:`_split_bases`), where no base of the split has more bytes per row than
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
        lower = max(_split_floor(estimates[name], current_bytes), 0)
        room = left + current_bytes - lower
        shape = layout.shape(name)
        known = [(size, setting) for size, _, setting in estimates[name]] + list(options)
        rows_bytes = {setting: size - _codebook_bytes(setting, shape) for size, setting in known}

        def fits(size, setting):
            if size - current_bytes <= left:  # switched whole
                return True
            # A split adds the candidate's codebook, less what its rows save on those of the
            # base (the planned option or one of more bytes than the split floor):
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
    then the options of less error than any option of fewer bytes, between the second hull
    vertex before ``current`` and ``better`` in bytes (those whose streams fit in the
    ``left`` bytes).

    The plan's setting is a vertex of the lower convex hull of the whole tensor's options,
    which passes over the others; but a split gives each part a codebook of its own, so a
    split from one with a smaller codebook can keep more rows under ``better`` and lower the
    error more (2-D k-means with 32 codewords instead of 2 of 256 sparse codes under 2-D
    k-means with 64: 0.5 dB on a MiniLM attention matrix at 3 bits per weight). Two vertices
    back, because a vertex with a large codebook (k-means with 1,024 codewords of 4, then
    2,048, on a 1024 x 1024 Gaussian matrix at 3 bits per weight) passes over the setting of
    a small codebook that a split wants."""
    known = {setting: (size, error) for size, error, setting in options}
    (current_bytes, _), (better_bytes, better_error) = known[current], known[better]
    lower = _split_floor(options, current_bytes)
    bases = [(current, left)]
    least = float("inf")
    for size, error, setting in sorted(options, key=lambda o: (o[0], o[1])):
        if error < least:
            least = error
            if (lower < size < better_bytes and error > better_error and setting != current
                    and size - current_bytes < left):
                bases.append((setting, left - (size - current_bytes)))
    return bases


def _split_floor(options, current_bytes):
    """The bytes of the second vertex of the lower convex hull of ``options`` (``(bytes,
    error, setting)``) before ``current_bytes`` (-1 if there is none): a split keeps its other
    rows under options of more bytes (:func:`_split_bases`)."""
    below = [size for size, _, _ in options_hull(options) if size < current_bytes]
    return below[-2] if len(below) >= 2 else -1


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
                     relative, factors, progress=None):
    """The estimates (:func:`_estimate`, ``relative`` errors or not) of the ``wanted``
    candidates of each tensor (a dict of name to a list of settings), in parallel, largest
    tensors first: name to a dict of setting to ``(bytes, error)``, the error times the
    tensor's sensitivity factor (``factors``, :func:`_sensitivity_factors`, or None), without
    the candidates that could not be estimated. ``progress(results, names)``, if given, wraps
    the tensors' results as they come (a progress bar)."""
    if not wanted:
        return {}
    order = _largest_first(list(wanted), layout.checkpoint)
    # the wanted candidates by their positions, a tuple of ints: Dask's joblib backend
    # scatters an argument of more than 1 kB and gives back the futures of a set's items in
    # their place (a frozenset of settings arrived as one of futures, which no setting is in)
    positions = {name: tuple(i for i, c in enumerate(candidates) if c in wanted[name])
                 for name in order}
    results = joblib.Parallel(n_jobs=n_jobs, return_as="generator")(
        joblib.delayed(_estimate)(
            layout.checkpoint.ref(name), candidates, _layer_seed(base, name), n_threads,
            relative, calibrations.get(name), positions[name],
        )
        for name in order
    )
    if progress is not None:
        results = progress(results, order)
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
          calibrations, sensitivity=None, progress=None):
    """The settings of the ``free`` tensors at ``bits_per_weight`` for the whole file, and why
    it may fall short of it (:func:`_why_unspent`). ``progress`` wraps each round's results
    (see :func:`_estimate_layers`).

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
        # the tensors the candidates cannot lower
        advice = _CHEAPER_CANDIDATES + _kept_share(layout) + _fixed_share(fixed, layout)
        raise _below_reach(bits_per_weight, least_bytes, layout, advice=advice)
    relative = bool(calibrations) or sensitivity is not None
    factors = _sensitivity_factors(sensitivity, free)

    def estimate(wanted):
        return _estimate_layers(layout, wanted, candidates, base, n_jobs, n_threads,
                                calibrations, relative, factors, progress)

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
