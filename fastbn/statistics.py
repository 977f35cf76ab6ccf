"""Mergeable statistics: per-channel moments of any part of the data, merged anywhere.

    m = fastbn.moments(x, axis=1)                  # Moments of x's values, per channel
    m = fastbn.merge_moments([m_a, m_b, m_c])      # as if of the concatenated data
    s = m.finish(eps=1e-5)                         # mean, var, var_unbiased, invstd

A Moments holds, per channel and in float64, the count of values, a shift near their mean,
the sum of their deviations from the shift and the sum of squared deviations from their mean:
the partial format of fastbn's kernels (include/fastbn/moments.h). Two of them merge with
Chan's formula, exactly as the kernels merge their chunks, so moments computed on chunks of a
data set, on threads, on processes or machines merge into the statistics of the whole, in
one pass over the data and without the cancellation of E[x^2] - E[x]^2. Merging in the order
the kernels do gives the same bits as one call; any other grouping agrees to rounding.

`Moments.data` is the (4, C) float64 array itself (count, shift, dev_sum, m2 rows): what to
send to another process (e.g. an MPI Allgather of 4*C doubles) and rebuild with
`Moments(data)`.
"""
from collections import namedtuple

import numpy as np

from . import _kernels
from ._api import _Views
from ._rules import EPS, MIN_TRAIN_COUNT, real, x_and_axis
from .layers import BatchNorm

__all__ = ["Moments", "Statistics", "moments", "merge_moments", "recalibrate"]

Statistics = namedtuple("Statistics", "mean var var_unbiased invstd")
Statistics.__doc__ = """Finished per-channel statistics, float64 arrays: the mean, the biased
variance (what normalizing uses), the unbiased variance n / (n - 1) (what running statistics
use), and invstd = 1 / sqrt(var + eps)."""

_FIELDS = 4


class Moments:
    """Per-channel moments of some values, mergeable: see fastbn.statistics.

    Moments(data) takes a (4, C) float64 array of rows count, shift, dev_sum, m2 (as
    Moments.data holds, or as another process sent it).
    """

    __slots__ = ("data",)

    def __init__(self, data):
        data = np.ascontiguousarray(data, dtype=np.float64)
        if data.ndim != 2 or data.shape[0] != _FIELDS:
            raise ValueError(f"data must have shape (4, C) (count, shift, dev_sum and m2 of C "
                             f"channels), got {data.shape}")
        if (data[0] < 0).any():
            raise ValueError("data's counts (row 0) must be >= 0")
        self.data = data

    @property
    def count(self):
        """Values per channel."""
        return self.data[0]

    @property
    def mean(self):
        """Per-channel means (NaN for an empty channel)."""
        count, shift, dev_sum, _ = self.data
        with np.errstate(invalid="ignore", divide="ignore"):
            return shift + dev_sum / count

    @property
    def var(self):
        """Per-channel biased variances."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.data[3] / self.data[0]

    @property
    def channels(self):
        return self.data.shape[1]

    def merge(self, *others):
        """These moments merged with others, in order: the moments of all their values."""
        return merge_moments((self,) + others)

    def finish(self, eps=1e-5):
        """The Statistics (mean, var, var_unbiased, invstd with eps) of these moments."""
        eps = real(eps, EPS)
        return Statistics(*_kernels.finish_moments_stage(self.data, eps))

    def __repr__(self):
        return f"Moments(channels={self.channels}, count={self.count.tolist()!r:.60})"


def moments(x, *, axis=1):
    """The mergeable per-channel moments of x: over every axis but `axis`, as batch norm's
    training statistics. x: float32 or float64, any layout and strides (as batch_norm_train).
    """
    x, axis = x_and_axis(x, axis)
    C = x.shape[axis]
    if x.size == 0:
        return Moments(np.zeros((_FIELDS, C)))
    view = _Views(x, axis, [])
    parts = _kernels.statistics_stage(view.x, view.outer, C, view.inner)
    return Moments(_kernels.merge_stage(parts))


def merge_moments(parts):
    """Moments (or their (4, C) data arrays) of disjoint parts of some data, merged in the
    given order: the moments of all of it. Every part must have the same channels."""
    parts = [p if isinstance(p, Moments) else Moments(p) for p in parts]
    if not parts:
        raise ValueError("parts must hold at least one Moments")
    channels = {p.channels for p in parts}
    if len(channels) > 1:
        raise ValueError(f"parts must all have the same channels, got {sorted(channels)}")
    return Moments(_kernels.merge_stage(np.stack([p.data for p in parts])))


def recalibrate(layer, batches):
    """Precise BN: sets a BatchNorm layer's running statistics to the exact statistics of all
    values in batches, an iterable of its inputs (arrays of the layer's channels, axis and
    dtype), read once, one batch at a time. Returns the layer.

    running_mean becomes the mean of every value of the channel over all batches, and
    running_var their unbiased variance n / (n - 1) (the population variance for a Keras
    convention layer, as its updates use): what one batch of all the data would give, each
    value counted once whatever the sizes of the batches. Batches are merged as Moments
    (count, shift, deviations), so the variance between the batches' means is included.

    Other recipes average per-batch statistics: fvcore's update_bn_stats averages the
    batches' means and variances (equal batches; the mean of the variances leaves out the
    variance of the batch means), torch.optim.swa_utils.update_bn takes the cumulative average
    of the batches' statistics (each batch weighs the same, so an uneven last batch is
    overweighted, and the same term is left out). num_batches_tracked is left as it was; the
    running statistics are written only once every batch has been read. (A SyncBatchNorm is
    recalibrated with this process's batches only: give every rank all of them.)
    """
    if not isinstance(layer, BatchNorm):
        raise TypeError(f"layer must be a fastbn.BatchNorm, got {type(layer).__name__}")
    if not layer.track_running_stats:
        raise ValueError("layer has no running statistics (track_running_stats=False)")
    total = None
    for x in batches:
        layer._check_input(x)
        part = moments(x, axis=layer.axis)
        total = part if total is None else total.merge(part)
    count = int(total.count[0]) if total is not None else 0
    if count < MIN_TRAIN_COUNT:
        raise ValueError(f"batches must hold more than 1 value per channel, got {count}")
    s = total.finish(layer.eps)
    layer.running_mean[...] = s.mean
    layer.running_var[...] = s.var if layer._keras else s.var_unbiased
    return layer
