"""Bad input: a clear TypeError or ValueError naming the argument, raised before anything is
written (inputs, out= and running statistics stay as they were), and never a crash.
README.md's "Errors" section lists the same cases."""
import numpy as np
import pytest

import fastbn

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
    (dict(x=np.zeros((4, 3), np.int64)), TypeError, "x must have dtype float32, float64"),
    (dict(x=np.zeros((4, 3), np.int16)), TypeError, "int16"),
    (dict(x=np.zeros((4, 3), np.complex128)), TypeError, "complex128"),
    (dict(x="abc"), TypeError, "x must be a numpy.ndarray"),
    (dict(axis=3), np.exceptions.AxisError, r"^axis 3 is out of bounds for array of dimension 3$"),
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
    (dict(running_mean=np.zeros(3, np.float32)), TypeError, "running_mean must have x's statistics dtype"),
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_inference_names_the_first_negative_variance(rng, dtype, layout):
    # 40 channels: negatives inside the vectorized check's body and in its tail
    C = 40
    x = rng.standard_normal((2, C, 3, 3)).astype(dtype)
    axis = 1
    if layout == "NHWC":
        x, axis = np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1
    rv = np.ones(C, dtype)
    rv[[17, 30, 39]] = -0.25
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="got -0.25 for channel 17"):
        fastbn.batch_norm_infer(x, np.zeros(C, dtype), rv, axis=axis, out=out)
    np.testing.assert_array_equal(out, 7.0)


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



BAD_INFER = [
    (dict(running_mean=np.zeros(4)), ValueError, r"running_mean must have shape \(3,\)"),
    (dict(running_var=np.zeros((3, 1))), ValueError, r"running_var must have shape \(3,\)"),
    (dict(running_var=None), ValueError, "running_mean and running_var are required"),
    (dict(running_mean=np.array(["a", "b", "c"])), TypeError, "running_mean must be a float32"),
    (dict(running_var=np.array([1.0, -0.5, 1.0])), ValueError, "running_var must be non-negative"),
    (dict(weight=np.ones(3, np.complex128)), TypeError, "weight must be a float32"),
    (dict(eps=float("nan")), ValueError, "eps must be in"),
    (dict(axis=-4), np.exceptions.AxisError, r"^axis -4 is out of bounds for array of dimension 3$"),
    (dict(out=np.zeros((4, 3, 5), np.float32)), TypeError, "out must have the dtype of x"),
    (dict(out=np.zeros((4, 5, 3))), ValueError, "out must have the shape of x"),
]


@pytest.mark.parametrize("change,error,message", BAD_INFER)
def test_infer_rejects_bad_arguments_before_writing(arrays, change, error, message):
    kwargs = dict(running_mean=arrays["rm"], running_var=arrays["rv"], out=arrays["out"])
    kwargs.update(change)
    with pytest.raises(error, match=message):
        fastbn.batch_norm_infer(arrays["x"], **kwargs)
    assert_untouched(arrays)


BAD_BACKWARD = [
    (dict(dy=np.zeros((4, 3, 6))), ValueError, "dy must have the shape of x"),
    (dict(dy=np.zeros((4, 3, 5), np.float32)), TypeError, "dy must have the dtype of x"),
    (dict(dy=np.zeros((4, 3, 5), np.int64)), TypeError, "dy must have dtype float32, float64"),
    (dict(dy="dy"), TypeError, "dy must be a numpy.ndarray"),
    (dict(mean=np.zeros(2)), ValueError, r"mean must have shape \(3,\)"),
    (dict(invstd=np.ones((3, 1))), ValueError, r"invstd must have shape \(3,\)"),
    (dict(invstd=None), TypeError, "mean and invstd are required"),
    (dict(weight=np.ones(3, np.int8)), TypeError, "weight must be a float32"),
    (dict(axis="1"), TypeError, "axis must be an int"),
    (dict(out=np.zeros((4, 3, 5), np.float32)), TypeError, "out must have the dtype of x"),
]


@pytest.mark.parametrize("change,error,message", BAD_BACKWARD)
def test_backward_rejects_bad_arguments_before_writing(arrays, change, error, message):
    x = arrays["x"]
    kwargs = dict(dy=x.copy(), x=x, mean=np.zeros(3), invstd=np.ones(3), out=arrays["out"])
    kwargs.update(change)
    dy, xx, mean, invstd = (kwargs.pop(k) for k in ("dy", "x", "mean", "invstd"))
    with pytest.raises(error, match=message):
        fastbn.batch_norm_backward(dy, xx, mean, invstd, **kwargs)
    assert_untouched(arrays)


@pytest.mark.parametrize("x", [np.zeros((4, 3), bool), np.zeros((4, 3), object),
                               np.zeros((4, 3), np.int16), np.zeros((4, 3), np.uint8),
                               np.zeros((4, 3), np.complex64), np.zeros((4, 3), np.longdouble)])
def test_unsupported_dtypes_are_rejected(x):
    with pytest.raises(TypeError, match="x must have dtype float32, float64(,| or) float16"):
        fastbn.batch_norm_train(x)
    with pytest.raises(TypeError, match="x must have dtype float32, float64(,| or) float16"):
        fastbn.batch_norm_infer(x, np.zeros(3), np.ones(3))


@pytest.mark.parametrize("x", [None, 3.0, "abc", {"a": 1}])
def test_non_arrays_are_rejected(x):
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        fastbn.batch_norm_train(x)


def test_ragged_lists_are_rejected():
    with pytest.raises((TypeError, ValueError)):
        fastbn.batch_norm_train([[1.0, 2.0], [3.0]])


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_inf_and_nan_stay_in_their_channel(value, rng):
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((6, 3, 4)).astype(dtype)
        x[1, 2, 0] = value
        y, mean, invstd = fastbn.batch_norm_train(x)
        assert not np.isfinite(y[:, 2]).all() and not np.isfinite(mean[2] + invstd[2])
        assert np.isfinite(y[:, :2]).all() and np.isfinite(mean[:2]).all()
        dx, dweight, dbias = fastbn.batch_norm_backward(x, x, mean, invstd)
        assert np.isfinite(dx[:, :2]).all() and np.isfinite(dweight[:2]).all()


def test_nan_momentum_and_eps_are_rejected(arrays):
    for kw in (dict(momentum=float("nan")), dict(eps=-1e-9), dict(momentum=-0.1)):
        with pytest.raises(ValueError):
            fastbn.batch_norm_train(arrays["x"], running_mean=arrays["rm"],
                                    running_var=arrays["rv"], **kw)
    assert_untouched(arrays)


def test_channels_last_data_with_the_default_axis_get_a_hint(rng):
    """NHWC data without axis=-1: the per-channel arrays don't fit axis 1, and the message
    says the axis may be the thing that is wrong."""
    x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    w, b, rm, rv = np.ones(3, np.float32), np.zeros(3, np.float32), np.zeros(3), np.ones(3)
    calls = [lambda: fastbn.batch_norm_train(x, w, b),
             lambda: fastbn.batch_norm_infer(x, rm, rv),
             lambda: fastbn.batch_norm_backward(x, x, rm, rv)]
    for call in calls:
        with pytest.raises(ValueError, match=r"must have shape \(5,\), one value per channel, "
                                             r"got \(3,\) \(.*NHWC need axis=-1\)"):
            call()
    # an array of another rank is not about the axis: no hint
    with pytest.raises(ValueError) as error:
        fastbn.batch_norm_train(x, np.ones((5, 1), np.float32))
    assert "axis" not in str(error.value)
    fastbn.batch_norm_train(x, w, b, axis=-1)             # what the hint says works
