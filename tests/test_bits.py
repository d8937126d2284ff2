"""Bit accounting: exact formulas and their consistency with the fitted estimator."""

from math import comb, log2

import numpy as np
import pytest

from qsdlearn import QuantizedSparseDecomposition
from qsdlearn import Constraints
from qsdlearn._bits import ceil_log2, factorization_bits, support_bits


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 255, 256, 257, 2**40, 2**40 + 1])
def test_ceil_log2(m):
    expected = 0 if m == 1 else int(np.ceil(log2(m)))
    if m in (2**40 + 1,):
        expected = 41
    assert ceil_log2(m) == expected


def test_ceil_log2_rejects_nonpositive():
    with pytest.raises(ValueError, match="positive"):
        ceil_log2(0)


@pytest.mark.parametrize(
    "k, s, expected",
    [
        (256, 1, 8),
        (256, 2, 15),  # comb = 32640
        (64, 2, 11),  # comb = 2016
        (16, 16, 0),  # dense: nothing to store
        (5, 3, 4),  # comb = 10
        (1, 1, 0),
    ],
)
def test_support_bits_enumerative(k, s, expected):
    assert support_bits(k, s) == expected
    assert support_bits(k, s) == ceil_log2(comb(k, s))


def test_support_bits_falls_back_to_fixed_width_beyond_64_bits():
    assert comb(256, 32) > 2**64
    assert support_bits(256, 32) == 32 * 8


def test_factorization_bits_vq():
    budget = factorization_bits(Constraints(256, 1, 0), 1000, 8, float_bits=32)
    assert budget.code_support == 1000 * 8
    assert budget.code_values == 0
    assert budget.codebook_values == 256 * 8 * 32
    assert budget.codebook_scales == 0
    assert budget.total == 8000 + 65536


def test_factorization_bits_qsd_and_sparse_codebook():
    budget = factorization_bits(Constraints(64, 2, 3, 4, 5), 100, 16, float_bits=64)
    assert budget.code_support == 100 * 11
    assert budget.code_values == 100 * 2 * 3
    assert budget.codebook_support == 64 * ceil_log2(comb(16, 5))
    assert budget.codebook_values == 64 * 5 * 4
    assert budget.codebook_scales == 64 * 64
    assert budget.per_element == budget.total / 1600


@pytest.mark.parametrize(
    "params, per_row, codebook",
    [
        # truncated SVD, float64: dense float codes and codebook
        (dict(n_components=3), 3 * 64, 3 * 6 * 64),
        # VQ: 4 codewords -> 2 bits per row, float codebook
        (dict(n_components=4, n_nonzero=1, code_bits=0), 2, 4 * 6 * 64),
        # QSD: comb(8, 2) = 28 -> 5 bits + 2 values of 2 bits; 4-bit codebook + scales
        (dict(n_components=8, n_nonzero=2, code_bits=2, codebook_bits=4), 5 + 4, 8 * 6 * 4 + 8 * 64),
        # sparse components: dense float codes, 2 of 6 entries per codebook row
        (dict(n_components=3, component_nonzero=2), 3 * 64, 3 * (ceil_log2(15) + 2 * 64)),
    ],
)
def test_estimator_reports_the_formula(params, per_row, codebook):
    X = np.random.default_rng(0).normal(size=(50, 6))
    est = QuantizedSparseDecomposition(random_state=0, max_iter=5, **params)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X)
    assert est.bits_ == 50 * per_row + codebook
    assert est.bits_per_element_ == est.bits_ / 300
    assert est.compression_ratio_ == pytest.approx(64 * 300 / est.bits_)  # float64 data
    est32 = QuantizedSparseDecomposition(random_state=0, max_iter=5, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est32.fit(X.astype(np.float32))
    assert est32.compression_ratio_ == pytest.approx(32 * 300 / est32.bits_)
    assert est32.encode(X.astype(np.float32)).compression_ratio == est32.compression_ratio_


@pytest.mark.parametrize("n_positions, n_keep", [(1, 1), (9, 3), (362, 2), (20000, 4)])
def test_binomial_tables_are_fresh_copies(n_positions, n_keep):
    """Small tables are built once and handed out as copies: writing into one leaves the
    next call's entries exact (the large ones are built each time)."""
    from qsdlearn._bits import binomial_table

    table = binomial_table(n_positions, n_keep)
    m = np.arange(max(n_positions, 1))
    for i in range(n_keep + 1):
        expected = [min(comb(int(v), i), 2**64 - 1) for v in m]
        np.testing.assert_array_equal(table[:, i], np.array(expected, dtype=np.uint64))
    table[:] = 7
    again = binomial_table(n_positions, n_keep)
    assert again is not table and again[-1, 1] == max(n_positions - 1, 0)


@pytest.mark.parametrize("fields, error, message", [
    (dict(n_components=0), ValueError, "n_components=0 is out of range: it must be at least 1"),
    (dict(n_components="a"), TypeError, "n_components must be an integer, got 'a'"),
    (dict(n_components=None), TypeError, "n_components must be an integer, got None"),
    (dict(n_components=16, code_bits=99), ValueError, "code_bits=99 .* from 0 to 16"),
    (dict(n_components=16, codebook_bits=0), ValueError, "codebook_bits=0 .* from 1 to 32"),
    (dict(n_components=16, n_nonzero=True), TypeError, "n_nonzero must be an integer or None"),
    (dict(n_components=16, component_nonzero=2.0), TypeError, "component_nonzero must be"),
    # every row the sum of all codebook rows: refused by every fit, now when built
    (dict(n_components=4, code_bits=0), ValueError, "code_bits=0 .* needs n_nonzero"),
    (dict(n_components=4, n_nonzero=4, code_bits=0), ValueError, "needs n_nonzero"),
])
def test_constraints_check_their_fields_when_built(fields, error, message):
    """Refused when built, with the range (they failed later, in a fit or a file, as
    "constraint n_components=0 is invalid")."""
    with pytest.raises(error, match=message):
        Constraints(**fields)
    assert Constraints(np.int64(16), code_bits=np.int8(2)).code_bits == 2
    assert Constraints(1, n_nonzero=1, code_bits=0).one_hot  # one codeword: dense is one-hot


def test_the_bit_account_refuses_impossible_shapes():
    """Negative rows, more nonzeros per codebook row than features and a float of 7 bits
    gave nonsense counts (a fresh user's trial: code_values=-128 for -1 rows)."""
    for args, error in (((-1, 8, 32), ValueError), ((2.0, 8, 32), TypeError),
                        ((10, 0, 32), ValueError), ((10, 8, 7), ValueError),
                        ((10, 8, True), TypeError)):
        with pytest.raises(error):
            Constraints(4).bits(*args)
    with pytest.raises(ValueError, match="component_nonzero=10 exceeds"):
        Constraints(4, component_nonzero=10).bits(10, 8, 32)
    empty = Constraints(4).bits(0, 8, 32)  # no rows: the codebook alone
    assert empty.code_support == 0 and empty.code_values == 0 and empty.total > 0
    assert Constraints(4).bits(np.int64(10), np.int64(8), 16).total > 0
