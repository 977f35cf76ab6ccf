"""LayerNorm and RMSNorm (fastbn/_rows.py on the row kernels, include/fastbn/rows_impl.h):
against fastbn.reference (extended precision) and torch.nn.functional (when installed), over
ranks 2-5 and 1-3 normalized axes; far from zero; any strides, out= and in place; fusion;
the same bits for any thread count; half precision; bad input; the layers."""
import numpy as np
import pytest

import fastbn
from fastbn import reference
from conftest import DTYPES, TOL_GRAD, TOL_STAT, TOL_Y, assert_close, assert_rel

# (x's shape, normalized_shape): ranks 2-5, 1-3 normalized axes, rows shorter than the SIMD
# lanes, longer than a statistics block, odd sizes; the last ones take the parallel path
CASES = [((7, 5), 5), ((3, 1), 1), ((4, 6, 8), (6, 8)), ((2, 3, 4, 5), (3, 4, 5)),
         ((2, 3, 4, 5, 6), (5, 6)), ((3, 2, 5, 7, 3), 3), ((3, 4100), 4100), ((9, 17, 33), 33),
         ((64, 6, 130), 130), ((256, 384), (384,)), ((8, 4, 96, 32), (96, 32))]
NORMS = ["layer", "rms"]


def shape_of(normalized_shape):
    return (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape


def make_rows(shape, normalized_shape, dtype, rng, offset=0.0):
    """Rows of normal data, each with its own spread and a centre `offset` spreads from zero."""
    k = len(shape_of(normalized_shape))
    stats_shape = shape[:len(shape) - k] + (1,) * k
    spread = rng.uniform(0.5, 2.0, stats_shape)
    centre = rng.choice([-1.0, 1.0], stats_shape) * (offset + rng.uniform(-1, 1, stats_shape))
    return (spread * (centre + rng.standard_normal(shape))).astype(dtype)


def make_affine(normalized_shape, dtype, rng):
    shape = shape_of(normalized_shape)
    weight = (rng.uniform(0.5, 1.5, shape) * rng.choice([-1, 1], shape)).astype(dtype)
    return weight, rng.standard_normal(shape).astype(dtype)


def train(norm, x, ns, weight, bias, module=fastbn, **kw):
    """(y, saved statistics as a tuple) of either norm (RMSNorm has no bias)."""
    if norm == "layer":
        y, mean, invstd = module.layer_norm_train(x, ns, weight, bias, **kw)
        return y, (mean, invstd)
    y, invrms = module.rms_norm_train(x, ns, weight, **kw)
    return y, (invrms,)


def backward(norm, dy, x, saved, weight, ns, module=fastbn, **kw):
    """(dx, dweight, dbias or None) of either norm."""
    if norm == "layer":
        return module.layer_norm_backward(dy, x, *saved, weight, normalized_shape=ns, **kw)
    return (*module.rms_norm_backward(dy, x, *saved, weight, normalized_shape=ns, **kw), None)


def check_saved(saved, saved_ref, x, ns, tol):
    """Saved statistics: invstd relative to itself, a mean relative to |mean| + the row's
    standard deviation (a row's mean near zero is known to a fraction of its spread)."""
    for s, s_ref in zip(saved, saved_ref):
        assert s.dtype == s_ref.dtype and s.shape == x.shape[:x.ndim - len(shape_of(ns))]
    assert_rel(saved[-1], saved_ref[-1], tol, "invstd")
    if len(saved) == 2:
        scale = np.abs(saved_ref[0].astype(np.longdouble)) + 1 / saved_ref[1]
        err = np.abs(saved[0].astype(np.longdouble) - saved_ref[0])
        assert (err <= tol * scale).all(), f"mean: error {float(np.max(err / scale)):.3g}"


def check_against_reference(norm, x, ns, weight, bias, dy, tol_y, tol_grad, tol_stat, **fuse):
    y, saved = train(norm, x, ns, weight, bias, **fuse)
    y_ref, saved_ref = train(norm, x, ns, weight, bias, module=reference, **fuse)
    assert y.dtype == x.dtype
    assert_close(y, y_ref, tol_y, "y")
    check_saved(saved, saved_ref, x, ns, tol_stat)
    bkw = {}
    if fuse.get("activation"):
        bkw = {"y": y, "activation": fuse["activation"]}
    grads = backward(norm, dy, x, saved, weight, ns, **bkw)
    grads_ref = backward(norm, dy, x, saved, weight, ns, module=reference, **bkw)
    for name, g, g_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        if g_ref is not None:
            assert_close(g, g_ref, tol_grad, name)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, ns", CASES)
def test_matches_reference(norm, dtype, shape, ns, rng):
    x = make_rows(shape, ns, dtype, rng)
    weight, bias = make_affine(ns, dtype, rng)
    dy = rng.standard_normal(shape).astype(dtype)
    check_against_reference(norm, x, ns, weight, bias, dy, TOL_Y[dtype], TOL_GRAD[dtype],
                            TOL_STAT[dtype])


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_without_affine(norm, dtype, rng):
    shape, ns = (5, 6, 7), (6, 7)
    x = make_rows(shape, ns, dtype, rng)
    dy = rng.standard_normal(shape).astype(dtype)
    check_against_reference(norm, x, ns, None, None, dy, TOL_Y[dtype], TOL_GRAD[dtype],
                            TOL_STAT[dtype])
    dx, dweight, dbias = backward(norm, dy, x, train(norm, x, ns, None, None)[1], None, ns)
    assert dweight.shape == (6, 7) and (dbias is None or dbias.shape == (6, 7))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, ns", [((40, 5, 64), 64), ((6, 3, 2, 2100), (2, 2100))])
def test_accurate_far_from_zero(norm, dtype, shape, ns, rng):
    """Rows 1e6 standard deviations from zero: the shifted sums keep every digit."""
    x = make_rows(shape, ns, dtype, rng, offset=1e6)
    weight, bias = make_affine(ns, dtype, rng)
    dy = rng.standard_normal(shape).astype(dtype)
    check_against_reference(norm, x, ns, weight, bias, dy, TOL_Y[dtype], TOL_GRAD[dtype],
                            TOL_STAT[dtype])


# ------------------------------------------------------------------------------- torch

@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape, ns", [((4, 6, 8), (6, 8)), ((2, 3, 4, 5, 6), (4, 5, 6)),
                                       ((33, 70), 70)])
