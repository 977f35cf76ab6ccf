"""Batch-norm variants on the existing stage kernels (issue 16): batch renormalization and
ghost (virtual-batch) batch norm. No new kernel, no Python loop over the data.

Batch renormalization (Ioffe 2017), Keras's BatchNormalization(renorm=True):

    sigma_B = sqrt(var_B + eps),  r = clip(sigma_B / sigma_R, rmin, rmax),
    d = clip((mu_B - mu_R) / sigma_R, -dmax, dmax)            (mu_R, sigma_R: renorm moments)
    y = ((x - mu_B) / sigma_B * r + d) * gamma + beta
      = (x - mu_B) * invstd_B * (r gamma) + (d gamma + beta)

is batch norm with weight' = r gamma and bias' = d gamma + beta: the statistics stage, r and
d from its moments, the usual finish with the primed parameters, the normalize stage. r and d
are constants for the gradient (stop_gradient), so dx is batch norm's dx with weight', and
    dgamma = sum g (xhat r + d) = r * sum(g xhat) + d * sum(g),   dbeta = sum(g).

Ghost batch norm (Hoffer et al. 2017): statistics per virtual batch of `vbs` consecutive
samples (the last may be smaller). x is taken as C-contiguous (N, C, S) (a channels-last x is
copied to that order first: its (ghost, channel) units are no single view of the kernels'
(outer, U, inner) form). Then, for the whole batch at once:

    statistics stage over (1, N*C, S): moments per (sample, channel)
    merge stage over the vbs samples of every ghost (one more call for a smaller last ghost)
    finish per (ghost, channel) unit (_groups' float64 finish, one channel per unit)
    normalize stage over (1, N*C, S) with each sample's ghost's coefficients
and the backward likewise (gradient sums per (sample, channel) around the ghost's shifts,
merged per ghost, _groups' finish, the grad_input stage).
"""
import math
from types import SimpleNamespace

import numpy as np

from . import _kernels
from ._api import _backward_args, _run, _train_args, batch_norm_backward
from ._groups import _grad_coefficients, _norm_coefficients
from ._rules import check_train_count, train_count


# ------------------------------------------------------------------------------ renorm

def renorm_clipping(clipping):
    """(rmin, rmax, dmax) from a renorm_clipping dict (keys rmax, rmin, dmax). Missing rmax
    and dmax are inf (as Keras); a missing rmin is 1 / rmax (the paper's [1/rmax, rmax];
    Keras's is 0, which this gives too when rmax is missing)."""
    if clipping is None:
        clipping = {}
    if not isinstance(clipping, dict):
        raise TypeError(f"renorm_clipping must be a dict or None, got {type(clipping).__name__}")
    unknown = set(clipping) - {"rmax", "rmin", "dmax"}
    if unknown:
        raise ValueError(f"renorm_clipping has keys not in ('rmax', 'rmin', 'dmax'): "
                         f"{sorted(map(str, unknown))}")
    values = {}
    for key in ("rmax", "rmin", "dmax"):
        v = clipping.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                or not v >= 0:
            raise ValueError(f"renorm_clipping[{key!r}] must be a number >= 0, got {v!r}")
        values[key] = float(v)
    rmax = values.get("rmax", math.inf)
    rmin = values.get("rmin", 1.0 / rmax if rmax > 0 else math.inf)
    if rmin > rmax:
        raise ValueError(f"renorm_clipping: rmin {rmin} > rmax {rmax}")
    return rmin, rmax, values.get("dmax", math.inf)


