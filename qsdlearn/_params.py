"""Checks of parameters that scikit-learn's parameter validation lets through."""

import numpy as np
from sklearn.utils._param_validation import InvalidParameterError


def refuse_bools(owner, **params):
    """Refuse a bool given for a numeric parameter, which scikit-learn's ``Interval`` checks
    take for 0 or 1 (``code_bits=True`` would be one bit, ``max_fit_rows=True`` one row).

    Raises
    ------
    InvalidParameterError
        (a ValueError and a TypeError) Naming the first such parameter of ``owner``.
    """
    for name, value in params.items():
        if isinstance(value, (bool, np.bool_)):
            raise InvalidParameterError(
                f"The {name!r} parameter of {owner} must be a number, not a bool. "
                f"Got {value!r} instead.")
