"""Batch, group, instance, layer and RMS normalization in plain NumPy: the oracle every fastbn
result is tested against.

Written for clarity, not speed, with the same signatures as the fast functions. Everything is
computed in extended precision (``numpy.longdouble``: a 64-bit mantissa on x86 Linux) on
values centred on their channel's first value. Centring is exact, so errors scale with the
spread of the data, not with how far its mean sits from zero. Results are then rounded to
x's dtype, once; statistics to x's statistics dtype (float32 for half-precision x, whose
values are first widened to float32, exactly). Never imported by the fast path.
"""
import math

import numpy as np

from . import activations
from ._rules import rms_eps

EXTENDED = np.longdouble


def _extended(a):
    """a in extended precision (half precision through float32, exactly: not every NumPy
    build casts bfloat16 to longdouble)."""
    a = np.asarray(a)
    if a.dtype.itemsize < 4:
        a = a.astype(np.float32)
    return a.astype(EXTENDED)


def _stat_dtype(dtype):
    """The dtype of a statistic of data of dtype: its own, float32 for half precision."""
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


def _channel_rows(x, axis):
    """x as a (C, values per channel) matrix in extended precision."""
    return _extended(np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1))


def _from_channel_rows(rows, x, axis):
    """The inverse of _channel_rows: back to x's shape."""
    moved = np.moveaxis(np.empty(x.shape, dtype=np.bool_), axis, 0).shape
    return np.moveaxis(rows.reshape(moved), 0, axis)


def _column(v):
    return _extended(v)[:, None]


def _rounded(result, dtype):
    """result rounded to dtype (half precision through float64: every NumPy build casts that)"""
    if dtype.itemsize < 4:
        return np.asarray(result).astype(np.float64).astype(dtype)
    return np.asarray(result).astype(dtype)


def _store(result, x, out):
    if out is None:
        return _rounded(result, x.dtype)
    out[...] = _rounded(result, out.dtype)
    return out


def _activate(z, activation, negative_slope):
    """act(z), the registry's forward in extended precision."""
    return activations.get(activation).forward(z, EXTENDED(negative_slope))


def _activation_grad(dy, y, activation, negative_slope):
    """dy * act'(z), from y = act(z) (the derivative needs only the output), the registry's
    in extended precision."""
    return activations.get(activation).grad_from_y(_extended(dy), _extended(y)
                                                   if y is not None else None,
                                                   EXTENDED(negative_slope))


def _fuse(y, residual, activation, negative_slope):
    """act(y + residual) for a normalized y of x's shape (extended precision)."""
    if residual is not None:
        y = y + _extended(residual)
    return _activate(y, activation, negative_slope)


def _centred_stats(rows):
    """(values - shift, mean - shift, biased var) per channel, shift = each channel's first value.

    The mean of the centred values is taken twice (corrected two-pass) so it is exact to
    extended precision."""
    centred = rows - rows[:, :1]
    rough = centred.mean(axis=1, keepdims=True)
    mean = rough + (centred - rough).mean(axis=1, keepdims=True)
    var = ((centred - mean) ** 2).mean(axis=1)
    return centred, mean, var


def batch_stats(x, axis=1):
    """Per-channel batch mean and biased variance, in extended precision."""
    rows = _channel_rows(x, axis % x.ndim)
    _, mean, var = _centred_stats(rows)
    return rows[:, 0] + mean[:, 0], var


