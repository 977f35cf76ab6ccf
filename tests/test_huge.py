"""64-bit indexing: a float32 array of more than 2**31 elements, in both layouts.

Marked slow (left out of a plain `pytest`); .ci/run runs it when 20 GB of memory are free:
    pytest -m slow
The data are channel * 1000 + (i % 7 - 3) along each channel, whose exact mean and variance
follow from counting residues, so no reference pass over 2**31 values is needed; the arrays
are normalized in place (out=x) to need one copy of the data (8.6 GB)."""
from fractions import Fraction

import numpy as np
import pytest

import fastbn

pytestmark = pytest.mark.slow

LENGTH = 2**28 + 8          # values per channel; 8 channels -> 2**31 + 64 values


def pattern(n):
    return (np.arange(n, dtype=np.float32) % 7) - 3


def exact_stats(n, channel):
    counts = [n // 7 + (r < n % 7) for r in range(7)]
    mean = Fraction(sum((r - 3) * c for r, c in enumerate(counts)), n)
    var = Fraction(sum((r - 3 - mean) ** 2 * c for r, c in enumerate(counts)), n)
    return channel * 1000 + mean, var


def check(mean, invstd, first, last, n):
    """Statistics against the exact ones; y at each channel's first value (pattern -3, i = 0)
    and last value (i = n - 1). first(c) and last(c) read y there."""
    for c in range(len(mean)):
        m, v = exact_stats(n, c)
        assert abs(float(mean[c]) - float(m)) <= 1e-6 * abs(float(m)) + 1e-6
        inv = 1 / np.sqrt(float(v) + 1e-5)
        assert abs(float(invstd[c]) - inv) <= 1e-6 * inv
        for got, value in ((first(c), -3), (last(c), (n - 1) % 7 - 3)):
            want = (c * 1000 + value - float(m)) * inv
            assert abs(float(got) - want) <= 1e-5 * max(1.0, abs(want))


def test_channels_first_over_2_31_values():
    n_per = LENGTH // 2
    x = np.empty((2, 8, n_per), np.float32)              # 2 x 8 x 2**27+4: 2**31 + 64 values
    base = pattern(LENGTH)
    for c in range(8):
        x[0, c] = base[:n_per] + c * 1000
        x[1, c] = base[n_per:] + c * 1000
    del base
    assert x.size > 2**31
    _, mean, invstd = fastbn.batch_norm_train(x, out=x)
    check(mean, invstd, lambda c: x[0, c, 0], lambda c: x[1, c, -1], LENGTH)


def test_channels_last_over_2_31_values():
    x = np.empty((LENGTH, 8), np.float32)                # 2**31 + 64 values, channels last
    base = pattern(LENGTH)
    for c in range(8):
        x[:, c] = base + c * 1000
    del base
    assert x.size > 2**31
    _, mean, invstd = fastbn.batch_norm_train(x, axis=-1, out=x)
    check(mean, invstd, lambda c: x[0, c], lambda c: x[-1, c], LENGTH)
