"""GroupNorm and InstanceNorm (fastbn/_groups.py): against fastbn.reference (extended
precision) and, where it is installed, PyTorch; accuracy far from zero in both layouts,
the same bits for any thread count, strides, out= and in place, fusion, bad input, half
precision, and the layers."""
import numpy as np
import pytest

import fastbn
import fastbn.reference as ref
from conftest import TOL_GRAD, TOL_STAT, TOL_Y, assert_close, assert_rel, make_params

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")

DTYPES = [np.float32, np.float64]

# (shape, axis, num_groups): ranks 2-5, channels first and last, one group, groups of one
# channel (InstanceNorm's units), odd channels per group, one sample, one value per channel
CASES = [
    ((7, 6), 1, 3),
    ((5, 6, 9), 1, 2),
    ((3, 6, 5, 7), 1, 6),
    ((2, 9, 3, 4, 5), 1, 3),
    ((4, 8, 2053), 1, 1),
    ((1, 4, 6, 6), 1, 2),
    ((4, 5, 7, 6), -1, 2),
    ((3, 4, 5, 9), -1, 3),
    ((2, 3, 4, 5, 6), -1, 6),
    ((5, 11, 4), -1, 1),
    ((1, 7, 6), -1, 3),
    ((6, 4, 1, 1), 1, 2),
]


def make_data(shape, axis, dtype, rng, offset=0.0):
    """Normal data about offset (the same for every channel, so a group's spread is its
    values' spread), a spread per channel."""
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    spread = rng.uniform(0.5, 2.0, shape[axis]).reshape(bshape)
    return (offset + spread * rng.standard_normal(shape)).astype(dtype)


def check_group_norm(x, G, axis, rng, weight=None, bias=None, dy=None, tol_y=None,
                     tol_grad=None):
    """fastbn's forward and backward against the reference's."""
    dtype = x.dtype.type
    y, mean, invstd = fastbn.group_norm_train(x, G, weight, bias, axis=axis)
    y_ref, mean_ref, invstd_ref = ref.group_norm_train(x, G, weight, bias, axis=axis)
    assert mean.shape == invstd.shape == (x.shape[0], G)
    assert y.dtype == x.dtype and mean.dtype == invstd.dtype == x.dtype
    assert_close(y, y_ref, tol_y or TOL_Y[dtype], "y")
    assert_rel(mean, mean_ref, TOL_STAT[dtype], "mean")
    assert_rel(invstd, invstd_ref, TOL_STAT[dtype], "invstd")
    if dy is None:
        dy = rng.standard_normal(x.shape).astype(dtype)
    got = fastbn.group_norm_backward(dy, x, mean, invstd, weight, num_groups=G, axis=axis)
    want = ref.group_norm_backward(dy, x, mean, invstd, weight, num_groups=G, axis=axis)
    for g, w, what in zip(got, want, ("dx", "dweight", "dbias")):
        assert g.dtype == x.dtype
        assert_close(g, w, tol_grad or TOL_GRAD[dtype], what)
    return y, mean, invstd, got


# ----------------------------------------------------------------------------- the reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,G", CASES)
def test_group_norm_matches_reference(shape, axis, G, dtype, rng):
    x = make_data(shape, axis, dtype, rng, offset=3.0)
    weight, bias = make_params(shape[axis], dtype, rng)
    check_group_norm(x, G, axis, rng, weight, bias)


@pytest.mark.parametrize("shape,axis,G", [((5, 6, 9), 1, 3), ((4, 5, 7, 6), -1, 2)])
def test_without_affine_and_group_norm_shorthand(shape, axis, G, rng):
    x = make_data(shape, axis, np.float64, rng)
    check_group_norm(x, G, axis, rng)
    np.testing.assert_array_equal(fastbn.group_norm(x, G, axis=axis),
                                  fastbn.group_norm_train(x, G, axis=axis)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((4, 6, 5, 7), 1), ((3, 5, 4, 6), -1), ((2, 3, 9), 1)])
