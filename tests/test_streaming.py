"""Streaming stores: an op whose traffic (inputs read, re-reads counted, and output) comes to
48 MB or more writes its output with non-temporal stores (kernels_impl.h). Forcing the
threshold down, every kernel path that streams must give the same bits as its cached path,
from any alignment of the output, and so match the reference."""
import numpy as np
import pytest

import fastbn
from fastbn import _plan, reference
from conftest import (DTYPES, PARALLEL_CASES, SMALL_CASES, TOL_GRAD, TOL_Y, assert_close,
                      make_input, make_params, plan)

CASES = SMALL_CASES + PARALLEL_CASES[:-1] + [((2, 4, 3, 67), -1), ((3, 9, 2, 37), 1)]


@pytest.fixture
def streaming():
    """Call with True to stream every output, False for none; restores the default."""
    def force(on):
        _plan._set_stream_traffic_bytes(0 if on else 1 << 62)
    yield force
    _plan._set_stream_traffic_bytes(-1)


def misaligned_like(x):
    """An empty array like x whose data start 1 element past a 16-byte boundary."""
    buf = np.empty(x.size + 16, x.dtype)
    skip = (-buf.ctypes.data % 16) // x.itemsize + 1
    return buf[skip:skip + x.size].reshape(x.shape)


def run_ops(x, axis, weight, bias, dy, out=None):
    C = x.shape[axis]
    rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
    fresh = lambda: None if out is None else out()
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis, running_mean=rm,
                                              running_var=rv, out=fresh())
    y_inf = fastbn.batch_norm_infer(x, rm, rv, weight, bias, axis=axis, out=fresh())
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis, out=fresh())
    return y, mean, invstd, rm, rv, y_inf, dx, dw, db


def test_the_plan_streams_when_the_traffic_outgrows_the_cache():
    everything = {"train": True, "infer": True, "backward": True}
    assert plan((32, 64, 56, 56), 1)["stream"] == everything    # 25.7 MB: 51 MB and more
    assert plan((32, 56, 56, 64), -1, np.float64)["stream"] == everything
    # 19.3 MB: inference (39 MB) and the one-read channels-first training keep their output
    # in cache; the channels-last ops that read x twice, and backward, do not
    assert plan((24, 64, 56, 56), 1)["stream"] == {"train": False, "infer": False,
                                                   "backward": True}
    assert plan((24, 56, 56, 64), -1)["stream"] == {"train": True, "infer": False,
                                                    "backward": True}
    assert not any(plan((8, 64, 56, 56), 1)["stream"].values())      # 6.4 MB


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_streaming_gives_the_cached_bits(shape, axis, dtype, rng, streaming):
    x = make_input(shape, axis, dtype, rng, offset=3.0)
    weight, bias = make_params(shape[axis], dtype, rng)
    dy = rng.standard_normal(shape).astype(dtype)
    streaming(False)
    cached = run_ops(x, axis, weight, bias, dy)
    streaming(True)
    assert all(plan(shape, axis, dtype)["stream"].values())
    for out in (None, lambda: misaligned_like(x)):
        streamed = run_ops(x, axis, weight, bias, dy, out)
        for name, a, b in zip("y mean invstd rm rv y_inf dx dw db".split(), cached, streamed):
            assert a.tobytes() == b.tobytes(), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((4, 80, 32, 32), 1), ((8, 64, 64, 8), -1)])
def test_streaming_matches_the_reference(shape, axis, dtype, rng, streaming):
    streaming(True)
    x = make_input(shape, axis, dtype, rng, offset=3.0)
    weight, bias = make_params(shape[axis], dtype, rng)
    dy = rng.standard_normal(shape).astype(dtype)
    y, mean, invstd, rm, rv, y_inf, dx, dw, db = run_ops(x, axis, weight, bias, dy)
    ry, _, _ = reference.batch_norm_train(x, weight, bias, axis=axis)
    assert_close(y, ry, TOL_Y[dtype], "y")
    assert_close(y_inf, reference.batch_norm_infer(x, rm, rv, weight, bias, axis=axis),
                 TOL_Y[dtype], "y_inf")
    rdx, rdw, rdb = reference.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    assert_close(dx, rdx, TOL_GRAD[dtype], "dx")
    assert_close(dw, rdw, TOL_GRAD[dtype], "dweight")
    assert_close(db, rdb, TOL_GRAD[dtype], "dbias")


def test_fused_ops_do_not_stream_but_agree(rng, streaming):
    """A fused op reads each block back after normalizing it, so it keeps cached stores."""
    shape, axis, dtype = (4, 80, 32, 32), 1, np.float32
    x = make_input(shape, axis, dtype, rng)
    residual = rng.standard_normal(shape).astype(dtype)
    weight, bias = make_params(shape[axis], dtype, rng)
    streaming(False)
    cached = fastbn.batch_norm_train(x, weight, bias, residual=residual, activation="relu")[0]
    streaming(True)
    streamed = fastbn.batch_norm_train(x, weight, bias, residual=residual, activation="relu")[0]
    assert cached.tobytes() == streamed.tobytes()
