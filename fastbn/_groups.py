"""GroupNorm and InstanceNorm on the batch-norm stages: statistics per sample and group.

    y, mean, invstd = group_norm_train(x, num_groups, weight, bias)     # mean, invstd (N, G)
    dx, dweight, dbias = group_norm_backward(dy, x, mean, invstd, weight, num_groups=G)
    InstanceNorm is GroupNorm with one channel per group (G = C), plus torch's running
    statistics (the batch average of the per-instance mean and unbiased variance).

No new kernel (docs/architecture.md, section 4): the statistics, merge, gradient-sums and
apply stages of fastbn/_kernels.pyx run over views of x; only the finishes are here, in
float64 NumPy over all units at once, in a fixed order (so the same bits for any thread count):

    channels first, x as (N, C, S): the statistics over the (1, N*G, (C/G)*S) view (a unit, one
        sample's group, is contiguous), the apply over the (1, N*C, S) view with coefficients
        per (sample, channel): one call of each stage for the whole batch.
    channels last, x as (N, S, C): per sample, the moments of each channel of its (S, C) rows,
        merged within each group (Chan's merge, channel order); the apply per sample with that
        sample's coefficients. The samples are the stages' problems (problems=N): one pool
        job runs every sample's work items, each sample split as a call on it alone would be.

Which one runs follows the memory order of x (a channels-first array stored NHWC, as torch's
channels_last format, takes the channels-last path), as for batch norm. axis is 1 or -1.
"""
import numpy as np

from . import _api, _kernels, _problems
from ._api import BACKWARD_IN_PLACE, _backward_args, _fused_y, _grad_buffer, _run, _train_args
from ._api import batch_norm_infer
from ._rules import check_train_count, compute_dtype, x_and_axis

__all__ = ["group_norm", "group_norm_train", "group_norm_backward", "instance_norm",
           "instance_norm_train", "instance_norm_backward"]


# ------------------------------------------------------------------------- arguments, layout

def _family_axis(x, axis):
    """The channel axis (already checked against x.ndim) must be 1 or the last one."""
    if axis not in (1, x.ndim - 1):
        raise ValueError(f"axis must be 1 (channels first: NCHW, NCL, NCDHW, (N, C)) or -1 "
                         f"(channels last: NHWC, NLC, NDHWC), got {axis} for x of "
                         f"shape {x.shape}")


def _num_groups(num_groups, C, shape):
    """num_groups as an int that divides C (torch's rule)."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    num_groups = int(num_groups)
    if num_groups < 1:
        raise ValueError(f"num_groups must be positive, got {num_groups}")
    if C % num_groups:
        raise ValueError(f"Expected number of channels in input to be divisible by "
                         f"num_groups, but got input of shape {shape} and "
                         f"num_groups={num_groups}")
    return num_groups


def _unit_stats(mean, invstd, shape, dtype, producer):
    """The saved (N, G) statistics as C-contiguous arrays of the statistics dtype."""
    if mean is None or invstd is None:
        raise TypeError(f"mean and invstd are required: pass what {producer} returned")
    checked = []
    for v, name in ((mean, "mean"), (invstd, "invstd")):
        v = np.asarray(v)
        if v.dtype.kind != "f" or v.dtype.itemsize > 8:
            raise TypeError(f"{name} must be a float32 or float64 array, got dtype {v.dtype}")
        if v.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, one value per sample and "
                             f"group, got {v.shape}")
        checked.append(np.ascontiguousarray(v, dtype=dtype))
    return checked


def _samples_outermost(x, axis):
    """x, or a copy of it in C order where the memory order _api._Views would read it in
    (its axes by decreasing stride) interleaves samples, or puts spatial axes on both sides of
    the channels: the stages need each sample's values in one block, channels first or last."""
    if x.flags.c_contiguous:
        return x
    order = _api._dense_order(x, axis)
    if order is None:               # _Views copies it to C order itself
        return x
    big = [i for i in order[1] if x.shape[i] > 1]      # size-1 axes go anywhere
    spatial = [i for i in big if i != 0]
    samples_first = x.shape[0] == 1 or (big[0] == 0 and x.strides[0] > 0)   # not flipped
    channels_at_an_end = x.shape[axis] == 1 or axis in (spatial[0], spatial[-1])
    return x if samples_first and channels_at_an_end else np.ascontiguousarray(x)


