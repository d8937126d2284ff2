"""Rate allocation: which setting each layer gets under one byte budget.

Each layer has candidate settings with an exact size in bytes and an estimated squared error.
The total error under the budget is minimised greedily over every layer's lower convex hull of
(bytes, error): the step with the largest error decrease per byte goes first (the Lagrangian
solution on the hulls). This module works on numbers only and imports nothing from the package.
"""


def saving_per_byte(from_bytes, from_error, to_bytes, to_error):
    """Error decrease per extra byte of a move between two options (at least one byte apart,
    so that options of equal size do not divide by zero)."""
    return (from_error - to_error) / max(to_bytes - from_bytes, 1)


def options_hull(options):
    """The lower convex hull of ``(bytes, error, setting)`` options, by increasing bytes."""
    hull = []
    for option in sorted(options, key=lambda o: (o[0], o[1])):
        if hull and option[1] >= hull[-1][1]:
            continue  # more bytes, no less error
        while len(hull) >= 2:
            (b0, e0, _), (b1, e1, _) = hull[-2], hull[-1]
            if (e0 - e1) * (option[0] - b1) <= (e1 - option[1]) * (b1 - b0):
                hull.pop()  # hull[-1] is above the segment: not on the convex hull
            else:
                break
        hull.append(option)
    return hull


def allocate(estimates, budget_bytes, stop_when_blocked=False):
    """Greedy marginal-return allocation over each layer's lower convex hull.

    ``estimates[name]`` is a list of (bytes, error, setting). Returns name -> setting, or
    None when even the smallest choices exceed the budget.

    The step with the largest error decrease per byte goes first. When it does not fit in
    what is left, ``stop_when_blocked=False`` goes on with the best step that fits (on
    another layer, with less decrease per byte); ``True`` stops there, leaving the rest for
    a split of that layer's rows towards its step, the Lagrangian solution made real by
    time-sharing. Which of the two is better depends on whether that split fits (it adds a
    codebook) and on what the other steps save: the caller compares them.
    """
    hulls = {name: options_hull(options) for name, options in estimates.items()}
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
            if used + extra > budget_bytes and not stop_when_blocked:
                continue
            slope = saving_per_byte(*hull[i][:2], *hull[i + 1][:2])
            if slope > best_slope:
                best, best_slope = name, slope
        if best is None:
            break
        i = position[best]
        extra = hulls[best][i + 1][0] - hulls[best][i][0]
        if used + extra > budget_bytes:  # stop_when_blocked: the best step does not fit
            break
        used += extra
        position[best] = i + 1
    return {name: hulls[name][position[name]][2] for name in hulls}


def next_steps(estimates, plan):
    """The moves beyond ``plan``, most profitable first: for every layer, each of its options
    with less error than its planned one, ordered by error decrease per extra byte from the
    planned one. A layer's next hull vertex comes before its other options (convexity); the
    others serve when a split of its rows towards that vertex does not fit (a split adds the
    new setting's codebook, which a smaller one may leave room for).

    Returns
    -------
    list of (name, setting)
        Empty when every layer is at the end of its hull (its least error).
    """
    steps = []
    for name, options in estimates.items():
        current = [option for option in options if option[2] == plan[name]]
        if not current:
            continue
        current_bytes, current_error, _ = current[0]
        for size, error, setting in options:
            if error < current_error:
                slope = saving_per_byte(current_bytes, current_error, size, error)
                steps.append((slope, name, setting))
    steps.sort(key=lambda step: -step[0])
    return [(name, setting) for _, name, setting in steps]


def may_enter(estimates, plans, pending):
    """The ``pending`` options (known bytes, error not yet estimated) that could enter a
    plan, for estimates made in rounds: the cheaper options first, the others only where an
    allocation may want them.

    An option ``(b, setting)`` of a layer planned at ``(b0, e0)`` saves at most ``e0`` (its
    error is not negative), so it saves at most ``e0 / (b - b0)`` per extra byte. Where that
    is less than what the step to the layer's next hull vertex ``(b1, e1)`` saves per byte,
    ``(e0 - e1) / (b1 - b0)``, the option comes after that vertex in every order of steps
    (:func:`allocate`, :func:`next_steps`), and it cannot take the vertex off the hull: the
    hull up to the next vertex is the one with every option. So it is left out. A layer at
    the end of its hull (or with no estimate yet) takes all its pending options; one whose
    error is zero, none. (An allocation that skips a step that does not fit may move other
    layers past where they stood: the caller checks every allocation it makes.)

    Parameters
    ----------
    estimates : dict of str to list of (bytes, error, setting)
        The options of every layer estimated so far.
    plans : list of dict of str to setting
        Allocations of those options (e.g. with and without ``stop_when_blocked``; None where
        the budget is too small): an option that may enter any of them is kept.
    pending : dict of str to list of (bytes, setting)
        Every layer's options not estimated yet.

    Returns
    -------
    dict of str to list of setting
        Per layer with any, the pending settings to estimate, in ``pending``'s order.
    """
    wanted = {}
    for name, options in pending.items():
        hull = options_hull(estimates.get(name, []))
        settings = [option[2] for option in hull]
        keep = set()
        for plan in plans:
            if not hull or plan is None or plan.get(name) not in settings:
                keep.update(setting for _, setting in options)
                continue
            i = settings.index(plan[name])
            b0, e0, _ = hull[i]
            if e0 <= 0:
                continue  # nothing left to gain
            if i + 1 == len(hull):
                keep.update(setting for _, setting in options)
                continue
            next_slope = saving_per_byte(b0, e0, *hull[i + 1][:2])
            keep.update(setting for size, setting in options
                        if saving_per_byte(b0, e0, size, 0.0) >= next_slope)
        kept = [setting for _, setting in options if setting in keep]
        if kept:
            wanted[name] = kept
    return wanted
