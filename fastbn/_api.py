"""The NumPy face of fastbn: validation, dtype and out= rules, the canonical view, dispatch.

Every function checks all of its arguments before anything is written, so a failed call leaves
its inputs, `out` and the running statistics as they were. Wrong types raise TypeError, wrong
shapes or values ValueError, each naming the argument. The common call (C-contiguous arrays
of one float dtype; `out=` absent, the input itself, or a disjoint C-contiguous array) is
first offered to a fast path in _kernels, which checks the same rules cheaply in C and
declines anything else, so the messages and conversions live here only.

The canonical view: the kernels see any array as (outer, C, inner), C-contiguous, where C is
the channel axis. An array whose elements fill one block of memory in some axis order (NCHW,
NHWC, a transposed or reversed view of either) is used where it lies, by permuting and flipping
its axes; anything else is copied once. Outputs take the input's memory layout.
"""
import math
from collections import namedtuple

import numpy as np

from . import _fastpath, _kernels, _outputs, _rules, _threads
from ._rules import (EPS, MOMENTUM, NEGATIVE_SLOPE_BACKWARD, channel_vector, companion,
                     compute_dtype, data, like_x, out_array, real, running_stat, train_count,
                     x_and_axis)

__all__ = ["batch_norm_train", "batch_norm_infer", "batch_norm_backward", "batch_norm",
           "set_num_threads", "get_num_threads", "set_output_cache", "get_output_cache"]

set_num_threads = _threads.set_num_threads
get_num_threads = _threads.get_num_threads
set_output_cache = _outputs.set_output_cache
get_output_cache = _outputs.get_output_cache


# --------------------------------------------------------------------------- canonical view

def _dense_order(a, axis):
    """(flips, perm) with a[flips].transpose(perm) C-contiguous, or None if a is not dense.

    A reversed channel axis counts as not dense: flipping it would reverse the channels
    against weight, bias and the statistics."""
    if a.strides[axis] < 0:
        return None
    flips = None
    if any(s < 0 for s in a.strides):
        flips = tuple(slice(None, None, -1) if s < 0 else slice(None) for s in a.strides)
        a = a[flips]
    perm = tuple(sorted(range(a.ndim), key=lambda i: -a.strides[i]))
    return (flips, perm) if a.transpose(perm).flags.c_contiguous else None


def _to_order(a, order):
    flips, perm = order
    return (a if flips is None else a[flips]).transpose(perm)


def _from_order(b, order):
    flips, perm = order
    b = b.transpose(np.argsort(perm))
    return b if flips is None else b[flips]


def _same_view(a, b):
    return (a is b or (a.strides == b.strides
                       and _kernels.address(a) == _kernels.address(b)))


class _Views:
    """x and the arrays read with it (dy, residual, y: x's shape) as C-contiguous
    (outer, C, inner) arrays sharing one memory order, and the arrays the kernel writes
    (`outputs`), with what to return and what to copy back. c_order: the kernel needs the
    arrays in C order itself (the row-wise norms' rows), so anything else is copied."""

    __slots__ = ("x", "inputs", "outputs", "outer", "inner", "_results", "_copy_back")

    def __init__(self, x, axis, outs, inputs=(), c_order=False):
        order = None
        if not (x.flags.c_contiguous and all(a.flags.c_contiguous for a in inputs)):
            order = None if c_order else _dense_order(x, axis)
            if order is None:               # not one block of memory: copy once
                x = np.ascontiguousarray(x)
                inputs = [np.ascontiguousarray(a) for a in inputs]
            else:
                axis = order[1].index(axis)
                x = _to_order(x, order)
                inputs = [np.ascontiguousarray(_to_order(a, order)) for a in inputs]
        self.x = x
        self.inputs = inputs
        self.outer = math.prod(x.shape[:axis])
        self.inner = math.prod(x.shape[axis + 1:])
        self.outputs, self._results, self._copy_back = [], [], []
        for out in outs:
            self._add_output(x, order, out)

    def _add_output(self, x, order, out):
        """The array the kernel writes for out (None: a new array), what the caller gets, and
        where to copy the first into when out can't be written directly."""
        copy_back = None
        if out is None:
            y = _outputs.empty(x.shape, x.dtype)
            result = y if order is None else _from_order(y, order)
        else:
            target = out if order is None else _to_order(out, order)
            result = out
            if target.flags.c_contiguous and target.shape == x.shape:
                y = target
            else:
                y = _outputs.empty(x.shape, x.dtype)
                copy_back = target
        self.outputs.append(y)
        self._results.append(result)
        self._copy_back.append(copy_back)

    def finish(self):
        for y, target in zip(self.outputs, self._copy_back):
            if target is not None:
                np.copyto(target, y)
        return self._results


