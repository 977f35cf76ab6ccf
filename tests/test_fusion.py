"""The fused forward y = act(bn(x) + residual) and its backward from y, on every kernel path:
against fastbn.reference, against the unfused composite, by finite differences, across thread
counts and aliasing, and with bad input. (Against torch autograd: tests/test_torch.py.)"""
import numpy as np
import pytest

import fastbn
import fastbn.reference as ref
from conftest import (DTYPES, PARALLEL_CASES, SMALL_CASES, TOL_GRAD, TOL_Y, assert_close,
                      make_input, make_params)

ACTIVATIONS = [None, "relu", "leaky_relu", "tanh"]
SLOPE = 0.2
# (activation, residual?): every activation, with and without a residual, on the small
# shapes; on the large (parallel) ones, a residual with each activation
SMALL_FUSIONS = [(None, True)] + [(a, r) for a in ACTIVATIONS[1:] for r in (False, True)]
PARALLEL_FUSIONS = [(None, True), ("relu", True), ("leaky_relu", True), ("tanh", True)]
CASES = ([(s, a, f) for s, a in SMALL_CASES for f in SMALL_FUSIONS]
         + [(s, a, f) for s, a in PARALLEL_CASES for f in PARALLEL_FUSIONS])


def fused_inputs(shape, axis, dtype, rng):
    """x, a residual, dy, weight, bias, running statistics: data such that bn(x) + residual
    changes sign often (every activation's kink is visited)."""
    x = make_input(shape, axis, dtype, rng, offset=2.0)
    residual = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    weight, bias = make_params(C, dtype, rng)
    running_mean = rng.standard_normal(C).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, C).astype(dtype)
    return x, residual, dy, weight, bias, running_mean, running_var


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,fusion", CASES)
def test_fused_ops_match_reference(shape, axis, fusion, dtype, rng):
    activation, with_residual = fusion
    x, residual, dy, weight, bias, rm, rv = fused_inputs(shape, axis, dtype, rng)
    residual = residual if with_residual else None
    fuse = dict(residual=residual, activation=activation, negative_slope=SLOPE)

    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis, **fuse)
    y_ref, mean_ref, _ = ref.batch_norm_train(x, weight, bias, axis=axis, **fuse)
    assert_close(y, y_ref, TOL_Y[dtype], "train y")
    # the statistics are x's, whatever the fusion
    assert_close(mean, mean_ref, TOL_Y[dtype], "mean")

    yi = fastbn.batch_norm_infer(x, rm, rv, weight, bias, axis=axis, **fuse)
    assert_close(yi, ref.batch_norm_infer(x, rm, rv, weight, bias, axis=axis, **fuse),
                 TOL_Y[dtype], "infer y")

    back = dict(y=y if activation else None, activation=activation, negative_slope=SLOPE)
    dres = np.full_like(x, np.nan)
    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                                    out_residual=dres, **back)
    dres_ref = np.empty(shape, np.longdouble)
    dx_ref, dweight_ref, dbias_ref = ref.batch_norm_backward(
        dy, x, mean, invstd, weight, axis=axis, out_residual=dres_ref, **back)
    assert_close(dres, dres_ref, TOL_GRAD[dtype], "d residual")
    assert_close(dx, dx_ref, TOL_GRAD[dtype], "dx")
    assert_close(dweight, dweight_ref, TOL_GRAD[dtype], "dweight")
    assert_close(dbias, dbias_ref, TOL_GRAD[dtype], "dbias")

    if activation:      # the same gradients without asking for the residual's
        dx2, dweight2, dbias2 = fastbn.batch_norm_backward(dy, x, mean, invstd, weight,
                                                           axis=axis, **back)
        np.testing.assert_array_equal(dx2, dx)
        np.testing.assert_array_equal(dweight2, dweight)
        np.testing.assert_array_equal(dbias2, dbias)


def numpy_activation(z, activation):
    if activation == "relu":
        return np.where(z < 0, z.dtype.type(0), z)
    if activation == "leaky_relu":
        return np.where(z < 0, z * z.dtype.type(SLOPE), z)
    return z


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("shape,axis", [((4, 6, 9, 11), 1), ((4, 9, 11, 6), -1),
                                        ((4, 3, 128, 128), 1), ((8, 64, 64, 8), -1)])
