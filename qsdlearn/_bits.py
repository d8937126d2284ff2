"""Exact bit accounting of the fitted factors.

The counts here are the sizes of the packed streams that the codec writes (without its fixed
header), so that ``bits_per_element_`` is a measurement, not an estimate:

``codes``
    per row: the support (``support_bits(k, s)``) and ``s`` values of ``code_bits`` bits each;
    with float values every value costs the float width. Dense codes (``n_nonzero=None``) have
    no support to store.
``codebook``
    per codebook row: its support among the ``d`` columns (when ``component_nonzero`` is set)
    and its values, ``codebook_bits`` each or the float width.
``scales``
    one float per codebook row when the codebook is quantized. Code values need no scale of
    their own: it is folded into the codebook rows during fitting.

A support of ``s`` positions out of ``k`` is stored as the rank of the ``s``-subset in the
combinatorial number system, ``ceil(log2(comb(k, s)))`` bits, while that rank fits in 64 bits;
beyond that it is stored as ``s`` fixed-width positions of ``ceil(log2(k))`` bits each.
"""

from dataclasses import dataclass
from math import comb

#: Largest number of subsets for which a support is stored as one enumerative rank.
ENUMERATIVE_SUPPORT_LIMIT = 2**64


def ceil_log2(m):
    """``ceil(log2(m))`` for a positive integer ``m``, exactly (0 for ``m == 1``)."""
    if m < 1:
        raise ValueError(f"ceil_log2 needs a positive integer, got {m}")
    return (int(m) - 1).bit_length()


def support_is_enumerative(n_positions, n_keep):
    """Whether a support of ``n_keep`` out of ``n_positions`` is stored as one rank."""
    return comb(n_positions, n_keep) <= ENUMERATIVE_SUPPORT_LIMIT


def support_bits(n_positions, n_keep):
    """Bits that store which ``n_keep`` of ``n_positions`` positions a row uses."""
    if n_keep >= n_positions:
        return 0
    if support_is_enumerative(n_positions, n_keep):
        return ceil_log2(comb(n_positions, n_keep))
    return n_keep * ceil_log2(n_positions)


@dataclass(frozen=True)
class BitBudget:
    """Bits of each stream of an encoded factorization of an ``(n_rows, n_features)`` matrix."""

    n_rows: int
    n_features: int
    code_support: int
    code_values: int
    codebook_support: int
    codebook_values: int
    codebook_scales: int

    @property
    def total(self):
        """All payload bits."""
        return (
            self.code_support
            + self.code_values
            + self.codebook_support
            + self.codebook_values
            + self.codebook_scales
        )

    @property
    def per_element(self):
        """Payload bits per element of the matrix."""
        return self.total / (self.n_rows * self.n_features)


def factorization_bits(
    n_rows,
    n_features,
    n_components,
    n_nonzero,
    code_bits,
    codebook_bits,
    component_nonzero,
    float_bits,
):
    """Count the payload bits of a factorization ``X ~ Z C`` with the given settings.

    Parameters
    ----------
    n_rows, n_features : int
        Shape of ``X``.
    n_components : int
        Number of codebook rows ``k``.
    n_nonzero : int or None
        Slots per code row; ``None`` for dense codes.
    code_bits, codebook_bits : int or None
        Bits per code value / codebook value; ``None`` for float values.
    component_nonzero : int or None
        Slots per codebook row; ``None`` for dense codebook rows.
    float_bits : int
        Width of a float value and of a scale (32 for float32, 64 for float64).

    Returns
    -------
    BitBudget
    """
    k, d = n_components, n_features
    s = k if n_nonzero is None else n_nonzero
    t = d if component_nonzero is None else component_nonzero
    value_bits = float_bits if code_bits is None else code_bits
    centroid_bits = float_bits if codebook_bits is None else codebook_bits
    return BitBudget(
        n_rows=n_rows,
        n_features=n_features,
        code_support=0 if n_nonzero is None else n_rows * support_bits(k, s),
        code_values=n_rows * s * value_bits,
        codebook_support=0 if component_nonzero is None else k * support_bits(d, t),
        codebook_values=k * t * centroid_bits,
        codebook_scales=0 if codebook_bits is None else k * float_bits,
    )
