"""Run under mpiexec (tests/test_mpi.py does): every rank takes its uneven slice of the same
global batch and checks that sync batch norm (forward, running statistics, backward; both
layouts, both dtypes, fused activation and residual) equals the single-process call on the
whole batch, and that the statistics and parameter gradients are the same bits on every rank.
Rank 0 prints what it checked; any failure aborts every rank (exit status 1).

    mpiexec -n 3 python tests/mpi_sync_check.py
"""
import sys

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn.distributed import SyncBatchNorm, sync_batch_norm_backward, sync_batch_norm_train

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
TOL = {np.float32: 1e-6, np.float64: 1e-12}


def abort_all(kind, value, tb):
    sys.__excepthook__(kind, value, tb)
    sys.stderr.flush()
    comm.Abort(1)       # no rank is left waiting in a collective


sys.excepthook = abort_all


def local_sizes(n):
    """Uneven local batches; the last-but-one rank gets none when there are 3 or more."""
    sizes = [2 + 3 * r for r in range(size)]
    if size >= 3:
        sizes[-2] = 0
    return sizes[:size - 1] + [n - sum(sizes[:size - 1])]


def mine(a, sizes):
    return np.split(a, np.cumsum(sizes)[:-1])[rank]


def close(actual, expected, tol, what):
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = float(np.abs(actual.astype(np.float64) - expected).max(initial=0.0))
    assert err <= tol * scale, f"rank {rank}: {what}: error {err:.3g} > {tol:g} * {scale:.3g}"


def same_on_every_rank(a, what):
    assert len(set(comm.allgather(a.tobytes()))) == 1, f"{what} differs between ranks"


checks = 0
for dtype in (np.float32, np.float64):
    for shape, axis in (((20, 6, 4, 5), 1), ((20, 4, 5, 6), -1)):
        for activation in (None, "relu"):
            rng = np.random.default_rng(7)          # the same global batch on every rank
            C = shape[axis]
            x = (rng.standard_normal(shape) * 2 + 40).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            residual = rng.standard_normal(shape).astype(dtype) if activation else None
            weight = rng.uniform(0.5, 2, C).astype(dtype)
            bias = rng.standard_normal(C).astype(dtype)
            sizes = local_sizes(shape[0])

            rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
            y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis,
                                                      running_mean=rm, running_var=rv,
                                                      activation=activation, residual=residual)
            dx, dweight, dbias = fastbn.batch_norm_backward(
                dy, x, mean, invstd, weight, axis=axis, activation=activation,
                y=y if activation else None)

            rm_r, rv_r = np.zeros(C, dtype), np.ones(C, dtype)
            y_r, mean_r, invstd_r = sync_batch_norm_train(
                mine(x, sizes), weight, bias, comm=comm, axis=axis, running_mean=rm_r,
                running_var=rv_r, activation=activation,
                residual=mine(residual, sizes) if activation else None)
            dx_r, dweight_r, dbias_r = sync_batch_norm_backward(
                mine(dy, sizes), mine(x, sizes), mean_r, invstd_r, weight, comm=comm, axis=axis,
                activation=activation, y=y_r if activation else None)

            tol = TOL[dtype]
            close(y_r, mine(y, sizes), tol, "y")
            close(dx_r, mine(dx, sizes), tol, "dx")
            for what, a, b in (("mean", mean_r, mean), ("invstd", invstd_r, invstd),
                               ("running_mean", rm_r, rm), ("running_var", rv_r, rv),
                               ("dweight", dweight_r, dweight), ("dbias", dbias_r, dbias)):
                close(a, b, 10 * tol, what)
                same_on_every_rank(a, what)
            checks += 1

# the layer, with its default communicator, MPI.COMM_WORLD
layer, single = SyncBatchNorm(6, dtype=np.float64), fastbn.BatchNorm(6, dtype=np.float64)
rng = np.random.default_rng(8)
x = rng.standard_normal((20, 6, 3)) + 3
sizes = local_sizes(20)
close(layer(mine(x, sizes)), mine(single(x), sizes), 1e-12, "SyncBatchNorm y")
for key, value in single.state_dict().items():
    close(layer.state_dict()[key], value, 1e-12, key)
    same_on_every_rank(layer.state_dict()[key], key)

# one value in the global batch: the same ValueError on every rank, no rank left waiting
try:
    sync_batch_norm_train(np.ones((1 if rank == 0 else 0, 3)), comm=comm)
    raise AssertionError("one value in the global batch was accepted")
except ValueError as e:
    assert len(set(comm.allgather(str(e)))) == 1

if rank == 0:
    print(f"ok: {size} ranks, local batches {sizes}: {checks} forward/backward cases equal "
          f"the single-process call, statistics and gradients identical on every rank; "
          f"SyncBatchNorm; the count error on every rank")
