"""Hypothesis: random shapes, strides, axes, dtypes and optional arguments against the reference."""
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastbn  # noqa: E402
import fastbn.reference as ref  # noqa: E402
from conftest import TOL_GRAD, TOL_Y, assert_close  # noqa: E402


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    steps = tuple(draw(st.lists(st.sampled_from([1, 1, 2, -1]), min_size=ndim, max_size=ndim)))
    perm = tuple(draw(st.permutations(range(ndim))))
    offset = draw(st.sampled_from([0.0, 10.0, 1e4]))
    return shape, axis, dtype, seed, steps, perm, offset, draw(st.booleans()), draw(st.booleans())


def strided(rng, shape, dtype, steps, perm, offset):
    """An array of `shape` seen through a permuted, sliced view of a bigger buffer."""
    big = [s * abs(st_) for s, st_ in zip(shape, steps)]
    buf_shape = [big[p] for p in perm]
    buf = (offset + rng.standard_normal(buf_shape)).astype(dtype)
    view = buf.transpose(np.argsort(perm))
    return view[tuple(slice(None, None, st_) for st_ in steps)]


@settings(max_examples=300, deadline=None)
@given(cases())
def test_random_layouts(case):
    shape, axis, dtype, seed, steps, perm, offset, affine, use_out = case
    rng = np.random.default_rng(seed)
    x = strided(rng, shape, dtype, steps, perm, offset)
    assert x.shape == shape
    C = shape[axis]
    weight = rng.standard_normal(C).astype(dtype) if affine else None
    bias = rng.standard_normal(C).astype(dtype) if affine else None
    out = strided(rng, shape, dtype, steps[::-1], perm[::-1], 0.0) if use_out else None
    x_before = x.copy()

    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.1, 2.0, C).astype(dtype)
    y = fastbn.batch_norm_infer(x, rm, rv, weight, bias, axis=axis, out=out)
    assert_close(y, ref.batch_norm_infer(x, rm, rv, weight, bias, axis=axis), TOL_Y[dtype])

    assume(x.size // C > 1)   # training needs two values per channel
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis, out=out)
    assert_close(y, ref.batch_norm_train(x, weight, bias, axis=axis)[0], TOL_Y[dtype])
    dy = strided(rng, shape, dtype, steps, perm[::-1], 0.0)
    grads = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis, out=out)
    for got, want in zip(grads, ref.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)):
        assert_close(got, want, TOL_GRAD[dtype])
    np.testing.assert_array_equal(x, x_before)
