"""fastbn.BatchNorm against torch.nn.BatchNorm1d/2d/3d through the same train/eval sequence:
every output, gradient and buffer; state dicts both ways; .npz save/load; errors; Keras
conventions, the window, the repr. The tests that compare with PyTorch are skipped without it
(each on its own: the others run anyway)."""
import numpy as np
import pytest

import fastbn

try:
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="compares with PyTorch, not installed")

if torch is not None:
    TORCH_LAYER = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                   5: torch.nn.BatchNorm3d}
TOL = {np.float32: 2e-5, np.float64: 1e-10}


def close(a, t, dtype):
    np.testing.assert_allclose(a, t.detach().numpy(), rtol=TOL[dtype], atol=TOL[dtype])


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,channels_last", [((8, 5), False), ((6, 4, 9), False),
                                                 ((4, 3, 6, 5), False), ((4, 3, 6, 5), True),
                                                 ((2, 3, 4, 5, 3), False)])
@pytest.mark.parametrize("momentum,affine,track", [(0.1, True, True), (None, True, True),
                                                   (0.3, False, True), (0.1, True, False)])
def test_same_sequence_as_torch(shape, channels_last, dtype, momentum, affine, track, rng):
    C = shape[1]
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    tlayer = TORCH_LAYER[len(shape)](C, eps=1e-4, momentum=momentum, affine=affine,
                                     track_running_stats=track).to(tdtype)
    layer = fastbn.BatchNorm(C, eps=1e-4, momentum=momentum, affine=affine,
                             track_running_stats=track, axis=-1 if channels_last else 1,
                             dtype=dtype)
    if affine:      # the same non-trivial parameters in both
        w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
        with torch.no_grad():
            tlayer.weight.copy_(torch.from_numpy(w))
            tlayer.bias.copy_(torch.from_numpy(b))
        layer.weight[...], layer.bias[...] = w, b
    for step, training in enumerate([True, True, False, True, False]):
        tlayer.train(training)
        layer.train(training)
        x = (2.0 + 3 * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = tlayer(xt)
        yt.backward(torch.from_numpy(dy))
        x_in, dy_in = x, dy
        if channels_last:
            x_in, dy_in = np.moveaxis(x, 1, -1).copy(), np.moveaxis(dy, 1, -1).copy()
        y = layer(x_in)
        dx = layer.backward(dy_in)
        if channels_last:
            y, dx = np.moveaxis(y, -1, 1), np.moveaxis(dx, -1, 1)
        close(y, yt, dtype)
        close(dx, xt.grad, dtype)
        if affine:
            close(layer.grad_weight, tlayer.weight.grad, dtype)
            close(layer.grad_bias, tlayer.bias.grad, dtype)
            tlayer.weight.grad = tlayer.bias.grad = None
        if track:
            close(layer.running_mean, tlayer.running_mean, dtype)
            close(layer.running_var, tlayer.running_var, dtype)
            assert layer.num_batches_tracked == int(tlayer.num_batches_tracked)


@needs_torch
def test_state_dict_round_trips_with_torch(rng, tmp_path):
    tlayer = torch.nn.BatchNorm2d(4)
    tlayer.train()
    for _ in range(3):
        tlayer(torch.randn(5, 4, 3, 3) * 2 + 1)
    tlayer.eval()
    layer = fastbn.BatchNorm(4)
    layer.load_state_dict({k: v.numpy() for k, v in tlayer.state_dict().items()})
    layer.eval()
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    close(layer(x), tlayer(torch.from_numpy(x)), np.float32)
    loaded = torch.nn.BatchNorm2d(4)
    loaded.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in layer.state_dict().items()})
    for k, v in loaded.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), tlayer.state_dict()[k].numpy())
    layer.save(tmp_path / "bn.npz")
    again = fastbn.BatchNorm(4)
    again.load(tmp_path / "bn.npz")
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, again.state_dict()[k])


