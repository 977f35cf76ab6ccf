"""The activation registry (fastbn.activations) is what the kernels compute, NaN included."""
import numpy as np
import pytest

import fastbn
from fastbn import activations

NAMES = [name for name in activations.ACTIVATIONS if name is not None]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", NAMES)
def test_registry_forward_and_derivative_are_the_kernels(name, dtype):
    rng = np.random.default_rng(4)
    z = (rng.standard_normal((6, 3, 5)) * 2).astype(dtype)
    z[0, 0, :3] = [np.nan, 0.0, -0.0]
    C = z.shape[1]
    ones, zeros = np.ones(C, dtype), np.zeros(C, dtype)
    # inference with mean 0, var 1 - eps, no affine: bn(z) = z to rounding, so y = act(z)
    eps = 1e-5
    y = fastbn.batch_norm_infer(z, zeros, ones - dtype(eps), eps=eps, activation=name,
                                negative_slope=0.2)
    entry = activations.get(name)
    expected = entry.forward(z, 0.2)
    np.testing.assert_allclose(y, expected, rtol=4 * np.finfo(dtype).eps, atol=0)
    assert np.array_equal(np.isnan(y), np.isnan(expected))

    dy = rng.standard_normal(z.shape).astype(dtype)
    _, mean, invstd = fastbn.batch_norm_train(z[1:])
    g = np.empty_like(z)
    fastbn.batch_norm_backward(dy, z, np.zeros(C, dtype), ones, y=y, activation=name,
                               negative_slope=0.2, out_residual=g)
    np.testing.assert_allclose(g, entry.grad_from_y(dy, y, 0.2), rtol=4 * np.finfo(dtype).eps)


def test_registry_codes_and_names():
    codes = [a.code for a in activations.ACTIVATIONS.values()]
    assert len(set(codes)) == len(codes)
    assert activations.get(None).code == 0
    with pytest.raises(ValueError, match="activation must be None or one of 'relu'"):
        activations.get("gelu")
    with pytest.raises(TypeError, match="activation must be None or a str"):
        activations.get(3)


def test_layer_and_kernel_agree_on_nan_in_the_derivative():
    """relu's derivative at a NaN output passes dy, in the layer's evaluation-mode backward
    as in the fused kernel (they used to disagree)."""
    layer = fastbn.BatchNorm(2, activation="relu", dtype=np.float64)
    layer.eval()
    x = np.array([[np.nan, 1.0], [2.0, -1.0]])
    y = layer(x)
    dx = layer.backward(np.ones_like(x))
    g = np.empty_like(x)
    fastbn.batch_norm_backward(np.ones_like(x), x, np.zeros(2), np.ones(2), y=y,
                               activation="relu", out_residual=g)
    assert g[0, 0] == 1.0                                   # the kernel passes dy at NaN
    assert dx[0, 0] == 1.0 / np.sqrt(1.0 + layer.eps)       # and so does the layer