def batch_norm_train(x, weight=None, bias=None, *, eps=1e-5, axis=1, running_mean=None,
                     running_var=None, momentum=0.1, out=None, residual=None, activation=None,
                     negative_slope=0.01):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with batch statistics, then
    y = act(y + residual) when fused.

    Returns (y, mean, invstd). Running statistics, when given, are updated in place:
    r = (1 - momentum) * r + momentum * batch, with the unbiased variance n / (n - 1).
    """
    axis = axis % x.ndim
    rows = _channel_rows(x, axis)
    count = rows.shape[1]
    centred, mean, var = _centred_stats(rows)
    invstd = 1 / np.sqrt(var + EXTENDED(eps))
    y = (centred - mean) * invstd[:, None]
    if weight is not None:
        y = y * _column(weight)
    if bias is not None:
        y = y + _column(bias)
    batch_mean = rows[:, 0] + mean[:, 0]
    if running_mean is not None:
        running_mean[...] = (1 - momentum) * _extended(running_mean) + momentum * batch_mean
        running_var[...] = ((1 - momentum) * _extended(running_var)
                            + momentum * var * count / (count - 1))
    y = _fuse(_from_channel_rows(y, x, axis), residual, activation, negative_slope)
    stat = _stat_dtype(x.dtype)
    return _store(y, x, out), batch_mean.astype(stat), invstd.astype(stat)


def batch_norm_infer(x, running_mean, running_var, weight=None, bias=None, *, eps=1e-5, axis=1,
                     out=None, residual=None, activation=None, negative_slope=0.01):
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, then
    y = act(y + residual) when fused."""
    axis = axis % x.ndim
    rows = _channel_rows(x, axis)
    scale = 1 / np.sqrt(_column(running_var) + EXTENDED(eps))
    if weight is not None:
        scale = scale * _column(weight)
    y = (rows - _column(running_mean)) * scale
    if bias is not None:
        y = y + _column(bias)
    y = _fuse(_from_channel_rows(y, x, axis), residual, activation, negative_slope)
    return _store(y, x, out)


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, axis=1, y=None, activation=None,
                        negative_slope=0.01, out=None, out_residual=None):
    """Gradients of batch_norm_train's y with respect to x, weight and bias.

    Fused (activation given, y the fused forward's output): the gradient at the
    activation's input, g = dy * act'(y), is the residual's gradient (stored in out_residual
    if given) and takes dy's place below.

    With xhat = (x - mu) * invstd and n values per channel:
        dbias   = sum dy
        dweight = sum dy * xhat
        dx      = weight * invstd * (dy - dbias / n - xhat * dweight / n)
    mu is the batch mean of x, as in batch_norm_train: the saved `mean` (which may have been
    rounded to float32) is not needed to compute it.
    """
    axis = axis % x.ndim
    rows = _channel_rows(x, axis)
    count = rows.shape[1]
    centred, mu, _ = _centred_stats(rows)
    invstd = _column(invstd)
    g_full = _activation_grad(dy, y, activation, negative_slope)
    if out_residual is not None:
        out_residual[...] = _rounded(g_full, out_residual.dtype)
    g = _channel_rows(g_full, axis)
    xhat = (centred - mu) * invstd
    dbias = g.sum(axis=1)
    dweight = (g * xhat).sum(axis=1)
    gamma = 1 if weight is None else _column(weight)
    dx = gamma * invstd * (g - dbias[:, None] / count - xhat * dweight[:, None] / count)
    dx = _from_channel_rows(dx, x, axis)
    stat = _stat_dtype(x.dtype)
    return _store(dx, x, out), dweight.astype(stat), dbias.astype(stat)


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None):
    """torch.nn.functional.batch_norm's semantics: batch statistics when training."""
    if training:
        return batch_norm_train(x, weight, bias, eps=eps, axis=axis, running_mean=running_mean,
                                running_var=running_var, momentum=momentum, out=out)[0]
    return batch_norm_infer(x, running_mean, running_var, weight, bias, eps=eps, axis=axis,
                            out=out)


# ====================================================================== GroupNorm, InstanceNorm
# (the normalization family, issue 16: statistics per sample and group of channels)