def test_matches_torch(norm, shape, ns, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = make_rows(shape, ns, np.float64, rng, offset=3.0)
    weight, bias = make_affine(ns, np.float64, rng)
    dy = rng.standard_normal(shape)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    if norm == "layer":
        yt = F.layer_norm(xt, shape_of(ns), wt, bt, 1e-5)
        y, saved = train(norm, x, ns, weight, bias)
    else:
        yt = F.rms_norm(xt, shape_of(ns), wt)          # eps=None: finfo(float64).eps
        y, saved = train(norm, x, ns, weight, None)
    yt.backward(torch.tensor(dy))
    assert_close(y, yt.detach().numpy(), 1e-12, "y")
    dx, dweight, dbias = backward(norm, dy, x, saved, weight, ns)
    assert_close(dx, xt.grad.numpy(), 1e-12, "dx")
    assert_close(dweight, wt.grad.numpy(), 1e-12, "dweight")
    if norm == "layer":
        assert_close(dbias, bt.grad.numpy(), 1e-12, "dbias")


# ------------------------------------------------------------- layouts, out=, in place

@pytest.mark.parametrize("norm", NORMS)
def test_any_strides(norm, rng):
    base = make_rows((6, 10, 16), 16, np.float32, rng)
    weight, bias = make_affine(8, np.float32, rng)
    for x in (base[:, ::2, ::2], base.transpose(1, 0, 2)[..., :8], base[::-1, :, 8:]):
        y, saved = train(norm, x, 8, weight, bias)
        y_c, saved_c = train(norm, np.ascontiguousarray(x), 8, weight,
                             bias)
        np.testing.assert_array_equal(y, y_c)
        dy = rng.standard_normal(x.shape).astype(np.float32)[..., ::-1]
        for g, g_c in zip(backward(norm, dy, x, saved, weight, 8),
                          backward(norm, np.ascontiguousarray(dy), np.ascontiguousarray(x),
                                   saved_c, weight, 8)):
            if g is not None:
                np.testing.assert_array_equal(g, g_c)


@pytest.mark.parametrize("norm", NORMS)
def test_out_and_in_place(norm, rng):
    x = make_rows((12, 3, 40), 40, np.float64, rng)
    weight, bias = make_affine(40, np.float64, rng)
    b = bias
    y, saved = train(norm, x, 40, weight, b)
    dy = rng.standard_normal(x.shape)
    dx = backward(norm, dy, x, saved, weight, 40)[0]

    out = np.empty_like(x)
    assert train(norm, x, 40, weight, b, out=out)[0] is out
    np.testing.assert_array_equal(out, y)
    strided = np.empty((12, 3, 80))[..., ::2]                  # out that is not contiguous
    assert train(norm, x, 40, weight, b, out=strided)[0] is strided
    np.testing.assert_array_equal(strided, y)
    shifted = np.concatenate([x.ravel(), [0.0]])                # out overlapping x
    x_view, out_view = shifted[:-1].reshape(x.shape), shifted[1:].reshape(x.shape)
    train(norm, x_view, 40, weight, b, out=out_view)
    np.testing.assert_array_equal(out_view, y)

    x_copy = x.copy()                                           # in place
    assert train(norm, x_copy, 40, weight, b, out=x_copy)[0] is x_copy
    np.testing.assert_array_equal(x_copy, y)
    for overwrite in ("dy", "x"):
        dy_copy, x_copy = dy.copy(), x.copy()
        target = dy_copy if overwrite == "dy" else x_copy
        got = backward(norm, dy_copy, x_copy, saved, weight, 40, out=target)[0]
        assert got is target
        np.testing.assert_array_equal(got, dx)


# --------------------------------------------------------------------------------- fusion

@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_matches_reference(norm, activation, dtype, rng):
    shape, ns = (9, 7, 48), 48
    x = make_rows(shape, ns, dtype, rng)
    weight, bias = make_affine(ns, dtype, rng)
    residual = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    check_against_reference(norm, x, ns, weight, bias, dy, TOL_Y[dtype], TOL_GRAD[dtype],
                            TOL_STAT[dtype], residual=residual, activation=activation)


@pytest.mark.parametrize("norm", NORMS)
def test_fused_backward_out_residual(norm, rng):
    shape, ns = (10, 32), 32
    x = make_rows(shape, ns, np.float64, rng)
    weight, bias = make_affine(ns, np.float64, rng)
    residual, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    fuse = dict(activation="relu")
    y, saved = train(norm, x, ns, weight, bias, residual=residual,
                     **fuse)
    grad_res, grad_res_ref = np.empty_like(x), np.empty_like(x)
    grads = backward(norm, dy, x, saved, weight, ns, y=y, out_residual=grad_res, **fuse)
    grads_ref = backward(norm, dy, x, saved, weight, ns, module=reference, y=y,
                         out_residual=grad_res_ref, **fuse)
    np.testing.assert_array_equal(grad_res, grad_res_ref)
    for g, g_ref in zip(grads, grads_ref):
        if g is not None:
            assert_close(g, g_ref, 1e-12)
    # the composite: relu's gradient first, then the unfused backward
    unfused = backward(norm, np.where(y > 0, dy, 0.0), x, saved, weight, ns)
    for g, g_u in zip(grads, unfused):
        if g is not None:
            assert_close(g, g_u, 1e-12)


# ------------------------------------------------------------------------------- threads

@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape, ns", [((512, 384), 384), ((40, 12, 130), 130),
                                       ((3, 70000), 70000)])