def test_instance_norm_matches_reference_and_updates_running_statistics(shape, axis, dtype,
                                                                        rng):
    x = make_data(shape, axis, dtype, rng, offset=2.0)
    C = shape[axis]
    weight, bias = make_params(C, dtype, rng)
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(1, 2, C).astype(dtype)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    y, mean, invstd = fastbn.instance_norm_train(x, weight, bias, axis=axis, running_mean=rm,
                                                 running_var=rv, momentum=0.3)
    y_ref, mean_ref, invstd_ref = ref.instance_norm_train(
        x, weight, bias, axis=axis, running_mean=rm_ref, running_var=rv_ref, momentum=0.3)
    assert mean.shape == (shape[0], C)
    assert_close(y, y_ref, TOL_Y[dtype], "y")
    assert_rel(invstd, invstd_ref, TOL_STAT[dtype], "invstd")
    assert_rel(rm, rm_ref, TOL_STAT[dtype], "running_mean")
    assert_rel(rv, rv_ref, TOL_STAT[dtype], "running_var")
    # instance norm is group norm with one channel per group
    np.testing.assert_array_equal(y, fastbn.group_norm_train(x, C, weight, bias, axis=axis)[0])
    dy = rng.standard_normal(shape).astype(dtype)
    got = fastbn.instance_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    want = ref.instance_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    for g, w, what in zip(got, want, ("dx", "dweight", "dbias")):
        assert_close(g, w, TOL_GRAD[dtype], what)
    # running statistics instead of the input's
    y = fastbn.instance_norm(x, rm, rv, weight, bias, use_input_stats=False, axis=axis)
    assert_close(y, ref.instance_norm(x, rm, rv, weight, bias, use_input_stats=False,
                                      axis=axis), TOL_Y[dtype], "y (running statistics)")


# ------------------------------------------------------------------------------ accuracy

@pytest.mark.skipif(np.finfo(np.longdouble).nmant < 63,
                    reason="the oracle needs an 80-bit long double")
@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,G", [((8, 16, 12, 12), 1, 4), ((8, 12, 12, 16), -1, 4),
                                          ((64, 8), 1, 2), ((4, 9, 9, 6), -1, 6),
                                          ((4, 6, 9, 9), 1, 6)])
def test_far_from_zero(shape, axis, G, dtype, offset, rng):
    """Data offset/sd from zero, in both layouts, and a dy far from zero as well: the
    statistics come from the kernels' shifted sums and Chan merges (docs: 'Numerics')."""
    x = make_data(shape, axis, dtype, rng, offset=offset)
    weight, bias = make_params(shape[axis], dtype, rng)
    check_group_norm(x, G, axis, rng, weight, bias)
    dy = (offset + rng.standard_normal(shape)).astype(dtype)
    check_group_norm(x, G, axis, rng, weight, bias, dy=dy)


# ------------------------------------------------------------------------ determinism

@pytest.mark.parametrize("shape,axis,G", [((4, 16, 64, 64), 1, 4), ((4, 64, 64, 16), -1, 8),
                                          ((2, 4, 200, 200), 1, 4)])
def test_same_bits_for_one_and_two_threads(shape, axis, G, rng, threads):
    x = make_data(shape, axis, np.float32, rng, offset=10.0)
    weight, bias = make_params(shape[axis], np.float32, rng)
    dy = rng.standard_normal(shape).astype(np.float32)
    results = []
    for n in (1, 2):
        threads(n)
        y, mean, invstd = fastbn.group_norm_train(x, G, weight, bias, axis=axis)
        results.append((y, mean, invstd) + fastbn.group_norm_backward(
            dy, x, mean, invstd, weight, num_groups=G, axis=axis))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------- layouts, strides, out=