def _run(kernel, arrays, axis, outs, in_place, c_order=False):
    """kernel(views) on the canonical views of arrays (x first, then the arrays read with it);
    returns the output arrays, one per entry of outs (an array to fill, or None for new).

    Output k may be exactly an array whose index is in in_place[k] (the kernels read each
    element before they write it there); when it overlaps an input any other way, the kernel
    writes a fresh array that is then copied into it. c_order: as _Views."""
    outs = list(outs)
    deferred = [None] * len(outs)
    for k, out in enumerate(outs):
        if out is None:
            continue
        for j, a in enumerate(arrays):
            if (not (j in in_place[k] and _same_view(out, a))
                    and np.may_share_memory(out, a)):
                outs[k], deferred[k] = None, out
                break
    v = _Views(arrays[0], axis, outs, inputs=arrays[1:], c_order=c_order)
    kernel(v)
    results = v.finish()
    for k, target in enumerate(deferred):
        if target is not None:
            np.copyto(target, results[k])
            results[k] = target
    return results


def _required_pair(a, b, names, C, dtype, missing):
    """Two per-channel arrays that go together, both required (else `missing` is raised)."""
    if a is None or b is None:
        raise missing
    return channel_vector(a, names[0], C, dtype), channel_vector(b, names[1], C, dtype)



# ------------------------------------------------------------------ arguments, checked once
# The checked arguments of the training forward and of the backward, shared by their
# synchronized versions (fastbn.distributed), which differ only in where statistics come from.

TrainArgs = namedtuple("TrainArgs", "x axis C stat_dtype weight bias eps momentum residual act "
                                    "slope running_mean running_var out arrays")
BackwardArgs = namedtuple("BackwardArgs", "dy x axis C stat_dtype mean invstd weight y act "
                                          "slope fused out outs arrays")
# the fused backward's arguments (every backward's: batch norm's and the row-wise norms')
Fusion = namedtuple("Fusion", "y act slope fused out outs arrays")

# outputs that may be exactly one of the inputs (_run): dx may be dy, x or y (each is read
# before it is written), out_residual dy or y
BACKWARD_IN_PLACE = [(0, 1, 2), (1, 2)]


def _train_args(x, weight, bias, eps, axis, running_mean, running_var, momentum, out,
                residual, activation, negative_slope):
    """batch_norm_train's arguments, checked (all but the count of values per channel)."""
    x, axis = x_and_axis(x, axis)
    C = x.shape[axis]
    stat_dtype = compute_dtype(x.dtype)
    weight = channel_vector(weight, "weight", C, stat_dtype)
    bias = channel_vector(bias, "bias", C, stat_dtype)
    eps = real(eps, EPS)
    momentum = real(momentum, MOMENTUM)
    residual = companion(residual, "residual", x)
    act, slope = _rules.activation(activation, negative_slope)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if running_mean is not None:
        running_mean = running_stat(running_mean, "running_mean", C, stat_dtype)
        running_var = running_stat(running_var, "running_var", C, stat_dtype)
    out = out_array(out, x)
    arrays = [x] if residual is None else [x, residual]
    return TrainArgs(x, axis, C, stat_dtype, weight, bias, eps, momentum, residual, act, slope,
                     running_mean, running_var, out, arrays)


