"""Any strides: views, transposes, Fortran order, negative strides; out= and in place."""
import numpy as np
import pytest

import fastbn
import fastbn.reference as ref
from conftest import DTYPES, TOL_GRAD, TOL_Y, assert_close, make_input, make_params


def views(base):
    """(name, view, axis) of a (4, 6, 10, 8) base, with the channel axis of size 6 or 8."""
    return [
        ("sliced", base[:, :, ::2, 1:], 1),
        ("nhwc_as_nchw", base.transpose(0, 3, 1, 2), 1),        # torch's channels_last
        ("fortran", np.asfortranarray(base), 1),
        ("reversed", base[::-1, :, :, ::-1], 1),
        ("reversed_channels", base[:, ::-1], 1),
        ("channels_last_view", base.transpose(0, 2, 3, 1), -1),
        ("every_other_channel", base[:, ::2], 1),
        ("broadcast", np.broadcast_to(base[:1], base.shape), 1),
        ("axis2", base.transpose(2, 0, 1, 3), 2),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", [v[0] for v in views(np.zeros((4, 6, 10, 8)))])
def test_strided_inputs(name, dtype, rng):
    base = make_input((4, 6, 10, 8), 1, dtype, rng, offset=2.0)
    _, x, axis = next(v for v in views(base) if v[0] == name)
    C = x.shape[axis]
    weight, bias = make_params(C, dtype, rng)
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis)
    y_ref, _, _ = ref.batch_norm_train(x, weight, bias, axis=axis)
    assert_close(y, y_ref, TOL_Y[dtype], "train")
    assert_close(fastbn.batch_norm_infer(x, mean, 1 / invstd**2, axis=axis, eps=0),
                 ref.batch_norm_infer(x, mean, 1 / invstd**2, axis=axis, eps=0), TOL_Y[dtype],
                 "infer")
    dy = np.ascontiguousarray(rng.standard_normal(x.shape).astype(dtype)[..., ::-1])[..., ::-1]
    grads = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    for got, want in zip(grads, ref.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)):
        assert_close(got, want, TOL_GRAD[dtype], "backward")


def test_output_keeps_the_memory_layout_of_x(rng):
    nhwc = make_input((2, 5, 7, 3), -1, np.float32, rng)
    x = nhwc.transpose(0, 3, 1, 2)                       # NCHW shape, NHWC memory
    y = fastbn.batch_norm_train(x)[0]
    assert y.strides == x.strides
    y = fastbn.batch_norm_infer(x[:, :, ::-1], np.zeros(3, np.float32), np.ones(3, np.float32))
    assert y.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_out_argument(dtype, layout, rng):
    x = make_input((5, 4, 6, 7), 1, dtype, rng)
    if layout == "C":
        out = np.empty_like(x)
    elif layout == "F":
        out = np.asfortranarray(np.empty_like(x))
    else:
        out = np.empty((5, 4, 12, 7), dtype)[:, :, ::2]
    y, mean, invstd = fastbn.batch_norm_train(x, out=out)
    assert y is out
    assert_close(out, ref.batch_norm_train(x)[0], TOL_Y[dtype])
    out[...] = 0
    assert fastbn.batch_norm_infer(x, mean, 1 / invstd**2, eps=0, out=out) is out
    assert_close(out, ref.batch_norm_infer(x, mean, 1 / invstd**2, eps=0), TOL_Y[dtype])
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, out=out)
    assert dx is out
    assert_close(out, ref.batch_norm_backward(dy, x, mean, invstd)[0], TOL_GRAD[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((4, 80, 32, 32), 1), ((4, 3, 128, 128), 1),
                                        ((8, 64, 64, 8), -1), ((5, 3, 7), 1), ((6, 5), -1)])
def test_in_place(shape, axis, dtype, rng):
    x = make_input(shape, axis, dtype, rng, offset=5.0)
    x0 = x.copy()
    y_ref, mean_ref, invstd_ref = ref.batch_norm_train(x0, axis=axis)
    y, mean, invstd = fastbn.batch_norm_train(x, axis=axis, out=x)
    assert y is x
    assert_close(x, y_ref, TOL_Y[dtype], "train in place")

    x = x0.copy()
    fastbn.batch_norm_infer(x, mean, 1 / invstd**2, eps=0, axis=axis, out=x)
    assert_close(x, ref.batch_norm_infer(x0, mean, 1 / invstd**2, eps=0, axis=axis),
                 TOL_Y[dtype], "infer in place")

    dy = rng.standard_normal(shape).astype(dtype)
    want = ref.batch_norm_backward(dy, x0, mean, invstd, axis=axis)[0]
    dy_copy = dy.copy()
    fastbn.batch_norm_backward(dy_copy, x0, mean, invstd, axis=axis, out=dy_copy)
    assert_close(dy_copy, want, TOL_GRAD[dtype], "backward into dy")
    x = x0.copy()
    fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, out=x)
    assert_close(x, want, TOL_GRAD[dtype], "backward into x")


def test_out_overlapping_the_input_shifted(rng):
    """out overlaps x without being x: the result is still right."""
    buf = make_input((9, 3, 5), 1, np.float64, rng)
    x, out = buf[:-1], buf[1:]
    want = ref.batch_norm_train(x.copy())[0]
    fastbn.batch_norm_train(x, out=out)
    assert_close(buf[1:], want, TOL_Y[np.float64])
