"""The validation rules of fastbn's arguments, and their messages: written once.

fastbn._api checks every argument with these functions before anything is written. The fast
path (fastbn/_fastpath.pyx) takes only calls these rules accept unchanged, and reads the same
definitions to decide that cheaply: the ranges (EPS, MOMENTUM, NEGATIVE_SLOPE), the dtypes
(DATA_DTYPES, compute_dtype), the activation names (fastbn.activations) and MIN_TRAIN_COUNT.
Anything the fast path declines comes here, where it gets its message.

Wrong types raise TypeError, wrong shapes or values ValueError, each naming the argument.
"""
import math
import numbers
from collections import namedtuple

import numpy as np

from . import activations
from ._dtypes import COMPUTE_DTYPES, available

# The storage dtypes (x, dy, residual, y, out) and, for each, the dtype of per-channel arrays
DATA_DTYPES = tuple(dtype for _, dtype in available())
_COMPUTE = {dtype: np.dtype(COMPUTE_DTYPES[t.compute]) for t, dtype in available()}
DTYPE_NAMES = ", ".join(str(d) for d in DATA_DTYPES[:-1]) + f" or {DATA_DTYPES[-1]}"

Range = namedtuple("Range", "name low high")
EPS = Range("eps", 0.0, math.inf)
MOMENTUM = Range("momentum", 0.0, 1.0)
NEGATIVE_SLOPE = Range("negative_slope", -math.inf, math.inf)
# the backward recovers leaky_relu's derivative from the sign of y
NEGATIVE_SLOPE_BACKWARD = Range("negative_slope", 0.0, math.inf)

# training needs more than one value per channel (the unbiased variance divides by n - 1)
MIN_TRAIN_COUNT = 2

AxisError = np.exceptions.AxisError


def compute_dtype(dtype):
    """The dtype of per-channel arrays (weight, statistics) for data of dtype."""
    return _COMPUTE[dtype]


def real(value, rule):
    """value as a float in [rule.low, rule.high]; NaN fails."""
    if type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{rule.name} must be a real number, got {type(value).__name__}")
        value = float(value)
    if not rule.low <= value <= rule.high:
        raise ValueError(f"{rule.name} must be in [{rule.low}, {rule.high}], got {value}")
    return value


def data(x, name):
    """x as an ndarray of a storage dtype in native byte order (a copy only for byte order)."""
    if type(x) is not np.ndarray:
        if isinstance(x, (np.ndarray, list, tuple)):
            x = np.asarray(x)
        else:
            raise TypeError(f"{name} must be a numpy.ndarray of {DTYPE_NAMES}, "
                            f"got {type(x).__name__}")
    dtype = x.dtype
    if dtype in _COMPUTE:
        return x
    native = dtype.newbyteorder("=")
    if native in _COMPUTE:
        return x.astype(native)
    hint = " (convert with .astype(np.float32))" if dtype.kind in "biuf" else ""
    raise TypeError(f"{name} must have dtype {DTYPE_NAMES}, got {dtype}{hint}")


def like_x(a, name, x):
    """a has x's shape and dtype."""
    if a.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {x.shape}, got {a.shape}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {a.dtype}")