def _layouts(rng):
    """(x, axis): arrays that are not C-contiguous, each with its C-ordered equal."""
    nchw = make_data((4, 6, 5, 7), 1, np.float64, rng)
    base = make_data((6, 4, 35), 1, np.float64, rng)
    return [
        (np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2), 1),  # NHWC mem
        (nchw[:, :, ::2, ::-1], 1),                              # strided, reversed spatially
        (base.transpose(1, 0, 2), 1),                            # samples not outermost
        (nchw[::-1], 1),                                         # samples reversed
        (np.ascontiguousarray(nchw.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3), 1),
        (np.ascontiguousarray(nchw.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3), 1),
        (np.asfortranarray(nchw), 1),
        (nchw.transpose(0, 2, 3, 1)[:, ::2], -1),                # channels last, strided
        (np.ascontiguousarray(nchw).transpose(0, 2, 3, 1), -1),  # channels last, NCHW memory
    ]


def test_any_strides_give_the_results_of_c_order(rng):
    for x, axis in _layouts(rng):
        dense = np.ascontiguousarray(x)
        dy = rng.standard_normal(x.shape)
        weight, bias = make_params(x.shape[axis], np.float64, rng)
        y, mean, invstd = fastbn.group_norm_train(x, 2, weight, bias, axis=axis)
        want = fastbn.group_norm_train(dense, 2, weight, bias, axis=axis)
        for g, w in zip((y, mean, invstd), want):
            assert_close(g, w, 1e-13)
        got = fastbn.group_norm_backward(dy[..., ::1], x, mean, invstd, weight, num_groups=2,
                                         axis=axis)
        want = fastbn.group_norm_backward(dy, dense, mean, invstd, weight, num_groups=2,
                                          axis=axis)
        for g, w in zip(got, want):
            assert_close(g, w, 1e-13)
        in_place = np.empty_like(x)         # x's axis order (empty_like keeps it)
        in_place[...] = x
        assert fastbn.group_norm(in_place, 2, weight, bias, axis=axis, out=in_place) is in_place
        assert_close(in_place, y, 1e-13)


def test_out_and_in_place(rng):
    for axis, shape in ((1, (3, 6, 4, 5)), (-1, (3, 4, 5, 6))):
        x = make_data(shape, axis, np.float32, rng)
        dy = rng.standard_normal(shape).astype(np.float32)
        y, mean, invstd = fastbn.group_norm_train(x, 3, axis=axis)
        dx = fastbn.group_norm_backward(dy, x, mean, invstd, num_groups=3, axis=axis)[0]
        out = np.empty_like(x)
        assert fastbn.group_norm_train(x, 3, axis=axis, out=out)[0] is out
        np.testing.assert_array_equal(out, y)
        xt = np.asfortranarray(x)           # out in another memory order than x
        out = np.zeros_like(x)
        assert fastbn.group_norm(xt, 3, axis=axis, out=out) is out
        np.testing.assert_array_equal(out, y)
        dy_in_place = dy.copy()             # dx over dy
        assert fastbn.group_norm_backward(dy_in_place, x, mean, invstd, num_groups=3, axis=axis,
                                          out=dy_in_place)[0] is dy_in_place
        np.testing.assert_array_equal(dy_in_place, dx)
        x_in_place = x.copy()               # dx over x, then y over x
        fastbn.group_norm_backward(dy, x_in_place, mean, invstd, num_groups=3, axis=axis,
                                   out=x_in_place)
        np.testing.assert_array_equal(x_in_place, dx)
        x_in_place = x.copy()
        assert fastbn.group_norm(x_in_place, 3, axis=axis, out=x_in_place) is x_in_place
        np.testing.assert_array_equal(x_in_place, y)
        half_overlap = np.concatenate([x, x])   # out overlapping x another way
        fastbn.group_norm(half_overlap[1:1 + shape[0]], 3, axis=axis,
                          out=half_overlap[:shape[0]])
        np.testing.assert_array_equal(half_overlap[:shape[0]],
                                      fastbn.group_norm(np.concatenate([x, x])[1:1 + shape[0]],
                                                        3, axis=axis))


