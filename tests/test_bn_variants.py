"""BatchNorm's variants (issue 16): bias=False, batch renormalization, ghost batch norm."""
import numpy as np
import pytest

import fastbn
from fastbn import reference as R


def _rng():
    return np.random.default_rng(16)


# ------------------------------------------------------------------------------- bias=False

def test_bias_false_layer():
    layer = fastbn.BatchNorm(4, bias=False)
    assert layer.weight is not None and layer.bias is None
    assert "bias" not in layer.state_dict()
    x = _rng().standard_normal((8, 4, 3)).astype(np.float32)
    y = layer(x)
    layer.backward(np.ones_like(y))
    assert layer.grad_bias is None and layer.grad_weight is not None
    assert "bias=False" in repr(layer)
    with pytest.raises(ValueError, match="unexpected.*bias"):
        layer.load_state_dict({**layer.state_dict(), "bias": np.zeros(4, np.float32)})


def test_defaults_unchanged():
    """The defaults give the bits they gave (the same calls as before the variants)."""
    x = _rng().standard_normal((6, 3, 5)).astype(np.float32)
    layer = fastbn.BatchNorm(3)
    y = layer(x)
    want, _, _ = fastbn.batch_norm_train(x, np.ones(3, np.float32), np.zeros(3, np.float32))
    np.testing.assert_array_equal(y, want)
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_var",
                                       "num_batches_tracked"}


def test_bias_false_against_torch():
    torch = pytest.importorskip("torch")
    rng = _rng()
    tl = torch.nn.BatchNorm2d(3, bias=False, dtype=torch.float64)
    with torch.no_grad():
        tl.weight.copy_(torch.tensor(rng.uniform(0.5, 2, 3)))
    x = rng.standard_normal((5, 3, 4, 4)) * 2 + 1
    tl(torch.tensor(x))                         # one training step: running statistics
    layer = fastbn.BatchNorm(3, bias=False, dtype=np.float64)
    layer.load_state_dict({k: v.numpy() for k, v in tl.state_dict().items()})
    xt = torch.tensor(x, requires_grad=True)
    yt = tl(xt)
    y = layer(x)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(x.shape)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(layer.backward(dy), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.grad_weight, tl.weight.grad.numpy(), rtol=1e-10)
    assert tl.bias is None and layer.grad_bias is None
    for k in ("running_mean", "running_var"):
        np.testing.assert_allclose(getattr(layer, k), getattr(tl, k).numpy(), rtol=1e-12)
    tl.eval(), layer.eval()
    np.testing.assert_allclose(layer(x), tl(torch.tensor(x)).detach().numpy(), rtol=1e-12,
                               atol=1e-12)


# ------------------------------------------------------------------------------ renorm

def _renorm_paper(x, gamma, beta, mu_r, sigma_r, eps, rmin, rmax, dmax, axis=1):
    """Algorithm 1 of Ioffe 2017 (with Keras's sigma_R floor sqrt(eps)), NumPy, float64:
    y and, with r and d held constant, the function of (x, gamma, beta) it defines."""
    red = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    mu = x.mean(axis=red)
    sigma = np.sqrt(x.var(axis=red) + eps)
    sr = np.maximum(sigma_r, np.sqrt(eps))
    r = np.clip(sigma / sr, rmin, rmax)
    d = np.clip((mu - mu_r) / sr, -dmax, dmax)

    def f(x, gamma, beta):       # r, d constants (stop_gradient)
        m = x.mean(axis=red).reshape(shape)
        s = np.sqrt(x.var(axis=red) + eps).reshape(shape)
        xhat = (x - m) / s
        return (xhat * r.reshape(shape) + d.reshape(shape)) * gamma.reshape(shape) \
            + beta.reshape(shape)
    return f, r, d, mu, sigma


def _numeric_grad(f, args, i, dy, h=1e-6):
    g = np.zeros_like(args[i])
    for idx in np.ndindex(args[i].shape):
        plus = [a.copy() for a in args]
        minus = [a.copy() for a in args]
        plus[i][idx] += h
        minus[i][idx] -= h
        g[idx] = ((f(*plus) - f(*minus)) * dy).sum() / (2 * h)
    return g