class _Shape:
    """N samples, C channels in G groups of CG, S values per sample and channel; `first`:
    the view _Views made has each sample's channels first (x as (N, C, S)), else last
    ((N, S, C), S > 1: each sample's rows)."""

    def __init__(self, x, C, G):
        self.N, self.C, self.G, self.CG = x.shape[0], C, G, C // G
        self.S = x.size // (self.N * C) if self.N * C else 0
        self.first = True

    def of_view(self, v):
        self.first = v.inner == self.S
        return self

    def samples(self, *arrays):
        """Per sample n, the tuple of each view's n-th contiguous block (channels last: the
        sample's (S, C) rows); None stays None."""
        rows = [[None] * self.N if a is None else a.reshape(self.N, -1) for a in arrays]
        return zip(*rows)


# ------------------------------------------------------------------------------- forward

def _moments(xv, s):
    """Each unit's (sample's group's) merged moments: (4, N, G) float64, the partial format."""
    if s.first:
        units = _kernels.statistics_stage(xv, 1, s.N * s.G, s.CG * s.S)
        return _kernels.merge_stage(units).reshape(4, s.N, s.G)
    problem = _problems.Problem(s.N, s.S, s.C, 1, s.CG, "group")
    return np.moveaxis(_problems.statistics(xv, problem), 1, 0)


def _per_channel(unit_values, s):
    """(N, G) values repeated for each channel of the group: (N, C)."""
    return np.repeat(unit_values, s.CG, axis=1)


def _norm_coefficients(moments, weight, bias, eps, dtype, s):
    """The apply stage's coefficients hi | scale | offset per (sample, channel), (3, N, C) of
    dtype, and the saved mean and invstd (N, G), as the kernels' train_coefficients forms
    them:  mean = hi + lo  (hi rounded to dtype, so x - hi is exact near the mean),
    invstd = 1 / sqrt(m2 / n + eps),  y = (x - hi) * scale + offset  with
    scale = w_c * invstd_u  and  offset = b_c - lo_u * scale  (in float64)."""
    count, shift, dev_sum, m2 = moments
    mean_rest = dev_sum / count
    hi = (shift + mean_rest).astype(dtype)
    lo = (shift - hi) + mean_rest
    invstd = 1.0 / np.sqrt(m2 / count + eps)
    scale = _per_channel(invstd, s) * (1.0 if weight is None else weight.astype(np.float64))
    offset = (0.0 if bias is None else bias.astype(np.float64)) - _per_channel(lo, s) * scale
    coef = np.stack([_per_channel(hi, s), scale, offset]).astype(dtype)
    return coef, hi, invstd.astype(dtype)


def _update_running(moments, running_mean, running_var, momentum):
    """torch's InstanceNorm: r = (1 - momentum) r + momentum * (the batch average of the
    per-instance mean, and of the unbiased variance m2 / (n - 1))."""
    count, shift, dev_sum, m2 = moments
    batch_mean = (shift + dev_sum / count).mean(axis=0)
    batch_var = (m2 / (count - 1)).mean(axis=0)
    running_mean[...] = (1 - momentum) * running_mean.astype(np.float64) + momentum * batch_mean
    running_var[...] = (1 - momentum) * running_var.astype(np.float64) + momentum * batch_var


def _apply(s, x, out, coef, residual, act, slope):
    """y = act(normalize(x) + residual) with (3, N, C) coefficients: one call channels first,
    one over the samples as problems channels last."""
    if s.first:
        _kernels.normalize_stage(x, out, 1, s.N * s.C, s.S, np.ascontiguousarray(coef),
                                 residual, act, slope)
        return
    _kernels.normalize_stage(x, out, s.S, s.C, 1, np.ascontiguousarray(coef.transpose(1, 0, 2)),
                             residual, act, slope, problems=s.N)


