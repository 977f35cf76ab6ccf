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


@st.composite
def calls(draw):
    """Shapes with 0- and 1-sized dimensions, and each optional argument present or not."""
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    options = draw(st.fixed_dictionaries({
        "weight": st.booleans(), "bias": st.booleans(), "running": st.booleans(),
        "out": st.booleans(), "eps": st.sampled_from([None, 0.0, 1e-3]),
        "momentum": st.sampled_from([None, 0.0, 0.5, 1.0])}))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return shape, axis, dtype, options, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=300, deadline=None)
@given(calls())
def test_random_arguments(call):
    shape, axis, dtype, opt, seed = call
    rng = np.random.default_rng(seed)
    x = (3.0 + rng.standard_normal(shape)).astype(dtype)
    C = shape[axis]
    count = x.size // C if C else 0
    kw = {}
    if opt["eps"] is not None:
        kw["eps"] = opt["eps"] + 1e-5       # eps = 0 with a constant channel gives inf
    weight = rng.standard_normal(C).astype(dtype) if opt["weight"] else None
    bias = rng.standard_normal(C).astype(dtype) if opt["bias"] else None
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    out = np.full_like(x, 7.0) if opt["out"] else None

    # inference: any shape
    y = fastbn.batch_norm_infer(x, rm, rv, weight, bias, axis=axis, out=out, **kw)
    assert y.shape == x.shape and y.dtype == x.dtype and (out is None or y is out)
    if x.size:
        assert_close(y, ref.batch_norm_infer(x, rm, rv, weight, bias, axis=axis, **kw), TOL_Y[dtype])

    # training
    train_kw = dict(kw, axis=axis, out=out)
    if opt["momentum"] is not None:
        train_kw["momentum"] = opt["momentum"]
    if opt["running"]:
        train_kw.update(running_mean=rm, running_var=rv)
    if count == 1:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            fastbn.batch_norm_train(x, weight, bias, **train_kw)
        np.testing.assert_array_equal(rm, rm0)
        return
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, **train_kw)
    assert mean.shape == invstd.shape == (C,)
    if count == 0:
        np.testing.assert_array_equal(rm, rm0)   # an empty batch leaves them alone
        np.testing.assert_array_equal(rv, rv0)
        return
    ref_kw = dict(kw, axis=axis)
    if opt["momentum"] is not None:
        ref_kw["momentum"] = opt["momentum"]
    if opt["running"]:
        ref_kw.update(running_mean=rm0, running_var=rv0)
    y_ref, _, invstd_ref = ref.batch_norm_train(x, weight, bias, **ref_kw)
    assert_close(y, y_ref, TOL_Y[dtype])
    if opt["running"]:
        assert_close(rm, rm0, TOL_Y[dtype])
        assert_close(rv, rv0, TOL_Y[dtype])

    # backward
    dy = rng.standard_normal(shape).astype(dtype)
    grads = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis, out=out)
    for got, want in zip(grads, ref.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)):
        assert_close(got, want, TOL_GRAD[dtype])
