"""fastbn.torch against torch.nn.BatchNorm*d: gradcheck, training a small block, state dicts,
memory formats, the fallbacks and convert (skipped without torch)."""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import fastbn  # noqa: E402
import fastbn.torch as fbt  # noqa: E402

DTYPES = [torch.float32, torch.float64]
# float64 agrees with torch to rounding; float32 within torch's own float32 error
TOL = {torch.float32: 1e-4, torch.float64: 1e-11}


def pair(cls, *args, dtype=torch.float64, seed=0, **kwargs):
    """(torch's layer, fastbn's) with the same random affine parameters."""
    ours_cls = {nn.BatchNorm1d: fbt.BatchNorm1d, nn.BatchNorm2d: fbt.BatchNorm2d,
                nn.BatchNorm3d: fbt.BatchNorm3d}[cls]
    theirs = cls(*args, dtype=dtype, **kwargs)
    if theirs.weight is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5, generator=generator)
            if theirs.bias is not None:
                theirs.bias.uniform_(-0.5, 0.5, generator=generator)
    ours = ours_cls(*args, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def close(a, b, dtype):
    torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


def test_torch_is_imported_only_when_fastbn_torch_is_used():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    check = ("import sys, fastbn; assert 'torch' not in sys.modules; "
             "fastbn.torch.BatchNorm2d; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", check], cwd=root, check=True)
    assert fastbn.torch is fbt


@pytest.mark.parametrize("cls,shape,memory_format", [
    (nn.BatchNorm1d, (6, 3), None),
    (nn.BatchNorm1d, (4, 3, 5), None),
    (nn.BatchNorm2d, (3, 4, 5, 2), None),
    (nn.BatchNorm2d, (3, 4, 5, 2), torch.channels_last),
    (nn.BatchNorm3d, (2, 3, 2, 3, 2), torch.channels_last_3d),
])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(cls, shape, memory_format, training):
    _, ours = pair(cls, shape[1])
    ours.train(training)
    if not training:
        with torch.no_grad():
            ours.running_mean.uniform_(-1, 1)
            ours.running_var.uniform_(0.5, 2)
    x = torch.randn(shape, dtype=torch.float64)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    # the running statistics move with every training forward: check the function, not the
    # layer, so that gradcheck's repeated calls all see the same ones
    assert torch.autograd.gradcheck(lambda x, w, b: fbt._BatchNormFunction.apply(
        x, w, b, ours.running_mean.clone(), ours.running_var.clone(), training, 0.1, ours.eps),
        (x, ours.weight, ours.bias))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_forward_backward_and_running_stats_match_torch(dtype, memory_format, momentum):
    theirs, ours = pair(nn.BatchNorm2d, 6, dtype=dtype, momentum=momentum)
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        x = (torch.randn(5, 6, 7, 3, dtype=dtype, generator=generator) * 3 + 2).contiguous(
            memory_format=memory_format)
        dy = torch.randn(x.shape, dtype=dtype, generator=generator)
        x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
        y_theirs.backward(dy)
        y_ours.backward(dy)
        assert y_ours.is_contiguous(memory_format=memory_format)
        assert x_ours.grad.is_contiguous(memory_format=memory_format)
        close(y_ours, y_theirs, dtype)
        close(x_ours.grad, x_theirs.grad, dtype)
    close(ours.weight.grad, theirs.weight.grad, dtype)
    close(ours.bias.grad, theirs.bias.grad, dtype)
    for name, value in theirs.state_dict().items():
        close(ours.state_dict()[name], value, dtype)
    assert ours.num_batches_tracked.item() == 3


def test_outputs_keep_the_input_memory_format_and_strided_input_is_read_right():
    _, ours = pair(nn.BatchNorm2d, 8, dtype=torch.float32)
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    y = ours(x)
    assert y.stride() == x.stride()
    # a strided input (a slice) is read correctly: fastbn copies it once
    theirs, ours = pair(nn.BatchNorm2d, 3)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)[:, ::2, :, 1:]
    close(ours(x), theirs(x), torch.float64)