def renorm_train(x, weight, bias, renorm_mean, renorm_stddev, *, clipping=(0, math.inf,
                 math.inf), renorm_momentum=0.99, eps=1e-5, axis=1, running_mean=None,
                 running_var=None, momentum=0.1, residual=None, activation=None,
                 negative_slope=0.01):
    """Batch renormalization's training forward: (y, mean, invstd, r, d), mean and invstd
    the batch's (as batch_norm_train's), r and d the (C,) float64 corrections that
    renorm_backward takes. renorm_mean and renorm_stddev (float64 (C,)) give r and d, then
    are updated in place (Keras: v = v * renorm_momentum + batch * (1 - renorm_momentum),
    with batch sigma_B = sqrt(var_B + eps)). running_mean / running_var as batch_norm_train."""
    a = _train_args(x, weight, bias, eps, axis, running_mean, running_var, momentum, None,
                    residual, activation, negative_slope)
    C = a.C
    train_count(a.x, a.axis, C)
    if a.x.size == 0:
        raise ValueError("renorm: x has no values")
    rmin, rmax, dmax = clipping
    mean, invstd = np.empty(C, a.stat_dtype), np.empty(C, a.stat_dtype)
    rd = {}

    def kernel(v):
        part = _kernels.merge_stage(_kernels.statistics_stage(v.x, v.outer, C, v.inner))
        mu, var = _kernels.finish_moments_stage(part, a.eps)[:2]
        sigma = np.sqrt(var + a.eps)
        # Keras: the pre-update renorm moments, stddev kept away from 0 by sqrt(eps)
        sigma_r = np.maximum(renorm_stddev, math.sqrt(a.eps))
        r = np.clip(sigma / sigma_r, rmin, rmax)
        d = np.clip((mu - renorm_mean) / sigma_r, -dmax, dmax)
        renorm_mean[...] = renorm_mean * renorm_momentum + mu * (1 - renorm_momentum)
        renorm_stddev[...] = renorm_stddev * renorm_momentum + sigma * (1 - renorm_momentum)
        gamma = 1.0 if a.weight is None else a.weight.astype(np.float64)
        beta = 0.0 if a.bias is None else a.bias.astype(np.float64)
        w = (r * gamma).astype(a.stat_dtype)             # weight' = r gamma
        b = (d * gamma + beta).astype(a.stat_dtype)      # bias'   = d gamma + beta
        like = np.broadcast_to(np.empty((), v.x.dtype), (v.outer, C, v.inner))
        coef = _kernels.finish_train_stage(part, like, w, b, a.eps, a.running_mean,
                                           a.running_var, a.momentum, mean, invstd)
        _kernels.normalize_stage(v.x, v.outputs[0], v.outer, C, v.inner, coef,
                                 v.inputs[0] if v.inputs else None, a.act, a.slope)
        rd["r"], rd["d"] = r, d

    y, = _run(kernel, a.arrays, a.axis, [None], in_place=[(0,)])
    return y, mean, invstd, rd["r"], rd["d"]


def renorm_backward(dy, x, mean, invstd, weight, r, d, **kwargs):
    """(dx, dweight, dbias) of renorm_train's y, r and d constants: batch norm's backward
    with weight' = r gamma; its dweight is sum(g xhat), so dgamma = r * that + d * dbias."""
    gamma = 1.0 if weight is None else np.asarray(weight, np.float64)
    dtype = np.asarray(mean).dtype
    dx, dw, db = batch_norm_backward(dy, x, mean, invstd, (r * gamma).astype(dtype), **kwargs)
    dweight = (r * dw.astype(np.float64) + d * db.astype(np.float64)).astype(dw.dtype)
    return dx, dweight, db


# ------------------------------------------------------------------------- ghost batches

def virtual_batch_size(value):
    """A positive int, checked."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"virtual_batch_size must be an int or None, got "
                        f"{type(value).__name__}")
    if value < 1:
        raise ValueError(f"virtual_batch_size must be positive, got {value}")
    return int(value)


def _first(a, axis):
    """a (N, ..., C at axis, ...) as C-contiguous (N, C, S) (a copy unless it is one)."""
    N, C = a.shape[0], a.shape[axis]
    return np.ascontiguousarray(np.moveaxis(a, axis, 1)).reshape(N, C, -1)


def _back(af, like, axis):
    """(N, C, S) back to like's shape and axis order: like's layout (C order when it is)."""
    view = np.moveaxis(af.reshape((like.shape[0], like.shape[axis]) +
                                  tuple(np.delete(like.shape, [0, axis]))), 1, axis)
    if view.flags.c_contiguous:
        return view
    out = np.empty_like(like)
    out[...] = view
    return out


def _ghosts(per_sample, vbs):
    """(F, N, C) per-(sample, channel) partials merged over each ghost's samples, in sample
    order: (F, ghosts, C). Two merge calls at most (the full ghosts, a smaller last one)."""
    F, N, C = per_sample.shape
    K = N // vbs
    parts = []
    if K:
        full = per_sample[:, :K * vbs].reshape(F, K, vbs, C).transpose(2, 0, 1, 3)
        parts.append(_kernels.merge_stage(full.reshape(vbs, F, K * C)).reshape(F, K, C))
    if K * vbs < N:
        parts.append(_kernels.merge_stage(per_sample[:, K * vbs:].transpose(1, 0, 2))[:, None])
    return np.concatenate(parts, axis=1)


def _to_samples(per_ghost, vbs, N):
    """(..., ghosts, C) -> (..., N, C): each sample gets its ghost's values."""
    return np.ascontiguousarray(np.repeat(per_ghost, vbs, axis=-2)[..., :N, :])


def _units(ghosts, C):
    """_groups' shape record for (ghost, channel) units of one channel each."""
    return SimpleNamespace(N=ghosts, C=C, G=C, CG=1)