def test_fused_forward_is_the_composite_bit_for_bit(shape, axis, activation, dtype, rng):
    """Fused, the same operations in the same precision as BN, then add, then activation."""
    x, residual, _, weight, bias, rm, rv = fused_inputs(shape, axis, dtype, rng)
    fuse = dict(residual=residual, activation=activation, negative_slope=SLOPE)
    y = fastbn.batch_norm_train(x, weight, bias, axis=axis, **fuse)[0]
    plain = fastbn.batch_norm_train(x, weight, bias, axis=axis)[0]
    np.testing.assert_array_equal(y, numpy_activation(plain + residual, activation))
    yi = fastbn.batch_norm_infer(x, rm, rv, weight, bias, axis=axis, **fuse)
    plain = fastbn.batch_norm_infer(x, rm, rv, weight, bias, axis=axis)
    np.testing.assert_array_equal(yi, numpy_activation(plain + residual, activation))


def float32_tanh_ulp():
    """The float32 tanh's bound: 1.51 ulp where the kernels have FMA (the AVX2 / AVX-512
    clones, or a native build for such a CPU), 1.57 on the baseline x86-64 kernels (over every
    float32 in [1/16, 16): 1.5014 and 1.5649); 1.6 elsewhere."""
    build = fastbn._kernels.build_info()
    if build["dispatch_selected"] in ("x86-64-v3", "x86-64-v4") or \
            build["baseline_simd"] in ("avx2", "avx512f"):
        return 1.51
    if build["dispatch_selected"] == "x86-64" or build["baseline_simd"] == "sse2":
        return 1.57
    return 1.6


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_accuracy(dtype, rng):
    """tanh itself (batch_norm_infer with mean 0, variance 1, eps 0 is the identity): float32
    within 1.51 ulp (1.57 without FMA: float32_tanh_ulp; numpy's own float32 tanh: 1.4),
    float64 within 4; special values."""
    z = np.concatenate([rng.standard_normal(20000) * 4, rng.uniform(-0.3, 0.3, 20000),
                        rng.uniform(-1e-6, 1e-6, 100), np.linspace(-25, 25, 5001),
                        [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-300, -5e-324, 0.25,
                         np.nextafter(0.25, 0), 19.9999, 20.0, 700.0, -1e30]])
    z = z.astype(dtype).reshape(-1, 1)
    one = np.ones(1, dtype)
    t = fastbn.batch_norm_infer(z, 0 * one, one, eps=0.0, activation="tanh")[:, 0]
    exact = np.tanh(z[:, 0].astype(np.longdouble))
    finite = np.isfinite(exact)
    ulp = np.spacing(np.abs(exact[finite]).astype(dtype)).astype(np.longdouble)
    err = np.abs(t[finite].astype(np.longdouble) - exact[finite]) / ulp
    assert err.max() <= (float32_tanh_ulp() if dtype == np.float32 else 4.0), err.max()
    np.testing.assert_array_equal(np.isnan(t), np.isnan(z[:, 0]))
    assert np.all(np.abs(t[~np.isnan(t)]) <= 1)
    assert np.all(t[z[:, 0] == 0] == 0)
    assert np.all(t[np.isinf(z[:, 0])] == np.sign(z[np.isinf(z[:, 0]), 0]))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((6, 2, 3, 4), -1)])
def test_fused_backward_by_finite_differences(shape, axis, activation, rng):
    """Central differences of L = sum(G * act(bn(x) + r)) in float64, for x, weight, bias, r.
    (Kinks are avoided: no value of bn(x) + r within 1e-3 of zero.)"""
    x = make_input(shape, axis, np.float64, rng, offset=1.0)
    weight, bias = make_params(shape[axis], np.float64, rng)
    r = rng.standard_normal(shape)
    z = fastbn.batch_norm_train(x, weight, bias, axis=axis, eps=1e-3)[0] + r
    r[np.abs(z) < 1e-3] += 0.01
    G = rng.standard_normal(shape)
    fuse = dict(activation=activation, negative_slope=SLOPE)

    def loss(x_, w_, b_, r_):
        y_ = fastbn.batch_norm_train(x_, w_, b_, axis=axis, eps=1e-3, residual=r_, **fuse)[0]
        return float(np.sum(y_ * G))

    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis, eps=1e-3,
                                              residual=r, **fuse)
    dres = np.empty_like(x)
    dx, dweight, dbias = fastbn.batch_norm_backward(
        G, x, mean, invstd, weight, axis=axis, y=y if activation else None, out_residual=dres,
        **fuse)

    h = 1e-6
    args = [x, weight, bias, r]
    for k, grad in enumerate([dx, dweight, dbias, dres]):
        numeric = np.zeros_like(args[k])
        for i in np.ndindex(args[k].shape):
            plus, minus = list(args), list(args)
            plus[k], minus[k] = args[k].copy(), args[k].copy()
            plus[k][i] += h
            minus[k][i] -= h
            numeric[i] = (loss(*plus) - loss(*minus)) / (2 * h)
        np.testing.assert_allclose(grad, numeric, atol=2e-7, err_msg=f"argument {k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", PARALLEL_CASES[:4])