def _train(a, G, instance=False):
    """The training forward of checked arguments a (_api.TrainArgs) with G groups: (y, mean,
    invstd). instance: InstanceNorm's rules (more than one value per instance; running
    statistics updated when given)."""
    s = _Shape(a.x, a.C, G)
    if instance:
        check_train_count(s.S, f"{s.S} per sample and channel in x of shape {a.x.shape}")
    mean = np.empty((s.N, G), a.stat_dtype)
    invstd = np.empty((s.N, G), a.stat_dtype)
    if a.x.size == 0:       # no values: nothing is updated
        mean.fill(np.nan)
        invstd.fill(np.nan)
        return (np.empty_like(a.x) if a.out is None else a.out), mean, invstd

    def kernel(v):
        s.of_view(v)
        moments = _moments(v.x, s)
        coef, mean[...], invstd[...] = _norm_coefficients(moments, a.weight, a.bias, a.eps,
                                                          a.stat_dtype, s)
        if a.running_mean is not None:
            _update_running(moments, a.running_mean, a.running_var, a.momentum)
        _apply(s, v.x, v.outputs[0], coef, v.inputs[0] if v.inputs else None, a.act, a.slope)

    arrays = [_samples_outermost(a.x, a.axis)] + a.arrays[1:]
    y, = _run(kernel, arrays, a.axis, [a.out], in_place=[(0,)])
    return y, mean, invstd


# ------------------------------------------------------------------------------ backward

def _grad_sums(dy, x, y, grad, mean, a, s):
    """Per (sample, channel) gradient sums (6, N, C) around the unit's saved mean m and one dy
    shift q per unit (its first g value), so that a unit's channels share both shifts."""
    if s.first:
        q = _kernels.grad_shifts_stage(dy, s.N * s.G, s.CG * s.S, mean.ravel(), y, grad, a.act,
                                       a.slope)
        sums = _kernels.grad_sums_stage(dy, x, 1, s.N * s.C, s.S, _per_channel(mean, s).ravel(),
                                        np.repeat(q, s.CG), y, grad, a.act, a.slope)
        return _kernels.merge_stage(sums).reshape(6, s.N, s.C)
    # the shifts read one row per sample: a loop over the samples costs little
    q = np.stack([_kernels.grad_shifts_stage(dy_n, s.C, 1, mean_n, y_n, grad_n, a.act, a.slope)
                  for mean_n, (dy_n, y_n, grad_n) in zip(mean, s.samples(dy, y, grad))])
    sums = _kernels.grad_sums_stage(dy, x, s.S, s.C, 1, _per_channel(mean, s),
                                    np.repeat(q[:, ::s.CG], s.CG, axis=1), y, grad, a.act,
                                    a.slope, problems=s.N)
    return _kernels.merge_stage(_problems.problems_as_units(sums)).reshape(6, s.N, s.C)


def _grad_coefficients(sums, invstd, weight, dtype, s):
    """dx's coefficients h | G | k_dy | k_xc | k_0 per (sample, channel), (5, N, C) of dtype
    (dx = k_dy (g - G) + k_xc (x - h) + k_0, the grad_input stage), dweight and dbias.

    Per unit u (a sample's group: channels c of n_c values, M in all) from the channel sums
    around the unit's shifts m and q: D_c = sum (g - q), P_c = sum (g - q)(x - m),
    X_c = sum (x - m), with xhat = (x - mu) invstd and
        mu      = m + lo,  lo = sum_c X_c / M           the exact unit mean (m is a shift)
        Y_c     = X_c - n_c lo                          sum (x - mu) over channel c
        sum_g_c = D_c + n_c q                           -> dbias_c   = sum over samples
        Sxg_c   = P_c - lo D_c + q Y_c                  sum g (x - mu) over channel c
                                                        -> dweight_c = sum invstd Sxg_c
        dx      = invstd (w_c g - mean_u(w g) - xhat mean_u(w g xhat))
                = k_dy (g - G_c) + k_xc (x - h) + k_0
    with G_c the channel's mean of g and h = mu, each rounded to dtype (g - G_c and x - h are
    exact near the means), k_dy = w_c invstd, k_xc = -invstd^3 Sw / M (Sw = sum_c w_c Sxg_c),
    k_0 = invstd (w_c G_c - mean_u(w g)) + k_xc (h - mu). Weights enter as w_c = w_0 + dw_c
    (w_0: the unit's first channel's), so that q, which may be far from zero, multiplies only
    the exact differences dw_c and sums that cancel to rounding: equal weights give exactly
    the batch norm's form."""
    shape = (6, s.N, s.G, s.CG)
    n, m, q, D, P, X = sums.reshape(shape)
    m, q = m[..., :1], q[..., :1]                   # the unit's shifts
    invstd = invstd.astype(np.float64)[..., None]
    w = np.ones((1, s.G, s.CG)) if weight is None else weight.astype(np.float64).reshape(
        1, s.G, s.CG)
    dw = w - w[..., :1]

    def unit_sum(a):
        return a.sum(axis=2, keepdims=True)

    M = unit_sum(n)
    lo = unit_sum(X) / M
    Y = X - n * lo
    Sxg = (P - lo * D) + q * Y
    dbias = (D + n * q).sum(axis=0).reshape(s.C)
    dweight = (invstd * Sxg).sum(axis=0).reshape(s.C)
    Sw = unit_sum(w * (P - lo * D)) + q * (unit_sum(dw * Y) + w[..., :1] * unit_sum(Y))
    G_c = (q + D / n).astype(dtype)
    h = (m + lo).astype(dtype)
    k_dy = w * invstd
    k_xc = -invstd ** 3 * Sw / M
    # w_c G_c - mean_u(w g), around q:  w_c (G_c - q) - sum_c w_c D_c / M + q (dw_c - sum dw n / M)
    centre = w * (G_c - q) - unit_sum(w * D) / M + q * (dw - unit_sum(dw * n) / M)
    k_0 = invstd * centre + k_xc * ((h - m) - lo)
    coef = np.stack(np.broadcast_arrays(h, G_c, k_dy, k_xc, k_0)).astype(dtype)
    return coef.reshape(5, s.N, s.C), dweight.astype(dtype), dbias.astype(dtype)