def test_errors_leave_the_layer_unchanged(rng):
    layer = fastbn.BatchNorm(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(np.ones((1, 3), np.float32))
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_var, 1.0)
    with pytest.raises(ValueError, match="num_features=3"):
        layer(np.ones((4, 5), np.float32))
    with pytest.raises(TypeError, match="layer's dtype"):
        layer(np.ones((4, 3), np.float64))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        layer([[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="state dict keys"):
        layer.load_state_dict({"weight": np.ones(3)})
    with pytest.raises(ValueError, match="running_var must be a float array of shape"):
        layer.load_state_dict({"weight": np.ones(3), "bias": np.zeros(3),
                               "running_mean": np.zeros(3), "running_var": np.ones(4),
                               "num_batches_tracked": np.array(0)})
    np.testing.assert_array_equal(layer.running_var, 1.0)
    with pytest.raises(RuntimeError, match="forward first"):
        fastbn.BatchNorm(2).backward(np.ones((2, 2), np.float32))
    with pytest.raises(TypeError, match="num_features"):
        fastbn.BatchNorm(2.0)
    with pytest.raises(ValueError, match="momentum"):
        fastbn.BatchNorm(2, momentum=2.0)


def keras_reference(batches, momentum, epsilon, gamma, beta, axis):
    """Keras's documented formulas, in float64: training output and moving statistics."""
    moving_mean, moving_var = np.zeros(gamma.size), np.ones(gamma.size)
    outputs = []
    for x in batches:
        axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        mean, var = x.mean(axis=axes), x.var(axis=axes)          # population variance
        shape = [1] * x.ndim
        shape[axis] = -1
        outputs.append((x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon)
                       * gamma.reshape(shape) + beta.reshape(shape))
        moving_mean = moving_mean * momentum + mean * (1 - momentum)
        moving_var = moving_var * momentum + var * (1 - momentum)
    return outputs, moving_mean, moving_var


@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False)])
def test_keras_conventions(center, scale, rng):
    layer = fastbn.BatchNorm.keras(4, momentum=0.9, center=center, scale=scale, dtype=np.float64)
    assert layer.eps == 1e-3 and layer.axis == -1
    assert (layer.weight is None) == (not scale) and (layer.bias is None) == (not center)
    assert layer.affine == (center and scale)
    assert f"center={center}, scale={scale}" in repr(layer)
    if scale:
        layer.weight[...] = rng.uniform(0.5, 1.5, 4)
    if center:
        layer.bias[...] = rng.standard_normal(4)
    gamma = layer.weight if scale else np.ones(4)
    beta = layer.bias if center else np.zeros(4)
    batches = [2 + rng.standard_normal((6, 5, 4)) for _ in range(3)]
    outputs, moving_mean, moving_var = keras_reference(batches, 0.9, 1e-3, gamma, beta, -1)
    for x, want in zip(batches, outputs):
        np.testing.assert_allclose(layer(x), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.running_mean, moving_mean, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(layer.running_var, moving_var, rtol=1e-13)
    layer.eval()
    x = rng.standard_normal((3, 5, 4))
    want = (x - moving_mean) / np.sqrt(moving_var + 1e-3) * gamma + beta
    np.testing.assert_allclose(layer(x), want, rtol=1e-12, atol=1e-12)
    assert set(layer.state_dict()) == ({"weight"} if scale else set()) | (
        {"bias"} if center else set()) | {"running_mean", "running_var", "num_batches_tracked"}


def test_sliding_window_statistics(rng):
    layer = fastbn.BatchNorm(3, window=2, dtype=np.float64)
    means, variances = [], []
    for step in range(4):
        x = step + rng.standard_normal((7, 3, 5)) * (step + 1)
        layer(x)
        means.append(x.mean(axis=(0, 2)))
        variances.append(x.var(axis=(0, 2), ddof=1))            # unbiased, as PyTorch
        np.testing.assert_allclose(layer.running_mean, np.mean(means[-2:], axis=0), rtol=1e-13)
        np.testing.assert_allclose(layer.running_var, np.mean(variances[-2:], axis=0), rtol=1e-13)
    assert layer.num_batches_tracked == 4 and "window=2" in repr(layer)
    with pytest.raises(ValueError, match="window must be a positive int"):
        fastbn.BatchNorm(3, window=0)


def torch_activation(name):
    return {"relu": torch.nn.functional.relu,
            "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, 0.1),
            "tanh": torch.tanh}[name]


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_layer_same_sequence_as_torch(activation, with_residual, dtype, rng):
    """BatchNorm(activation=...) with a residual against torch's BatchNorm2d, add, activation:
    outputs, dx, grad_weight, grad_bias, grad_residual, buffers, in train and eval steps."""
    C, shape = 3, (4, 3, 6, 5)
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    tlayer = torch.nn.BatchNorm2d(C, eps=1e-4).to(tdtype)
    layer = fastbn.BatchNorm(C, eps=1e-4, dtype=dtype, activation=activation,
                             negative_slope=0.1)
    act = torch_activation(activation)
    for training in [True, True, False, True, False]:
        tlayer.train(training)
        layer.train(training)
        x = (2.0 + 3 * rng.standard_normal(shape)).astype(dtype)
        r = rng.standard_normal(shape).astype(dtype) if with_residual else None
        dy = rng.standard_normal(shape).astype(dtype)
        xt = torch.from_numpy(x).requires_grad_(True)
        rt = torch.from_numpy(r).requires_grad_(True) if with_residual else 0
        yt = act(tlayer(xt) + rt)
        yt.backward(torch.from_numpy(dy))
        y = layer(x, r)
        close(y, yt, dtype)
        close(layer.backward(dy), xt.grad, dtype)
        close(layer.grad_weight, tlayer.weight.grad, dtype)
        close(layer.grad_bias, tlayer.bias.grad, dtype)
        if with_residual:
            close(layer.grad_residual, rt.grad, dtype)
        else:
            assert layer.grad_residual is None
        tlayer.weight.grad = tlayer.bias.grad = None
        close(layer.running_mean, tlayer.running_mean, dtype)
        close(layer.running_var, tlayer.running_var, dtype)


def test_fused_layer_arguments():
    with pytest.raises(ValueError, match="activation"):
        fastbn.BatchNorm(3, activation="gelu")
    with pytest.raises(ValueError, match="negative_slope"):
        fastbn.BatchNorm(3, activation="leaky_relu", negative_slope=-0.5)
    assert "activation='tanh'" in repr(fastbn.BatchNorm(3, activation="tanh"))


def test_state_dict_and_save_load_round_trip(rng, tmp_path):
    """Without torch: the state after training survives state_dict / load_state_dict and
    save / load, and the loaded layer computes the same evaluation output."""
    layer = fastbn.BatchNorm(4, momentum=0.2)
    layer.weight[...] = rng.uniform(0.5, 1.5, 4)
    layer.bias[...] = rng.standard_normal(4)
    for _ in range(3):
        layer(rng.standard_normal((5, 4, 3, 3)).astype(np.float32) * 2 + 1)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert int(state["num_batches_tracked"]) == 3
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    want = layer.eval()(x)
    copy = fastbn.BatchNorm(4)
    copy.load_state_dict(state)
    layer.save(tmp_path / "bn.npz")
    loaded = fastbn.BatchNorm(4)
    assert loaded.load(tmp_path / "bn.npz") is None
    for other in (copy, loaded):
        for k, v in state.items():
            np.testing.assert_array_equal(other.state_dict()[k], v)
        assert other.num_batches_tracked == 3
        np.testing.assert_array_equal(other.eval()(x), want)


REPR_CASES = [
    lambda: fastbn.BatchNorm(3),
    lambda: fastbn.BatchNorm(3, eps=1e-3, momentum=None, affine=False, axis=-1,
                             dtype=np.float64),
    lambda: fastbn.BatchNorm(3, momentum=0.3, track_running_stats=False),
    lambda: fastbn.BatchNorm(3, window=2, activation="leaky_relu", negative_slope=0.2),
    lambda: fastbn.BatchNorm.keras(3),
    lambda: fastbn.BatchNorm.keras(3, momentum=0.9, epsilon=1e-4, center=False, axis=1,
                                   dtype=np.float64),
    lambda: fastbn.BatchNorm.keras(3, scale=False),
]


@pytest.mark.parametrize("make", REPR_CASES)
def test_repr_builds_a_layer_that_behaves_the_same(make, rng):
    """eval(repr(layer)) is the same layer: same repr, and through the same training steps
    the same running statistics (Keras's momentum convention included) and outputs."""
    layer = make()
    again = eval(repr(layer), {"BatchNorm": fastbn.BatchNorm})
    assert repr(again) == repr(layer)
    axis = layer.axis
    for step in range(3):
        x = (1 + 2 * rng.standard_normal((6, 3, 4))).astype(layer.dtype)
        if axis == -1:
            x = np.moveaxis(x, 1, -1).copy()
        np.testing.assert_array_equal(again(x), layer(x))
    if layer.track_running_stats:
        np.testing.assert_array_equal(again.running_mean, layer.running_mean)
        np.testing.assert_array_equal(again.running_var, layer.running_var)
    for k in ("weight", "bias", "eps", "momentum", "affine", "window", "activation"):
        assert np.array_equal(getattr(again, k), getattr(layer, k)) or \
            getattr(again, k) == getattr(layer, k)


def test_keras_repr_keeps_the_keras_convention():
    layer = fastbn.BatchNorm.keras(4)
    assert repr(layer) == ("BatchNorm.keras(4, momentum=0.99, epsilon=0.001, center=True, "
                           "scale=True, axis=-1, dtype='float32')")


@pytest.mark.parametrize("eps,error,message", [
    ("a", TypeError, "eps must be a real number, got str"),
    (None, TypeError, "eps must be a real number, got NoneType"),
    (True, TypeError, "eps must be a real number, got bool"),
    (-1, ValueError, "eps must be a finite number >= 0, got -1"),
    (float("nan"), ValueError, "eps must be a finite number >= 0, got nan"),
    (float("inf"), ValueError, "eps must be a finite number >= 0, got inf"),
])
def test_bad_eps_is_rejected_at_construction(eps, error, message):
    with pytest.raises(error, match=message):
        fastbn.BatchNorm(3, eps=eps)
    with pytest.raises(error, match=message):         # Keras's epsilon is the same eps
        fastbn.BatchNorm.keras(3, epsilon=eps)


def test_channels_last_input_to_a_channels_first_layer_gets_a_hint(rng):
    layer = fastbn.BatchNorm(3)
    x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)      # NHWC
    with pytest.raises(ValueError, match=r"x has 5 channels on axis 1, this layer has "
                                         r"num_features=3; is the channel axis wrong\? x has 3 "
                                         r"values on axis -1 \(build the layer with axis=-1"):
        layer(x)
    with pytest.raises(ValueError) as error:                        # no axis has 3: no hint
        layer(rng.standard_normal((2, 5, 6, 7)).astype(np.float32))
    assert "channel axis wrong" not in str(error.value)
    assert fastbn.BatchNorm(3, axis=-1)(x).shape == x.shape


def test_public_methods_have_docstrings():
    for name in ("train", "eval", "forward", "backward", "state_dict", "load_state_dict",
                 "save", "load", "keras"):
        assert getattr(fastbn.BatchNorm, name).__doc__, name