def test_fused_results_do_not_depend_on_threads(shape, axis, dtype, rng, threads):
    x, residual, dy, weight, bias, rm, rv = fused_inputs(shape, axis, dtype, rng)
    results = []
    for n in (1, 2, 3):
        threads(n)
        y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis, residual=residual,
                                                  activation="tanh")
        dres = np.empty_like(x)
        grads = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis, y=y,
                                           activation="tanh", out_residual=dres)
        yi = fastbn.batch_norm_infer(x, rm, rv, weight, bias, axis=axis, residual=residual,
                                     activation="relu")
        results.append([y, mean, invstd, yi, dres, *grads])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((4, 6, 9, 11), 1), ((4, 9, 11, 6), -1),
                                        ((4, 80, 32, 32), 1)])
def test_fused_in_place_and_aliasing(shape, axis, dtype, rng):
    """out may be x, or the residual (written through a copy); the backward's out and
    out_residual may be dy or y, and out may be x; every result as with fresh outputs."""
    x, residual, dy, weight, bias, rm, rv = fused_inputs(shape, axis, dtype, rng)
    fuse = dict(axis=axis, residual=residual, activation="relu")
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, **fuse)
    yi = fastbn.batch_norm_infer(x, rm, rv, weight, bias, **fuse)
    for target in ("x", "residual"):
        arrays = {"x": x.copy(), "residual": residual.copy()}
        got = fastbn.batch_norm_train(arrays["x"], weight, bias, axis=axis,
                                      residual=arrays["residual"], activation="relu",
                                      out=arrays[target])[0]
        assert got is arrays[target]
        np.testing.assert_array_equal(got, y)
        arrays = {"x": x.copy(), "residual": residual.copy()}
        got = fastbn.batch_norm_infer(arrays["x"], rm, rv, weight, bias, axis=axis,
                                      residual=arrays["residual"], activation="relu",
                                      out=arrays[target])
        np.testing.assert_array_equal(got, yi)

    back = dict(axis=axis, activation="relu")
    dres = np.empty_like(x)
    expected = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, y=y, out_residual=dres,
                                          **back)
    for out, out_residual in [("dy", None), ("x", None), ("y", None), ("dy", "y"),
                              ("y", "dy"), (None, "x"), ("x", "dy"), (None, "dy")]:
        arrays = {"dy": dy.copy(), "x": x.copy(), "y": y.copy()}
        got = fastbn.batch_norm_backward(
            arrays["dy"], arrays["x"], mean, invstd, weight, y=arrays["y"],
            out=arrays.get(out), out_residual=arrays.get(out_residual), **back)
        what = f"out={out}, out_residual={out_residual}"
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b, err_msg=what)
        if out is not None:
            assert got[0] is arrays[out], what
        if out_residual is not None:
            np.testing.assert_array_equal(arrays[out_residual], dres, err_msg=what)