def test_empty_batch(rng):
    x = np.empty((0, 6, 4), np.float32)
    y, mean, invstd = fastbn.group_norm_train(x, 3)
    assert y.shape == x.shape and mean.shape == (0, 3)
    dx, dweight, dbias = fastbn.group_norm_backward(x, x, mean, invstd, num_groups=3)
    assert dx.shape == x.shape and not dweight.any() and not dbias.any()
    y, mean, _ = fastbn.group_norm_train(np.empty((2, 6, 0), np.float32), 3)
    assert np.isnan(mean).all() and mean.shape == (2, 3)


# ---------------------------------------------------------------------------------- fusion

@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh"])
@pytest.mark.parametrize("shape,axis", [((3, 6, 5, 7), 1), ((3, 5, 7, 6), -1)])
def test_fused_epilogue(shape, axis, activation, rng):
    x = make_data(shape, axis, np.float64, rng, offset=1.0)
    residual = rng.standard_normal(shape)
    weight, bias = make_params(shape[axis], np.float64, rng)
    fuse = dict(activation=activation, negative_slope=0.2)
    y, mean, invstd = fastbn.group_norm_train(x, 3, weight, bias, axis=axis, residual=residual,
                                              **fuse)
    y_ref = ref.group_norm_train(x, 3, weight, bias, axis=axis, residual=residual, **fuse)[0]
    assert_close(y, y_ref, 1e-12, "y")
    dy = rng.standard_normal(shape)
    out_residual = np.empty_like(x)
    got = fastbn.group_norm_backward(dy, x, mean, invstd, weight, num_groups=3, axis=axis, y=y,
                                     out_residual=out_residual, **fuse)
    want_residual = np.empty_like(x)
    want = ref.group_norm_backward(dy, x, mean, invstd, weight, num_groups=3, axis=axis, y=y,
                                   out_residual=want_residual, **fuse)
    assert_close(out_residual, want_residual, 1e-12, "out_residual")
    for g, w, what in zip(got, want, ("dx", "dweight", "dbias")):
        assert_close(g, w, 1e-12, what)
    yi = fastbn.instance_norm_train(x, weight, bias, axis=axis, residual=residual, **fuse)[0]
    assert_close(yi, ref.instance_norm_train(x, weight, bias, axis=axis, residual=residual,
                                             **fuse)[0], 1e-12, "instance norm y")


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("call,error,message", [
    (lambda x, s: fastbn.group_norm(x, 4), ValueError, "divisible by num_groups"),
    (lambda x, s: fastbn.group_norm(x, 2.0), TypeError, "num_groups must be an int"),
    (lambda x, s: fastbn.group_norm(x, 0), ValueError, "num_groups must be positive"),
    (lambda x, s: fastbn.group_norm(x, 2, axis=0), ValueError, "axis must be 1"),
    (lambda x, s: fastbn.group_norm(x.astype(np.int32), 2), TypeError, "x must have dtype"),
    (lambda x, s: fastbn.group_norm(x, 2, np.ones(5, np.float32)), ValueError, "weight"),
    (lambda x, s: fastbn.group_norm(x, 2, eps=-1.0), ValueError, "eps"),
    (lambda x, s: fastbn.group_norm(x, 2, activation="gelu"), ValueError, "gelu"),
    (lambda x, s: fastbn.group_norm(x, 2, residual=x[:1]), ValueError, "residual"),
    (lambda x, s: fastbn.group_norm_backward(x, x, s[0][:, :1], s[1], num_groups=2),
     ValueError, "mean must have shape (4, 2)"),
    (lambda x, s: fastbn.group_norm_backward(x, x, None, s[1], num_groups=2), TypeError,
     "mean and invstd are required"),
    (lambda x, s: fastbn.group_norm_backward(x, x, s[0], s[1], num_groups=3), ValueError,
     "mean must have shape (4, 3)"),
    (lambda x, s: fastbn.group_norm_backward(x[:2], x, s[0], s[1], num_groups=2), ValueError,
     "dy must have the shape of x"),
    (lambda x, s: fastbn.instance_norm(x[..., :1], axis=1), ValueError,
     "Expected more than 1 value"),
    (lambda x, s: fastbn.instance_norm(x, np.zeros(6, np.float32), None), ValueError,
     "given together"),
    (lambda x, s: fastbn.instance_norm(x, None, None, use_input_stats=False), ValueError,
     "running_mean and running_var are required"),
])
def test_bad_arguments_are_rejected_before_anything_is_written(call, error, message, rng):
    x = make_data((4, 6, 5), 1, np.float32, rng)
    stats = fastbn.group_norm_train(x, 2)[1:]
    before = x.copy()
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(x, stats)
    np.testing.assert_array_equal(x, before)