def _unit_rows(a, axis, num_groups):
    """a (channels on axis 1 or -1) as (N, G, C/G, S) in extended precision: unit (n, g) is
    a[n, g]."""
    moved = np.moveaxis(np.asarray(a), axis % a.ndim, 1)
    N, C = moved.shape[:2]
    return _extended(moved.reshape(N, num_groups, C // num_groups, -1))


def _from_unit_rows(rows, x, axis):
    """The inverse of _unit_rows: back to x's shape."""
    moved = np.moveaxis(np.empty(x.shape, dtype=np.bool_), axis % x.ndim, 1).shape
    return np.moveaxis(rows.reshape(moved), 1, axis % x.ndim)


def _unit_stats(rows):
    """(values - shift, mean - shift, biased var) per unit of (N, G, C/G, S) rows, centred on
    each unit's first value (_centred_stats over the unit's values)."""
    N, G = rows.shape[:2]
    centred, mean, var = _centred_stats(rows.reshape(N * G, -1))
    return (centred.reshape(rows.shape), mean.reshape(N, G, 1, 1), var.reshape(N, G, 1, 1))


def _affine_of_units(v, G):
    """A (C,) per-channel vector shaped to multiply (N, G, C/G, S) rows."""
    return _extended(v).reshape(1, G, -1, 1)


def group_norm_train(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, residual=None,
                     activation=None, negative_slope=0.01, out=None):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with mean and biased var per sample
    and group of C / num_groups consecutive channels, then act(y + residual) when fused.
    Returns (y, mean, invstd), the statistics of shape (N, num_groups)."""
    G = num_groups
    rows = _unit_rows(x, axis, G)
    centred, mean, var = _unit_stats(rows)
    invstd = 1 / np.sqrt(var + EXTENDED(eps))
    y = (centred - mean) * invstd
    if weight is not None:
        y = y * _affine_of_units(weight, G)
    if bias is not None:
        y = y + _affine_of_units(bias, G)
    y = _fuse(_from_unit_rows(y, x, axis), residual, activation, negative_slope)
    stat = _stat_dtype(x.dtype)
    unit_mean = rows[:, :, :1, :1] + mean
    return (_store(y, x, out), unit_mean[:, :, 0, 0].astype(stat),
            invstd[:, :, 0, 0].astype(stat))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, residual=None,
               activation=None, negative_slope=0.01, out=None):
    """group_norm_train's y (torch.nn.functional.group_norm)."""
    return group_norm_train(x, num_groups, weight, bias, eps, axis=axis, residual=residual,
                            activation=activation, negative_slope=negative_slope, out=out)[0]


def group_norm_backward(dy, x, mean, invstd, weight=None, *, num_groups, axis=1, y=None,
                        activation=None, negative_slope=0.01, out=None, out_residual=None):
    """Gradients of group_norm_train's y. With g = dy (fused: dy * act'(y)), xhat =
    (x - mu) * invstd and the means over each unit (a sample's group):
        dbias_c   = sum over samples and positions of g
        dweight_c = sum g * xhat
        dx        = invstd * (w_c g - mean_unit(w g) - xhat * mean_unit(w g xhat))
    mu is the unit's mean of x (the saved mean is not needed)."""
    G = num_groups
    rows = _unit_rows(x, axis, G)
    centred, mu, _ = _unit_stats(rows)
    invstd = _extended(invstd)[:, :, None, None]
    g_full = _activation_grad(dy, y, activation, negative_slope)
    if out_residual is not None:
        out_residual[...] = _rounded(g_full, out_residual.dtype)
    g = _unit_rows(g_full, axis, G)
    xhat = (centred - mu) * invstd
    w = 1 if weight is None else _affine_of_units(weight, G)
    wg = w * g
    dx = invstd * (wg - wg.mean(axis=(2, 3), keepdims=True)
                   - xhat * (wg * xhat).mean(axis=(2, 3), keepdims=True))
    dx = _from_unit_rows(dx, x, axis)
    C = x.shape[axis]
    dweight = (g * xhat).sum(axis=(0, 3)).reshape(C)
    dbias = g.sum(axis=(0, 3)).reshape(C)
    stat = _stat_dtype(x.dtype)
    return _store(dx, x, out), dweight.astype(stat), dbias.astype(stat)


def instance_norm_train(x, weight=None, bias=None, *, eps=1e-5, axis=1, running_mean=None,
                        running_var=None, momentum=0.1, out=None, residual=None,
                        activation=None, negative_slope=0.01):
    """GroupNorm with one channel per group; running statistics, when given, updated in place
    with the batch average of the per-instance mean and unbiased variance (torch)."""
    C = x.shape[axis]
    if running_mean is not None:
        rows = _unit_rows(x, axis, C)
        count = rows[0, 0].size
        centred, mean, var = _unit_stats(rows)
        batch_mean = (rows[:, :, :1, :1] + mean).mean(axis=0).reshape(C)
        batch_var = (var * count / (count - 1)).mean(axis=0).reshape(C)
        running_mean[...] = (1 - momentum) * _extended(running_mean) + momentum * batch_mean
        running_var[...] = (1 - momentum) * _extended(running_var) + momentum * batch_var
    return group_norm_train(x, C, weight, bias, eps, axis=axis, residual=residual,
                            activation=activation, negative_slope=negative_slope, out=out)


def instance_norm_backward(dy, x, mean, invstd, weight=None, *, axis=1, y=None,
                           activation=None, negative_slope=0.01, out=None, out_residual=None):
    """Gradients of instance_norm_train's y (group_norm_backward with G = C)."""
    return group_norm_backward(dy, x, mean, invstd, weight, num_groups=x.shape[axis], axis=axis,
                               y=y, activation=activation, negative_slope=negative_slope,
                               out=out, out_residual=out_residual)


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, out=None):
    """torch.nn.functional.instance_norm's semantics."""
    if use_input_stats:
        return instance_norm_train(x, weight, bias, eps=eps, axis=axis,
                                   running_mean=running_mean, running_var=running_var,
                                   momentum=momentum, out=out)[0]
    return batch_norm_infer(x, running_mean, running_var, weight, bias, eps=eps, axis=axis,
                            out=out)


# ------------------------------------------------------------------- layer norm, RMS norm
# Statistics per row of the trailing normalized_shape axes, the affine per position in a row.

def _rows(x, normalized_shape):
    """x as a (rows, D) matrix in extended precision, the normalized shape as a tuple, and the
    shape of the per-row statistics."""
    shape = ((normalized_shape,) if isinstance(normalized_shape, (int, np.integer))
             else tuple(normalized_shape))
    return (_extended(x).reshape(-1, math.prod(shape)), shape,
            x.shape[:x.ndim - len(shape)])


def _row_affine(v):
    """weight or bias as a row of D values in extended precision (1 where there is none)."""
    return 1 if v is None else _extended(v).reshape(-1)


def _row_stats(values, stats_shape, dtype):
    return values.reshape(stats_shape).astype(_stat_dtype(dtype))


def layer_norm_train(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None,
                     activation=None, negative_slope=0.01, out=None):
    """y = (x - mean) / sqrt(var + eps) * weight + bias per row, then act(y + residual).
    Returns (y, mean, invstd)."""
    rows, _, stats_shape = _rows(x, normalized_shape)
    centred, mean, var = _centred_stats(rows)
    invstd = 1 / np.sqrt(var + EXTENDED(eps))
    y = (centred - mean) * invstd[:, None] * _row_affine(weight)
    if bias is not None:
        y = y + _row_affine(bias)
    y = _fuse(y.reshape(x.shape), residual, activation, negative_slope)
    return (_store(y, x, out), _row_stats(rows[:, 0] + mean[:, 0], stats_shape, x.dtype),
            _row_stats(invstd, stats_shape, x.dtype))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None,
               activation=None, negative_slope=0.01, out=None):
    return layer_norm_train(x, normalized_shape, weight, bias, eps, residual=residual,
                            activation=activation, negative_slope=negative_slope, out=out)[0]


