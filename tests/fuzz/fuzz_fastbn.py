"""Fuzz harness for fastbn's public functions (atheris).

    pip install atheris
    python tests/fuzz/fuzz_fastbn.py -max_total_time=60      # run for 60 seconds
    python tests/fuzz/fuzz_fastbn.py -runs=100000            # or for a number of inputs

Each input becomes a call: shape (0- and 1-sized dimensions included), axis, dtype (invalid
ones too), strides, values (NaN, Inf and huge offsets included) and optional arguments (some of
them wrong). A TypeError or ValueError is the accepted way to fail; any other exception or a
crash is a finding. When a call succeeds on finite data, its result must agree with
fastbn.reference. atheris guides itself by the coverage of the Python layer (fastbn._api).
"""
import sys

import atheris
import numpy as np

with atheris.instrument_imports():
    import fastbn
    import fastbn.reference as ref

DTYPES = [np.float32, np.float64, np.float32, np.float64, np.float16, np.int32, np.complex64]


def array(fdp, shape, dtype):
    """An array of shape and dtype, C-contiguous or a strided / transposed view."""
    n = int(np.prod(shape))
    kind = fdp.ConsumeIntInRange(0, 3)
    offset = [0.0, 1.0, 1e4, 1e6][fdp.ConsumeIntInRange(0, 3)]
    values = np.array([fdp.ConsumeFloatInRange(-4.0, 4.0) for _ in range(min(n, 64))] or [0.0])
    data = (offset + np.resize(values, n)).reshape(shape)
    if fdp.ConsumeIntInRange(0, 15) == 0 and n:
        data.flat[fdp.ConsumeIntInRange(0, n - 1)] = [np.nan, np.inf, -np.inf][fdp.ConsumeIntInRange(0, 2)]
    data = data.astype(dtype)
    if kind == 1 and len(shape) >= 2:
        return np.asfortranarray(data)
    if kind == 2:
        bigger = np.repeat(data, 2, axis=-1)
        return bigger[..., ::2]
    if kind == 3:
        return data[::-1]
    return data


def vector(fdp, C, dtype):
    size = C if fdp.ConsumeIntInRange(0, 9) else C + 1          # sometimes the wrong length
    return np.resize(np.array([fdp.ConsumeFloatInRange(0.1, 2.0) for _ in range(3)]), size).astype(dtype)


def close(got, want, dtype):
    want = np.asarray(want, dtype=np.longdouble)
    if not np.isfinite(want).all() or want.size == 0:
        return True
    tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-9
    return float(np.max(np.abs(got - want))) <= tol * max(1.0, float(np.max(np.abs(want))))


def TestOneInput(data):
    fdp = atheris.FuzzedDataProvider(data)
    ndim = fdp.ConsumeIntInRange(1, 4)
    shape = tuple(fdp.ConsumeIntInRange(0, 5) for _ in range(ndim))
    dtype = DTYPES[fdp.ConsumeIntInRange(0, len(DTYPES) - 1)]
    x = array(fdp, shape, dtype)
    axis = fdp.ConsumeIntInRange(-ndim - 1, ndim)
    C = shape[axis] if -ndim <= axis < ndim else 1
    vec_dtype = np.float64 if fdp.ConsumeBool() else dtype
    weight = vector(fdp, C, vec_dtype) if fdp.ConsumeBool() else None
    bias = vector(fdp, C, vec_dtype) if fdp.ConsumeBool() else None
    eps = [1e-5, 0.0, 1e-3, -1.0, float("nan")][fdp.ConsumeIntInRange(0, 4)]
    momentum = [0.1, 0.0, 1.0, 1.5][fdp.ConsumeIntInRange(0, 3)]
    out = np.empty_like(x) if fdp.ConsumeBool() else None
    op = fdp.ConsumeIntInRange(0, 2)
    try:
        if op == 0:
            rm, rv = (vector(fdp, C, dtype), vector(fdp, C, dtype)) if fdp.ConsumeBool() else (None, None)
            y, _, _ = fastbn.batch_norm_train(x, weight, bias, eps=eps, axis=axis, running_mean=rm,
                                              running_var=rv, momentum=momentum, out=out)
            oracle = lambda: ref.batch_norm_train(x, weight, bias, eps=eps, axis=axis)[0]
        elif op == 1:
            rm, rv = vector(fdp, C, dtype), vector(fdp, C, dtype)
            y = fastbn.batch_norm_infer(x, rm, rv, weight, bias, eps=eps, axis=axis, out=out)
            oracle = lambda: ref.batch_norm_infer(x, rm, rv, weight, bias, eps=eps, axis=axis)
        else:
            dy = array(fdp, shape, dtype)
            mean, invstd = vector(fdp, C, dtype), vector(fdp, C, dtype)
            y = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis, out=out)[0]
            oracle = lambda: ref.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)[0]
    except (TypeError, ValueError):
        return
    assert y.shape == x.shape
    # the oracle is defined for non-empty, finite data (an empty batch has no statistics)
    if x.size and np.isfinite(np.asarray(x, dtype=np.float64)).all() and not close(y, oracle(), dtype):
        raise AssertionError(f"fastbn and the reference disagree: op {op}, shape {shape}, "
                             f"axis {axis}, dtype {np.dtype(dtype)}")


def main():
    np.seterr(all="ignore")
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
