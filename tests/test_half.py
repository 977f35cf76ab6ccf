"""Half-precision storage (float16, and ml_dtypes' bfloat16) with float32 compute.

The contract: outputs of x's dtype within 1 ulp of the correctly rounded result of the exact
computation on the same half-precision inputs (fastbn.reference, in extended precision,
rounded once), so the only error is the final rounding, except near zero: an output that is
a small difference of larger float32 terms (|y| under 2^-8 of the output's scale) carries
float32's absolute error of those terms, a few times 2^-24 of the scale, which is more
than a float16 ulp there (PyTorch, computing in float32 too, does the same). Statistics,
running statistics and
parameter gradients in float32. Every kernel path: both layout families (channels-first, fused
grouped and chunked; channels-last), serial and parallel, train / infer / backward, fused
epilogue. And the same results as PyTorch's float16 / bfloat16 CPU batch norm to its
accuracy."""
import numpy as np
import pytest

import fastbn
from fastbn import reference
from conftest import make_params


HALF = [np.dtype(np.float16)]
try:
    import ml_dtypes
    HALF.append(np.dtype(ml_dtypes.bfloat16))
except ImportError:
    pass

# (shape, axis): channels-first grouped (small channels) and chunked (long channels),
# channels-last, 2-D; the larger ones take the parallel path
CASES = [((6, 5, 7, 9), 1), ((2, 3, 96, 96), 1), ((32, 64, 16, 16), 1), ((6, 7, 9, 5), -1),
         ((16, 24, 24, 64), -1), ((300, 37), 1), ((5, 4, 3, 6, 2), 1)]
STAT = np.dtype(np.float32)


def ordered(a):
    """16-bit sign-magnitude floats as integers in value order (one apart: one ulp)."""
    bits = np.ascontiguousarray(a).view(np.int16).astype(np.int32)
    return np.where(bits < 0, -(bits & 0x7FFF), bits)


def assert_ulps(got, want, ulps=1, what=""):
    """got within `ulps` ulps of want, or, near zero, within float32's absolute error of the
    output's scale (see above)."""
    assert got.dtype == want.dtype
    assert np.isfinite(got.astype(np.float32)).all(), what
    diff = np.abs(ordered(got) - ordered(want))
    exact = want.astype(np.float64)
    scale = max(1.0, np.abs(exact).max())
    near_zero_error = np.abs(got.astype(np.float64) - exact) <= 2.0**-20 * scale
    bad = (diff > ulps) & ~near_zero_error
    assert not bad.any(), f"{what}: {diff[bad].max()} ulps apart at {exact[bad][:3]}"


def make(shape, axis, dtype, rng, offset=0.0):
    """Half-precision data around offset, and its gradient."""
    x = (rng.standard_normal(shape) * 2 + offset).astype(np.float32).astype(dtype)
    dy = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    return x, dy


@pytest.fixture(params=HALF, ids=lambda d: d.name)
def dtype(request):
    return request.param