def _backward(a, G):
    """The backward of checked arguments a (_api.BackwardArgs, with the (N, G) statistics)."""
    s = _Shape(a.x, a.C, G)
    dweight = np.zeros(a.C, a.stat_dtype)
    dbias = np.zeros(a.C, a.stat_dtype)
    if a.x.size == 0:
        return (np.empty_like(a.x) if a.out is None else a.out), dweight, dbias

    def kernel(v):
        s.of_view(v)
        dy, y, grad = v.inputs[0], _fused_y(v, a), _grad_buffer(v, a)
        sums = _grad_sums(dy, v.x, y, grad, a.mean, a, s)
        coef, dweight[...], dbias[...] = _grad_coefficients(sums, a.invstd, a.weight,
                                                            a.stat_dtype, s)
        g = dy if grad is None else grad
        if s.first:
            _kernels.grad_input_stage(g, v.x, v.outputs[0], 1, s.N * s.C, s.S,
                                      np.ascontiguousarray(coef))
            return
        _kernels.grad_input_stage(g, v.x, v.outputs[0], s.S, s.C, 1,
                                  np.ascontiguousarray(coef.transpose(1, 0, 2)), problems=s.N)

    arrays = [_samples_outermost(a.x, a.axis)] + a.arrays[1:]
    results = _run(kernel, arrays, a.axis, a.outs, in_place=BACKWARD_IN_PLACE)
    return results[0], dweight, dbias


def _checked_backward(dy, x, mean, invstd, weight, axis, y, activation, negative_slope, out,
                      out_residual, groups_of, producer):
    """_api's backward checks, with the (N, G) statistics in place of per-channel ones;
    groups_of(x, C) gives G. Returns (arguments, G)."""
    x, axis = x_and_axis(x, axis)
    _family_axis(x, axis)
    C = x.shape[axis]
    G = groups_of(x, C)
    stat_dtype = compute_dtype(x.dtype)
    mean, invstd = _unit_stats(mean, invstd, (x.shape[0], G), stat_dtype, producer)
    stand_in = np.zeros(C, stat_dtype)      # passes the per-channel check; replaced below
    a = _backward_args(dy, x, stand_in, stand_in, weight, axis, y, activation, negative_slope,
                       out, out_residual)
    return a._replace(mean=mean, invstd=invstd), G


def _checked_train(x, weight, bias, eps, axis, running_mean, running_var, momentum, out,
                   residual, activation, negative_slope):
    a = _train_args(x, weight, bias, eps, axis, running_mean, running_var, momentum, out,
                    residual, activation, negative_slope)
    _family_axis(a.x, a.axis)
    return a


