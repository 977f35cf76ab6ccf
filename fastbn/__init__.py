"""fastbn: fast, accurate batch normalization for NumPy on the CPU.

    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias)            # training
    y = fastbn.batch_norm_infer(x, running_mean, running_var, weight, bias)
    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight)
    y = fastbn.layer_norm(x, normalized_shape, weight, bias)          # also rms_norm
    y = fastbn.group_norm(x, num_groups, weight, bias)                # also instance_norm
    y = fastbn.batch_norm(x, running_mean, running_var, weight, bias, training=False)

axis=1 is the channel axis of NCHW-family arrays, axis=-1 of channels-last ones.
fastbn.reference has the same functions in plain NumPy, in extended precision (the oracle).
"""
try:
    from . import _kernels  # noqa: F401  (first: a missing build is reported below)
except ImportError:
    import glob as _glob
    import os as _os
    _here = _os.path.dirname(_os.path.abspath(__file__))
    _built = [f for pattern in ("_kernels*.so", "_kernels*.pyd")
              for f in _glob.glob(_os.path.join(_here, pattern))]
    if _built or not _os.path.exists(_os.path.join(_here, "_kernels.pyx")):
        raise               # a build that fails to load: its own error says why
    # a source folder (a clone, an unpacked sdist) with no build in it, imported because the
    # current directory comes first on sys.path; Python's own message blames a circular import
    raise ImportError(
        f"fastbn's compiled extension is not in {_here}: Python imported fastbn's source "
        f"folder (a clone or an unpacked sdist, which `pip install .` does not build into) "
        f"because the current directory comes first on sys.path. Run Python from another "
        f"directory to use the installed fastbn, or build in place with `pip install -e .`"
    ) from None

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
from ._groups import (
    group_norm,
    group_norm_backward,
    group_norm_train,
    instance_norm,
    instance_norm_backward,
    instance_norm_train,
)
from ._rows import (
    layer_norm,
    layer_norm_backward,
    layer_norm_train,
    rms_norm,
    rms_norm_backward,
    rms_norm_train,
)
from ._version import __version__
from .folding import fold_conv, fold_conv_transpose, fold_linear, scale_shift
from .layers import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from .statistics import Moments, Statistics, merge_moments, moments, recalibrate
from . import distributed, reference   # distributed imports mpi4py only when it needs it

__all__ = ["BatchNorm", "InstanceNorm", "GroupNorm", "LayerNorm", "RMSNorm", "fold_conv",
           "fold_conv_transpose", "fold_linear", "scale_shift", "batch_norm_train",
           "batch_norm_infer", "batch_norm_backward", "batch_norm", "group_norm",
           "group_norm_train", "group_norm_backward", "instance_norm", "instance_norm_train",
           "instance_norm_backward", "layer_norm", "layer_norm_train", "layer_norm_backward",
           "rms_norm", "rms_norm_train", "rms_norm_backward", "moments", "merge_moments",
           "Moments", "Statistics", "recalibrate", "set_num_threads", "get_num_threads",
           "set_output_cache", "get_output_cache", "reference", "distributed", "__version__"]


def __getattr__(name):
    # fastbn.torch needs PyTorch, which fastbn does not depend on: imported on first use
    if name == "torch":
        import importlib
        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