def test_same_bits_for_any_thread_count(norm, shape, ns, rng, threads):
    x = make_rows(shape, ns, np.float32, rng, offset=10.0)
    weight, bias = make_affine(ns, np.float32, rng)
    dy = rng.standard_normal(shape).astype(np.float32)
    results = []
    for n in (1, 2):
        threads(n)
        y, saved = train(norm, x, ns, weight, bias)
        grads = backward(norm, dy, x, saved, weight, ns)
        results.append([a for a in (y, *saved, *grads) if a is not None])
    for a, b in zip(*results):
        assert a.tobytes() == b.tobytes()


# -------------------------------------------------------------------------- half precision

HALF = [np.dtype(np.float16)]
try:
    import ml_dtypes
    HALF.append(np.dtype(ml_dtypes.bfloat16))
except ImportError:
    pass


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape, ns", [((6, 5, 24), 24), ((300, 96), 96), ((4, 3, 8, 20), (8, 20))])
def test_half_precision(norm, dtype, shape, ns, rng):
    from test_half import assert_ulps
    x = make_rows(shape, ns, np.float32, rng, offset=2.0).astype(dtype)
    weight, bias = make_affine(ns, np.float32, rng)
    dy = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    b = bias
    y, saved = train(norm, x, ns, weight, b, residual=x, activation="relu")
    y_ref, saved_ref = train(norm, x, ns, weight, b, module=reference, residual=x,
                             activation="relu")
    assert_ulps(y, y_ref, what="y")
    assert all(s.dtype == np.float32 for s in saved)
    check_saved(saved, saved_ref, x, ns, 1e-6)
    grads = backward(norm, dy, x, saved, weight, ns)
    grads_ref = backward(norm, dy, x, saved, weight, ns, module=reference)
    assert_ulps(grads[0], grads_ref[0], what="dx")
    for g, g_ref in zip(grads[1:], grads_ref[1:]):
        if g is not None:
            assert g.dtype == np.float32
            assert_close(g, g_ref, 1e-5)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_rms_eps_default_is_the_dtypes_epsilon(dtype, rng):
    x = rng.standard_normal((5, 16)).astype(np.float32).astype(dtype) * 0.01
    eps = float(ml_dtypes.finfo(dtype).eps) if dtype.name == "bfloat16" else \
        float(np.finfo(dtype).eps)
    np.testing.assert_array_equal(fastbn.rms_norm(x, 16), fastbn.rms_norm(x, 16, eps=eps))


