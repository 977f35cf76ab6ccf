"""Prefetching (include/fastbn/kernels.h, FBN_PREFETCH_BYTES): a channels-first walk that reads
a channel of long enough runs, from an array over FBN_PREFETCH_SPAN, prefetches each line the
same place some runs ahead. Prefetching changes no arithmetic: forced on at small sizes, every
reading walk (statistics with one or two passes, gradient sums, the fused gradient sums; one
group per channel, or chunks of a channel) gives the bits it gives without, and matches the
reference."""
import numpy as np
import pytest

import fastbn
from fastbn import _kernels, reference
from conftest import DTYPES, TOL_GRAD, TOL_Y, assert_close, make_input, make_params, plan

# (8, 4, 32, 32): whole channels of 8 runs of 1024 values (one group a channel);
# (16, 2, 64, 64): 4 chunks a channel, of 4 runs of 4096 values; (3, 5, 40, 70): odd runs
CASES = [((8, 4, 32, 32), 1), ((16, 2, 64, 64), 1), ((3, 5, 40, 70), 1)]


@pytest.fixture
def prefetching():
    """Call with True to prefetch in every walk that has runs far enough ahead, False for
    none; restores the default."""
    def force(on):
        _kernels._set_prefetch_span(0 if on else 1 << 62)
    yield force
    _kernels._set_prefetch_span(-1)


def run_ops(x, weight, bias, dy):
    C = x.shape[1]
    rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, running_mean=rm, running_var=rv)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, weight)
    z = fastbn.batch_norm_train(x, weight, bias, activation="relu")[0]
    residual_grad = np.empty_like(x)
    fdx, fdw, fdb = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, y=z,
                                               activation="relu", out_residual=residual_grad)
    return y, mean, invstd, rm, rv, dx, dw, db, z, fdx, fdw, fdb, residual_grad


def test_the_plan_prefetches_large_channels_first_arrays():
    assert plan((32, 64, 56, 56), 1)["prefetch_runs"] == 1          # 25.7 MB, 12.5 KB runs
    assert plan((32, 256, 28, 28), 1)["prefetch_runs"] == 3         # 25.7 MB, 3 KB runs
    assert plan((32, 64, 56, 56), 1, np.float64)["prefetch_runs"] == 1
    assert plan((4, 64, 56, 56), 1)["prefetch_runs"] == 0           # 3.2 MB: from cache
    assert plan((1, 512, 112, 112), 1)["prefetch_runs"] == 0        # one run a channel
    assert plan((32, 56, 56, 64), -1)["prefetch_runs"] == 0         # channels-last


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_prefetching_gives_the_same_bits(shape, axis, dtype, rng, prefetching):
    x = make_input(shape, axis, dtype, rng, offset=3.0)
    x[:, :, 0, 0] += 40.0            # first values far out: the statistics' two-pass path
    weight, bias = make_params(shape[axis], dtype, rng)
    dy = rng.standard_normal(shape).astype(dtype)
    prefetching(False)
    assert plan(shape, axis, dtype)["prefetch_runs"] == 0
    plain = run_ops(x, weight, bias, dy)
    prefetching(True)
    assert plan(shape, axis, dtype)["prefetch_runs"] > 0
    prefetched = run_ops(x, weight, bias, dy)
    names = "y mean invstd rm rv dx dw db z fdx fdw fdb residual_grad".split()
    for name, a, b in zip(names, plain, prefetched):
        assert a.tobytes() == b.tobytes(), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefetching_matches_the_reference(dtype, rng, prefetching):
    prefetching(True)
    shape = (16, 2, 64, 64)
    x = make_input(shape, 1, dtype, rng, offset=3.0)
    weight, bias = make_params(2, dtype, rng)
    dy = rng.standard_normal(shape).astype(dtype)
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias)
    assert_close(y, reference.batch_norm_train(x, weight, bias)[0], TOL_Y[dtype], "y")
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, weight)
    rdx, rdw, rdb = reference.batch_norm_backward(dy, x, mean, invstd, weight)
    assert_close(dx, rdx, TOL_GRAD[dtype], "dx")
    assert_close(dw, rdw, TOL_GRAD[dtype], "dweight")
    assert_close(db, rdb, TOL_GRAD[dtype], "dbias")