def ghost_train(x, vbs, weight=None, bias=None, *, eps=1e-5, axis=1, residual=None,
                activation=None, negative_slope=0.01, batch_stats=None, unbiased=True):
    """Ghost batch norm's training forward: (y, mean, invstd), mean and invstd of shape
    (ghosts, C), ghosts = ceil(N / vbs) (the statistics ghost_backward takes).
    batch_stats, if given as two (C,) arrays, receives the average over the ghosts of their
    means and of their variances (unbiased n_k / (n_k - 1), or biased with unbiased=False),
    the values the running statistics follow (as Keras: reduce_mean over the ghosts)."""
    vbs = virtual_batch_size(vbs)
    a = _train_args(x, weight, bias, eps, axis, None, None, 0.1, None, residual, activation,
                    negative_slope)
    x, C = a.x, a.C
    if a.axis == 0:
        raise ValueError("virtual_batch_size: the batch axis 0 cannot be the channel axis")
    N = x.shape[0]
    S = x.size // (N * C) if N * C else 0
    ghosts = -(-N // vbs)
    smallest = min(vbs, N - (ghosts - 1) * vbs) * S if N else 0
    check_train_count(smallest, f"{smallest} in the smallest virtual batch of x of shape "
                                f"{x.shape} (virtual_batch_size={vbs})")
    if x.size == 0:
        raise ValueError(f"virtual_batch_size: x of shape {x.shape} has no values")
    xf = _first(x, a.axis)
    moments = _ghosts(_kernels.merge_stage(
        _kernels.statistics_stage(xf, 1, N * C, S)).reshape(4, N, C), vbs)
    coef, mean, invstd = _norm_coefficients(moments, a.weight, a.bias, a.eps, a.stat_dtype,
                                            _units(ghosts, C))
    yf = np.empty_like(xf)
    _kernels.normalize_stage(xf, yf, 1, N * C, S, _to_samples(coef, vbs, N),
                             None if residual is None else _first(a.residual, a.axis),
                             a.act, a.slope)
    if batch_stats is not None:
        count, shift, dev_sum, m2 = moments
        batch_stats[0][...] = (shift + dev_sum / count).mean(axis=0)
        batch_stats[1][...] = (m2 / (count - 1 if unbiased else count)).mean(axis=0)
    return _back(yf, x, a.axis), mean, invstd


def ghost_backward(dy, x, mean, invstd, weight=None, *, vbs, axis=1, y=None,
                   activation=None, negative_slope=0.01, out_residual=None):
    """(dx, dweight, dbias) of ghost_train's y; mean and invstd are what it returned.
    out_residual, if given, receives the residual's gradient g = dy * act'(y)."""
    vbs = virtual_batch_size(vbs)
    x_checked, ax = x, axis
    C = x.shape[axis]
    stat_dtype = np.asarray(mean).dtype
    stand_in = np.zeros(C, stat_dtype)        # passes the per-channel check; not used
    a = _backward_args(dy, x_checked, stand_in, stand_in, weight, ax, y, activation,
                       negative_slope, None, out_residual)
    x, N = a.x, a.x.shape[0]
    S = x.size // (N * C)
    ghosts = -(-N // vbs)
    mean = np.ascontiguousarray(mean, a.stat_dtype).reshape(ghosts, C)
    invstd = np.ascontiguousarray(invstd, a.stat_dtype).reshape(ghosts, C)
    xf, dyf = _first(x, a.axis), _first(a.dy, a.axis)
    yf = None if a.y is None else _first(a.y, a.axis)
    grad = np.empty_like(xf) if a.fused else None     # g = dy * act'(y), written by the sums
    mean_n = _to_samples(mean, vbs, N).ravel()
    # one dy shift per (ghost, channel): its first sample's, so a ghost's sums share both
    # shifts and the merge only adds them
    q = _kernels.grad_shifts_stage(dyf, N * C, S, mean_n, yf, grad, a.act, a.slope)
    q_n = _to_samples(q.reshape(N, C)[::vbs], vbs, N).ravel()
    sums = _kernels.merge_stage(_kernels.grad_sums_stage(
        dyf, xf, 1, N * C, S, mean_n, q_n, yf, grad, a.act, a.slope)).reshape(6, N, C)
    coef, dweight, dbias = _grad_coefficients(_ghosts(sums, vbs), invstd, a.weight,
                                              a.stat_dtype, _units(ghosts, C))
    dxf = np.empty_like(xf)
    _kernels.grad_input_stage(dyf if grad is None else grad, xf, dxf, 1, N * C, S,
                              _to_samples(coef, vbs, N))
    if out_residual is not None:
        out_residual[...] = _back(grad, x, a.axis)
    return _back(dxf, x, a.axis), dweight, dbias
