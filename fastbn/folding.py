"""Inference folding: batch norm with running statistics is an affine map per channel,
y = a * x + b, which a preceding convolution or linear layer can absorb.

Computed in float64 and rounded once, at the end, to the dtype of the weights they fold into
(torch computes in that dtype): any float dtype, float16 and ml_dtypes' bfloat16 included.
fastbn's own inference keeps y = (x - running_mean) * a + beta, as fast (the
pass is bound by memory) and exact near the mean for data far from zero.
"""
import numpy as np

__all__ = ["scale_shift", "fold_conv", "fold_conv_transpose", "fold_linear"]


def _is_float(dtype):
    """NumPy's float kinds, and ml_dtypes' bfloat16 (a kind 'V' dtype to NumPy)."""
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _vector(v, name, C, default):
    if v is None:
        return np.full(C, default, np.float64)
    v = np.asarray(v)
    if not (v.dtype.kind in "iu" or _is_float(v.dtype)):
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
    dtype = dtype if _is_float(dtype) else np.dtype(np.float64)
    return a.astype(dtype), (beta - mean * a).astype(dtype)


def _fold(w, b, running_mean, running_var, weight, bias, eps, name, min_ndim, groups=None):
    """The folded (w, b); groups=None: w is (out, ...), else a transposed convolution's
    (Cin, Cout / groups, ...)."""
    w = np.asarray(w)
    if not _is_float(w.dtype):
        raise TypeError(f"{name}_weight must be a float array, got dtype {w.dtype}")
    if w.ndim < min_ndim:
        raise ValueError(f"{name}_weight must have at least {min_ndim} dimensions, got {w.shape}")
    C, mean, a, beta = _affine(running_mean, running_var, weight, bias, eps)
    w64 = w.astype(np.float64)
    if groups is None:
        if w.shape[0] != C:
            raise ValueError(f"{name}_weight has {w.shape[0]} output channels, the batch norm {C}")
        folded_w = w64 * a.reshape((C,) + (1,) * (w.ndim - 1))
    else:
        if w.shape[0] % groups:
            raise ValueError(f"{name}_weight has {w.shape[0]} input channels, not a multiple "
                             f"of groups={groups}")
        if groups * w.shape[1] != C:
            raise ValueError(f"{name}_weight has {groups} x {w.shape[1]} output channels, the "
                             f"batch norm {C}")
        # output channel g * (Cout / groups) + j is w[g * Cin / groups:(g + 1) * Cin / groups, j]
        grouped = w64.reshape((groups, w.shape[0] // groups) + w.shape[1:])
        per_channel = a.reshape((groups, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        folded_w = (grouped * per_channel).reshape(w.shape)
    b = _vector(b, f"{name}_bias", C, 0.0)
    folded_b = (b - mean) * a + beta
    return folded_w.astype(w.dtype), folded_b.astype(w.dtype)


def fold_conv(conv_weight, conv_bias, running_mean, running_var, weight=None, bias=None,
              eps=1e-5):
    """(w, b) of the convolution that computes conv followed by batch norm (inference):
    conv_weight is (Cout, Cin / groups, *kernel), conv_bias (Cout,) or None.
    As torch.nn.utils.fusion.fuse_conv_bn_weights."""
    return _fold(conv_weight, conv_bias, running_mean, running_var, weight, bias, eps, "conv", 3)


def fold_conv_transpose(conv_weight, conv_bias, running_mean, running_var, weight=None,
                        bias=None, eps=1e-5, *, groups=1):
    """(w, b) of the transposed convolution that computes itself followed by batch norm
    (inference): conv_weight is (Cin, Cout / groups, *kernel), as torch.nn.ConvTranspose and
    ONNX ConvTranspose hold it, conv_bias (Cout,) or None."""
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    return _fold(conv_weight, conv_bias, running_mean, running_var, weight, bias, eps, "conv", 3,
                 groups=int(groups))


def fold_linear(linear_weight, linear_bias, running_mean, running_var, weight=None, bias=None,
                eps=1e-5):
    """(w, b) of the linear layer that computes linear followed by batch norm (inference):
    linear_weight is (out, in), linear_bias (out,) or None.
    As torch.nn.utils.fusion.fuse_linear_bn_weights."""
    w = np.asarray(linear_weight)
    if w.ndim != 2:
        raise ValueError(f"linear_weight must be 2-D (out, in), got shape {w.shape}")
    return _fold(w, linear_bias, running_mean, running_var, weight, bias, eps, "linear", 2)
