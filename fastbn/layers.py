"""Stateful normalization layers with PyTorch's semantics: BatchNorm (torch.nn.BatchNorm1d/2d/3d),
InstanceNorm (torch.nn.InstanceNorm1d/2d/3d), GroupNorm (torch.nn.GroupNorm), LayerNorm and
RMSNorm (torch.nn.LayerNorm, torch.nn.RMSNorm).

Calls the public functions of fastbn only (docs/architecture.md: layers -> _api, _groups, _rows).
"""
import math
import numbers
from collections import deque
from functools import partial

import numpy as np

from . import _rules, _variants, activations
from ._api import batch_norm_backward, batch_norm_infer, batch_norm_train
from ._groups import (group_norm_backward, group_norm_train, instance_norm_backward,
                      instance_norm_train)
from ._rows import layer_norm_backward, layer_norm_train, rms_norm_backward, rms_norm_train

_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_RENORM_KEYS = ("renorm_mean", "renorm_stddev")     # a renorm layer's (not torch's)


def _check_state_keys(state, expected):
    """A state dict's keys must be exactly `expected` (checked before anything is loaded)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"state dict keys: missing {missing}, unexpected {unexpected}")


class BatchNorm:
    """Batch normalization over the channel axis `axis` of its input, as torch.nn.BatchNorm*d.

    Training (the default mode) normalizes with the batch statistics and, when
    track_running_stats, updates running_mean and running_var:
    r = (1 - momentum) r + momentum * batch (momentum=None: the cumulative average over
    num_batches_tracked batches), with the unbiased batch variance for running_var.
    Evaluation normalizes with the running statistics, or with the batch statistics when
    track_running_stats is False.

    backward(dy) returns dx for the last forward and keeps grad_weight and grad_bias.

    activation='relu', 'leaky_relu' (negative_slope) or 'tanh' fuses the activation, and
    forward(x, residual) adds a residual before it: y = act(bn(x) + residual) in one pass.
    backward(dy) then takes dy as the gradient of that y and keeps grad_residual, the
    residual's gradient (None when the forward had no residual).

    window=k replaces the exponential moving average: the running statistics are then the
    average of the last k batches' statistics (momentum is not used). BatchNorm.keras(...)
    builds the layer with Keras's conventions.

    bias=False (with affine): a weight but no bias (torch's BatchNorm*d(..., bias=False)).

    renorm=True: batch renormalization in training (Keras's BatchNormalization(renorm=True)):
    y = ((x - mu_B) / sigma_B * r + d) * weight + bias with r = clip(sigma_B / sigma_R,
    rmin, rmax), d = clip((mu_B - mu_R) / sigma_R, -dmax, dmax), sigma_B = sqrt(var_B + eps),
    mu_R and sigma_R the renorm moments (renorm_mean, renorm_stddev: their own moving averages
    with renorm_momentum, taken before this batch updates them). r and d are constants in the
    backward. renorm_clipping: a dict of rmax, dmax (missing: no bound) and rmin (missing:
    1 / rmax). The running statistics and evaluation are as without renorm.

    virtual_batch_size=v: ghost batch norm in training: each run of v samples along axis 0
    (the last may be smaller) is normalized with its own statistics; the running statistics
    follow the average over the ghosts of their means and variances (unbiased, or the
    population variance for a Keras-convention layer), by the layer's rule. Evaluation is as
    without it.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, dtype=np.float32, window=None,
                 activation=None, negative_slope=0.01, bias=True, renorm=False,
                 renorm_clipping=None, renorm_momentum=0.99, virtual_batch_size=None):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
        if not 0 <= eps < math.inf:
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        dtype = np.dtype(dtype)
        if dtype not in _rules.DATA_DTYPES:
            raise TypeError(f"dtype must be {_rules.DTYPE_NAMES}, got {dtype}")
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window < 1):
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        activations.get(activation)       # TypeError / ValueError for an unknown one
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)) \
                or not 0 <= negative_slope < float("inf"):
            raise ValueError(f"negative_slope must be a finite number >= 0 (the backward "
                             f"recovers the derivative from the output's sign), "
                             f"got {negative_slope!r}")
        self.renorm = bool(renorm)
        self._clipping = _variants.renorm_clipping(renorm_clipping)    # (rmin, rmax, dmax)
        self.renorm_clipping = None if renorm_clipping is None else dict(renorm_clipping)
        if isinstance(renorm_momentum, bool) or not isinstance(renorm_momentum, (int, float)) \
                or not 0 <= renorm_momentum <= 1:
            raise ValueError(f"renorm_momentum must be in [0, 1], got {renorm_momentum!r}")
        self.renorm_momentum = float(renorm_momentum)
        self.virtual_batch_size = (None if virtual_batch_size is None
                                   else _variants.virtual_batch_size(virtual_batch_size))
        if self.renorm and self.virtual_batch_size:
            raise ValueError("renorm and virtual_batch_size cannot be combined here")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = axis
        self.dtype = dtype             # of x
        self.param_dtype = _rules.compute_dtype(dtype)   # of the parameters and statistics
        self.training = True
        self.window = window
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self._history = deque(maxlen=window) if window else None   # (mean, var) per batch
        self._keras = False         # running statistics as Keras updates them
        C = self.num_features
        param = self.param_dtype
        self.weight = np.ones(C, param) if affine else None
        self.bias = np.zeros(C, param) if affine and bias else None
        # renorm's moving moments (Keras's renorm_mean / renorm_stddev: zeros, ones)
        self.renorm_mean = np.zeros(C, param) if self.renorm else None
        self.renorm_stddev = np.ones(C, param) if self.renorm else None
        self.grad_weight = None
        self.grad_bias = None
        self.grad_residual = None
        if track_running_stats:
            self.running_mean = np.zeros(C, param)
            self.running_var = np.ones(C, param)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self._saved = None          # what backward needs from the last forward

    # ----------------------------------------------------------------------------- modes
    def train(self, mode=True):
        """Training mode (mode=True, the default): the forward normalizes with the batch
        statistics and updates the running statistics. train(False) is eval(). Returns the
        layer."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode: the forward normalizes with the running statistics (with the batch
        statistics when track_running_stats is False) and updates nothing. Returns the
        layer."""
        return self.train(False)

    # --------------------------------------------------------------------------- forward
    def __call__(self, x, residual=None):
        return self.forward(x, residual)

    def forward(self, x, residual=None):
        """y = bn(x), or act(bn(x) + residual) with the layer's activation."""
        self._check_input(x)
        fuse = dict(residual=residual, activation=self.activation,
                    negative_slope=self.negative_slope)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats:
            y = batch_norm_infer(x, self.running_mean, self.running_var, self.weight, self.bias,
                                 eps=self.eps, axis=self.axis, **fuse)
            self._saved = ("running", x, y, residual is not None)
            return y
        update = self.training and self.track_running_stats
        train, backward = self._batch_ops()
        if self.training and self.renorm:
            train, backward = self._renorm_ops()
        if self.training and self.virtual_batch_size:
            y, mean, invstd, backward = self._forward_ghost(x, fuse, update)
        elif update and (self.window or self._keras):
            y, mean, invstd = self._forward_own_update(x, fuse, train)
        else:
            momentum = 0.0
            if update:  # momentum=None: the cumulative average over the batches seen
                momentum = (1.0 / (self.num_batches_tracked + 1) if self.momentum is None
                            else float(self.momentum))
            y, mean, invstd = train(
                x, self.weight, self.bias, eps=self.eps, axis=self.axis, momentum=momentum,
                running_mean=self.running_mean if update else None,
                running_var=self.running_var if update else None, **fuse)
        if update:      # counted once the call has succeeded
            self.num_batches_tracked += 1
        self._saved = ("batch", x, y, residual is not None, mean, invstd, backward)
        return y

    def _batch_ops(self):
        """The training forward and its backward that normalize with batch statistics: this
        batch's (SyncBatchNorm: the global batch's, while training)."""
        return batch_norm_train, batch_norm_backward

    def _renorm_ops(self):
        """renorm_train as the training forward (r and d kept for the backward, which is
        batch norm's with weight' = r * weight): a pair for one forward."""
        rd = []

        def train(x, weight, bias, **kwargs):
            y, mean, invstd, *rd[:] = _variants.renorm_train(
                x, weight, bias, self.renorm_mean, self.renorm_stddev, clipping=self._clipping,
                renorm_momentum=self.renorm_momentum, **kwargs)
            return y, mean, invstd

        def backward(dy, x, mean, invstd, weight, **kwargs):
            return _variants.renorm_backward(dy, x, mean, invstd, weight, *rd, **kwargs)
        return train, backward

    def _forward_ghost(self, x, fuse, update):
        """Ghost batch norm's training forward: (y, mean, invstd, backward)."""
        C = self.num_features
        stats = (np.zeros(C), np.zeros(C))       # the ghosts' average mean and variance
        y, mean, invstd = _variants.ghost_train(
            x, self.virtual_batch_size, self.weight, self.bias, eps=self.eps, axis=self.axis,
            batch_stats=stats if update else None, unbiased=not self._keras, **fuse)
        if update:
            self._update_running(*stats)
        return y, mean, invstd, partial(_variants.ghost_backward, vbs=self.virtual_batch_size)

    def _update_running(self, batch_mean, batch_var):
        """The running statistics from one training batch's float64 mean and variance
        (population variance under Keras's rule, unbiased otherwise), by the layer's rule."""
        if self._keras:
            # moving = moving * momentum + batch * (1 - momentum)
            m = self.momentum
            self.running_mean[...] = self.running_mean * m + batch_mean * (1 - m)
            self.running_var[...] = self.running_var * m + batch_var * (1 - m)
        elif self.window:
            self._history.append((batch_mean, batch_var))
            self.running_mean[...] = np.mean([h[0] for h in self._history], axis=0)
            self.running_var[...] = np.mean([h[1] for h in self._history], axis=0)
        else:   # torch: r = (1 - m) r + m batch; momentum None: the cumulative average
            m = (1.0 / (self.num_batches_tracked + 1) if self.momentum is None
                 else float(self.momentum))
            self.running_mean[...] = (1 - m) * self.running_mean.astype(np.float64) \
                + m * batch_mean
            self.running_var[...] = (1 - m) * self.running_var.astype(np.float64) \
                + m * batch_var

    def _forward_own_update(self, x, fuse, train):
        """Training forward for the window and Keras rules: the kernel's update with
        momentum 1 gives the batch mean and unbiased variance exactly, the layer does the rest."""
        C = self.num_features
        batch_mean, batch_var = np.zeros(C, self.param_dtype), np.zeros(C, self.param_dtype)
        y, mean, invstd = train(x, self.weight, self.bias, eps=self.eps, axis=self.axis,
                                momentum=1.0, running_mean=batch_mean, running_var=batch_var,
                                **fuse)
        batch_mean, batch_var = batch_mean.astype(np.float64), batch_var.astype(np.float64)
        if self._keras:     # Keras's moving variance takes the population variance
            count = x.size // C
            batch_var *= (count - 1) / count
        self._update_running(batch_mean, batch_var)
        return y, mean, invstd

    @classmethod
    def keras(cls, num_features, momentum=0.99, epsilon=1e-3, center=True, scale=True, *,
              axis=-1, dtype=np.float32, renorm=False, renorm_clipping=None,
              renorm_momentum=0.99, virtual_batch_size=None):
        """The layer with keras.layers.BatchNormalization's conventions: momentum weights the
        old value (moving = moving * momentum + batch * (1 - momentum)), the moving variance
        takes the batch's population variance, epsilon 1e-3, beta only with center, gamma only
        with scale, channels last by default. Arrays keep PyTorch's names (weight = gamma,
        bias = beta, running_mean, running_var). renorm, renorm_clipping, renorm_momentum and
        virtual_batch_size as Keras's (see BatchNorm)."""
        if not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        layer = cls(num_features, eps=epsilon, momentum=0.1, affine=True, axis=axis,
                    dtype=dtype, renorm=renorm, renorm_clipping=renorm_clipping,
                    renorm_momentum=renorm_momentum, virtual_batch_size=virtual_batch_size)
        layer.momentum = float(momentum)
        layer._keras = True
        if not scale:
            layer.weight = None
        if not center:
            layer.bias = None
        layer.affine = bool(center and scale)     # as torch: both parameters present
        return layer

    def _check_input(self, x):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy.ndarray, got {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"x must have at least 2 dimensions, got shape {x.shape}")
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(f"axis {self.axis} is out of range for x of shape {x.shape}")
        if x.shape[self.axis] != self.num_features:
            raise ValueError(f"x has {x.shape[self.axis]} channels on axis {self.axis}, "
                             f"this layer has num_features={self.num_features}"
                             + self._axis_hint(x.shape))
        if x.dtype != self.dtype:
            raise TypeError(f"x must have the layer's dtype ({self.dtype}), got {x.dtype}")

    def _axis_hint(self, shape):
        """'; is the channel axis wrong? ...' naming the axes of x that have num_features
        values (NHWC data for a layer built with axis=1, say); '' when none has."""
        axes = [a - len(shape) if a == len(shape) - 1 else a
                for a in range(len(shape)) if shape[a] == self.num_features]
        if not axes:
            return ""
        advice = ("build the layer with axis=-1 for channels-last data such as NHWC"
                  if -1 in axes else f"build the layer with axis={axes[0]}")
        return (f"; is the channel axis wrong? x has {self.num_features} values on axis "
                f"{', '.join(map(str, axes))} ({advice})")

    # -------------------------------------------------------------------------- backward
    def backward(self, dy):
        """dx of the last forward; keeps grad_weight and grad_bias (when affine), and
        grad_residual when the forward had a residual."""
        if self._saved is None:
            raise RuntimeError("backward needs a forward first")
        mode, x, y, with_residual = self._saved[:4]
        grad_residual = np.empty_like(x) if with_residual else None
        if mode == "batch":
            mean, invstd, batch_backward = self._saved[4:]
            dx, dweight, dbias = batch_backward(
                dy, x, mean, invstd, self.weight, axis=self.axis,
                y=y if self.activation else None, activation=self.activation,
                negative_slope=self.negative_slope, out_residual=grad_residual)
        else:
            # running statistics are constants: y = act(x * a + b + residual) per channel
            # (the training backward has the activation's derivative fused in its kernel)
            dy = activations.get(self.activation).grad_from_y(dy, y, self.negative_slope)
            if with_residual:
                grad_residual[...] = dy
            dx = batch_norm_infer(dy, np.zeros_like(self.running_var), self.running_var,
                                  self.weight, None, eps=self.eps, axis=self.axis)
            xhat = batch_norm_infer(x, self.running_mean, self.running_var, None, None,
                                    eps=self.eps, axis=self.axis)
            reduce = tuple(i for i in range(x.ndim) if i != self.axis % x.ndim)
            dweight = (np.asarray(dy, np.float64) * xhat).sum(axis=reduce).astype(self.param_dtype)
            dbias = np.asarray(dy, np.float64).sum(axis=reduce).astype(self.param_dtype)
        self.grad_weight = dweight if self.weight is not None else None
        self.grad_bias = dbias if self.bias is not None else None
        self.grad_residual = grad_residual
        return dx

    # ----------------------------------------------------------------------------- state
    def state_dict(self):
        """PyTorch's keys: weight, bias (affine), running_mean, running_var,
        num_batches_tracked (track_running_stats). Copies. (A window layer's history of batch
        statistics is not part of it.) A renorm layer adds renorm_mean and renorm_stddev."""
        state = {}
        if self.weight is not None:
            state["weight"] = self.weight.copy()
        if self.bias is not None:
            state["bias"] = self.bias.copy()
        if self.track_running_stats:
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, np.int64)
        for k in _RENORM_KEYS:
            if getattr(self, k, None) is not None:
                state[k] = getattr(self, k).copy()
        return state

    def load_state_dict(self, state):
        """Loads a state dict (e.g. {k: v.numpy()} of a torch BatchNorm's): all keys are
        checked before any is written."""
        expected = [k for k in _STATE_KEYS
                    if (k in ("weight", "bias") and getattr(self, k) is not None)
                    or (k not in ("weight", "bias") and self.track_running_stats)]
        expected += [k for k in _RENORM_KEYS if getattr(self, k, None) is not None]
        _check_state_keys(state, expected)
        values = {}
        for k in expected:
            v = np.asarray(state[k])
            if k == "num_batches_tracked":
                if v.shape != () or v.dtype.kind not in "iu":
                    raise ValueError(f"num_batches_tracked must be an integer scalar, got {v!r}")
                values[k] = int(v)
                continue
            if v.shape != (self.num_features,) or v.dtype.kind != "f":
                raise ValueError(f"{k} must be a float array of shape ({self.num_features},), "
                                 f"got {v.dtype} {v.shape}")
            values[k] = v.astype(self.param_dtype)
        for k, v in values.items():
            setattr(self, k, v)

    def save(self, path):
        """The state dict to an .npz file."""
        np.savez(path, **self.state_dict())

    def load(self, path):
        """Loads the state dict that save() wrote to an .npz file (as load_state_dict: all
        keys are checked before any is written). Returns nothing."""
        with np.load(path) as data:
            self.load_state_dict({k: data[k] for k in data.files})

    def __repr__(self):
        """The call that builds this layer (with fresh parameters and statistics): for a
        Keras-convention layer, BatchNorm.keras(...), whose momentum means the other thing."""
        if self._keras:
            return (f"BatchNorm.keras({self.num_features}, momentum={self.momentum!r}, "
                    f"epsilon={self.eps!r}, center={self.bias is not None}, "
                    f"scale={self.weight is not None}, axis={self.axis}, "
                    f"dtype='{self.dtype.name}'" + self._variants_repr() + ")")
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps!r}, "
                f"momentum={self.momentum!r}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}, dtype='{self.dtype.name}'"
                + (f", window={self.window}" if self.window else "")
                + (", bias=False" if self.affine and self.bias is None else "")
                + self._variants_repr()
                + (f", activation={self.activation!r}" if self.activation else "")
                + (f", negative_slope={self.negative_slope!r}"
                   if self.activation == "leaky_relu" else "") + ")")

    def _variants_repr(self):
        return ((f", renorm=True, renorm_clipping={self.renorm_clipping!r}, "
                 f"renorm_momentum={self.renorm_momentum!r}" if self.renorm else "")
                + (f", virtual_batch_size={self.virtual_batch_size}"
                   if self.virtual_batch_size else ""))


