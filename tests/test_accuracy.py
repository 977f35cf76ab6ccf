"""The accuracy targets (docs/architecture.md, "Numerics") on inputs far from zero, both layouts.

The oracle is fastbn.reference, exact to extended precision relative to the spread of the
data (it centres each channel on one of its values before anything else)."""
import numpy as np
import pytest

import fastbn
import fastbn.reference as ref
from conftest import TOL_GRAD, TOL_STAT, TOL_Y, assert_close, assert_rel, make_input, make_params

pytestmark = pytest.mark.skipif(np.finfo(np.longdouble).nmant < 63,
                                reason="the oracle needs an 80-bit long double")

LAYOUTS = [((16, 8, 24, 24), 1),      # NCHW
           ((16, 24, 24, 8), -1),     # NHWC
           ((8, 3, 64, 64), 1),       # NCHW, few channels: split chunks, parallel
           ((32, 16, 16, 32), -1),    # NHWC, parallel
           ((4000, 6), 1)]            # (N, C)


@pytest.mark.parametrize("offset", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_far_from_zero(shape, axis, dtype, offset, rng):
    x = make_input(shape, axis, dtype, rng, offset=offset)
    C = shape[axis]
    weight, bias = make_params(C, dtype, rng)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis,
                                              running_mean=rm, running_var=rv)
    y_ref, _, invstd_ref = ref.batch_norm_train(x, weight, bias, axis=axis,
                                                running_mean=rm_ref, running_var=rv_ref)
    mean_ref, _ = ref.batch_stats(x, axis)
    assert_close(y, y_ref, TOL_Y[dtype], "y")
    assert_rel(mean, mean_ref, TOL_STAT[dtype], "mean")
    assert_rel(invstd, invstd_ref, TOL_STAT[dtype], "invstd")
    assert_rel(rv, rv_ref, TOL_STAT[dtype], "running_var")
    assert_rel(rm, rm_ref, TOL_STAT[dtype], "running_mean")

    dy = (rng.standard_normal(shape) + 0.5).astype(dtype)
    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    dx_ref, dweight_ref, dbias_ref = ref.batch_norm_backward(dy, x, mean, invstd_ref, weight,
                                                             axis=axis)
    assert_close(dx, dx_ref, TOL_GRAD[dtype], "dx")
    assert_close(dweight, dweight_ref, TOL_GRAD[dtype], "dweight")
    assert_close(dbias, dbias_ref, TOL_GRAD[dtype], "dbias")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_outlier_first_in_block(dtype, rng):
    """A huge value at the start of every block must not spoil the block's variance."""
    x = make_input((8, 2, 4096), 1, dtype, rng, offset=1e3)
    x[:, :, ::2048] += 1e4 * np.sign(x[:, :, ::2048])
    y, mean, invstd = fastbn.batch_norm_train(x)
    y_ref, _, invstd_ref = ref.batch_norm_train(x)
    assert_close(y, y_ref, TOL_Y[dtype], "y")
    assert_rel(invstd, invstd_ref, TOL_STAT[dtype], "invstd")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((64, 2, 4096), 1), ((65536, 4), 1)])
def test_sorted_data(shape, axis, dtype, rng):
    """Each channel's values in increasing order: every block's mean drifts away from the mean
    of the blocks before it (the shift later blocks start from)."""
    x = make_input(shape, axis, dtype, rng, offset=1e4)
    moved = np.moveaxis(x, axis, -1)
    flat = np.sort(moved.reshape(-1, moved.shape[-1]), axis=0)
    x = np.ascontiguousarray(np.moveaxis(flat.reshape(moved.shape), -1, axis))
    y, mean, invstd = fastbn.batch_norm_train(x, axis=axis)
    y_ref, _, invstd_ref = ref.batch_norm_train(x, axis=axis)
    assert_close(y, y_ref, TOL_Y[dtype], "y")
    assert_rel(invstd, invstd_ref, TOL_STAT[dtype], "invstd")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((16, 4, 9), 1), ((64, 4), 1), ((8, 5, 5, 4), -1)])
def test_gradient_of_offset_dy_and_a_mean_far_from_the_data(shape, axis, dtype, rng):
    """dy far from zero (dx needs dy minus its mean), and a saved mean that is not the batch
    mean (the backward recovers the batch mean from x): found by the fuzz harness, where
    dx = k_dy * dy + k_0 cancelled in float32."""
    x = make_input(shape, axis, dtype, rng, offset=1e3)
    dy = (1e6 + rng.standard_normal(shape)).astype(dtype)
    _, mean, invstd = fastbn.batch_norm_train(x, axis=axis)
    foreign_mean = (mean * 0 + 0.25).astype(dtype)
    weight = make_params(shape[axis], dtype, rng)[0]
    want = ref.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    got = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    for g, w, what in zip(got, want, ("dx", "dweight", "dbias")):
        assert_close(g, w, TOL_GRAD[dtype], what)
    # a mean other than the saved one: dx stays exact (it is centred on the recovered mean);
    # the sums lose digits in proportion to |mean - batch mean| / sd, hence the float32 bound
    got = fastbn.batch_norm_backward(dy, x, foreign_mean, invstd, weight, axis=axis)
    assert_close(got[0], want[0], TOL_GRAD[dtype], "dx")
    assert_close(got[1], want[1], TOL_GRAD[np.float32], "dweight")