@pytest.mark.parametrize("axis", [1, -1])
def test_renorm_against_algorithm_1(axis):
    rng = _rng()
    C = 3
    shape = (6, C, 4) if axis == 1 else (6, 4, C)
    clipping = {"rmax": 1.5, "dmax": 0.5}
    layer = fastbn.BatchNorm(C, dtype=np.float64, axis=axis, renorm=True,
                             renorm_clipping=clipping, renorm_momentum=0.9)
    layer.weight[...] = rng.uniform(0.5, 2, C)
    layer.bias[...] = rng.standard_normal(C)
    mu_r, sigma_r = np.zeros(C), np.ones(C)
    for step in range(3):       # the renorm moments move: later steps clip differently
        x = rng.standard_normal(shape) * rng.uniform(0.3, 3) + rng.standard_normal() * 2
        f, r, d, mu, sigma = _renorm_paper(x, layer.weight, layer.bias, mu_r, sigma_r,
                                           layer.eps, 1 / 1.5, 1.5, 0.5, axis % 3)
        y = layer(x)
        np.testing.assert_allclose(y, f(x, layer.weight, layer.bias), rtol=1e-12, atol=1e-12)
        mu_r = 0.9 * mu_r + 0.1 * mu
        sigma_r = 0.9 * sigma_r + 0.1 * sigma
        np.testing.assert_allclose(layer.renorm_mean, mu_r, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(layer.renorm_stddev, sigma_r, rtol=1e-12)
    dy = rng.standard_normal(shape)
    args = [x, layer.weight.copy(), layer.bias.copy()]
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, _numeric_grad(f, args, 0, dy), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.grad_weight, _numeric_grad(f, args, 1, dy), rtol=1e-7)
    np.testing.assert_allclose(layer.grad_bias, _numeric_grad(f, args, 2, dy), rtol=1e-7)
    # the explicit formula: dgamma = sum dy (xhat r + d)
    red = tuple(i for i in range(3) if i != axis % 3)
    xhat = (x - x.mean(axis=red, keepdims=True)) / np.sqrt(
        x.var(axis=red, keepdims=True) + layer.eps)
    rs = r.reshape([-1 if i == axis % 3 else 1 for i in range(3)])
    ds = d.reshape(rs.shape)
    np.testing.assert_allclose(layer.grad_weight, (dy * (xhat * rs + ds)).sum(axis=red),
                               rtol=1e-12)


def test_renorm_running_stats_and_eval():
    """Inference statistics as without renorm; eval applies no correction."""
    rng = _rng()
    x = rng.standard_normal((10, 3)) * 4 + 1
    plain = fastbn.BatchNorm(3, dtype=np.float64)
    renorm = fastbn.BatchNorm(3, dtype=np.float64, renorm=True, renorm_clipping={"rmax": 3})
    plain(x), renorm(x)
    for k in ("running_mean", "running_var"):
        np.testing.assert_allclose(getattr(renorm, k), getattr(plain, k), rtol=1e-14)
    plain.eval(), renorm.eval()
    np.testing.assert_array_equal(renorm(x), plain(x))
    before = renorm.renorm_mean.copy()
    renorm(x)
    np.testing.assert_array_equal(renorm.renorm_mean, before)


def test_renorm_unclipped_first_step_is_batch_norm():
    """Fresh renorm moments (0, 1) with no clipping: r = sigma_B, d = mu_B, so
    y = x * gamma + beta exactly undoes the normalization (the paper's identity at r = sigma_B /
    sigma_R, d = (mu_B - mu_R) / sigma_R)."""
    x = _rng().standard_normal((8, 2, 3))
    layer = fastbn.BatchNorm(2, dtype=np.float64, renorm=True)
    np.testing.assert_allclose(layer(x), x, rtol=1e-12, atol=1e-12)


def test_renorm_state_dict_roundtrip(tmp_path):
    layer = fastbn.BatchNorm(3, renorm=True, renorm_clipping={"rmax": 2, "dmax": 1})
    layer(_rng().standard_normal((5, 3)).astype(np.float32))
    path = tmp_path / "s.npz"
    layer.save(path)
    other = fastbn.BatchNorm(3, renorm=True)
    other.load(path)
    np.testing.assert_array_equal(other.renorm_stddev, layer.renorm_stddev)
    with pytest.raises(ValueError, match="missing.*renorm_mean"):
        other.load_state_dict(fastbn.BatchNorm(3).state_dict())


@pytest.mark.parametrize("kwargs, error, name", [
    ({"renorm": True, "renorm_clipping": {"rmax": 2, "foo": 1}}, ValueError, "renorm_clipping"),
    ({"renorm": True, "renorm_clipping": [("rmax", 2)]}, TypeError, "renorm_clipping"),
    ({"renorm": True, "renorm_clipping": {"rmax": -1}}, ValueError, "renorm_clipping"),
    ({"renorm": True, "renorm_clipping": {"rmin": 3, "rmax": 2}}, ValueError, "rmin"),
    ({"renorm": True, "renorm_momentum": 1.5}, ValueError, "renorm_momentum"),
    ({"virtual_batch_size": 0}, ValueError, "virtual_batch_size"),
    ({"virtual_batch_size": 2.0}, TypeError, "virtual_batch_size"),
    ({"virtual_batch_size": True}, TypeError, "virtual_batch_size"),
    ({"virtual_batch_size": 2, "renorm": True}, ValueError, "virtual_batch_size"),
])
def test_validation(kwargs, error, name):
    with pytest.raises(error, match=name):
        fastbn.BatchNorm(3, **kwargs)


def test_renorm_clipping_defaults():
    from fastbn._variants import renorm_clipping
    assert renorm_clipping({"rmax": 4, "dmax": 2}) == (0.25, 4.0, 2.0)
    assert renorm_clipping(None) == (0.0, np.inf, np.inf)       # Keras: inf, 0, inf