# ------------------------------------------------------------------------------- GroupNorm

def group_norm_train(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, residual=None,
                     activation=None, negative_slope=0.01, out=None):
    """Group normalization (torch.nn.functional.group_norm): returns (y, mean, invstd).

    The C channels (axis 1, or -1 for channels-last data) are num_groups groups of
    C / num_groups consecutive channels; each sample's group is normalized with its own mean
    and biased variance, then y = (x - mean) * invstd * weight + bias per channel.
    Fused: y = act(that + residual), as fastbn.batch_norm_train. mean and invstd are
    (N, num_groups) arrays of the statistics dtype (x's; float32 for half precision), the
    saved statistics group_norm_backward takes.
    """
    a = _checked_train(x, weight, bias, eps, axis, None, None, 0.1, out, residual, activation,
                       negative_slope)
    return _train(a, _num_groups(num_groups, a.C, a.x.shape))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, residual=None,
               activation=None, negative_slope=0.01, out=None):
    """torch.nn.functional.group_norm on NumPy arrays: group_norm_train's y."""
    return group_norm_train(x, num_groups, weight, bias, eps, axis=axis, residual=residual,
                            activation=activation, negative_slope=negative_slope, out=out)[0]


def group_norm_backward(dy, x, mean, invstd, weight=None, *, num_groups, axis=1, y=None,
                        activation=None, negative_slope=0.01, out=None, out_residual=None):
    """Gradients of group_norm_train's y: returns (dx, dweight, dbias), dweight and dbias of
    shape (C,) (returned whether or not weight is given, as batch_norm_backward).

    mean and invstd are what group_norm_train returned ((N, num_groups)); the mean is a shift
    only (the exact group mean is recovered from x). Fusion (y, activation, out_residual) as
    fastbn.batch_norm_backward.
    """
    a, G = _checked_backward(dy, x, mean, invstd, weight, axis, y, activation, negative_slope,
                             out, out_residual,
                             lambda x, C: _num_groups(num_groups, C, x.shape),
                             "group_norm_train")
    return _backward(a, G)


# ---------------------------------------------------------------------------- InstanceNorm

def instance_norm_train(x, weight=None, bias=None, *, eps=1e-5, axis=1, running_mean=None,
                        running_var=None, momentum=0.1, out=None, residual=None,
                        activation=None, negative_slope=0.01):
    """Instance normalization with the statistics of each sample's channel: (y, mean, invstd),
    mean and invstd of shape (N, C). running_mean and running_var, if given, are updated in
    place as torch does: r = (1 - momentum) r + momentum * (the average over the batch of the
    per-instance mean, and of the unbiased variance). Fusion as fastbn.batch_norm_train.
    """
    a = _checked_train(x, weight, bias, eps, axis, running_mean, running_var, momentum, out,
                       residual, activation, negative_slope)
    return _train(a, a.C, instance=True)


def instance_norm_backward(dy, x, mean, invstd, weight=None, *, axis=1, y=None,
                           activation=None, negative_slope=0.01, out=None, out_residual=None):
    """Gradients of instance_norm_train's y: returns (dx, dweight, dbias), dweight and dbias
    of shape (C,) (returned whether or not weight is given, as batch_norm_backward). mean and
    invstd are what instance_norm_train returned ((N, C)); fusion as
    fastbn.batch_norm_backward."""
    a, G = _checked_backward(dy, x, mean, invstd, weight, axis, y, activation, negative_slope,
                             out, out_residual, lambda x, C: C, "instance_norm_train")
    return _backward(a, G)


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, out=None):
    """torch.nn.functional.instance_norm on NumPy arrays: use_input_stats=True normalizes
    each sample's channels with their own statistics (and updates the running statistics in
    place if given); False normalizes with the running statistics."""
    if use_input_stats:
        return instance_norm_train(x, weight, bias, eps=eps, axis=axis,
                                   running_mean=running_mean, running_var=running_var,
                                   momentum=momentum, out=out)[0]
    x, checked_axis = x_and_axis(x, axis)
    _family_axis(x, checked_axis)
    return batch_norm_infer(x, running_mean, running_var, weight, bias, eps=eps, axis=axis,
                            out=out)
