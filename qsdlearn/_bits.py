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

import functools
from dataclasses import dataclass
from math import comb

import numpy as np

from ._jit import njit, split_among_threads

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

    def stream_bits(self):
        """Bits of every stream, by the stream names of the codec."""
        return dict(
            code_support=self.code_support,
            code_values=self.code_values,
            codebook_support=self.codebook_support,
            codebook_values=self.codebook_values,
            codebook_scales=self.codebook_scales,
        )

    @property
    def total(self):
        """All payload bits."""
        return sum(self.stream_bits().values())

    @property
    def per_element(self):
        """Payload bits per element of the matrix."""
        return self.total / (self.n_rows * self.n_features)


def factorization_bits(constraints, n_rows, n_features, float_bits):
    """Count the payload bits of a factorization ``X ~ Z C``.

    Parameters
    ----------
    constraints : Constraints
        The constraints of the factorization (see :class:`qsdlearn.Constraints`).
    n_rows, n_features : int
        Shape of ``X``.
    float_bits : int
        Width of a float value and of a scale (32 for float32, 64 for float64).

    Returns
    -------
    BitBudget
    """
    k, d = constraints.n_components, n_features
    s = constraints.slots
    t = constraints.codebook_row_nonzero(d)
    value_bits = float_bits if constraints.code_bits is None else constraints.code_bits
    entry_bits = float_bits if constraints.codebook_bits is None else constraints.codebook_bits
    return BitBudget(
        n_rows=n_rows,
        n_features=n_features,
        code_support=0 if constraints.dense_codes else n_rows * support_bits(k, s),
        code_values=n_rows * s * value_bits,
        codebook_support=(
            0 if constraints.component_nonzero is None else k * support_bits(d, t)
        ),
        codebook_values=k * t * entry_bits,
        codebook_scales=0 if constraints.codebook_bits is None else k * float_bits,
    )


# -- bit packing -------------------------------------------------------------------------------
#
# A stream holds fixed-width unsigned fields, most significant bit first, field after field,
# and is padded with zero bits to a whole number of bytes. Packing runs in threads over
# ranges of blocks of 8 fields (a block then starts on a byte boundary, so blocks never share
# a byte); compiled serial kernels in Python threads, as in qsdlearn._kernels, compile in a
# fraction of the time of a parallel loop.


def stream_bytes(n_fields, width):
    """Bytes of a stream of ``n_fields`` fields of ``width`` bits."""
    return (n_fields * width + 7) // 8


@njit()
def _pack(values, width, out, first_block, last_block):
    """Pack the fields of blocks ``first_block:last_block`` (8 fields each) into ``out``."""
    for i in range(8 * first_block, min(values.shape[0], 8 * last_block)):
        value = np.uint64(values[i])
        bitpos = i * width
        remaining = width
        while remaining > 0:
            byte = bitpos >> 3
            free = 8 - (bitpos & 7)
            take = min(free, remaining)
            shift = np.uint64(remaining - take)
            bits = (value >> shift) & np.uint64((1 << take) - 1)
            out[byte] |= np.uint8(bits << np.uint64(free - take))
            bitpos += take
            remaining -= take


@njit()
def _unpack(buf, width, out, start, stop):
    """Read fields ``start:stop`` of the stream ``buf`` into ``out``."""
    for i in range(start, stop):
        value = np.uint64(0)
        bitpos = i * width
        remaining = width
        while remaining > 0:
            byte = np.uint64(buf[bitpos >> 3])
            free = 8 - (bitpos & 7)
            take = min(free, remaining)
            bits = (byte >> np.uint64(free - take)) & np.uint64((1 << take) - 1)
            value = (value << np.uint64(take)) | bits
            bitpos += take
            remaining -= take
        out[i] = value


def pack_fields(values, width):
    """Pack non-negative integers into ``width``-bit fields (``0 <= width <= 64``).

    Returns
    -------
    bytes
        ``stream_bytes(len(values), width)`` bytes.
    """
    values = np.ascontiguousarray(values, dtype=np.uint64).ravel()
    if not 0 <= width <= 64:
        raise ValueError(f"field width must be between 0 and 64 bits, got {width}")
    if width < 64 and values.size and int(values.max()) >> width:
        raise ValueError(f"a value does not fit in {width} bits")
    out = np.zeros(stream_bytes(values.size, width), dtype=np.uint8)
    if width and values.size:
        split_among_threads(_pack, -(-values.size // 8), values, width, out)
    return out.tobytes()


def unpack_fields(stream, width, count):
    """Read ``count`` fields of ``width`` bits; the stream must have exactly the right size."""
    buf = np.frombuffer(stream, dtype=np.uint8)
    if buf.size != stream_bytes(count, width):
        raise ValueError(
            f"stream of {buf.size} bytes, expected {stream_bytes(count, width)} for {count} "
            f"fields of {width} bits"
        )
    out = np.zeros(count, dtype=np.uint64)
    if width and count:
        split_among_threads(_unpack, count, buf, width, out)
    return out


# -- subsets as ranks (combinatorial number system) --------------------------------------------


#: Tables of at most this many entries are built once per size and copied (a model's
#: compression packs the supports of thousands of fits, and a table of 362 positions took
#: about 1 ms of Python to build).
_CACHED_TABLE_ENTRIES = 1 << 16


def binomial_table(n_positions, n_keep):
    """``table[m, i] = comb(m, i)`` for ``m < n_positions``, ``i <= n_keep``, as uint64.

    Entries above 2**64 - 1 are saturated; ranking and unranking a support of ``n_keep`` out of
    ``n_positions`` never reads them when ``comb(n_positions, n_keep) <= 2**64``: the entries it
    reads are at most ``comb(n_positions - 1, n_keep)``.
    """
    if max(n_positions, 1) * (n_keep + 1) <= _CACHED_TABLE_ENTRIES:
        return _cached_binomial_table(n_positions, n_keep).copy()
    return _build_binomial_table(n_positions, n_keep)


@functools.lru_cache(maxsize=64)
def _cached_binomial_table(n_positions, n_keep):
    return _build_binomial_table(n_positions, n_keep)


def _build_binomial_table(n_positions, n_keep):
    table = np.zeros((max(n_positions, 1), n_keep + 1), dtype=np.uint64)
    cap = 2**64 - 1
    for m in range(n_positions):
        for i in range(n_keep + 1):
            table[m, i] = min(comb(m, i), cap)
    return table


def rank_subsets(idx, table, out):
    """Rank of every sorted row of ``idx`` among the subsets of its size: sum_i comb(c_i, i+1)."""
    split_among_threads(_rank_rows, idx.shape[0], idx, table, out)


@njit()
def _rank_rows(idx, table, out, start, stop):
    for r in range(start, stop):
        rank = np.uint64(0)
        for i in range(idx.shape[1]):
            rank += table[idx[r, i], i + 1]
        out[r] = rank


def unrank_subsets(ranks, n_positions, table, out):
    """Inverse of :func:`rank_subsets`; ``ranks`` must be below ``comb(n_positions, s)``."""
    split_among_threads(_unrank_rows, out.shape[0], ranks, n_positions, table, out)


@njit()
def _unrank_rows(ranks, n_positions, table, out, start, stop):
    for r in range(start, stop):
        rank = ranks[r]
        top = n_positions - 1
        for i in range(out.shape[1], 0, -1):
            # largest c <= top with comb(c, i) <= rank (comb(i - 1, i) = 0 always qualifies)
            c = top
            while table[c, i] > rank:
                c -= 1
            out[r, i - 1] = c
            rank -= table[c, i]
            top = c - 1