def test_out_and_running_statistics_untouched_by_a_failed_call(rng):
    x = make_data((4, 6, 5), 1, np.float32, rng)
    out = np.full_like(x, 7.0)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    with pytest.raises(TypeError):
        fastbn.instance_norm_train(x, np.ones(6, np.float32), bias="no", running_mean=rm,
                                   running_var=rv, out=out)
    with pytest.raises(ValueError):
        fastbn.group_norm_train(x, 4, out=out)
    assert (out == 7).all() and not rm.any() and (rv == 1).all()
    with pytest.raises(ValueError, match="read-only"):
        out.flags.writeable = False
        fastbn.group_norm(x, 2, out=out)


# ------------------------------------------------------------------------- half precision

@pytest.mark.parametrize("name", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape,axis", [((4, 6, 9, 9), 1), ((4, 9, 9, 6), -1)])
def test_half_precision(shape, axis, name, rng):
    """Outputs of x's dtype within about one of its ulps of the reference rounded once;
    statistics and parameter gradients in float32."""
    dtype = np.dtype(np.float16 if name == "float16"
                     else pytest.importorskip("ml_dtypes").bfloat16)
    ulp = 2.0 ** -10 if dtype == np.float16 else 2.0 ** -7
    x = (rng.standard_normal(shape) * 2 + 5).astype(np.float32).astype(dtype)
    dy = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    weight, bias = make_params(shape[axis], np.float32, rng)
    y, mean, invstd = fastbn.group_norm_train(x, 3, weight, bias, axis=axis)
    assert y.dtype == dtype and mean.dtype == invstd.dtype == np.float32
    y_ref, mean_ref, invstd_ref = ref.group_norm_train(x, 3, weight, bias, axis=axis)
    assert_close(y.astype(np.float32), y_ref.astype(np.float32), 2 * ulp, "y")
    assert_rel(invstd, invstd_ref, 1e-6, "invstd")
    got = fastbn.group_norm_backward(dy, x, mean, invstd, weight, num_groups=3, axis=axis)
    want = ref.group_norm_backward(dy, x, mean, invstd, weight, num_groups=3, axis=axis)
    assert got[0].dtype == dtype and got[1].dtype == np.float32
    assert_close(got[0].astype(np.float32), want[0].astype(np.float32), 2 * ulp, "dx")
    for g, w, what in zip(got[1:], want[1:], ("dweight", "dbias")):
        assert_close(g, w, 1e-5, what)


# ------------------------------------------------------------------------------- PyTorch

def _torch_in(x, axis):
    """x as torch's NC... tensor: channels-last arrays as torch's channels_last format."""
    t = torch.from_numpy(x)
    return t.permute(0, x.ndim - 1, *range(1, x.ndim - 1)) if axis == -1 and x.ndim > 2 else t


def _numpy_out(t, axis):
    a = t.detach().numpy()
    return np.moveaxis(a, 1, -1) if axis == -1 and a.ndim > 2 else a


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,G", [((5, 6, 9), 1, 2), ((3, 6, 5, 7), 1, 6),
                                          ((2, 9, 3, 4, 5), 1, 3), ((4, 5, 7, 6), -1, 3),
                                          ((2, 3, 4, 5, 6), -1, 2), ((7, 6), 1, 3)])
