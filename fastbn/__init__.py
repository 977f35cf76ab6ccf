"""fastbn: fast, accurate batch normalization for NumPy on the CPU.

    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias)            # training
    y = fastbn.batch_norm_infer(x, running_mean, running_var, weight, bias)
    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight)
    y = fastbn.batch_norm(x, running_mean, running_var, weight, bias, training=False)

axis=1 is the channel axis of NCHW-family arrays, axis=-1 of channels-last ones.
"""
from ._api import (
    batch_norm,
    batch_norm_backward,
    batch_norm_infer,
    batch_norm_train,
    get_num_threads,
    get_output_cache,
    set_num_threads,
    set_output_cache,
)
from ._version import __version__
from .folding import fold_conv, fold_linear, scale_shift
from .layers import BatchNorm
from .statistics import Moments, Statistics, merge_moments, moments

__all__ = ["BatchNorm", "fold_conv", "fold_linear", "scale_shift", "batch_norm_train",
           "batch_norm_infer", "batch_norm_backward", "batch_norm", "moments", "merge_moments",
           "Moments", "Statistics", "set_num_threads", "get_num_threads", "set_output_cache",
           "get_output_cache", "__version__"]