def axis(value, ndim):
    """The channel axis as 0..ndim-1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {type(value).__name__}")
    if not -ndim <= value < ndim:
        raise AxisError(int(value), ndim)     # "axis 4 is out of bounds for array of dimension 4"
    return int(value) % ndim


def x_and_axis(x, axis_value):
    """x (at least 2 dimensions) and its channel axis."""
    x = data(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch and channels), "
                         f"got shape {x.shape}")
    return x, axis(axis_value, x.ndim)


def per_channel_message(name, C, shape):
    """A per-channel array of the wrong shape; a vector of another length more often means
    that the channel axis is wrong (NHWC data with the default axis=1) than the array."""
    hint = ""
    if len(shape) == 1:
        hint = (f" (x has {C} values on its channel axis: is axis= right? It is 1 by default; "
                f"channels-last data such as NHWC need axis=-1)")
    return f"{name} must have shape ({C},), one value per channel, got {shape}{hint}"


def channel_vector(v, name, C, dtype):
    """A read-only (C,) parameter as a contiguous array of dtype (converted if needed)."""
    if v is None:
        return None
    v = _float_array(v, name)
    if v.shape != (C,):
        raise ValueError(per_channel_message(name, C, v.shape))
    return _contiguous(v, dtype)


def shaped_parameter(v, name, shape, what, dtype):
    """A read-only parameter of the given shape (the row-wise norms' weight and bias of
    normalized_shape, their saved statistics of x's leading axes: `what` says which) as a
    contiguous array of dtype (converted if needed)."""
    if v is None:
        return None
    v = _float_array(v, name)
    if v.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, {what}, got {v.shape}")
    return _contiguous(v, dtype)


def _float_array(v, name):
    if type(v) is not np.ndarray:
        v = np.asarray(v)
    if v.dtype.kind != "f" or v.dtype.itemsize > 8:
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {v.dtype}")
    return v


def _contiguous(v, dtype):
    if v.dtype == dtype and v.flags.c_contiguous:
        return v
    return np.ascontiguousarray(v, dtype=dtype)


def rms_eps(dtype):
    """RMSNorm's eps=None, as torch.nn.functional.rms_norm's: the machine epsilon of x's
    dtype (float16's or bfloat16's own for half-precision x)."""
    try:
        return float(np.finfo(dtype).eps)
    except ValueError:      # bfloat16: NumPy's finfo does not know ml_dtypes' types
        import ml_dtypes
        return float(ml_dtypes.finfo(dtype).eps)


# the row-wise norms normalize over this many trailing axes at most
MAX_NORMALIZED_AXES = 3


def normalized_shape(value, x):
    """normalized_shape (an int, or a sequence of 1 to MAX_NORMALIZED_AXES ints) as a tuple:
    the shape of x's last axes."""
    shape = (value,) if isinstance(value, (int, np.integer)) else value
    if (isinstance(value, bool) or not isinstance(shape, (tuple, list))
            or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool)
                       for n in shape)):
        raise TypeError(f"normalized_shape must be an int or a tuple of ints, "
                        f"got {value!r}")
    shape = tuple(int(n) for n in shape)
    if not 1 <= len(shape) <= MAX_NORMALIZED_AXES:
        raise ValueError(f"normalized_shape must have 1 to {MAX_NORMALIZED_AXES} axes, "
                         f"got {shape}")
    if x.shape[x.ndim - len(shape):] != shape or x.ndim < len(shape):
        raise ValueError(f"normalized_shape {shape} must be the last axes of x, which has "
                         f"shape {x.shape}")
    return shape


def running_stat(v, name, C, dtype):
    """A running statistic that training updates in place: a writeable (C,) array of dtype."""
    if not isinstance(v, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), "
                        f"got {type(v).__name__}")
    if v.dtype != dtype:
        raise TypeError(f"{name} must have x's statistics dtype ({dtype}), got {v.dtype}"
                        + (" (half-precision data keeps float32 running statistics: in "
                           "float16 or bfloat16 the momentum's small updates would be lost)"
                           if v.dtype.itemsize == 2 else ""))
    if v.shape != (C,):
        raise ValueError(per_channel_message(name, C, v.shape))
    if not v.flags.writeable:
        raise ValueError(f"{name} is read-only, but training updates it in place")
    if v.strides[0] % v.itemsize:
        raise ValueError(f"{name} must have a stride that is a multiple of its item size")
    return v


def out_array(out, x, name="out"):
    """out (None, or a writeable array of x's shape and dtype)."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    like_x(out, name, x)
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


def companion(a, name, x):
    """An array read alongside x (residual, y): x's shape and dtype."""
    if a is None:
        return None
    a = data(a, name)
    like_x(a, name, x)
    return a


def activation(name, negative_slope):
    """(kernel code, slope) of an activation name."""
    return activations.get(name).code, real(negative_slope, NEGATIVE_SLOPE)


def train_count(x, axis_value, C):
    """Values per channel, which training needs more than one of."""
    count = x.size // C if C else 0
    check_train_count(count, f"x of shape {x.shape} with channels on axis {axis_value}")
    return count


def check_train_count(count, what):
    """count values per channel (none, or more than one) are enough for training."""
    if 0 < count < MIN_TRAIN_COUNT:
        raise ValueError(f"Expected more than 1 value per channel when training, got {what}")
