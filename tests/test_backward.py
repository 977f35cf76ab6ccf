"""Backward pass against fastbn.reference on every kernel path, and by finite differences."""
import numpy as np
import pytest

import fastbn
import fastbn.reference as ref
from conftest import (DTYPES, PARALLEL_CASES, SMALL_CASES, TOL_GRAD, assert_close, make_input,
                      make_params)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SMALL_CASES + PARALLEL_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_backward_matches_reference(shape, axis, dtype, affine, rng):
    x = make_input(shape, axis, dtype, rng, offset=3.0)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = make_params(shape[axis], dtype, rng)[0] if affine else None
    _, mean, invstd = fastbn.batch_norm_train(x, weight, axis=axis)
    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    dx_ref, dweight_ref, dbias_ref = ref.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    assert dx.dtype == dweight.dtype == dbias.dtype == dtype
    assert_close(dx, dx_ref, TOL_GRAD[dtype], "dx")
    assert_close(dweight, dweight_ref, TOL_GRAD[dtype], "dweight")
    assert_close(dbias, dbias_ref, TOL_GRAD[dtype], "dbias")


@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((6, 2, 3, 4), -1), ((5, 4), 1)])
def test_backward_by_finite_differences(shape, axis, rng):
    """Central differences of L = sum(y * g) in float64, for x, weight and bias."""
    x = make_input(shape, axis, np.float64, rng, offset=1.0)
    weight, bias = make_params(shape[axis], np.float64, rng)
    g = rng.standard_normal(shape)

    def loss(x_, w_, b_):
        return float(np.sum(fastbn.batch_norm_train(x_, w_, b_, axis=axis, eps=1e-3)[0] * g))

    _, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis, eps=1e-3)
    dx, dweight, dbias = fastbn.batch_norm_backward(g, x, mean, invstd, weight, axis=axis)

    h = 1e-6
    def numeric(arr, args_for):
        grad = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[i] += h
            minus[i] -= h
            grad[i] = (loss(*args_for(plus)) - loss(*args_for(minus))) / (2 * h)
        return grad

    np.testing.assert_allclose(dx, numeric(x, lambda v: (v, weight, bias)), atol=1e-7)
    np.testing.assert_allclose(dweight, numeric(weight, lambda v: (x, v, bias)), atol=1e-7)
    np.testing.assert_allclose(dbias, numeric(bias, lambda v: (x, weight, v)), atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_uses_the_batch_mean_not_its_rounding(dtype, rng):
    """A float32-rounded mean of data far from zero must not cost gradient accuracy."""
    x = make_input((64, 4, 16), 1, dtype, rng, offset=1e5)
    dy = rng.standard_normal(x.shape).astype(dtype) + 1.0   # nonzero sum dy per channel
    _, mean, invstd = fastbn.batch_norm_train(x)
    rounded = mean.astype(np.float32)
    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, rounded, invstd)
    dx_ref, dweight_ref, dbias_ref = ref.batch_norm_backward(dy, x, mean, invstd)
    assert_close(dx, dx_ref, TOL_GRAD[dtype], "dx")
    assert_close(dweight, dweight_ref, TOL_GRAD[dtype], "dweight")