def test_group_norm_against_torch(shape, axis, G, dtype, rng):
    x = make_data(shape, axis, dtype, rng, offset=1.0)
    weight, bias = make_params(shape[axis], dtype, rng)
    dy = rng.standard_normal(shape).astype(dtype)
    xt = _torch_in(x, axis).requires_grad_()
    if axis == -1 and x.ndim == 4:
        assert xt.is_contiguous(memory_format=torch.channels_last)
    wt, bt = (torch.from_numpy(v).requires_grad_() for v in (weight, bias))
    yt = F.group_norm(xt, G, wt, bt, eps=1e-5)
    yt.backward(_torch_in(dy, axis))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    y, mean, invstd = fastbn.group_norm_train(x, G, weight, bias, axis=axis)
    assert_close(y, _numpy_out(yt, axis), tol, "y")
    dx, dweight, dbias = fastbn.group_norm_backward(dy, x, mean, invstd, weight, num_groups=G,
                                                    axis=axis)
    assert_close(dx, _numpy_out(xt.grad, axis), 10 * tol, "dx")
    assert_close(dweight, wt.grad.numpy(), 10 * tol, "dweight")
    assert_close(dbias, bt.grad.numpy(), 10 * tol, "dbias")


@needs_torch
@pytest.mark.parametrize("shape,axis", [((4, 6, 5, 7), 1), ((3, 5, 7, 6), -1), ((2, 3, 9), 1)])
def test_instance_norm_against_torch(shape, axis, rng):
    x = make_data(shape, axis, np.float64, rng, offset=1.0)
    C = shape[axis]
    weight, bias = make_params(C, np.float64, rng)
    rm, rv = rng.standard_normal(C), rng.uniform(1, 2, C)
    rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    xt = _torch_in(x, axis).requires_grad_()
    wt, bt = (torch.from_numpy(v).requires_grad_() for v in (weight, bias))
    yt = F.instance_norm(xt, rmt, rvt, wt, bt, use_input_stats=True, momentum=0.2, eps=1e-5)
    y = fastbn.instance_norm(x, rm, rv, weight, bias, momentum=0.2, axis=axis)
    assert_close(y, _numpy_out(yt, axis), 1e-12, "y")
    assert_close(rm, rmt.numpy(), 1e-13, "running_mean")
    assert_close(rv, rvt.numpy(), 1e-13, "running_var")
    dy = rng.standard_normal(shape)
    yt.backward(_torch_in(dy, axis))
    _, mean, invstd = fastbn.instance_norm_train(x, weight, bias, axis=axis)
    dx, dweight, dbias = fastbn.instance_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    assert_close(dx, _numpy_out(xt.grad, axis), 1e-11, "dx")
    assert_close(dweight, wt.grad.numpy(), 1e-11, "dweight")
    assert_close(dbias, bt.grad.numpy(), 1e-11, "dbias")
    yt = F.instance_norm(_torch_in(x, axis), rmt, rvt, wt, bt, use_input_stats=False)
    y = fastbn.instance_norm(x, rm, rv, weight, bias, use_input_stats=False, axis=axis)
    assert_close(y, _numpy_out(yt, axis), 1e-12, "y (running statistics)")


# --------------------------------------------------------------------------------- layers

