"""Synchronized batch norm: data-parallel training with the statistics of the global batch.

    from mpi4py import MPI
    y, mean, invstd = sync_batch_norm_train(x, weight, bias, comm=MPI.COMM_WORLD)
    dx, dweight, dbias = sync_batch_norm_backward(dy, x, mean, invstd, weight,
                                                  comm=MPI.COMM_WORLD)
    layer = SyncBatchNorm(64)              # the BatchNorm layer, global statistics in training

Each rank (process) holds its slice of the batch: the local x. A call is the stages of the
single-process one (docs/architecture.md, section 3) with one collective between them:

    forward   local moments -> Allgather -> merge in rank order -> finish -> apply (y)
    backward  local gradient sums -> Allgather -> merge in rank order -> finish -> apply (dx)

What crosses the collective is each rank's partial in the kernels' partial format, as it is:
moments 4*C float64 (count, shift, dev_sum, m2), gradient sums 6*C (count, x shift, dy shift
and three sums around them). Gathering the partials, rather than summing them with Allreduce,
keeps each rank's shifts (so inputs far from zero lose no digits, as in one process) and lets
every rank merge the same bytes in the same order with the same code: the statistics, the
running statistics, dweight and dbias are the same bits on every rank, which an Allreduce
does not promise. The price is P partials received instead of one, 4*C*P doubles: 32 KiB for
C = 512 channels on 2 ranks, below the latency of one message; at hundreds of ranks a
reduction with a custom (merge) operator would send less.

The result is exact for any split of the global batch: uneven local batches, ranks with an
empty batch (count 0) or one value. A global count of one value per channel raises the same
ValueError on every rank, after the collective, so no rank is left waiting in it. Argument
errors (a wrong dtype, shape or type) are raised before the collective, on the rank that has
them: every rank must pass x of the same dtype and channels, and the same eps, weight and
bias, as with any collective.

`comm` is an mpi4py communicator (mpi4py is an optional dependency: pip install
"fastbn[mpi]"), or any object with the two methods used here:

    comm.Get_size() -> int                  the number of ranks P
    comm.Allgather(sendbuf, recvbuf)        sendbuf: a C-contiguous float64 array of n values;
                                            recvbuf: a C-contiguous float64 array (P, ...) of
                                            P * n values, filled with rank r's sendbuf at r
"""
from functools import partial

import numpy as np

from . import _kernels
from ._api import BACKWARD_IN_PLACE, _backward_args, _fused_y, _grad_buffer, _run, _train_args
from ._rules import check_train_count
from .layers import BatchNorm

__all__ = ["sync_batch_norm_train", "sync_batch_norm_backward", "SyncBatchNorm"]

_MOMENT_FIELDS = 4
_GRAD_FIELDS = 6


def _ranks(comm):
    """The number of ranks of comm, checking that it has the methods the protocol needs."""
    if not (callable(getattr(comm, "Allgather", None))
            and callable(getattr(comm, "Get_size", None))):
        raise TypeError(f"comm must be an mpi4py communicator or have its Get_size() and "
                        f"Allgather(sendbuf, recvbuf) methods, got {type(comm).__name__}")
    return int(comm.Get_size())


def _merge_all_ranks(comm, ranks, local):
    """Every rank's (fields, C) partial, gathered and merged in rank order: the partial of
    the global batch, the same bits on every rank."""
    gathered = np.empty((ranks,) + local.shape)
    comm.Allgather(np.ascontiguousarray(local), gathered)
    return _kernels.merge_stage(gathered)


def _global_count(merged):
    """Values per channel in the global batch (every channel has as many)."""
    return int(merged[0, 0]) if merged.shape[1] else 0


def _rank_independent(C, dtype):
    """A stand-in for the data in the finish stages: the finish of a problem whose plan
    groups whole channels (the fused path) may differ from the chunked one in its last bit,
    and each rank's local shape would pick one or the other; a (1, C, 1) problem is never
    grouped, so every rank finishes the same way."""
    return np.empty((1, C, 1), dtype)


def sync_batch_norm_train(x, weight=None, bias=None, *, comm, eps=1e-5, axis=1,
                          running_mean=None, running_var=None, momentum=0.1, out=None,
                          residual=None, activation=None, negative_slope=0.01):
    """fastbn.batch_norm_train with the statistics of all ranks' x together.

    Every rank calls it with its slice of the global batch x; y is this slice normalized with
    the mean and biased variance of the concatenation of all ranks' x. Returns (y, mean,
    invstd): the global statistics, the same bits on every rank. running_mean and
    running_var, if given, are updated in place with the global mean and unbiased variance,
    identically on every rank. One collective (an Allgather of 4*C float64 values per rank).
    Arguments and fusion (residual, activation) as fastbn.batch_norm_train.
    """
    a = _train_args(x, weight, bias, eps, axis, running_mean, running_var, momentum, out,
                    residual, activation, negative_slope)
    x, C = a.x, a.C
    ranks = _ranks(comm)
    mean = np.empty(C, a.stat_dtype)
    invstd = np.empty(C, a.stat_dtype)

    def global_coefficients(local):
        """The normalizing coefficients from this rank's moments and every other rank's; the
        saved and running statistics on the way."""
        merged = _merge_all_ranks(comm, ranks, local)
        count = _global_count(merged)
        # the same message on every rank
        check_train_count(count, f"{count} in the global batch of {ranks} ranks")
        if count == 0:      # as one process with an empty batch: nothing is updated
            mean.fill(np.nan)
            invstd.fill(np.nan)
            return None
        return _kernels.finish_train_stage(
            merged, _rank_independent(C, x.dtype), a.weight, a.bias, a.eps, a.running_mean,
            a.running_var, a.momentum, mean, invstd)

    if x.size == 0:         # no values here; the others' still set the statistics
        global_coefficients(np.zeros((_MOMENT_FIELDS, C)))
        return (np.empty_like(x) if a.out is None else a.out), mean, invstd

    def kernel(v):
        local = _kernels.merge_stage(_kernels.statistics_stage(v.x, v.outer, C, v.inner))
        coef = global_coefficients(local)
        _kernels.normalize_stage(v.x, v.outputs[0], v.outer, C, v.inner, coef,
                                 v.inputs[0] if v.inputs else None, a.act, a.slope)

    y, = _run(kernel, a.arrays, a.axis, [a.out], in_place=[(0,)])
    return y, mean, invstd


