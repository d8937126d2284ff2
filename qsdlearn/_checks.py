"""Checks of plain arguments shared by several layers (no scikit-learn: the low layers use
them too)."""

from numbers import Integral

import numpy as np


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