@pytest.mark.parametrize("threads_n", [1, 2])
@pytest.mark.parametrize("shape,axis", CASES)
def test_train_infer_backward_round_once(shape, axis, dtype, threads_n, rng, threads):
    threads(threads_n)
    x, dy = make(shape, axis, dtype, rng, offset=3.0)
    C = shape[axis]
    weight, bias = make_params(C, STAT, rng)
    rm, rv = np.zeros(C, STAT), np.ones(C, STAT)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis, running_mean=rm,
                                              running_var=rv)
    y_ref, mean_ref, invstd_ref = reference.batch_norm_train(
        x, weight, bias, axis=axis, running_mean=rm_ref, running_var=rv_ref)
    assert y.dtype == dtype and mean.dtype == invstd.dtype == STAT
    assert_ulps(y, y_ref, what="train y")
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-6)
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, rv_ref, rtol=1e-6)

    y_inf = fastbn.batch_norm_infer(x, rm, rv, weight, bias, axis=axis)
    assert_ulps(y_inf, reference.batch_norm_infer(x, rm, rv, weight, bias, axis=axis),
                what="infer y")

    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    dx_ref, dweight_ref, dbias_ref = reference.batch_norm_backward(dy, x, mean, invstd, weight,
                                                                   axis=axis)
    assert dx.dtype == dtype and dweight.dtype == dbias.dtype == STAT
    assert_ulps(dx, dx_ref, what="dx")
    scale = np.abs(dy.astype(np.float64)).sum(axis=tuple(i for i in range(x.ndim)
                                                         if i != axis % x.ndim))
    assert (np.abs(dweight - dweight_ref) <= 1e-6 * scale).all()
    assert (np.abs(dbias - dbias_ref) <= 1e-6 * scale).all()


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh"])
@pytest.mark.parametrize("shape,axis", [CASES[0], CASES[1], CASES[3], CASES[5]])
def test_fused_forward_rounds_once(shape, axis, activation, dtype, rng):
    """act(bn(x) + residual) computed in float32 and rounded once, not bn(x) rounded first."""
    x, residual = make(shape, axis, dtype, rng, offset=-1.0)
    C = shape[axis]
    weight, bias = make_params(C, STAT, rng)
    y, _, _ = fastbn.batch_norm_train(x, weight, bias, axis=axis, residual=residual,
                                      activation=activation)
    want = reference.batch_norm_train(x, weight, bias, axis=axis, residual=residual,
                                      activation=activation)[0]
    assert_ulps(y, want, what=f"fused {activation}")
    rm, rv = rng.standard_normal(C).astype(STAT), rng.uniform(0.5, 2, C).astype(STAT)
    y = fastbn.batch_norm_infer(x, rm, rv, weight, bias, axis=axis, residual=residual,
                                activation=activation)
    want = reference.batch_norm_infer(x, rm, rv, weight, bias, axis=axis, residual=residual,
                                      activation=activation)
    assert_ulps(y, want, what=f"fused infer {activation}")


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("shape,axis", [CASES[0], CASES[1], CASES[3]])
def test_fused_backward(shape, axis, activation, dtype, rng):
    """g = dy * act'(y) is an output (the residual's gradient), of x's dtype: the backward's
    sums and dx are those of that rounded g, as the unfused ops on it give."""
    x, dy = make(shape, axis, dtype, rng)
    residual = make(shape, axis, dtype, rng)[0]
    C = shape[axis]
    weight, bias = make_params(C, STAT, rng)
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis, residual=residual,
                                              activation=activation)
    g = np.empty_like(x)
    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                                    y=y, activation=activation, out_residual=g)
    g_ref = np.empty_like(x)
    reference.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis, y=y,
                                  activation=activation, out_residual=g_ref)
    assert_ulps(g, g_ref, what="g")
    dx_ref, dweight_ref, _ = reference.batch_norm_backward(g, x, mean, invstd, weight, axis=axis)
    assert_ulps(dx, dx_ref, what="dx")
    np.testing.assert_allclose(dweight, dweight_ref, rtol=1e-5, atol=1e-5)


def test_moments_of_half_data(dtype, rng):
    x, _ = make((16, 5, 8, 8), 1, dtype, rng, offset=10.0)
    m = fastbn.moments(x).finish()
    exact = x.astype(np.float64)
    np.testing.assert_allclose(m.mean, exact.mean(axis=(0, 2, 3)), rtol=1e-14)
    np.testing.assert_allclose(m.var, exact.var(axis=(0, 2, 3)), rtol=1e-12)


def test_half_running_statistics_are_rejected(dtype, rng):
    x, _ = make((8, 3, 4, 4), 1, dtype, rng)
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    with pytest.raises(TypeError, match="running_mean must have x's statistics dtype "
                                        r"\(float32\).*momentum's small updates"):
        fastbn.batch_norm_train(x, running_mean=rm, running_var=rv)
    assert (rm.astype(np.float32) == 0).all() and (rv.astype(np.float32) == 1).all()


