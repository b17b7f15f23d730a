"""The compiled bit counts (qsim.bitops) against their plain-Python definitions."""

import numpy as np
from numba import njit

from qsim import bitops


@njit
def _compiled(words):
    out = np.empty((words.shape[0], 4), np.int64)
    for i in range(words.shape[0]):
        w = words[i]
        out[i, 0] = bitops.popcount64(w)
        out[i, 1] = bitops.trailing_zeros32(w)
        out[i, 2] = bitops.leading_zeros32(w)
        out[i, 3] = bitops.trailing_zeros64(w)
    return out


def test_bit_counts_equal_their_definitions():
    rng = np.random.default_rng(0)
    edges = [0, 1, -1, 2**31, 2**32, 2**32 - 1, -2**63, 2**63 - 1, 0xFFFFFFFF, 1 << 40]
    single_bits = (np.int64(1) << rng.integers(0, 63, 64)).tolist()
    words = np.array(edges + single_bits + rng.integers(-2**63, 2**63 - 1, 2000, dtype=np.int64).tolist(), np.int64)
    expected = [[bitops.py_popcount64(w), bitops.py_trailing_zeros32(w), bitops.py_leading_zeros32(w),
                 bitops.py_trailing_zeros64(w)] for w in words.tolist()]
    assert _compiled(words).tolist() == expected
    assert expected[0] == [0, 32, 32, 64] and expected[2] == [64, 0, 0, 0] and expected[6] == [1, 32, 32, 63]