# ====================================================================== GroupNorm, InstanceNorm
# (the normalization family, issue 16)
class InstanceNorm(BatchNorm):
    """Instance normalization, as torch.nn.InstanceNorm1d/2d/3d: each sample's channel is
    normalized with its own statistics (in training, and in evaluation unless
    track_running_stats). With track_running_stats, training updates running_mean and
    running_var with the batch average of the per-instance mean and unbiased variance, and
    evaluation normalizes with them. axis is 1 (channels first) or -1 (channels last).

    BatchNorm's interface otherwise (backward keeps grad_weight, grad_bias and grad_residual;
    activation fusion; state_dict with torch's keys), with torch's InstanceNorm conventions:
    affine and track_running_stats off by default, num_batches_tracked never counts, and
    momentum=None is 0 (no update), as torch's functional call takes it.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, *, axis=1, dtype=np.float32, activation=None,
                 negative_slope=0.01):
        super().__init__(num_features, eps, 0.0 if momentum is None else momentum, affine,
                         track_running_stats, axis=axis, dtype=dtype, activation=activation,
                         negative_slope=negative_slope)

    def _batch_ops(self):
        return instance_norm_train, instance_norm_backward

    def forward(self, x, residual=None):
        counted = self.num_batches_tracked
        y = super().forward(x, residual)
        self.num_batches_tracked = counted      # torch's InstanceNorm keeps it at 0
        return y

    @classmethod
    def keras(cls, *args, **kwargs):
        """Not for InstanceNorm (Keras has no InstanceNormalization layer of its own)."""
        raise TypeError("InstanceNorm has no Keras conventions; use InstanceNorm(...)")


class GroupNorm:
    """Group normalization, as torch.nn.GroupNorm: the num_channels channels (axis 1, or -1
    for channels-last data) in num_groups groups of consecutive channels, each sample's group
    normalized with its own statistics, then a per-channel affine (affine=True: weight ones,
    bias zeros). The same in training and evaluation (no running statistics).

    backward(dy) returns dx for the last forward and keeps grad_weight and grad_bias (when
    affine); activation and forward(x, residual) fuse as in BatchNorm (grad_residual).
    state_dict() has torch's keys (weight, bias).
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, axis=1,
                 dtype=np.float32, activation=None, negative_slope=0.01):
        for name, value in (("num_groups", num_groups), ("num_channels", num_channels)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if num_channels % num_groups:
            raise ValueError(f"num_channels must be divisible by num_groups, got "
                             f"num_channels={num_channels} and num_groups={num_groups}")
        # BatchNorm's checks of the other arguments
        checked = BatchNorm(num_channels, eps, affine=affine, track_running_stats=False,
                            axis=axis, dtype=dtype, activation=activation,
                            negative_slope=negative_slope)
        self.num_groups = int(num_groups)
        self.num_channels = self.num_features = checked.num_features
        for name in ("eps", "affine", "axis", "dtype", "param_dtype", "activation",
                     "negative_slope", "weight", "bias", "training", "track_running_stats"):
            setattr(self, name, getattr(checked, name))
        self.grad_weight = self.grad_bias = self.grad_residual = None
        self._saved = None

    # BatchNorm's modes, input check and state dict (track_running_stats is False here)
    train = BatchNorm.train
    eval = BatchNorm.eval
    _check_input = BatchNorm._check_input
    _axis_hint = BatchNorm._axis_hint
    state_dict = BatchNorm.state_dict
    load_state_dict = BatchNorm.load_state_dict
    save = BatchNorm.save
    load = BatchNorm.load

    def __call__(self, x, residual=None):
        return self.forward(x, residual)

    def forward(self, x, residual=None):
        """y = gn(x), or act(gn(x) + residual) with the layer's activation."""
        self._check_input(x)
        y, mean, invstd = group_norm_train(x, self.num_groups, self.weight, self.bias,
                                           self.eps, axis=self.axis, residual=residual,
                                           activation=self.activation,
                                           negative_slope=self.negative_slope)
        self._saved = (x, y, residual is not None, mean, invstd)
        return y

    def backward(self, dy):
        """dx of the last forward; keeps grad_weight and grad_bias (when affine), and
        grad_residual when the forward had a residual."""
        if self._saved is None:
            raise RuntimeError("backward needs a forward first")
        x, y, with_residual, mean, invstd = self._saved
        grad_residual = np.empty_like(x) if with_residual else None
        dx, dweight, dbias = group_norm_backward(
            dy, x, mean, invstd, self.weight, num_groups=self.num_groups, axis=self.axis,
            y=y if self.activation else None, activation=self.activation,
            negative_slope=self.negative_slope, out_residual=grad_residual)
        self.grad_weight = dweight if self.weight is not None else None
        self.grad_bias = dbias if self.bias is not None else None
        self.grad_residual = grad_residual
        return dx

    def __repr__(self):
        return (f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps!r}, "
                f"affine={self.affine}, axis={self.axis}, dtype='{self.dtype.name}'"
                + (f", activation={self.activation!r}" if self.activation else "")
                + (f", negative_slope={self.negative_slope!r}"
                   if self.activation == "leaky_relu" else "") + ")")