def _backward_args(dy, x, mean, invstd, weight, axis, y, activation, negative_slope, out,
                   out_residual):
    """batch_norm_backward's arguments, checked."""
    x, axis = x_and_axis(x, axis)
    dy = data(dy, "dy")
    like_x(dy, "dy", x)
    C = x.shape[axis]
    stat_dtype = compute_dtype(x.dtype)
    mean, invstd = _required_pair(
        mean, invstd, ("mean", "invstd"), C, stat_dtype,
        TypeError("mean and invstd are required: pass what batch_norm_train returned"))
    weight = channel_vector(weight, "weight", C, stat_dtype)
    f = _backward_fusion(dy, x, y, activation, negative_slope, out, out_residual)
    return BackwardArgs(dy, x, axis, C, stat_dtype, mean, invstd, weight, f.y, f.act, f.slope,
                        f.fused, f.out, f.outs, f.arrays)


def _backward_fusion(dy, x, y, activation, negative_slope, out, out_residual):
    """A backward's fusion (y, activation) and outputs (out, out_residual), checked."""
    act, slope = _rules.activation(activation, negative_slope)
    y = companion(y, "y", x)
    if activation is not None and y is None:
        raise ValueError(f"y, the fused forward's output, is required with "
                         f"activation={activation!r}")
    if activation is None and y is not None:
        raise ValueError("y is used only with an activation: pass activation= as in the forward")
    if activation == "leaky_relu" and not slope >= NEGATIVE_SLOPE_BACKWARD.low:
        raise ValueError(f"negative_slope must be >= 0 for the backward (the derivative is "
                         f"recovered from the sign of y), got {slope}")
    out = out_array(out, x)
    if out_residual is not None:
        out_residual = out_array(out_residual, x, "out_residual")
        if out is not None and np.may_share_memory(out, out_residual):
            raise ValueError("out and out_residual must not overlap")
    fused = activation is not None or out_residual is not None
    outs = [out] if out_residual is None else [out, out_residual]
    arrays = [x, dy] if y is None else [x, dy, y]
    return Fusion(y, act, slope, fused, out, outs, arrays)


def _fused_y(v, a):
    """The view of the fused forward's y (None without it) among the backward's inputs."""
    return v.inputs[1] if a.y is not None else None


def _grad_buffer(v, a):
    """Where the fused backward writes g = dy * act'(y) (None unfused): out_residual, or dx's
    memory (the dx pass then runs in place) unless that is x's, which the sums still read."""
    if not a.fused:
        return None
    grad = v.outputs[1] if len(v.outputs) > 1 else v.outputs[0]
    if _kernels.address(grad) == _kernels.address(v.x):
        grad = _outputs.empty(v.x.shape, v.x.dtype)
    return grad


# ------------------------------------------------------------------------------- functions

def batch_norm_train(x, weight=None, bias=None, *, eps=1e-5, axis=1, running_mean=None,
                     running_var=None, momentum=0.1, out=None, residual=None, activation=None,
                     negative_slope=0.01):
    """Batch normalization with batch statistics (training mode).

    y = (x - mean) * invstd * weight + bias, with mean and the biased variance taken per
    channel over every axis but `axis`, and invstd = 1 / sqrt(var + eps).

    Fused: y = act(that + residual) in the same pass, with residual an array of x's shape and
    dtype (or None) and activation None, 'relu', 'leaky_relu' (negative_slope below zero) or
    'tanh'. The statistics are x's, as without fusion.

    Returns (y, mean, invstd); mean and invstd are (C,) arrays of x's dtype, the saved
    statistics batch_norm_backward takes. running_mean and running_var, if given, are
    updated in place: r = (1 - momentum) * r + momentum * batch, with the unbiased variance
    n / (n - 1) for running_var (PyTorch's convention).
    """
    result = _fastpath.train_common(x, weight, bias, eps, axis, running_mean, running_var,
                                   momentum, out, residual, activation, negative_slope)
    if result is not None:
        return result
    a = _train_args(x, weight, bias, eps, axis, running_mean, running_var, momentum, out,
                    residual, activation, negative_slope)
    x, C = a.x, a.C
    train_count(x, a.axis, C)

    mean = np.empty(C, a.stat_dtype)
    invstd = np.empty(C, a.stat_dtype)
    if x.size == 0:     # nothing to take statistics of: running statistics stay as they are
        mean.fill(np.nan)
        invstd.fill(np.nan)
        return (np.empty_like(x) if a.out is None else a.out), mean, invstd
    y, = _run(lambda v: _kernels.forward_train(
        v.x, v.outputs[0], v.outer, C, v.inner, a.weight, a.bias, a.eps, a.running_mean,
        a.running_var, a.momentum, mean, invstd, v.inputs[0] if v.inputs else None, a.act,
        a.slope), a.arrays, a.axis, [a.out], in_place=[(0,)])
    return y, mean, invstd


