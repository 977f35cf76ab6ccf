"""The row-wise normalizations, LayerNorm and RMSNorm (torch.nn.functional's semantics).

Statistics are taken per row, over the trailing `normalized_shape` axes of x (D values);
weight and bias have normalized_shape, one value per position in a row. Same rules as batch
norm (fastbn._rules): every argument is checked before anything is written; out= may be x
(in place) or any writeable array of x's shape and dtype; the fused epilogue
y = act(norm(x) + residual) and its backward as in batch_norm_train / batch_norm_backward.
The kernels need each row contiguous: x in another memory order is copied once.
"""
import math

import numpy as np

from . import _kernels, _rules
from ._api import BACKWARD_IN_PLACE, _backward_fusion, _fused_y, _grad_buffer, _run
from ._rules import EPS, companion, compute_dtype, data, like_x, out_array, real

__all__ = ["layer_norm", "layer_norm_train", "layer_norm_backward", "rms_norm",
           "rms_norm_train", "rms_norm_backward"]


def _rows(x, normalized_shape):
    """(normalized_shape as a tuple, D values per row, the shape of the per-row statistics)"""
    shape = _rules.normalized_shape(normalized_shape, x)
    return shape, math.prod(shape), x.shape[:x.ndim - len(shape)]


def _affine(v, D, dtype, fill):
    """weight or bias as the kernels take it: D values, `fill` where there is none."""
    return np.full(D, fill, dtype) if v is None else v.reshape(D)


def _forward(x, normalized_shape, weight, bias, eps, residual, activation, negative_slope,
             out, centred):
    """(y, mean or None, invstd) of LayerNorm (centred) or RMSNorm."""
    x = data(x, "x")
    shape, D, stats_shape = _rows(x, normalized_shape)
    stat_dtype = compute_dtype(x.dtype)
    weight = _rules.shaped_parameter(weight, "weight", shape, "normalized_shape", stat_dtype)
    bias = _rules.shaped_parameter(bias, "bias", shape, "normalized_shape", stat_dtype)
    eps = real(_rules.rms_eps(x.dtype) if eps is None else eps, EPS)
    residual = companion(residual, "residual", x)
    act, slope = _rules.activation(activation, negative_slope)
    out = out_array(out, x)

    mean = np.empty(stats_shape, stat_dtype) if centred else None
    invstd = np.empty(stats_shape, stat_dtype)
    if x.size == 0:
        invstd.fill(np.nan)
        if centred:
            mean.fill(np.nan)
        return (np.empty_like(x) if out is None else out), mean, invstd
    w, b = _affine(weight, D, stat_dtype, 1), _affine(bias, D, stat_dtype, 0)
    arrays = [x] if residual is None else [x, residual]
    y, = _run(lambda v: _kernels.rows_forward(
        v.x, v.outputs[0], D, w, b, eps, centred, mean, invstd,
        v.inputs[0] if v.inputs else None, act, slope),
        arrays, x.ndim - 1, [out], in_place=[(0,)], c_order=True)
    return y, mean, invstd


def _backward(dy, x, mean, invstd, weight, normalized_shape, y, activation, negative_slope,
              out, out_residual, centred, stats_names, train_name):
    """(dx, dweight, dbias) of LayerNorm (centred) or RMSNorm (mean None)."""
    x = data(x, "x")
    dy = data(dy, "dy")
    like_x(dy, "dy", x)
    shape, D, stats_shape = _rows(x, normalized_shape)
    stat_dtype = compute_dtype(x.dtype)
    saved = (mean, invstd) if centred else (invstd,)
    if any(s is None for s in saved):
        raise TypeError(f"{' and '.join(stats_names)} "
                        f"{'are' if centred else 'is'} required: pass what {train_name} returned")
    saved = [_rules.shaped_parameter(s, name, stats_shape, "x's shape without normalized_shape",
                                     stat_dtype) for s, name in zip(saved, stats_names)]
    mean, invstd = saved if centred else (None, saved[0])
    weight = _rules.shaped_parameter(weight, "weight", shape, "normalized_shape", stat_dtype)
    f = _backward_fusion(dy, x, y, activation, negative_slope, out, out_residual)

    if x.size == 0:
        zeros = np.zeros(shape, stat_dtype)
        return (np.empty_like(x) if f.out is None else f.out), zeros, zeros.copy()
    w = _affine(weight, D, stat_dtype, 1)
    sums = []

    def kernel(v):
        sums.append(_kernels.rows_backward(v.inputs[0], v.x, v.outputs[0], D, w, centred, mean,
                                           invstd, _fused_y(v, f), _grad_buffer(v, f), f.act,
                                           f.slope))

    results = _run(kernel, f.arrays, x.ndim - 1, f.outs, in_place=BACKWARD_IN_PLACE,
                   c_order=True)
    dweight, dbias = (s.reshape(shape).astype(stat_dtype) for s in sums[0])
    return results[0], dweight, dbias