# ====================================================================== LayerNorm, RMSNorm
# (the normalization family, issue 16)
class _RowNorm:
    """What LayerNorm and RMSNorm share: the normalized shape, eps, the elementwise affine
    parameters (of normalized_shape), the last forward's saved state, and state dicts with
    torch's keys (weight, bias)."""

    def __init__(self, normalized_shape, eps, weight, bias, dtype):
        shape = ((normalized_shape,) if isinstance(normalized_shape, (int, np.integer))
                 else normalized_shape)
        if (isinstance(normalized_shape, bool) or not isinstance(shape, (tuple, list))
                or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool)
                           and n >= 1 for n in shape)
                or not 1 <= len(shape) <= _rules.MAX_NORMALIZED_AXES):
            raise ValueError(f"normalized_shape must be a positive int or a tuple of 1 to "
                             f"{_rules.MAX_NORMALIZED_AXES} positive ints, "
                             f"got {normalized_shape!r}")
        if eps is not None:
            eps = _rules.real(eps, _rules.EPS)
        dtype = np.dtype(dtype)
        if dtype not in _rules.DATA_DTYPES:
            raise TypeError(f"dtype must be {_rules.DTYPE_NAMES}, got {dtype}")
        self.normalized_shape = tuple(int(n) for n in shape)
        self.eps = eps
        self.dtype = dtype                                   # of x
        self.param_dtype = _rules.compute_dtype(dtype)       # of the parameters
        self.weight = np.ones(self.normalized_shape, self.param_dtype) if weight else None
        self.bias = np.zeros(self.normalized_shape, self.param_dtype) if bias else None
        self.grad_weight = self.grad_bias = None
        self.training = True
        self._saved = None          # what backward needs from the last forward

    def train(self, mode=True):
        """Sets the mode (which changes nothing: the statistics are always the input's).
        Returns the layer."""
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, x):
        return self.forward(x)

    def _check_input(self, x):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy.ndarray, got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise TypeError(f"x must have the layer's dtype ({self.dtype}), got {x.dtype}")

    def _backward_saved(self):
        if self._saved is None:
            raise RuntimeError("backward needs a forward first")
        return self._saved

    def state_dict(self):
        """torch's keys: weight and bias, those the layer has. Copies."""
        return {k: getattr(self, k).copy() for k in ("weight", "bias")
                if getattr(self, k) is not None}

    def load_state_dict(self, state):
        """Loads a state dict (e.g. {k: v.numpy()} of a torch LayerNorm's or RMSNorm's): all
        keys are checked before any is written."""
        expected = [k for k in ("weight", "bias") if getattr(self, k) is not None]
        _check_state_keys(state, expected)
        values = {}
        for k in expected:
            v = np.asarray(state[k])
            if v.shape != self.normalized_shape or v.dtype.kind != "f":
                raise ValueError(f"{k} must be a float array of shape {self.normalized_shape}, "
                                 f"got {v.dtype} {v.shape}")
            values[k] = v.astype(self.param_dtype)
        for k, v in values.items():
            setattr(self, k, v)