@pytest.mark.parametrize("kwargs", [dict(affine=False), dict(track_running_stats=False),
                                    dict(bias=False)])
def test_options_match_torch(kwargs):
    theirs, ours = pair(nn.BatchNorm1d, 4, **kwargs)
    x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    for mode in (True, False):
        theirs.train(mode)
        ours.train(mode)
        dy = torch.randn(10, 4, dtype=torch.float64)
        theirs(x).backward(dy)
        ours(x2).backward(dy)
        close(x2.grad, x.grad, torch.float64)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        close(a.grad, b.grad, torch.float64)
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_same_errors_as_torch():
    _, ours = pair(nn.BatchNorm2d, 3)
    with pytest.raises(ValueError, match="expected 4D input"):
        ours(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(1, 3, 1, 1, dtype=torch.float64))


def test_falls_back_to_torch_for_what_fastbn_does_not_take():
    theirs, ours = pair(nn.BatchNorm2d, 3, dtype=torch.float32)
    for module in (theirs, ours):
        module.to(torch.bfloat16)
    x = torch.randn(4, 3, 5, 5).to(torch.bfloat16)
    torch.testing.assert_close(ours(x), theirs(x))
    # input of another dtype than the parameters: torch's op decides (and errors as torch)
    theirs, ours = pair(nn.BatchNorm2d, 3, dtype=torch.float32)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError) as theirs_error:
        theirs(x)
    with pytest.raises(RuntimeError) as ours_error:
        ours(x)
    assert str(ours_error.value) == str(theirs_error.value)


class Block(nn.Module):
    """A ResNet basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + x), then a classifier."""

    def __init__(self, channels=8, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(channels, classes), nn.BatchNorm1d(classes))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.head(torch.relu(self.bn2(self.conv2(h)) + x))


def train_losses(model, dtype, memory_format, steps=5):
    generator = torch.Generator().manual_seed(3)
    model = model.to(dtype=dtype, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 8, 6, 6, dtype=dtype, generator=generator).contiguous(
            memory_format=memory_format)
        target = torch.randint(0, 5, (16,), generator=generator)
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        losses.append(nn.functional.cross_entropy(model(x), target).item())
    return np.array(losses)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_training_a_resnet_block_gives_torchs_losses(dtype, memory_format):
    torch.manual_seed(0)
    model = Block()
    converted = fbt.convert(copy.deepcopy(model))
    assert sum(isinstance(m, fbt._FastBatchNorm) for m in converted.modules()) == 3
    theirs = train_losses(model, dtype, memory_format)
    ours = train_losses(converted, dtype, memory_format)
    np.testing.assert_allclose(ours, theirs, rtol={torch.float32: 1e-4,
                                                   torch.float64: 1e-12}[dtype])
    # state dicts interchange both ways
    model.load_state_dict(converted.state_dict())
    converted.load_state_dict(model.state_dict())


def test_convert_keeps_parameters_buffers_and_flags():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None),
                          nn.Sequential(nn.BatchNorm1d(5, affine=False)),
                          nn.BatchNorm3d(2, track_running_stats=False))
    model[1].weight.requires_grad_(False)
    model[2].eval()
    weight, running_mean = model[1].weight, model[1].running_mean
    state = copy.deepcopy(model.state_dict())
    converted = fbt.convert(model)
    assert type(converted[1]) is fbt.BatchNorm2d and type(converted[2][0]) is fbt.BatchNorm1d
    assert type(converted[3]) is fbt.BatchNorm3d and converted[0] is model[0]
    assert converted[1].weight is weight and converted[1].running_mean is running_mean
    assert not converted[1].weight.requires_grad and converted[1].momentum is None
    assert not converted[2][0].training and converted[2][0].weight is None
    assert converted[3].running_mean is None
    assert converted.state_dict().keys() == state.keys()
    for name, value in state.items():
        torch.testing.assert_close(converted.state_dict()[name], value)
    assert type(fbt.convert(nn.BatchNorm1d(3))) is fbt.BatchNorm1d
    with pytest.raises(TypeError, match="module"):
        fbt.convert(np.zeros(3))
