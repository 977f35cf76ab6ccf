"""Argument checking (clear errors naming the argument, nothing written on failure), edge
sizes, and the command line."""
import subprocess
import sys

import numpy as np
import pytest

import fastbn
import fastbn.reference as ref
from conftest import TOL_Y, assert_close


@pytest.fixture
def arrays(rng):
    x = rng.standard_normal((4, 3, 5))
    return dict(x=x, rm=np.zeros(3), rv=np.ones(3), out=np.full_like(x, 7.0))


def assert_untouched(a):
    np.testing.assert_array_equal(a["rm"], 0.0)
    np.testing.assert_array_equal(a["rv"], 1.0)
    np.testing.assert_array_equal(a["out"], 7.0)


BAD_TRAIN = [
    (dict(x=np.zeros(5)), ValueError, "at least 2 dimensions"),
    (dict(x=np.zeros((4, 3), np.int64)), TypeError, "x must have dtype float32 or float64"),
    (dict(x=np.zeros((4, 3), np.float16)), TypeError, "float16"),
    (dict(x=np.zeros((4, 3), np.complex128)), TypeError, "complex128"),
    (dict(x="abc"), TypeError, "x must be a numpy.ndarray"),
    (dict(axis=3), np.exceptions.AxisError, "axis"),
    (dict(axis=1.0), TypeError, "axis must be an int"),
    (dict(axis=True), TypeError, "axis must be an int"),
    (dict(weight=np.ones(4)), ValueError, r"weight must have shape \(3,\)"),
    (dict(bias=np.ones((3, 1))), ValueError, r"bias must have shape \(3,\)"),
    (dict(weight=np.ones(3, np.int32)), TypeError, "weight must be a float32 or float64"),
    (dict(eps=-1.0), ValueError, "eps must be in"),
    (dict(eps=float("nan")), ValueError, "eps must be in"),
    (dict(eps="1e-5"), TypeError, "eps must be a real number"),
    (dict(momentum=1.5), ValueError, "momentum must be in"),
    (dict(momentum=None), TypeError, "momentum must be a real number"),
    (dict(running_var=None), ValueError, "running_mean and running_var must be given together"),
    (dict(running_mean=np.zeros(3, np.float32)), TypeError, "running_mean must have the dtype of x"),
    (dict(running_var=np.ones(4)), ValueError, r"running_var must have shape \(3,\)"),
    (dict(running_mean=[0.0, 0.0, 0.0]), TypeError, "running_mean must be a numpy.ndarray"),
    (dict(out=np.zeros((4, 3, 6))), ValueError, "out must have the shape of x"),
    (dict(out=np.zeros((4, 3, 5), np.float32)), TypeError, "out must have the dtype of x"),
    (dict(out=[1.0]), TypeError, "out must be a numpy.ndarray"),
    (dict(x=np.zeros((1, 3, 1))), ValueError, "Expected more than 1 value per channel"),
]


@pytest.mark.parametrize("change,error,message", BAD_TRAIN)
def test_train_rejects_bad_arguments_before_writing(arrays, change, error, message):
    change = dict(change)
    own_x = "x" in change
    x = change.pop("x", arrays["x"])
    # out=arrays["out"] unless the case is about out, or x has another shape than out
    kwargs = dict(running_mean=arrays["rm"], running_var=arrays["rv"],
                  out=None if own_x else arrays["out"])
    kwargs.update(change)
    with pytest.raises(error, match=message):
        fastbn.batch_norm_train(x, **kwargs)
    assert_untouched(arrays)


def test_read_only_running_stat_is_rejected(arrays):
    arrays["rv"].flags.writeable = False
    with pytest.raises(ValueError, match="running_var is read-only"):
        fastbn.batch_norm_train(arrays["x"], running_mean=arrays["rm"], running_var=arrays["rv"])
    assert_untouched(arrays)


def test_read_only_out_is_rejected(arrays):
    arrays["out"].flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        fastbn.batch_norm_infer(arrays["x"], arrays["rm"], arrays["rv"], out=arrays["out"])


