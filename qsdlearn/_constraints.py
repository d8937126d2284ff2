"""The constraints of a factorization ``X ~ Z C``: one frozen type for every layer.

The estimator builds one from its parameters, the solver fits under it, the codec stores it
(flat, next to the matrix shape and dtype), the model adapter pairs it with a vector size, and
the bit account is a method of it.
"""

from dataclasses import asdict, dataclass, fields
from numbers import Integral

import numpy as np

from ._bits import factorization_bits
from ._checks import check_positive_int

#: Level-set code of float values, no quantization (see :mod:`qsdlearn._kernels`).
FLOAT = -1


#: The range of every field, ``(least, greatest or None, whether None is allowed)``: those of
#: the estimator's parameters.
_RANGES = {"n_components": (1, None, False), "n_nonzero": (1, None, True),
           "code_bits": (0, 16, True), "codebook_bits": (1, 32, True),
           "component_nonzero": (1, None, True)}


def _check_field(name, value):
    """Refuse a field value of the wrong type or out of its range (see :data:`_RANGES`)."""
    least, greatest, optional = _RANGES[name]
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer{' or None' if optional else ''}, got "
                        f"{value!r}")
    if value < least or (greatest is not None and value > greatest):
        span = f"at least {least}" if greatest is None else f"from {least} to {greatest}"
        raise ValueError(f"{name}={value} is out of range: it must be {span}")


