"""Checks of plain arguments shared by several layers (no scikit-learn: the low layers use
them too)."""

from numbers import Integral

import numpy as np

#: The largest bits per weight a budget may ask for: no weight needs more bits than a
#: float64's (a budget of 1e308 bits per weight overflowed to NaN bytes). Here, not in the
#: adapter, so that the command line checks its option without loading the library.
MAX_BITS_PER_WEIGHT = 64.0


def check_positive_int(name, value, none_allowed=False):
    """``value`` of the argument ``name`` as an int >= 1 (or None, where allowed).

    Raises
    ------
    TypeError
        If ``value`` is not an integer (a bool, a float such as ``8.0`` or NaN, a str).
    ValueError
        If it is below 1.
    """
    if value is None and none_allowed:
        return None
    expected = "a positive integer" + (" or None" if none_allowed else "")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_real_array(a, name):
    """``a`` as an array of real numbers (booleans, integers and floats, bfloat16 included);
    a TypeError naming ``name`` for complex numbers, strings or objects."""
    a = np.asarray(a)
    if a.dtype.kind not in "biuf" and a.dtype.name != "bfloat16":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    return a
