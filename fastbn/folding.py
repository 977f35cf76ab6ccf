"""Inference folding: batch norm with running statistics is an affine map per channel,
y = a * x + b, which a preceding convolution or linear layer can absorb.

Computed in float64 and returned in the dtype of the weights they fold into (torch computes
in that dtype). fastbn's own inference keeps y = (x - running_mean) * a + beta, as fast (the
pass is bound by memory) and exact near the mean for data far from zero.
"""
import numpy as np

__all__ = ["scale_shift", "fold_conv", "fold_linear"]


def _vector(v, name, C, default):
    if v is None:
        return np.full(C, default, np.float64)
    v = np.asarray(v)
    if v.dtype.kind not in "fiu" or v.dtype == bool:
        raise TypeError(f"{name} must be a real array, got dtype {v.dtype}")
    if v.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},), got {v.shape}")
    return v.astype(np.float64)


def _affine(running_mean, running_var, weight, bias, eps):
    running_mean = np.asarray(running_mean)
    if running_mean.ndim != 1:
        raise ValueError(f"running_mean must be 1-D, got shape {running_mean.shape}")
    C = running_mean.shape[0]
    mean = _vector(running_mean, "running_mean", C, 0.0)
    var = _vector(running_var, "running_var", C, 1.0)
    if running_var is None:
        raise ValueError("running_var is required")
    if (var < 0).any():
        raise ValueError("running_var must be non-negative")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    a = _vector(weight, "weight", C, 1.0) / np.sqrt(var + eps)
    return C, mean, a, _vector(bias, "bias", C, 0.0)


def scale_shift(running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """(a, b) with batch_norm_infer(x) == a * x + b per channel: a = weight / sqrt(var + eps),
    b = bias - running_mean * a. Returned in running_mean's float dtype (float64 otherwise)."""
    C, mean, a, beta = _affine(running_mean, running_var, weight, bias, eps)
    dtype = np.asarray(running_mean).dtype
    dtype = dtype if dtype.kind == "f" else np.dtype(np.float64)
    return a.astype(dtype), (beta - mean * a).astype(dtype)


def _fold(w, b, running_mean, running_var, weight, bias, eps, name, min_ndim):
    w = np.asarray(w)
    if w.dtype.kind != "f":
        raise TypeError(f"{name}_weight must be a float array, got dtype {w.dtype}")
    if w.ndim < min_ndim:
        raise ValueError(f"{name}_weight must have at least {min_ndim} dimensions, got {w.shape}")
    C, mean, a, beta = _affine(running_mean, running_var, weight, bias, eps)
    if w.shape[0] != C:
        raise ValueError(f"{name}_weight has {w.shape[0]} output channels, the batch norm {C}")
    b = _vector(b, f"{name}_bias", C, 0.0)
    folded_w = w.astype(np.float64) * a.reshape((C,) + (1,) * (w.ndim - 1))
    folded_b = (b - mean) * a + beta
    return folded_w.astype(w.dtype), folded_b.astype(w.dtype)


def fold_conv(conv_weight, conv_bias, running_mean, running_var, weight=None, bias=None,
              eps=1e-5):
    """(w, b) of the convolution that computes conv followed by batch norm (inference):
    conv_weight is (Cout, Cin / groups, *kernel), conv_bias (Cout,) or None.
    As torch.nn.utils.fusion.fuse_conv_bn_weights."""
    return _fold(conv_weight, conv_bias, running_mean, running_var, weight, bias, eps, "conv", 3)


def fold_linear(linear_weight, linear_bias, running_mean, running_var, weight=None, bias=None,
                eps=1e-5):
    """(w, b) of the linear layer that computes linear followed by batch norm (inference):
    linear_weight is (out, in), linear_bias (out,) or None.
    As torch.nn.utils.fusion.fuse_linear_bn_weights."""
    w = np.asarray(linear_weight)
    if w.ndim != 2:
        raise ValueError(f"linear_weight must be 2-D (out, in), got shape {w.shape}")
    return _fold(w, linear_bias, running_mean, running_var, weight, bias, eps, "linear", 2)