def test_out_and_in_place(dtype, rng):
    x, _ = make((4, 6, 5, 5), 1, dtype, rng, offset=1.0)
    expected = fastbn.batch_norm_train(x)[0]
    out = np.empty_like(x)
    assert fastbn.batch_norm_train(x, out=out)[0] is out
    assert (ordered(out) == ordered(expected)).all()
    fastbn.batch_norm_train(x, out=x)
    assert (ordered(x) == ordered(expected)).all()


def test_strided_half_input(dtype, rng):
    x, _ = make((8, 6, 10, 10), 1, dtype, rng)
    view = x[::2, :, 1:, ::3]
    assert_ulps(fastbn.batch_norm_train(view)[0], reference.batch_norm_train(view)[0],
                what="strided")


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_against_torch(dtype, memory_format, rng):
    """PyTorch's CPU batch norm on the same half-precision tensors: it also computes in
    float32 and rounds once, so the two agree to an ulp."""
    torch = pytest.importorskip("torch")
    shape = (8, 16, 12, 12)
    x, dy = make(shape, 1, dtype, rng, offset=2.0)
    weight, bias = make_params(16, STAT, rng)
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype.name]

    def tensor(a):
        t = torch.from_numpy(a.astype(np.float32)).to(torch_dtype)
        return t.contiguous(memory_format=torch.channels_last) \
            if memory_format == "channels_last" else t

    tx, tdy = tensor(x), tensor(dy)
    tw, tb = torch.from_numpy(weight), torch.from_numpy(bias)
    rm, rv = torch.zeros(16), torch.ones(16)
    ty, tmean, tinvstd = torch.ops.aten.native_batch_norm(tx, tw, tb, rm, rv, True, 0.1, 1e-5)
    tdx = torch.ops.aten.native_batch_norm_backward(tdy, tx, tw, rm, rv, tmean, tinvstd, True,
                                                    1e-5, [True, True, True])[0]
    if memory_format == "channels_last":
        x_ours, dy_ours, axis = np.moveaxis(x, 1, -1).copy(), np.moveaxis(dy, 1, -1).copy(), -1
    else:
        x_ours, dy_ours, axis = x, dy, 1
    y, mean, invstd = fastbn.batch_norm_train(x_ours, weight, bias, axis=axis)
    dx = fastbn.batch_norm_backward(dy_ours, x_ours, mean, invstd, weight, axis=axis)[0]
    if axis == -1:
        y, dx = np.moveaxis(y, -1, 1), np.moveaxis(dx, -1, 1)

    def ours_of(t):
        return t.float().contiguous().numpy().astype(dtype)

    assert_ulps(np.ascontiguousarray(y), ours_of(ty), ulps=2, what="torch y")
    assert_ulps(np.ascontiguousarray(dx), ours_of(tdx), ulps=2, what="torch dx")
    np.testing.assert_allclose(mean, tmean.numpy(), rtol=1e-5, atol=1e-5)


def test_layer_with_half_data(dtype, rng):
    """A BatchNorm layer for half-precision data keeps float32 parameters and statistics and
    gives the functions' results."""
    layer = fastbn.BatchNorm(6, dtype=dtype)
    assert layer.weight.dtype == layer.running_mean.dtype == STAT
    x, dy = make((5, 6, 4, 4), 1, dtype, rng, offset=1.0)
    y = layer(x)
    rm, rv = np.zeros(6, STAT), np.ones(6, STAT)
    y_fn, mean, invstd = fastbn.batch_norm_train(x, layer.weight, layer.bias, running_mean=rm,
                                                 running_var=rv)
    assert y.dtype == dtype and (ordered(y) == ordered(y_fn)).all()
    assert (layer.running_mean == rm).all() and (layer.running_var == rv).all()
    dx = layer.backward(dy)
    dx_fn, dweight, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, layer.weight)
    assert (ordered(dx) == ordered(dx_fn)).all() and layer.grad_weight.dtype == STAT
    assert (layer.grad_weight == dweight).all()
    layer.eval()
    assert_ulps(layer(x), reference.batch_norm_infer(x, rm, rv, layer.weight, layer.bias),
                what="eval")
    with pytest.raises(TypeError, match="x must have the layer's dtype"):
        layer(x.astype(np.float32))


