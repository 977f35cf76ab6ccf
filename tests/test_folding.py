"""scale_shift, fold_conv and fold_linear against batch_norm_infer and torch's fusion helpers."""
import numpy as np
import pytest

import fastbn
from conftest import assert_close


def bn_params(rng, C, dtype=np.float32):
    return (rng.standard_normal(C).astype(dtype), rng.uniform(0.2, 3, C).astype(dtype),
            rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scale_shift_reproduces_inference(dtype, rng):
    rm, rv, w, b = bn_params(rng, 6, dtype)
    x = rng.standard_normal((4, 6, 5)).astype(dtype)
    a, c = fastbn.scale_shift(rm, rv, w, b, eps=1e-3)
    assert a.dtype == c.dtype == dtype
    y = x * a[:, None] + c[:, None]
    assert_close(y, fastbn.batch_norm_infer(x, rm, rv, w, b, eps=1e-3), 1e-6 if dtype == np.float32 else 1e-13)


def test_folding_matches_torch(rng):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights
    rm, rv, w, b = bn_params(rng, 8)
    t = [torch.from_numpy(v) for v in (rm, rv, w, b)]
    for conv_w in (rng.standard_normal((8, 3, 3, 3)), rng.standard_normal((8, 2, 5)),
                   rng.standard_normal((8, 1, 3, 3, 3))):
        conv_w = conv_w.astype(np.float32)
        for conv_b in (None, rng.standard_normal(8).astype(np.float32)):
            fw, fb = fastbn.fold_conv(conv_w, conv_b, rm, rv, w, b, eps=1e-5)
            tw, tb = fuse_conv_bn_weights(torch.from_numpy(conv_w),
                                          None if conv_b is None else torch.from_numpy(conv_b),
                                          t[0], t[1], 1e-5, t[2], t[3])
            np.testing.assert_allclose(fw, tw.detach().numpy(), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(fb, tb.detach().numpy(), rtol=1e-6, atol=1e-6)
    lin_w = rng.standard_normal((8, 11)).astype(np.float32)
    lin_b = rng.standard_normal(8).astype(np.float32)
    fw, fb = fastbn.fold_linear(lin_w, lin_b, rm, rv, w, b)
    tw, tb = fuse_linear_bn_weights(torch.from_numpy(lin_w), torch.from_numpy(lin_b), *t[:2],
                                    1e-5, *t[2:])
    np.testing.assert_allclose(fw, tw.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fb, tb.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_folded_conv_equals_conv_then_batch_norm(rng):
    """A 1x1 convolution is a matrix product: fold, then compare outputs."""
    rm, rv, w, b = bn_params(rng, 5, np.float64)
    conv_w = rng.standard_normal((5, 3, 1, 1))
    conv_b = rng.standard_normal(5)
    x = rng.standard_normal((2, 3, 4, 4))
    conv = np.einsum("oi,nihw->nohw", conv_w[:, :, 0, 0], x) + conv_b[:, None, None]
    fw, fb = fastbn.fold_conv(conv_w, conv_b, rm, rv, w, b)
    folded = np.einsum("oi,nihw->nohw", fw[:, :, 0, 0], x) + fb[:, None, None]
    assert_close(folded, fastbn.batch_norm_infer(conv, rm, rv, w, b), 1e-12)


def test_folding_errors(rng):
    rm, rv, w, b = bn_params(rng, 4)
    with pytest.raises(ValueError, match="output channels"):
        fastbn.fold_conv(np.ones((3, 2, 3, 3), np.float32), None, rm, rv, w, b)
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        fastbn.fold_conv(np.ones((4, 2), np.float32), None, rm, rv, w, b)
    with pytest.raises(ValueError, match="2-D"):
        fastbn.fold_linear(np.ones((4, 2, 2), np.float32), None, rm, rv, w, b)
    with pytest.raises(ValueError, match=r"conv_bias must have shape \(4,\)"):
        fastbn.fold_conv(np.ones((4, 2, 3), np.float32), np.ones(3), rm, rv, w, b)
    with pytest.raises(ValueError, match="non-negative"):
        fastbn.scale_shift(rm, -rv)
    with pytest.raises(ValueError, match="eps"):
        fastbn.scale_shift(rm, rv, eps=-1.0)
    with pytest.raises(TypeError, match="conv_weight must be a float array"):
        fastbn.fold_conv(np.ones((4, 2, 3), np.int64), None, rm, rv)


@pytest.mark.parametrize("groups", [1, 2])
def test_fold_conv_transpose_matches_torch(groups, rng):
    """ConvTranspose2d then BatchNorm2d (eval) against the folded ConvTranspose2d, in float64."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=groups, bias=True).double()
    bn = nn.BatchNorm2d(6, eps=1e-3).double().eval()
    rm, rv, w, b = bn_params(rng, 6, np.float64)
    with torch.no_grad():
        for param, value in zip((bn.running_mean, bn.running_var, bn.weight, bn.bias),
                                (rm, rv, w, b)):
            param.copy_(torch.from_numpy(value))
    assert conv.weight.shape == (4, 6 // groups, 3, 3)
    fw, fb = fastbn.fold_conv_transpose(conv.weight.detach().numpy(), conv.bias.detach().numpy(),
                                        rm, rv, w, b, eps=1e-3, groups=groups)
    folded = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=groups, bias=True).double()
    with torch.no_grad():
        folded.weight.copy_(torch.from_numpy(fw))
        folded.bias.copy_(torch.from_numpy(fb))
        x = torch.from_numpy(rng.standard_normal((2, 4, 5, 5)))
        expected = bn(conv(x)).numpy()
        assert_close(folded(x).numpy(), expected, 1e-12)
    # no bias: the batch norm's shift becomes the bias
    fw0, fb0 = fastbn.fold_conv_transpose(conv.weight.detach().numpy(), None, rm, rv, w, b,
                                          eps=1e-3, groups=groups)
    np.testing.assert_array_equal(fw0, fw)
    np.testing.assert_allclose(fb0, b - rm * w / np.sqrt(rv + 1e-3), rtol=1e-14)


def test_fold_conv_transpose_errors(rng):
    rm, rv, w, b = bn_params(rng, 6)
    with pytest.raises(ValueError, match="2 x 2 output channels, the batch norm 6"):
        fastbn.fold_conv_transpose(np.ones((4, 2, 3, 3), np.float32), None, rm, rv, w, b,
                                   groups=2)
    with pytest.raises(ValueError, match="5 input channels, not a multiple of groups=2"):
        fastbn.fold_conv_transpose(np.ones((5, 3, 3, 3), np.float32), None, rm, rv, w, b,
                                   groups=2)
    for groups in (0, 1.0, True):
        with pytest.raises(ValueError, match="groups must be a positive integer"):
            fastbn.fold_conv_transpose(np.ones((6, 6, 3, 3), np.float32), None, rm, rv,
                                       groups=groups)


def half_dtypes():
    dtypes = [pytest.param(np.float16, id="float16")]
    try:
        import ml_dtypes
        dtypes.append(pytest.param(ml_dtypes.bfloat16, id="bfloat16"))
    except ImportError:
        dtypes.append(pytest.param(None, id="bfloat16",
                                   marks=pytest.mark.skip("ml_dtypes is not installed")))
    return dtypes


@pytest.mark.parametrize("dtype", half_dtypes())
def test_half_precision_is_the_float64_result_rounded_once(dtype, rng):
    """Half-precision weights and statistics: the float64 fold of the same values, rounded to
    the half dtype once (no intermediate rounding)."""
    rm, rv, w, b = (v.astype(dtype) for v in bn_params(rng, 6, np.float64))
    wide = [v.astype(np.float64) for v in (rm, rv, w, b)]
    conv_w = rng.standard_normal((6, 2, 3, 3)).astype(dtype)
    conv_b = rng.standard_normal(6).astype(dtype)
    convt_w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    lin_w = rng.standard_normal((6, 5)).astype(dtype)
    for fold, weights in [(fastbn.fold_conv, conv_w), (fastbn.fold_linear, lin_w),
                          (lambda *a: fastbn.fold_conv_transpose(*a, groups=2), convt_w)]:
        fw, fb = fold(weights, conv_b, rm, rv, w, b)
        ew, eb = fold(weights.astype(np.float64), conv_b.astype(np.float64), *wide)
        assert fw.dtype == fb.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(fw, ew.astype(dtype))
        np.testing.assert_array_equal(fb, eb.astype(dtype))
    a, c = fastbn.scale_shift(rm, rv, w, b)
    ea, ec = fastbn.scale_shift(*wide)
    assert a.dtype == c.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(a, ea.astype(dtype))
    np.testing.assert_array_equal(c, ec.astype(dtype))