# ------------------------------------------------------------------------- ghost batch norm

def _ghost_loop(x, dy, vbs, weight, bias, eps, axis):
    """The reference: a NumPy loop over the ghost batches of fastbn.reference's batch norm."""
    ys, dxs, dw, db, means, vars_ = [], [], 0, 0, [], []
    for k in range(0, x.shape[0], vbs):
        xk, dyk = x[k:k + vbs], dy[k:k + vbs]
        y, mean, invstd = R.batch_norm_train(xk, weight, bias, eps=eps, axis=axis)[:3]
        dx, dwk, dbk = R.batch_norm_backward(dyk, xk, mean, invstd, weight, axis=axis)
        ys.append(y), dxs.append(dx)
        dw, db = dw + dwk, db + dbk
        red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        means.append(xk.astype(np.float64).mean(axis=red))
        vars_.append(xk.astype(np.float64).var(axis=red, ddof=1))
    return (np.concatenate(ys), np.concatenate(dxs), dw, db, np.mean(means, 0),
            np.mean(vars_, 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis, shape", [(1, (11, 3, 2, 5)), (-1, (11, 2, 5, 3)),
                                         (1, (10, 4)), (-1, (9, 7, 4))])
@pytest.mark.parametrize("vbs", [4, 5, 1000])
def test_ghost_against_loop(dtype, axis, shape, vbs):
    rng = _rng()
    C = shape[axis]
    if shape[0] % vbs == 1 and np.prod(shape) // (shape[0] * C) == 1:
        pytest.skip("a last ghost of one value per channel (tested as an error)")
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    layer = fastbn.BatchNorm(C, dtype=dtype, axis=axis, virtual_batch_size=vbs)
    layer.weight[...] = rng.uniform(0.5, 2, C)
    layer.bias[...] = rng.standard_normal(C)
    y = layer(x)
    dx = layer.backward(dy)
    want = _ghost_loop(x, dy, vbs, layer.weight, layer.bias, layer.eps, axis)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)
    assert y.dtype == dtype and y.shape == shape and y.flags.c_contiguous
    np.testing.assert_allclose(y, want[0], **tol)
    np.testing.assert_allclose(dx, want[1], **tol)
    np.testing.assert_allclose(layer.grad_weight, want[2], **tol)
    np.testing.assert_allclose(layer.grad_bias, want[3], **tol)
    # running statistics: torch's momentum rule on the ghosts' average mean, unbiased var
    np.testing.assert_allclose(layer.running_mean, 0.1 * want[4], **tol)
    np.testing.assert_allclose(layer.running_var, 0.9 + 0.1 * want[5], **tol)
    layer.eval()            # evaluation is unchanged
    plain = fastbn.BatchNorm(C, dtype=dtype, axis=axis)
    plain.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(layer.eval()(x), plain.eval()(x))


def test_ghost_whole_batch_is_batch_norm():
    """One ghost of the whole batch is batch norm (to rounding: other stages)."""
    x = _rng().standard_normal((8, 3, 6))
    ghost = fastbn.BatchNorm(3, dtype=np.float64, virtual_batch_size=8)
    plain = fastbn.BatchNorm(3, dtype=np.float64)
    np.testing.assert_allclose(ghost(x), plain(x), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(ghost.running_var, plain.running_var, rtol=1e-13)


def test_ghost_fused_residual_activation():
    rng = _rng()
    x = rng.standard_normal((7, 3, 4))
    res = rng.standard_normal(x.shape)
    dy = rng.standard_normal(x.shape)
    layer = fastbn.BatchNorm(3, dtype=np.float64, virtual_batch_size=3, activation="relu")
    y = layer(x, res)
    dx = layer.backward(dy)
    pre = np.concatenate([R.batch_norm_train(x[k:k + 3], eps=layer.eps)[0]
                          for k in range(0, 7, 3)]) + res
    np.testing.assert_allclose(y, np.maximum(pre, 0), rtol=1e-12, atol=1e-12)
    g = dy * (pre > 0)
    np.testing.assert_allclose(layer.grad_residual, g, rtol=1e-12, atol=1e-12)
    want = _ghost_loop(x, g, 3, None, None, layer.eps, 1)
    np.testing.assert_allclose(dx, want[1], rtol=1e-10, atol=1e-12)


def test_ghost_keras_rule():
    """Keras: moving = moving * m + (average of the ghosts' population stats) * (1 - m)."""
    x = _rng().standard_normal((8, 5, 3))
    layer = fastbn.BatchNorm.keras(3, momentum=0.9, dtype=np.float64, virtual_batch_size=4)
    layer(x)
    ghosts = x.reshape(2, 4 * 5, 3)
    np.testing.assert_allclose(layer.running_mean, 0.1 * ghosts.mean(1).mean(0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, 0.9 + 0.1 * ghosts.var(1).mean(0),
                               rtol=1e-12)
    assert "virtual_batch_size=4" in repr(layer)


def test_ghost_last_batch_of_one_value():
    layer = fastbn.BatchNorm(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        layer(np.zeros((9, 3), np.float32))
