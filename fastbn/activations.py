"""The activations a fused batch norm applies: the one registry.

Each entry has the name the API takes, the code of the kernels' fbn_activation
(include/fastbn/activation.h; the build checks that the two agree), and NumPy versions of
its forward and of its derivative recovered from the output, which the layers, the reference,
the benchmarks and the tests use:

    forward(z, slope)          act(z)
    grad_from_y(dy, y, slope)  dy * act'(z), from y = act(z) alone (no mask is kept)

NaN stays NaN through every forward (comparisons with NaN are false); the derivatives read
y as the kernels do (relu: y <= 0 gives 0, so NaN y passes dy).

Adding an activation: docs/architecture.md, "Add an activation".
"""
from collections import namedtuple

import numpy as np

Activation = namedtuple("Activation", "name code forward grad_from_y")


def _identity(z, slope):
    return z


def _identity_grad(dy, y, slope):
    return dy


def _relu(z, slope):
    return np.where(z < 0, np.zeros((), z.dtype), z)


def _relu_grad(dy, y, slope):
    return np.where(y <= 0, np.zeros((), dy.dtype), dy)


def _leaky_relu(z, slope):
    return np.where(z < 0, z * z.dtype.type(slope), z)


def _leaky_relu_grad(dy, y, slope):
    return np.where(y > 0, dy, dy * dy.dtype.type(slope))


def _tanh(z, slope):
    return np.tanh(z)


def _tanh_grad(dy, y, slope):
    """dy (1 - y^2), formed as (1 - y)(1 + y) in float64 at least (exact near |y| = 1)."""
    wide = np.promote_types(dy.dtype, np.float64)
    y = y.astype(wide)
    return (dy.astype(wide) * ((1 - y) * (1 + y))).astype(dy.dtype)


ACTIVATIONS = {
    None: Activation(None, 0, _identity, _identity_grad),
    "relu": Activation("relu", 1, _relu, _relu_grad),
    "leaky_relu": Activation("leaky_relu", 2, _leaky_relu, _leaky_relu_grad),
    "tanh": Activation("tanh", 3, _tanh, _tanh_grad),
}

# the names the API takes, as an error message lists them
NAMES = tuple(name for name in ACTIVATIONS if name is not None)


def get(name):
    """The registry's entry for name (None: no activation). TypeError or ValueError, naming
    the argument, for anything else."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"activation must be None or a str, got {type(name).__name__}")
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation must be None or one of "
                         f"{', '.join(map(repr, NAMES))}, got {name!r}") from None