def test_inference_rejects_negative_variance_before_writing(arrays):
    rv = np.array([1.0, -0.5, 1.0])
    with pytest.raises(ValueError, match="running_var must be non-negative"):
        fastbn.batch_norm_infer(arrays["x"], arrays["rm"], rv, out=arrays["out"])
    assert_untouched(arrays)


def test_inference_needs_running_statistics(arrays):
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        fastbn.batch_norm(arrays["x"], training=False)


def test_backward_checks_dy_and_statistics(arrays):
    x = arrays["x"]
    _, mean, invstd = fastbn.batch_norm_train(x)
    with pytest.raises(ValueError, match="dy must have the shape of x"):
        fastbn.batch_norm_backward(x[:2], x, mean, invstd)
    with pytest.raises(TypeError, match="dy must have the dtype of x"):
        fastbn.batch_norm_backward(x.astype(np.float32), x, mean, invstd)
    with pytest.raises(ValueError, match=r"invstd must have shape \(3,\)"):
        fastbn.batch_norm_backward(x, x, mean, invstd[:2])
    with pytest.raises(TypeError, match="mean and invstd are required"):
        fastbn.batch_norm_backward(x, x, None, invstd)


def test_parameters_of_another_float_dtype_are_converted(rng):
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    w64, b64 = rng.standard_normal(3), rng.standard_normal(3)
    y = fastbn.batch_norm_train(x, w64, b64)[0]
    assert y.dtype == np.float32
    assert_close(y, ref.batch_norm_train(x, w64.astype(np.float32), b64.astype(np.float32))[0],
                 TOL_Y[np.float32])


def test_lists_and_byte_order(rng):
    x = rng.standard_normal((5, 2))
    y_list = fastbn.batch_norm_train(x.tolist())[0]
    y_swapped = fastbn.batch_norm_train(x.astype(">f8"))[0]
    want = ref.batch_norm_train(x)[0]
    assert_close(y_list, want, TOL_Y[np.float64])
    assert_close(y_swapped, want, TOL_Y[np.float64])
    assert y_swapped.dtype == np.float64 and y_swapped.dtype.isnative


def test_empty_batch_leaves_running_statistics(arrays):
    x = np.zeros((0, 3, 5))
    y, mean, invstd = fastbn.batch_norm_train(x, running_mean=arrays["rm"],
                                              running_var=arrays["rv"])
    assert y.shape == x.shape and mean.shape == (3,) and np.isnan(mean).all()
    assert_untouched(arrays)
    assert fastbn.batch_norm_infer(x, arrays["rm"], arrays["rv"]).shape == x.shape
    dx, dweight, dbias = fastbn.batch_norm_backward(x, x, mean, invstd)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dweight, 0.0)
    np.testing.assert_array_equal(dbias, 0.0)


def test_zero_channels():
    x = np.zeros((4, 0, 3), np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x)
    assert y.shape == x.shape and mean.shape == invstd.shape == (0,)


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "fastbn", "info"], capture_output=True,
                         text=True, check=True).stdout
    for field in ("fastbn", "openmp", "threads", "compiler", "baseline simd"):
        assert field in out
    assert fastbn.__version__ in out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1)])
def test_fast_path_and_full_path_agree(shape, axis, dtype, rng):
    """Plain arrays take the C-level fast path; a list for weight forces the full path."""
    x = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    fast = fastbn.batch_norm_train(x, w, b, axis=axis, running_mean=rm, running_var=rv)
    full = fastbn.batch_norm_train(x, w.tolist(), b, axis=axis, running_mean=rm2, running_var=rv2)
    for a, f in zip(fast + (rm, rv), full + (rm2, rv2)):
        assert a.tobytes() == f.tobytes()
    out = np.empty_like(x)
    assert fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis, out=out) is out
    assert out.tobytes() == fastbn.batch_norm_infer(x, rm, rv, w.tolist(), b, axis=axis).tobytes()
    dy = rng.standard_normal(shape).astype(dtype)
    _, mean, invstd = fast
    grads = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, out=out)
    assert grads[0] is out
    for a, f in zip(grads, fastbn.batch_norm_backward(dy, x, mean, invstd, w.tolist(), axis=axis)):
        assert a.tobytes() == f.tobytes()