# ------------------------------------------------------------------------------- LayerNorm

def layer_norm_train(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None,
                     activation=None, negative_slope=0.01, out=None):
    """Layer normalization over the last axes of x, those of normalized_shape (an int or a
    tuple of 1 to 3 ints), as torch.nn.functional.layer_norm:

        y = (x - mean) * invstd * weight + bias,   invstd = 1 / sqrt(var + eps)

    with mean and the biased variance per row of the normalized axes; weight and bias (or
    None) have normalized_shape. Fused: y = act(that + residual) in the same pass, as in
    batch_norm_train.

    Returns (y, mean, invstd); mean and invstd have x's shape without normalized_shape (dtype
    float32 for float32 and half-precision x, float64 for float64), the saved statistics
    layer_norm_backward takes.
    """
    return _forward(x, normalized_shape, weight, bias, eps, residual, activation,
                    negative_slope, out, centred=True)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None,
               activation=None, negative_slope=0.01, out=None):
    """y of layer_norm_train (torch.nn.functional.layer_norm)."""
    return layer_norm_train(x, normalized_shape, weight, bias, eps, residual=residual,
                            activation=activation, negative_slope=negative_slope, out=out)[0]


def layer_norm_backward(dy, x, mean, invstd, weight=None, *, normalized_shape, y=None,
                        activation=None, negative_slope=0.01, out=None, out_residual=None):
    """Gradients of layer_norm_train's output: returns (dx, dweight, dbias), dweight and dbias
    of normalized_shape (returned whether or not weight is given, as batch_norm_backward).

    mean and invstd are what layer_norm_train returned; the mean serves as a shift only (the
    exact row mean is recovered from x). Fused forward: pass its y and activation, and
    out_residual for the residual's gradient, as in batch_norm_backward.
    """
    return _backward(dy, x, mean, invstd, weight, normalized_shape, y, activation,
                     negative_slope, out, out_residual, True, ("mean", "invstd"),
                     "layer_norm_train")


# --------------------------------------------------------------------------------- RMSNorm

def rms_norm_train(x, normalized_shape, weight=None, eps=None, *, residual=None,
                   activation=None, negative_slope=0.01, out=None):
    """RMS normalization over the last axes of x, those of normalized_shape, as
    torch.nn.functional.rms_norm:

        y = x * invrms * weight,   invrms = 1 / sqrt(mean(x^2) + eps)

    per row of the normalized axes; eps=None is the machine epsilon of x's dtype (torch's
    default, float16's and bfloat16's own for half-precision x). Fused: y = act(that +
    residual). Returns (y, invrms), invrms of x's shape without normalized_shape.
    """
    y, _, invrms = _forward(x, normalized_shape, weight, None, eps, residual, activation,
                            negative_slope, out, centred=False)
    return y, invrms


def rms_norm(x, normalized_shape, weight=None, eps=None, *, residual=None, activation=None,
             negative_slope=0.01, out=None):
    """y of rms_norm_train (torch.nn.functional.rms_norm)."""
    return rms_norm_train(x, normalized_shape, weight, eps, residual=residual,
                          activation=activation, negative_slope=negative_slope, out=out)[0]


def rms_norm_backward(dy, x, invrms, weight=None, *, normalized_shape, y=None,
                      activation=None, negative_slope=0.01, out=None, out_residual=None):
    """Gradients of rms_norm_train's output: returns (dx, dweight), dweight of
    normalized_shape (returned whether or not weight is given). Fusion as in
    layer_norm_backward."""
    dx, dweight, _ = _backward(dy, x, None, invrms, weight, normalized_shape, y, activation,
                               negative_slope, out, out_residual, False, ("invrms",),
                               "rms_norm_train")
    return dx, dweight