# ------------------------------------------------------------------------------ bad input

BAD = [
    (lambda x, w: fastbn.layer_norm(x.tolist() and "x", 8), TypeError, "x must be"),
    (lambda x, w: fastbn.layer_norm(x.astype(np.int32), 8), TypeError, "dtype"),
    (lambda x, w: fastbn.layer_norm(x, 7), ValueError, "normalized_shape"),
    (lambda x, w: fastbn.layer_norm(x, (4, 3, 2, 8)), ValueError, "normalized_shape"),
    (lambda x, w: fastbn.layer_norm(x, 8.0), TypeError, "normalized_shape"),
    (lambda x, w: fastbn.layer_norm(x, ()), ValueError, "1 to 3 axes"),
    (lambda x, w: fastbn.layer_norm(x, 8, w[:4]), ValueError, "weight must have shape (8,)"),
    (lambda x, w: fastbn.layer_norm(x, 8, None, w.astype(int)), TypeError, "bias"),
    (lambda x, w: fastbn.layer_norm(x, 8, eps=-1.0), ValueError, "eps"),
    (lambda x, w: fastbn.rms_norm(x, 8, eps="small"), TypeError, "eps"),
    (lambda x, w: fastbn.layer_norm(x, 8, residual=x[:1]), ValueError, "residual"),
    (lambda x, w: fastbn.rms_norm(x, 8, activation="gelu"), ValueError, "gelu"),
    (lambda x, w: fastbn.layer_norm(x, 8, out=np.empty((4, 3, 8), np.float64)), TypeError,
     "out"),
    (lambda x, w: fastbn.layer_norm_backward(x, x, None, None, normalized_shape=8), TypeError,
     "mean and invstd are required"),
    (lambda x, w: fastbn.rms_norm_backward(x, x, None, normalized_shape=8), TypeError,
     "invrms is required"),
    (lambda x, w: fastbn.rms_norm_backward(x, x, np.ones(4), normalized_shape=8), ValueError,
     "invrms must have shape (4, 3)"),
    (lambda x, w: fastbn.layer_norm_backward(x[:2], x, np.ones((4, 3)), np.ones((4, 3)),
                                             normalized_shape=8), ValueError, "dy"),
    (lambda x, w: fastbn.rms_norm_backward(x, x, np.ones((4, 3)), normalized_shape=8,
                                           activation="relu"), ValueError, "y, the fused"),
]


