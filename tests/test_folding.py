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
