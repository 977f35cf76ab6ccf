"""Cross-check against torch.nn.functional.batch_norm and autograd (skipped without torch)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastbn  # noqa: E402
from conftest import DTYPES, make_input, make_params  # noqa: E402

TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}
# torch computes in the input's precision with its own summation order: compare loosely
TOL = {np.float32: 2e-5, np.float64: 1e-11}

CASES = [((8, 5), 1, None),
         ((4, 3, 17), 1, None),
         ((4, 6, 9, 11), 1, None),
         ((4, 6, 9, 11), 1, torch.channels_last),
         ((2, 3, 4, 5, 6), 1, None),
         ((2, 3, 4, 5, 6), 1, torch.channels_last_3d),
         ((8, 64, 24, 24), 1, None)]


def to_torch(a, memory_format=None):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.contiguous(memory_format=memory_format) if memory_format else t


def close(a, t, dtype):
    np.testing.assert_allclose(a, t.detach().numpy(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,memory_format", CASES)
def test_matches_torch_training_and_autograd(shape, axis, memory_format, dtype, rng):
    x = make_input(shape, axis, dtype, rng, offset=1.0)
    C = shape[axis]
    weight, bias = make_params(C, dtype, rng)
    dy = rng.standard_normal(shape).astype(dtype)

    xt = to_torch(x, memory_format).requires_grad_(True)
    wt = torch.from_numpy(weight.copy()).requires_grad_(True)
    bt = torch.from_numpy(bias.copy()).requires_grad_(True)
    rm_t, rv_t = torch.zeros(C, dtype=TORCH_DTYPE[dtype]), torch.ones(C, dtype=TORCH_DTYPE[dtype])
    yt = F.batch_norm(xt, rm_t, rv_t, wt, bt, training=True, momentum=0.2, eps=1e-4)
    yt.backward(torch.from_numpy(dy))

    if memory_format is not None:       # hand fastbn the same memory: channels-last view
        x_in = xt.detach().numpy()
        assert not x_in.flags.c_contiguous
    else:
        x_in = x
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y, mean, invstd = fastbn.batch_norm_train(x_in, weight, bias, eps=1e-4, axis=axis,
                                              running_mean=rm, running_var=rv, momentum=0.2)
    close(y, yt, dtype)
    close(rm, rm_t, dtype)
    close(rv, rv_t, dtype)
    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x_in, mean, invstd, weight, axis=axis)
    close(dx, xt.grad, dtype)
    close(dweight, wt.grad, dtype)
    close(dbias, bt.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,memory_format", CASES)
def test_matches_torch_inference(shape, axis, memory_format, dtype, rng):
    x = make_input(shape, axis, dtype, rng)
    C = shape[axis]
    weight, bias = make_params(C, dtype, rng)
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    yt = F.batch_norm(to_torch(x, memory_format), torch.from_numpy(rm), torch.from_numpy(rv),
                      torch.from_numpy(weight), torch.from_numpy(bias), training=False)
    close(fastbn.batch_norm(x, rm, rv, weight, bias, training=False), yt, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_batch_norm_saved_statistics(dtype, rng):
    """mean and invstd are what torch.native_batch_norm saves for its backward."""
    x = make_input((6, 4, 7, 7), 1, dtype, rng, offset=2.0)
    _, save_mean, save_invstd = torch.native_batch_norm(torch.from_numpy(x), None, None, None,
                                                        None, True, 0.1, 1e-5)
    _, mean, invstd = fastbn.batch_norm_train(x)
    close(mean, save_mean, dtype)
    close(invstd, save_invstd, dtype)


TORCH_ACTIVATION = {None: lambda z: z, "relu": F.relu,
                    "leaky_relu": lambda z: F.leaky_relu(z, 0.05), "tanh": torch.tanh}


@pytest.mark.parametrize("activation", list(TORCH_ACTIVATION))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,memory_format", [CASES[2], CASES[3], CASES[0]])
def test_fused_matches_torch_autograd(shape, axis, memory_format, dtype, activation, rng):
    """act(batch_norm(x) + residual), forward in training and evaluation, and autograd's
    gradients for x, weight, bias and the residual."""
    x = make_input(shape, axis, dtype, rng, offset=1.0)
    C = shape[axis]
    weight, bias = make_params(C, dtype, rng)
    residual = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)

    xt = to_torch(x, memory_format).requires_grad_(True)
    rt = to_torch(residual, memory_format).requires_grad_(True)
    wt = torch.from_numpy(weight.copy()).requires_grad_(True)
    bt = torch.from_numpy(bias.copy()).requires_grad_(True)
    act_t = TORCH_ACTIVATION[activation]
    yt = act_t(F.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-4) + rt)
    yt.backward(torch.from_numpy(dy))
    yt_eval = act_t(F.batch_norm(xt.detach(), torch.from_numpy(rm), torch.from_numpy(rv),
                                 torch.from_numpy(weight), torch.from_numpy(bias),
                                 training=False, eps=1e-4) + rt.detach())

    x_in = xt.detach().numpy() if memory_format is not None else x
    fuse = dict(activation=activation, negative_slope=0.05)
    y, mean, invstd = fastbn.batch_norm_train(x_in, weight, bias, eps=1e-4, axis=axis,
                                              residual=residual, **fuse)
    close(y, yt, dtype)
    close(fastbn.batch_norm_infer(x_in, rm, rv, weight, bias, eps=1e-4, axis=axis,
                                  residual=residual, **fuse), yt_eval, dtype)
    dres = np.empty_like(x)
    dx, dweight, dbias = fastbn.batch_norm_backward(
        dy, x_in, mean, invstd, weight, axis=axis, y=y if activation else None,
        out_residual=dres, **fuse)
    close(dx, xt.grad, dtype)
    close(dweight, wt.grad, dtype)
    close(dbias, bt.grad, dtype)
    close(dres, rt.grad, dtype)
