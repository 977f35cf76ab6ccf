"""Shared helpers: test data, the tolerance rule, and the shapes that reach every kernel path."""
import zlib

import numpy as np
import pytest

import fastbn
from fastbn import _kernels

# Accuracy targets (docs/architecture.md, "Numerics"), relative to max(1, max|reference|)
TOL_Y = {np.float32: 1e-6, np.float64: 1e-12}
TOL_GRAD = {np.float32: 1e-5, np.float64: 1e-12}
# statistics, relative per element
TOL_STAT = {np.float32: 1e-6, np.float64: 1e-13}

DTYPES = [np.float32, np.float64]

# (shape, axis): ranks 2-5, channels first / last / elsewhere, C = 1, C = 3, two values per
# channel, primes, sizes that are not multiples of any SIMD width, runs longer than a block.
SMALL_CASES = [
    ((7, 3), 1),
    ((2, 1), 1),
    ((5, 4, 9), 1),
    ((3, 5, 7, 11), 1),
    ((2, 3, 4, 5, 6), 1),
    ((3, 7, 11, 5), -1),
    ((2, 4, 5, 3, 6), -1),
    ((4, 6, 5, 3), 2),
    ((3, 4, 5), 0),
    ((8, 1, 5, 5), 1),
    ((13, 17, 19), 1),
    ((2, 3, 2053), 1),
    ((1, 5, 4099), 1),
    ((2, 5, 1, 1), 1),
    ((1, 2, 7), 2),
    ((31, 2, 3), -1),
]

# Large enough for the parallel path (above the serial threshold); chosen so that together they
# cover both kernel families, with channels in one chunk and split into several chunks.
PARALLEL_CASES = [
    ((4, 3, 128, 128), 1),     # channels-first, few channels: chunks split per channel
    ((4, 80, 32, 32), 1),      # channels-first, many channels: one chunk per channel, fused
    ((8, 64, 64, 8), -1),      # channels-last, many row chunks
    ((3, 2, 5, 4099), 1),      # channels-first, runs longer than a statistics block
    ((40000, 3), 1),           # (N, C) with few channels: channels-last family
    ((131072, 32), 1),         # 16 MiB and more: channels-last kernels in streaming mode
]


def canonical(shape, axis):
    axis = axis % len(shape)
    outer = int(np.prod(shape[:axis]))
    inner = int(np.prod(shape[axis + 1:]))
    return outer, shape[axis], inner


def make_input(shape, axis, dtype, rng, offset=0.0):
    """Normal data with a different spread per channel, centred `offset` spreads from zero."""
    axis = axis % len(shape)
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    spread = rng.uniform(0.5, 2.0, C).reshape(bshape)
    sign = rng.choice([-1.0, 1.0], C).reshape(bshape)
    centre = sign * (offset * spread + rng.uniform(-1, 1, C).reshape(bshape))
    return (centre + spread * rng.standard_normal(shape)).astype(dtype)


def make_params(C, dtype, rng):
    weight = rng.uniform(0.5, 1.5, C).astype(dtype) * rng.choice([-1, 1], C).astype(dtype)
    bias = rng.standard_normal(C).astype(dtype)
    return weight, bias


def assert_close(actual, expected, tol, what=""):
    """|actual - expected| <= tol * max(1, max|expected|), elementwise."""
    expected = np.asarray(expected, dtype=np.longdouble)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    err = float(np.max(np.abs(np.asarray(actual, dtype=np.longdouble) - expected))) if expected.size else 0.0
    assert actual.shape == expected.shape, what
    assert err <= tol * scale, f"{what}: error {err:.3g} > {tol:.1g} * {scale:.3g}"


def assert_rel(actual, expected, tol, what=""):
    """|actual - expected| <= tol * |expected|, elementwise."""
    expected = np.asarray(expected, dtype=np.longdouble)
    err = np.abs(np.asarray(actual, dtype=np.longdouble) - expected)
    bad = err > tol * np.abs(expected)
    assert not bad.any(), f"{what}: relative error {float(np.max(err / np.abs(expected))):.3g} > {tol:.1g}"


@pytest.fixture
def rng(request):
    # a seed per test, stable across runs
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def threads():
    """Restores the thread setting after a test that changes it."""
    yield fastbn.set_num_threads
    fastbn.set_num_threads(None)


def plan(shape, axis, dtype=np.float32):
    return _kernels.plan(*canonical(shape, axis), np.dtype(dtype).itemsize)