@dataclass(frozen=True)
class Constraints:
    """Constraints of ``X ~ Z C``; the parameters of :class:`QuantizedSparseDecomposition`.

    ``n_nonzero == n_components`` is the same as dense codes and is stored as ``None``, so
    that equal constraints compare, hash and serialise equal; NumPy integers are stored as
    ints for the same reason.

    Parameters
    ----------
    n_components : int
        Codebook rows ``k``.
    n_nonzero : int or None, default=None
        Code slots per row ``s``; ``None``: dense codes (no support stored).
    code_bits : int or None, default=None
        Bits per code value; ``None``: float values; ``0``: the single value 1 (one-hot).
    codebook_bits : int or None, default=None
        Bits per codebook entry, on a per-row uniform grid; ``None``: float entries.
    component_nonzero : int or None, default=None
        Nonzeros per codebook row; ``None``: dense codebook rows.

    Raises
    ------
    TypeError
        If a field is not an integer (or None where it may be).
    ValueError
        If a field is out of its range (``n_components``, ``n_nonzero`` and
        ``component_nonzero`` at least 1, ``code_bits`` 0 to 16, ``codebook_bits`` 1 to 32),
        ``n_nonzero`` exceeds ``n_components``, or ``code_bits=0`` comes with dense codes
        (every row the sum of all of more than one codebook row).

    Examples
    --------
    >>> from qsdlearn import Constraints
    >>> vq = Constraints(256, n_nonzero=1, code_bits=0, codebook_bits=8)
    >>> vq.one_hot, vq.slots
    (True, 1)
    >>> budget = vq.bits(n_rows=1000, n_features=8, float_bits=32)
    >>> budget.code_support, budget.codebook_values, budget.codebook_scales  # 8 bits a row
    (8000, 16384, 8192)
    >>> budget.total
    32576
    """

    n_components: int
    n_nonzero: int | None = None
    code_bits: int | None = None
    codebook_bits: int | None = None
    component_nonzero: int | None = None

    def __post_init__(self):
        for name in (f.name for f in fields(self)):
            value = getattr(self, name)
            if isinstance(value, Integral) and not isinstance(value, (bool, int)):
                object.__setattr__(self, name, int(value))  # a NumPy integer
            _check_field(name, getattr(self, name))
        if self.n_nonzero is not None and self.n_nonzero > self.n_components:
            raise ValueError(
                f"n_nonzero={self.n_nonzero} exceeds n_components={self.n_components}: a row "
                "cannot use more components than there are; lower n_nonzero or raise "
                "n_components."
            )
        if self.n_nonzero == self.n_components:
            object.__setattr__(self, "n_nonzero", None)
        if self.code_bits == 0 and self.n_nonzero is None and self.n_components > 1:
            raise ValueError(
                "code_bits=0 (every code value is 1) needs n_nonzero below n_components: with "
                "dense codes every row would be the same sum of all components. Set "
                "n_nonzero=1 for vector quantization."
            )

    @property
    def dense_codes(self):
        """Whether every row uses every codebook row (no support is stored)."""
        return self.n_nonzero is None

    @property
    def slots(self):
        """Code slots per row: ``n_nonzero``, or ``n_components`` for dense codes."""
        return self.n_components if self.dense_codes else self.n_nonzero

    @property
    def one_hot(self):
        """Whether every row is one codebook row (vector quantization)."""
        return self.code_bits == 0 and self.slots == 1

    @property
    def free_codebook(self):
        """Whether the codebook is unconstrained (float, dense rows)."""
        return self.codebook_bits is None and self.component_nonzero is None

    @property
    def code_levels(self):
        """Level-set code of the code values for the kernels (:data:`FLOAT` for floats)."""
        return FLOAT if self.code_bits is None else self.code_bits

    @property
    def codebook_levels(self):
        """Level-set code of the codebook entries for the kernels (:data:`FLOAT` for floats)."""
        return FLOAT if self.codebook_bits is None else self.codebook_bits

    def codebook_row_nonzero(self, n_features):
        """Entries kept per codebook row.

        Parameters
        ----------
        n_features : int
            Columns of the codebook.

        Returns
        -------
        int
            ``component_nonzero``, or ``n_features`` for dense rows.
        """
        return n_features if self.component_nonzero is None else self.component_nonzero

    def bits(self, n_rows, n_features, float_bits):
        """The exact bit account of a matrix factorized under these constraints.

        Parameters
        ----------
        n_rows, n_features : int
            Shape of the matrix.
        float_bits : int
            Width of a float value and of a scale: 32 for float32 data, 64 for float64.

        Returns
        -------
        BitBudget
            Bits of every stream (``code_support``, ``code_values``, ``codebook_support``,
            ``codebook_values``, ``codebook_scales``), their ``total`` and ``per_element``.

        Raises
        ------
        TypeError
            If an argument is not an integer.
        ValueError
            If ``n_rows`` is negative, ``n_features`` below 1 or below ``component_nonzero``,
            or ``float_bits`` not 16, 32 or 64.
        """
        if isinstance(n_rows, (bool, np.bool_)) or not isinstance(n_rows, Integral):
            raise TypeError(f"n_rows must be a non-negative integer, got {n_rows!r}")
        if n_rows < 0:
            raise ValueError(f"n_rows must be a non-negative integer, got {n_rows!r}")
        n_features = check_positive_int("n_features", n_features)
        if check_positive_int("float_bits", float_bits) not in (16, 32, 64):
            raise ValueError(f"float_bits is the width of a float: 16, 32 or 64, got "
                             f"{float_bits!r}")
        if self.component_nonzero is not None and self.component_nonzero > n_features:
            raise ValueError(f"component_nonzero={self.component_nonzero} exceeds the "
                             f"n_features={n_features} of a codebook row")
        return factorization_bits(self, int(n_rows), n_features, int(float_bits))

    def to_dict(self):
        """The fields as a mapping.

        Returns
        -------
        dict
            The five fields in declaration order (the flat form files store).
        """
        return asdict(self)

    def describe(self):
        """A short human-readable form.

        Returns
        -------
        str
            For example ``"k=256 2 of 256 codes=2b codebook=8b"``.
        """
        slots = "dense" if self.dense_codes else f"{self.n_nonzero} of {self.n_components}"
        text = (
            f"k={self.n_components} {slots} codes={_bits_text(self.code_bits)} "
            f"codebook={_bits_text(self.codebook_bits)}"
        )
        if self.component_nonzero is not None:
            text += f" nnz/row={self.component_nonzero}"
        return text


def _bits_text(bits):
    return "float" if bits is None else f"{bits}b"