def _row_gradients(dy, xhat, invstd, weight, y, activation, negative_slope, out_residual,
                   centred):
    """dx (rows), dweight, dbias of y = xhat * weight (+ bias), g = dy * act'(y) when fused:
        dx = invstd (gw - mean(gw) - xhat mean(gw xhat)),   gw = g * weight
    without the mean(gw) term for RMS norm (not centred)."""
    g_full = _activation_grad(dy, y, activation, negative_slope)
    if out_residual is not None:
        out_residual[...] = _rounded(g_full, out_residual.dtype)
    g = g_full.reshape(xhat.shape)
    gw = g * _row_affine(weight)
    dx = gw - (gw * xhat).mean(axis=1, keepdims=True) * xhat
    if centred:
        dx = dx - gw.mean(axis=1, keepdims=True)
    return dx * invstd, (g * xhat).sum(axis=0), g.sum(axis=0)


def layer_norm_backward(dy, x, mean, invstd, weight=None, *, normalized_shape, y=None,
                        activation=None, negative_slope=0.01, out=None, out_residual=None):
    """Gradients of layer_norm_train's y: (dx, dweight, dbias). The row mean is recovered from
    x, as in batch_norm_backward."""
    rows, shape, _ = _rows(x, normalized_shape)
    centred, mu, _ = _centred_stats(rows)
    invstd = _extended(invstd).reshape(-1, 1)
    dx, dweight, dbias = _row_gradients(dy, (centred - mu) * invstd, invstd, weight, y,
                                        activation, negative_slope, out_residual, True)
    stat = _stat_dtype(x.dtype)
    return (_store(dx.reshape(x.shape), x, out), dweight.reshape(shape).astype(stat),
            dbias.reshape(shape).astype(stat))


def _invrms(rows, eps, dtype):
    eps = rms_eps(dtype) if eps is None else eps
    return 1 / np.sqrt((rows * rows).mean(axis=1) + EXTENDED(eps))


def rms_norm_train(x, normalized_shape, weight=None, eps=None, *, residual=None,
                   activation=None, negative_slope=0.01, out=None):
    """y = x / sqrt(mean(x^2) + eps) * weight per row (eps=None: machine epsilon of x's
    dtype), then act(y + residual). Returns (y, invrms)."""
    rows, _, stats_shape = _rows(x, normalized_shape)
    invrms = _invrms(rows, eps, x.dtype)
    y = rows * invrms[:, None] * _row_affine(weight)
    y = _fuse(y.reshape(x.shape), residual, activation, negative_slope)
    return _store(y, x, out), _row_stats(invrms, stats_shape, x.dtype)


def rms_norm(x, normalized_shape, weight=None, eps=None, *, residual=None, activation=None,
             negative_slope=0.01, out=None):
    return rms_norm_train(x, normalized_shape, weight, eps, residual=residual,
                          activation=activation, negative_slope=negative_slope, out=out)[0]


def rms_norm_backward(dy, x, invrms, weight=None, *, normalized_shape, y=None,
                      activation=None, negative_slope=0.01, out=None, out_residual=None):
    """Gradients of rms_norm_train's y: (dx, dweight)."""
    rows, shape, _ = _rows(x, normalized_shape)
    invrms = _extended(invrms).reshape(-1, 1)
    dx, dweight, _ = _row_gradients(dy, rows * invrms, invrms, weight, y, activation,
                                    negative_slope, out_residual, False)
    return (_store(dx.reshape(x.shape), x, out),
            dweight.reshape(shape).astype(_stat_dtype(x.dtype)))