@pytest.mark.parametrize("call, error, words", BAD)
def test_bad_input(call, error, words, rng):
    x = rng.standard_normal((4, 3, 8)).astype(np.float32)
    with pytest.raises(error) as info:
        call(x, np.ones(8, np.float32))
    assert words in str(info.value)


def test_nothing_written_on_bad_input(rng):
    x = rng.standard_normal((4, 3, 8)).astype(np.float32)
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError):
        fastbn.layer_norm(x, 8, out=out, activation="nope")
    with pytest.raises(ValueError):
        fastbn.rms_norm_backward(x, x, np.ones((4, 3), np.float32), normalized_shape=8,
                                 out=out, activation="relu")
    assert (out == 7.0).all()


@pytest.mark.parametrize("norm", NORMS)
def test_empty(norm):
    x = np.empty((0, 5), np.float32)
    y, saved = train(norm, x, 5, None, None)
    assert y.shape == (0, 5) and all(s.shape == (0,) for s in saved)
    grads = backward(norm, x, x, saved, None, 5)
    assert grads[0].shape == (0, 5) and grads[1].shape == (5,)


# --------------------------------------------------------------------------------- layers

@pytest.mark.parametrize("norm", NORMS)
def test_layers_match_torch_modules(norm, rng):
    torch = pytest.importorskip("torch")
    ns = (6, 8)
    x = make_rows((5, 4, 6, 8), ns, np.float32, rng)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    if norm == "layer":
        theirs, ours = torch.nn.LayerNorm(ns), fastbn.LayerNorm(ns)
        keys = {"weight", "bias"}
    else:
        theirs, ours = torch.nn.RMSNorm(ns), fastbn.RMSNorm(ns)
        keys = {"weight"}
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape))
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    assert set(ours.state_dict()) == keys
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt)
    yt.backward(torch.tensor(dy))
    assert_close(ours(x), yt.detach().numpy(), 1e-5, "y")
    assert_close(ours.backward(dy), xt.grad.numpy(), 1e-5, "dx")
    assert_close(ours.grad_weight, theirs.weight.grad.numpy(), 1e-5, "grad_weight")
    if norm == "layer":
        assert_close(ours.grad_bias, theirs.bias.grad.numpy(), 1e-5, "grad_bias")


def test_layer_options_and_state_dict():
    layer = fastbn.LayerNorm(8, elementwise_affine=False)
    assert layer.weight is None and layer.bias is None and layer.state_dict() == {}
    layer = fastbn.LayerNorm((2, 8), bias=False, dtype=np.float64)
    assert layer.bias is None and layer.weight.shape == (2, 8)
    assert layer.weight.dtype == np.float64
    with pytest.raises(ValueError, match="missing"):
        layer.load_state_dict({})
    with pytest.raises(ValueError, match="shape"):
        layer.load_state_dict({"weight": np.ones(8)})
    with pytest.raises(ValueError, match="normalized_shape"):
        fastbn.RMSNorm((1, 2, 3, 4))
    with pytest.raises(RuntimeError):
        fastbn.RMSNorm(4).backward(np.ones((2, 4), np.float32))
    x = np.ones((2, 8), np.float32)
    layer = fastbn.RMSNorm(8)
    layer(x)
    assert layer.backward(x).shape == x.shape and layer.grad_weight.shape == (8,)