def test_fused_on_views_and_mixed_layouts(rng):
    """x as a channels-last view, the residual and dy in NCHW memory (and strided): results
    as with contiguous copies."""
    x = make_input((4, 9, 11, 6), -1, np.float32, rng).transpose(0, 3, 1, 2)   # NHWC memory
    residual = rng.standard_normal((4, 6, 9, 22)).astype(np.float32)[..., ::2]  # strided
    dy = rng.standard_normal((4, 6, 9, 11)).astype(np.float32)
    weight, bias = make_params(6, np.float32, rng)
    fuse = dict(residual=residual, activation="leaky_relu")
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, **fuse)
    y_c, _, _ = fastbn.batch_norm_train(np.ascontiguousarray(x), weight, bias,
                                        residual=np.ascontiguousarray(residual),
                                        activation="leaky_relu")
    np.testing.assert_array_equal(y, y_c)
    assert y.strides == x.strides       # the output keeps x's layout
    dres = np.empty((4, 6, 9, 11), np.float32)
    grads = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, y=y,
                                       activation="leaky_relu", out_residual=dres)
    dres_c = np.empty_like(dres)
    grads_c = fastbn.batch_norm_backward(dy, np.ascontiguousarray(x), mean, invstd, weight,
                                         y=np.ascontiguousarray(y), activation="leaky_relu",
                                         out_residual=dres_c)
    np.testing.assert_array_equal(dres, dres_c)
    for a, b in zip(grads, grads_c):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("call,error,words", [
    (lambda x, r, y: fastbn.batch_norm_train(x, activation="gelu"), ValueError, "activation"),
    (lambda x, r, y: fastbn.batch_norm_train(x, activation=1), TypeError, "activation"),
    (lambda x, r, y: fastbn.batch_norm_infer(x, r[0, :, 0, 0], r[0, :, 0, 0] ** 2,
                                             activation="RELU"), ValueError, "activation"),
    (lambda x, r, y: fastbn.batch_norm_train(x, residual=r[:1]), ValueError, "residual"),
    (lambda x, r, y: fastbn.batch_norm_train(x, residual=r.astype(np.float64)), TypeError,
     "residual"),
    (lambda x, r, y: fastbn.batch_norm_train(x, residual="r"), TypeError, "residual"),
    (lambda x, r, y: fastbn.batch_norm_train(x, activation="leaky_relu", negative_slope="a"),
     TypeError, "negative_slope"),
    (lambda x, r, y: fastbn.batch_norm_train(x, activation="leaky_relu",
                                             negative_slope=float("nan")),
     ValueError, "negative_slope"),
    (lambda x, r, y: fastbn.batch_norm_backward(r, x, *y[1:], activation="relu"), ValueError,
     "y"),
    (lambda x, r, y: fastbn.batch_norm_backward(r, x, *y[1:], y=y[0]), ValueError, "y"),
    (lambda x, r, y: fastbn.batch_norm_backward(r, x, *y[1:], y=y[0][:, :2],
                                                activation="tanh"), ValueError, "y"),
    (lambda x, r, y: fastbn.batch_norm_backward(r, x, *y[1:], y=y[0], activation="leaky_relu",
                                                negative_slope=-0.1), ValueError,
     "negative_slope"),
    (lambda x, r, y: fastbn.batch_norm_backward(r, x, *y[1:], y=y[0], activation="relu",
                                                out_residual=np.zeros((2, 3))), ValueError,
     "out_residual"),
    (lambda x, r, y: fastbn.batch_norm_backward(r, x, *y[1:], out_residual=[1.0]), TypeError,
     "out_residual"),
])
def test_fused_bad_input(call, error, words, rng):
    x = make_input((2, 3, 4, 5), 1, np.float32, rng)
    r = rng.standard_normal(x.shape).astype(np.float32)
    y = fastbn.batch_norm_train(x, activation="relu")
    with pytest.raises(error, match=words):
        call(x, r, y)


def test_fused_backward_writes_nothing_on_bad_input(rng):
    x = make_input((2, 3, 4, 5), 1, np.float32, rng)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x, activation="relu")
    out, out_residual = np.full_like(x, 7.0), np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="overlap"):
        fastbn.batch_norm_backward(dy, x, mean, invstd, y=y, activation="relu", out=out,
                                   out_residual=out)
    with pytest.raises(ValueError, match="negative_slope"):
        fastbn.batch_norm_backward(dy, x, mean, invstd, y=y, activation="leaky_relu",
                                   negative_slope=-1.0, out=out, out_residual=out_residual)
    read_only = np.zeros_like(x)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="out_residual"):
        fastbn.batch_norm_backward(dy, x, mean, invstd, y=y, activation="relu", out=out,
                                   out_residual=read_only)
    assert np.all(out == 7.0) and np.all(out_residual == 7.0)
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="activation"):
        fastbn.batch_norm_train(x, residual=dy, activation="elu", out=out)
    assert np.all(out == 7.0)