def batch_norm_infer(x, running_mean, running_var, weight=None, bias=None, *, eps=1e-5, axis=1,
                     out=None, residual=None, activation=None, negative_slope=0.01):
    """Batch normalization with running statistics (inference mode).

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, per channel; fused,
    y = act(that + residual) in the same pass (as in batch_norm_train).
    """
    y = _fastpath.infer_common(x, running_mean, running_var, weight, bias, eps, axis, out,
                              residual, activation, negative_slope)
    if y is not None:
        return y
    x, axis = x_and_axis(x, axis)
    C = x.shape[axis]
    stat_dtype = compute_dtype(x.dtype)
    running_mean, running_var = _required_pair(
        running_mean, running_var, ("running_mean", "running_var"), C, stat_dtype,
        ValueError("running_mean and running_var are required for inference"))
    weight = channel_vector(weight, "weight", C, stat_dtype)
    bias = channel_vector(bias, "bias", C, stat_dtype)
    eps = real(eps, EPS)
    residual = companion(residual, "residual", x)
    act, slope = _rules.activation(activation, negative_slope)
    out = out_array(out, x)
    if x.size == 0:
        return np.empty_like(x) if out is None else out
    arrays = [x] if residual is None else [x, residual]
    y, = _run(lambda v: _kernels.forward_infer(
        v.x, v.outputs[0], v.outer, C, v.inner, running_mean, running_var, weight, bias, eps,
        v.inputs[0] if v.inputs else None, act, slope), arrays, axis, [out], in_place=[(0,)])
    return y


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, axis=1, y=None, activation=None,
                        negative_slope=0.01, out=None, out_residual=None):
    """Gradients of batch_norm_train's output: returns (dx, dweight, dbias).

    dy is the gradient of y; mean and invstd are the statistics batch_norm_train returned.
    dweight and dbias are (C,) arrays (returned whether or not weight is given).
    The mean serves as a shift only: the exact batch mean is recovered from x, so a mean
    rounded to float32 costs no accuracy when the data sit far from zero.

    Fused forward (y = act(bn(x) + residual)): pass its output y and its activation (and
    negative_slope); dy is then the gradient of that y, and the activation's derivative is
    recovered from y. out_residual, an array of x's shape and dtype, receives the residual's
    gradient dy * act'(y) (dy itself without an activation), computed in the same pass.
    """
    fused = activation is not None or out_residual is not None
    if not fused and y is None:
        result = _fastpath.backward_common(dy, x, mean, invstd, weight, axis, out)
        if result is not None:
            return result
    a = _backward_args(dy, x, mean, invstd, weight, axis, y, activation, negative_slope, out,
                       out_residual)
    x, C = a.x, a.C

    dweight = np.zeros(C, a.stat_dtype)
    dbias = np.zeros(C, a.stat_dtype)
    if x.size == 0:
        return (np.empty_like(x) if a.out is None else a.out), dweight, dbias

    def kernel(v):
        _kernels.backward(v.inputs[0], v.x, v.outputs[0], v.outer, C, v.inner, a.mean,
                          a.invstd, a.weight, dweight, dbias, _fused_y(v, a), _grad_buffer(v, a),
                          a.act, a.slope)

    results = _run(kernel, a.arrays, a.axis, a.outs, in_place=BACKWARD_IN_PLACE)
    return results[0], dweight, dbias


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None):
    """torch.nn.functional.batch_norm's arguments and semantics, on NumPy arrays.

    training=True normalizes with batch statistics and updates the running statistics in
    place if given; training=False normalizes with the running statistics.
    """
    if training:
        return batch_norm_train(x, weight, bias, eps=eps, axis=axis, running_mean=running_mean,
                                running_var=running_var, momentum=momentum, out=out)[0]
    return batch_norm_infer(x, running_mean, running_var, weight, bias, eps=eps, axis=axis,
                            out=out)