def test_group_norm_layer(rng):
    x = make_data((4, 6, 5, 5), 1, np.float64, rng)
    layer = fastbn.GroupNorm(3, 6, dtype=np.float64)
    assert sorted(layer.state_dict()) == ["bias", "weight"]
    weight, bias = make_params(6, np.float64, rng)
    layer.load_state_dict({"weight": weight, "bias": bias})
    y = layer(x)
    y_ref, mean, invstd = ref.group_norm_train(x, 3, weight, bias)
    assert_close(y, y_ref, 1e-12)
    np.testing.assert_array_equal(layer.eval()(x), y)        # no running statistics
    dy = rng.standard_normal(x.shape)
    dx = layer.backward(dy)
    want = ref.group_norm_backward(dy, x, mean, invstd, weight, num_groups=3)
    for g, w in zip((dx, layer.grad_weight, layer.grad_bias), want):
        assert_close(g, w, 1e-12)
    fused = fastbn.GroupNorm(3, 6, dtype=np.float64, axis=-1, activation="relu")
    x_last, residual = np.moveaxis(x, 1, -1), rng.standard_normal((4, 5, 5, 6))
    y = fused(x_last, residual)
    assert_close(y, ref.group_norm(x_last, 3, fused.weight, fused.bias, axis=-1,
                                   residual=residual, activation="relu"), 1e-12)
    fused.backward(dy[:, 0, :, :, None] * np.ones(6))
    assert fused.grad_residual.shape == x_last.shape and fused.grad_weight.shape == (6,)
    assert fastbn.GroupNorm(2, 4, affine=False).state_dict() == {}
    with pytest.raises(ValueError, match="divisible"):
        fastbn.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="channels"):
        fastbn.GroupNorm(2, 6)(np.zeros((2, 4, 3), np.float32))


def test_instance_norm_layer(rng):
    x = make_data((4, 5, 6, 6), -1, np.float32, rng)
    layer = fastbn.InstanceNorm(6, affine=True, track_running_stats=True, axis=-1)
    assert sorted(layer.state_dict()) == ["bias", "num_batches_tracked", "running_mean",
                                          "running_var", "weight"]
    y = layer(x)
    assert_close(y, ref.instance_norm_train(x, layer.weight, layer.bias, axis=-1)[0], 1e-6)
    assert layer.num_batches_tracked == 0 and layer.running_mean.any()
    layer.backward(rng.standard_normal(x.shape).astype(np.float32))
    assert layer.grad_weight.shape == (6,)
    y_eval = layer.eval()(x)
    assert_close(y_eval, ref.batch_norm_infer(x, layer.running_mean, layer.running_var,
                                              layer.weight, layer.bias, axis=-1), 1e-6)
    plain = fastbn.InstanceNorm(6, axis=-1).eval()        # no running statistics: the input's
    assert plain.state_dict() == {}
    assert_close(plain(x), ref.instance_norm_train(x, axis=-1)[0], 1e-6)



def test_group_norm_layer_save_load(tmp_path, rng):
    """GroupNorm's save / load (BatchNorm's, to .npz) round-trip its parameters."""
    layer = fastbn.GroupNorm(2, 4)
    layer.weight[:] = rng.standard_normal(4)
    layer.bias[:] = rng.standard_normal(4)
    layer.save(tmp_path / "gn.npz")
    other = fastbn.GroupNorm(2, 4)
    other.load(tmp_path / "gn.npz")
    assert np.array_equal(other.weight, layer.weight)
    assert np.array_equal(other.bias, layer.bias)

@needs_torch
def test_layers_reproduce_torch_from_its_state_dict(rng):
    x = make_data((4, 6, 5, 5), 1, np.float32, rng, offset=1.0)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for theirs, ours in (
            (torch.nn.GroupNorm(3, 6), fastbn.GroupNorm(3, 6)),
            (torch.nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
             fastbn.InstanceNorm(6, affine=True, track_running_stats=True))):
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
        ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
        for _ in range(2):
            xt = torch.from_numpy(x).requires_grad_()
            yt = theirs(xt)
            yt.backward(torch.from_numpy(dy))
            assert_close(ours(x), yt.detach().numpy(), 1e-5, "y")
            assert_close(ours.backward(dy), xt.grad.numpy(), 1e-5, "dx")
            assert_close(ours.grad_weight, theirs.weight.grad.numpy(), 1e-5, "grad_weight")
            theirs.weight.grad = theirs.bias.grad = None
        for k, v in theirs.state_dict().items():
            assert_close(ours.state_dict()[k], v.numpy(), 1e-6, k)
        theirs.eval()
        ours.eval()
        assert_close(ours(x), theirs(torch.from_numpy(x)).detach().numpy(), 1e-5, "eval y")