class LayerNorm(_RowNorm):
    """Layer normalization over the last axes of its input, as torch.nn.LayerNorm:
    y = (x - mean) / sqrt(var + eps) * weight + bias per row of normalized_shape's axes.
    backward(dy) returns dx for the last forward and keeps grad_weight and grad_bias (those
    the layer has)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *,
                 dtype=np.float32):
        super().__init__(normalized_shape, eps, elementwise_affine,
                         elementwise_affine and bias, dtype)

    def forward(self, x):
        self._check_input(x)
        y, mean, invstd = layer_norm_train(x, self.normalized_shape, self.weight, self.bias,
                                           self.eps)
        self._saved = (x, mean, invstd)
        return y

    def backward(self, dy):
        x, mean, invstd = self._backward_saved()
        dx, dweight, dbias = layer_norm_backward(dy, x, mean, invstd, self.weight,
                                                 normalized_shape=self.normalized_shape)
        self.grad_weight = dweight if self.weight is not None else None
        self.grad_bias = dbias if self.bias is not None else None
        return dx

    def __repr__(self):
        return (f"LayerNorm({self.normalized_shape}, eps={self.eps!r}, "
                f"elementwise_affine={self.weight is not None}, bias={self.bias is not None}, "
                f"dtype='{self.dtype.name}')")


class RMSNorm(_RowNorm):
    """RMS normalization over the last axes of its input, as torch.nn.RMSNorm:
    y = x / sqrt(mean(x^2) + eps) * weight per row of normalized_shape's axes (eps=None: the
    machine epsilon of x's dtype). backward(dy) returns dx and keeps grad_weight."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, *,
                 dtype=np.float32):
        super().__init__(normalized_shape, eps, elementwise_affine, False, dtype)

    def forward(self, x):
        self._check_input(x)
        y, invrms = rms_norm_train(x, self.normalized_shape, self.weight, self.eps)
        self._saved = (x, invrms)
        return y

    def backward(self, dy):
        x, invrms = self._backward_saved()
        dx, dweight = rms_norm_backward(dy, x, invrms, self.weight,
                                        normalized_shape=self.normalized_shape)
        self.grad_weight = dweight if self.weight is not None else None
        return dx

    def __repr__(self):
        return (f"RMSNorm({self.normalized_shape}, eps={self.eps!r}, "
                f"elementwise_affine={self.weight is not None}, dtype='{self.dtype.name}')")