def test_stores_round_to_nearest_even(dtype, rng):
    """y = x * w with the running statistics at 0 and 1 and eps 0: the float32 product,
    stored. Over every finite float16 value (bfloat16: a sample of them) but zeros (the
    kernels add an offset of +0, which makes -0 +0), subnormals and the largest values
    (whose products overflow to inf) included: the same bits as NumPy's (ml_dtypes') rounding
    of the same float32 product."""
    if dtype == np.float16:
        x = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    else:
        x = rng.integers(0, 1 << 16, 1 << 16, dtype=np.uint16).view(dtype)
    with np.errstate(invalid="ignore"):     # signalling NaNs widen with a flag on aarch64
        wide = x.astype(np.float32)
    x = x[np.isfinite(wide) & (wide != 0)].copy()
    x = x[: len(x) // 4 * 4].reshape(-1, 4)
    w = np.array([1.0, 0.7071067, 1.9999999, 3.3e-5], np.float32)
    y = fastbn.batch_norm_infer(x, np.zeros(4, STAT), np.ones(4, STAT), w, eps=0.0)
    with np.errstate(over="ignore"):
        want = (x.astype(np.float32) * w).astype(dtype)
    assert (y.view(np.uint16) == want.view(np.uint16)).all()


def test_block_conversions_have_the_bits_of_single_ones():
    """The kernels convert float16 in blocks with the CPU's vector instructions (F16C, NEON;
    `python -m fastbn info` names them) and one value at a time elsewhere: both give NumPy's
    bits, for every float16 (loads; a signaling NaN may load as a quiet one) and for float32
    values at and between the float16 values' rounding boundaries (stores), in blocks of every
    length up to two vectors and a tail."""
    from fastbn import _kernels
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    nan = np.isnan(every)
    for blocks in (True, False):
        loaded = _kernels._convert_half(every, blocks)
        assert (loaded[~nan].view(np.uint32) == every[~nan].astype(np.float32).view(np.uint32)).all()
        assert np.isnan(loaded[nan]).all()

    finite = every[np.isfinite(every)].astype(np.float32)
    bits = finite.view(np.uint32)
    # each value, the float32s next to it, the ties half way to the next float16 (and one
    # float32 ulp either side), past the largest float16, float32 subnormals, inf and nan
    ties = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)
    rng = np.random.default_rng(5)
    stores = np.concatenate([
        finite, (bits + 1).view(np.float32), (bits - 1).view(np.float32), ties,
        np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf)),
        np.float32([65504, 65519.996, 65520, 65536, 1e30, np.inf, -np.inf, np.nan, 1e-45,
                    -1e-40, 2.0**-25, 2.0**-24, 3 * 2.0**-26]),
        rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint32).view(np.float32)])
    with np.errstate(over="ignore", invalid="ignore"):
        want = stores.astype(np.float16)
    real = ~np.isnan(stores)
    for blocks in (True, False):
        stored = _kernels._convert_half(stores, blocks)
        assert (stored[real].view(np.uint16) == want[real].view(np.uint16)).all()
        assert np.isnan(stored[~real]).all()
        for n in range(1, 20):                     # every tail length
            part = np.ascontiguousarray(stores[1000:1000 + n])
            assert (_kernels._convert_half(part, blocks).view(np.uint16)
                    == want[1000:1000 + n].view(np.uint16)).all()
            assert (_kernels._convert_half(np.ascontiguousarray(every[:n]), blocks).view(np.uint32)
                    == every[:n].astype(np.float32).view(np.uint32)).all()