def sync_batch_norm_backward(dy, x, mean, invstd, weight=None, *, comm, axis=1, y=None,
                             activation=None, negative_slope=0.01, out=None, out_residual=None):
    """fastbn.batch_norm_backward of sync_batch_norm_train: returns (dx, dweight, dbias).

    dx is the gradient of the global loss with respect to this rank's x; dweight and dbias
    are the global ones, the same bits on every rank. mean and invstd are what
    sync_batch_norm_train returned. One collective (an Allgather of 6*C float64 values per
    rank: the gradient sums around this rank's shifts). Arguments and fusion (y, activation,
    out_residual) as fastbn.batch_norm_backward.
    """
    a = _backward_args(dy, x, mean, invstd, weight, axis, y, activation, negative_slope, out,
                       out_residual)
    x, C = a.x, a.C
    ranks = _ranks(comm)
    dweight = np.zeros(C, a.stat_dtype)
    dbias = np.zeros(C, a.stat_dtype)

    def global_coefficients(local):
        """The dx coefficients from this rank's gradient sums and every other rank's; dweight
        and dbias on the way (zero, as in one process, when the global batch is empty)."""
        merged = _merge_all_ranks(comm, ranks, local)
        if _global_count(merged) == 0:
            return None
        return _kernels.finish_grad_stage(merged, _rank_independent(C, x.dtype), a.invstd,
                                          a.weight, dweight, dbias)

    if x.size == 0:
        global_coefficients(np.zeros((_GRAD_FIELDS, C)))
        return (np.empty_like(x) if a.out is None else a.out), dweight, dbias

    def kernel(v):
        dy_v, y_v, grad = v.inputs[0], _fused_y(v, a), _grad_buffer(v, a)
        # sums around the saved (global) mean and this rank's dy shifts; fused, the sums
        # stage writes g = dy * act'(y) to grad, which the dx stage then reads
        shift = _kernels.grad_shifts_stage(dy_v, C, v.inner, a.mean, y_v, grad, a.act, a.slope)
        local = _kernels.merge_stage(_kernels.grad_sums_stage(
            dy_v, v.x, v.outer, C, v.inner, a.mean, shift, y_v, grad, a.act, a.slope))
        coef = global_coefficients(local)
        _kernels.grad_input_stage(dy_v if grad is None else grad, v.x, v.outputs[0], v.outer,
                                  C, v.inner, coef)

    results = _run(kernel, a.arrays, a.axis, a.outs, in_place=BACKWARD_IN_PLACE)
    return results[0], dweight, dbias


class SyncBatchNorm(BatchNorm):
    """fastbn.BatchNorm with the statistics of the global batch in training.

    The layer's arguments, behaviour and state dict, plus comm: an mpi4py communicator or an
    object with its protocol (see fastbn.distributed); None, the default, is
    mpi4py.MPI.COMM_WORLD. In training, forward and backward are sync_batch_norm_train and
    sync_batch_norm_backward over comm, so every rank calls them together, and the running
    statistics, grad_weight and grad_bias are the same on every rank. In evaluation the layer
    is a local BatchNorm: running statistics (or, without track_running_stats, this rank's
    batch statistics, as torch.nn.SyncBatchNorm), no collective.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, dtype=np.float32, window=None,
                 activation=None, negative_slope=0.01, comm=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis=axis,
                         dtype=dtype, window=window, activation=activation,
                         negative_slope=negative_slope)
        if comm is None:
            comm = _world()
        _ranks(comm)
        self.comm = comm

    def _batch_ops(self):
        if not self.training:
            return super()._batch_ops()
        return (partial(sync_batch_norm_train, comm=self.comm),
                partial(sync_batch_norm_backward, comm=self.comm))

    @classmethod
    def keras(cls, *args, **kwargs):
        """Not for SyncBatchNorm: Keras's population variance would need the global count."""
        raise TypeError("SyncBatchNorm has no Keras conventions; use SyncBatchNorm(...) with "
                        "PyTorch's (momentum weights the batch, unbiased running variance)")


def _world():
    """mpi4py's MPI.COMM_WORLD, imported when first needed: fastbn does not require mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise ImportError("SyncBatchNorm's default comm is mpi4py's MPI.COMM_WORLD: install it "
                          "with pip install 'fastbn[mpi]' (mpi4py and MPICH), or pass comm=") \
            from None
    return MPI.COMM_WORLD
