"""pytest-benchmark suites: fastbn next to NumPy, PyTorch and ONNX Runtime.

One group per op, layout, dtype and thread count, with every implementation that has the op in
it; every result is checked against fastbn.reference before it counts.

    pytest benchmarks/                          # the timings
    pytest benchmarks/ --benchmark-disable      # run each once, results still checked (CI)

The implementations are those of ``python -m fastbn bench`` (fastbn/_bench.py).
"""
import functools

import numpy as np
import pytest

import fastbn
import fastbn.reference as ref
from fastbn import _bench

SHAPE = (16, 64, 28, 28)
THREADS = sorted({1, fastbn.get_num_threads()})
IMPLS = ["fastbn", "numpy", "torch", "onnxruntime"]


@functools.lru_cache(maxsize=None)
def case(op, layout, dtype):
    return _bench.Case(op, layout, np.dtype(dtype), SHAPE, np.random.default_rng(0))


@functools.lru_cache(maxsize=None)
def expected(op, layout, dtype):
    c = case(op, layout, dtype)
    if op == "train":
        return ref.batch_norm_train(c.x, c.weight, c.bias, eps=_bench.EPS, axis=c.axis)[0]
    if op == "infer":
        return ref.batch_norm_infer(c.x, c.running_mean, c.running_var, c.weight, c.bias,
                                    eps=_bench.EPS, axis=c.axis)
    return ref.batch_norm_backward(c.dy, c.x, c.mean, c.invstd, c.weight, axis=c.axis)[0]


def implementation(name, c, threads):
    if name == "fastbn":
        return _bench.fastbn_impl(c)
    if name == "numpy":
        return _bench.numpy_impl(c)
    peers = _bench.load_peers(threads)
    if name not in peers:
        pytest.skip(f"{name} is not installed")
    return peers[name](c)


@pytest.fixture
def threads_set():
    yield fastbn.set_num_threads
    fastbn.set_num_threads(None)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("op", _bench.OPS)
def test_batch_norm(benchmark, op, layout, dtype, impl, threads, threads_set):
    threads_set(threads)
    c = case(op, layout, dtype)
    fn = implementation(impl, c, threads)
    if fn is None:
        pytest.skip(f"{impl} has no {op} for {layout}")
    benchmark.group = f"{op} {layout} {dtype} threads={threads}"
    result = benchmark(fn)
    assert _bench.close_enough(result, expected(op, layout, dtype), c.dtype)


@pytest.mark.parametrize("impl", ["fused", "composite", "torch"])
@pytest.mark.parametrize("activation", _bench.FUSED_ACTIVATIONS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("op", _bench.OPS)
def test_fused(benchmark, op, layout, activation, impl):
    """act(bn(x) + residual) fused, against the composite (fastbn, then NumPy) and torch's."""
    c = _bench.FusedCase(op, layout, np.float32, SHAPE, np.random.default_rng(0), activation)
    impls = _bench.fused_impls(c)
    if impl == "torch":
        torch = pytest.importorskip("torch")
        impls["torch"] = _bench.torch_composite(c, torch)
    benchmark.group = f"fused {op} {layout} {activation}"
    result = benchmark(impls[impl])
    assert _bench.close_enough(result, impls["fused"](), c.dtype)
