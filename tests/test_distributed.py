"""fastbn.distributed on a thread-based communicator (one thread per rank): every rank's
results equal the single-process call on the concatenated batch and are the same bits on every
rank, for uneven, empty and one-value local batches, both layouts, both dtypes, fused
activation and residual; the count error is raised on every rank; SyncBatchNorm. The same
checks over real MPI processes: tests/test_mpi.py."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastbn
from fastbn.distributed import SyncBatchNorm, sync_batch_norm_backward, sync_batch_norm_train
from conftest import DTYPES, TOL_STAT, assert_close, make_input, make_params

# the targets against the single-process call, relative to max(1, max|reference|)
TOL = {np.float32: 1e-6, np.float64: 1e-12}


class ThreadComm:
    """The communicator protocol of fastbn.distributed for ranks that are threads of this
    process: Allgather through shared slots between two barriers (which time out, so a rank
    that never arrives fails the test instead of hanging it)."""

    def __init__(self, rank, shared):
        self.rank = rank
        self._shared = shared

    @classmethod
    def group(cls, size):
        shared = {"size": size, "slots": [None] * size,
                  "barrier": threading.Barrier(size, timeout=20), "calls": 0}
        return [cls(rank, shared) for rank in range(size)]

    def Get_size(self):
        return self._shared["size"]

    def Allgather(self, sendbuf, recvbuf):
        shared = self._shared
        shared["slots"][self.rank] = np.array(sendbuf, copy=True).ravel()
        shared["barrier"].wait()
        recvbuf.reshape(shared["size"], -1)[...] = np.stack(shared["slots"])
        if self.rank == 0:
            shared["calls"] += 1
        shared["barrier"].wait()

    @property
    def calls(self):
        return self._shared["calls"]


def on_ranks(comms, fn):
    """fn(rank, comm) on one thread per rank: each rank's result, or the exception it raised."""
    results = [None] * len(comms)

    def rank_main(rank):
        try:
            results[rank] = fn(rank, comms[rank])
        except Exception as e:              # noqa: BLE001 (compared by the tests)
            results[rank] = e

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(comms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def split(a, sizes):
    """a's batch (axis 0) cut into local batches of the given sizes."""
    return np.split(a, np.cumsum(sizes)[:-1])


def same_bits(arrays, what):
    for a in arrays[1:]:
        assert a.tobytes() == arrays[0].tobytes(), f"{what} differs between ranks"


# (global shape, channel axis, local batch sizes): uneven, an empty rank, one-value ranks
LAYOUTS = [((9, 4, 5, 3), 1), ((9, 5, 3, 4), -1), ((9, 6), 1)]
SPLITS = [(4, 5), (2, 0, 7), (1, 1, 7), (0, 8, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("sizes", SPLITS)
@pytest.mark.parametrize("activation", [None, "tanh", "leaky_relu"])
def test_forward_and_backward_equal_one_process(shape, axis, sizes, dtype, activation, rng):
    """Fused (an activation): with a residual, and the residual's gradient."""
    C = shape[axis]
    x = make_input(shape, axis, dtype, rng, offset=30.0)
    dy = (rng.standard_normal(shape) + 1).astype(dtype)
    weight, bias = make_params(C, dtype, rng)
    fused = activation is not None
    residual = rng.standard_normal(shape).astype(dtype) if fused else None
    fuse = dict(activation=activation, negative_slope=0.2 if activation else 0.01)

    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis, running_mean=rm,
                                              running_var=rv, momentum=0.3, residual=residual,
                                              **fuse)
    dr = np.empty_like(x) if fused else None
    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                                    y=y if activation else None,
                                                    out_residual=dr, **fuse)

    xs, dys = split(x, sizes), split(dy, sizes)
    rs = split(residual, sizes) if fused else [None] * len(sizes)

    def rank(r, comm):
        rm_r, rv_r = np.zeros(C, dtype), np.ones(C, dtype)
        y_r, mean_r, invstd_r = sync_batch_norm_train(
            xs[r], weight, bias, comm=comm, axis=axis, running_mean=rm_r, running_var=rv_r,
            momentum=0.3, residual=rs[r], **fuse)
        dr_r = np.empty_like(xs[r]) if fused else None
        dx_r, dweight_r, dbias_r = sync_batch_norm_backward(
            dys[r], xs[r], mean_r, invstd_r, weight, comm=comm, axis=axis,
            y=y_r if activation else None, out_residual=dr_r, **fuse)
        return y_r, mean_r, invstd_r, rm_r, rv_r, dx_r, dweight_r, dbias_r, dr_r

    results = on_ranks(ThreadComm.group(len(sizes)), rank)
    for res in results:
        if isinstance(res, Exception):
            raise res
    ys, means, invstds, rms, rvs, dxs, dweights, dbiases, drs = zip(*results)
    tol = TOL[dtype]
    assert_close(np.concatenate(ys), y, tol, "y")
    assert_close(np.concatenate(dxs), dx, tol, "dx")
    if fused:
        assert_close(np.concatenate(drs), dr, tol, "grad_residual")
    for name, mine, theirs in (("mean", means, mean), ("invstd", invstds, invstd),
                               ("running_mean", rms, rm), ("running_var", rvs, rv)):
        assert_close(mine[0], theirs, TOL_STAT[dtype], name)
        same_bits(mine, name)
    for name, mine, theirs in (("dweight", dweights, dweight), ("dbias", dbiases, dbias)):
        assert_close(mine[0], theirs, tol * 10, name)      # sums over the batch: a few ulp more
        same_bits(mine, name)


@pytest.mark.parametrize("sizes", [(1, 0), (0, 1, 0)])
def test_one_value_in_all_raises_on_every_rank(sizes):
    x = np.arange(sum(sizes) * 3, dtype=np.float64).reshape(-1, 3)
    rm, rv = np.zeros(3), np.ones(3)
    results = on_ranks(ThreadComm.group(len(sizes)), lambda r, comm: sync_batch_norm_train(
        split(x, sizes)[r], comm=comm, running_mean=rm, running_var=rv))
    messages = {str(e) for e in results if isinstance(e, ValueError)}
    assert all(isinstance(e, ValueError) for e in results), results
    assert len(messages) == 1 and "more than 1 value per channel" in messages.pop()
    assert (rm == 0).all() and (rv == 1).all()      # nothing written


def test_every_rank_empty_is_one_empty_batch():
    rm, rv = np.zeros(3), np.ones(3)
    comms = ThreadComm.group(2)
    results = on_ranks(comms, lambda r, comm: sync_batch_norm_train(
        np.empty((0, 3)), comm=comm, running_mean=rm, running_var=rv))
    for y, mean, invstd in results:
        assert y.shape == (0, 3) and np.isnan(mean).all() and np.isnan(invstd).all()
    assert (rm == 0).all() and (rv == 1).all()
    grads = on_ranks(comms, lambda r, comm: sync_batch_norm_backward(
        np.empty((0, 3)), np.empty((0, 3)), results[r][1], results[r][2], comm=comm))
    for dx, dweight, dbias in grads:
        assert dx.shape == (0, 3) and (dweight == 0).all() and (dbias == 0).all()


def test_outputs_in_place_and_strided_inputs(rng):
    """out= may be x itself; a non-contiguous local batch is copied, as in one process."""
    x = make_input((8, 3, 6), 1, np.float64, rng)
    y, _, _ = fastbn.batch_norm_train(x)
    xs = [np.array(part) for part in split(x, (3, 5))]
    comms = ThreadComm.group(2)
    on_ranks(comms, lambda r, comm: sync_batch_norm_train(xs[r], comm=comm, out=xs[r]))
    assert_close(np.concatenate(xs), y, 1e-12, "y in place")
    wide = np.zeros((8, 3, 12))
    wide[..., ::2] = x
    strided = split(wide[..., ::2], (3, 5))
    ys = on_ranks(comms, lambda r, comm: sync_batch_norm_train(strided[r], comm=comm)[0])
    assert_close(np.concatenate(ys), y, 1e-12, "y of strided x")


def test_arguments_are_checked_before_the_collective():
    comm, = ThreadComm.group(1)
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        sync_batch_norm_train(np.ones((4, 2)), comm=object())
    with pytest.raises(TypeError, match="comm must be"):
        sync_batch_norm_backward(np.ones((4, 2)), np.ones((4, 2)), np.zeros(2), np.ones(2),
                                 comm=None)
    with pytest.raises(ValueError, match="weight must have shape"):
        sync_batch_norm_train(np.ones((4, 2)), np.ones(3), comm=comm)
    with pytest.raises(TypeError, match="comm"):
        sync_batch_norm_train(np.ones((4, 2)))     # keyword-only and required
    assert comm.calls == 0


def test_one_rank_is_the_single_process_call(rng):
    x = make_input((6, 4, 7), 1, np.float32, rng, offset=100.0)
    comm, = ThreadComm.group(1)
    y, mean, invstd = fastbn.batch_norm_train(x)
    y1, mean1, invstd1 = sync_batch_norm_train(x, comm=comm)
    assert_close(y1, y, 1e-6, "y")
    assert_close(mean1, mean, 1e-7, "mean")
    assert_close(invstd1, invstd, 1e-6, "invstd")
    assert comm.calls == 1


# ------------------------------------------------------------------------------ the layer

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis,activation", [(1, None), (-1, "relu")])
def test_sync_layer_is_the_layer_on_the_whole_batch(dtype, axis, activation, rng):
    shape = (10, 4, 3, 5) if axis == 1 else (10, 3, 5, 4)
    sizes = (3, 0, 7)
    single = fastbn.BatchNorm(4, momentum=0.2, axis=axis, dtype=dtype, activation=activation)
    comms = ThreadComm.group(len(sizes))
    layers = [SyncBatchNorm(4, momentum=0.2, axis=axis, dtype=dtype, activation=activation,
                            comm=c) for c in comms]
    state = {k: v + rng.uniform(0, 1, v.shape).astype(v.dtype)
             for k, v in single.state_dict().items() if k != "num_batches_tracked"}
    state["num_batches_tracked"] = np.array(0)
    for layer in [single] + layers:
        layer.load_state_dict(state)

    for step in range(2):
        x = make_input(shape, axis, dtype, rng, offset=5.0)
        dy = rng.standard_normal(shape).astype(dtype)
        y, dx = single(x), single.backward(dy)
        xs, dys = split(x, sizes), split(dy, sizes)
        outs = on_ranks(comms, lambda r, comm: (layers[r](xs[r]), layers[r].backward(dys[r])))
        assert_close(np.concatenate([o[0] for o in outs]), y, TOL[dtype], "y")
        assert_close(np.concatenate([o[1] for o in outs]), dx, TOL[dtype], "dx")
        for name in ("grad_weight", "grad_bias"):
            same_bits([getattr(layer, name) for layer in layers], name)
            assert_close(getattr(layers[0], name), getattr(single, name), TOL[dtype] * 10, name)
    states = [layer.state_dict() for layer in layers]
    for key, value in single.state_dict().items():
        same_bits([s[key] for s in states], key)
        assert_close(states[0][key], value, TOL_STAT[dtype], key)

    # evaluation: local running statistics, no collective
    calls = comms[0].calls
    for layer in layers:
        layer.eval()
    x = make_input(shape, axis, dtype, rng)
    single.eval()
    assert_close(layers[1](x), single(x), TOL[dtype], "eval y")
    assert comms[0].calls == calls


def test_sync_layer_arguments():
    with pytest.raises(TypeError, match="comm must be"):
        SyncBatchNorm(3, comm="world")
    with pytest.raises(TypeError, match="no Keras conventions"):
        SyncBatchNorm.keras(3)
    comm, = ThreadComm.group(1)
    assert repr(SyncBatchNorm(3, comm=comm)).startswith("SyncBatchNorm(3, eps=1e-05")


def test_import_fastbn_imports_neither_mpi4py_nor_dask():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastbn.__file__)))
    code = ("import sys, fastbn; fastbn.distributed.SyncBatchNorm; "
            "print(sorted({'mpi4py', 'dask'} & set(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env, timeout=60)
    assert run.stdout.strip() == "[]"
