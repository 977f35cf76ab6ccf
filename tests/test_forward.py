"""Forward passes (training and inference) against fastbn.reference, every kernel path."""
import numpy as np
import pytest

import fastbn
import fastbn.reference as ref
from conftest import (DTYPES, PARALLEL_CASES, SMALL_CASES, TOL_STAT, TOL_Y, assert_close,
                      assert_rel, make_input, make_params, plan)

ALL_CASES = SMALL_CASES + PARALLEL_CASES


def test_cases_cover_every_kernel_path():
    """The shapes below reach: both families x (one chunk, several chunks) x (serial, parallel)."""
    parallel_families = {(p["family"], p["nchunks"] > 1)
                         for p in (plan(s, a) for s, a in PARALLEL_CASES)}
    assert parallel_families == {("channels_first", False), ("channels_first", True),
                                 ("channels_last", True)}
    serial = {plan(s, a)["family"] for s, a in SMALL_CASES if plan(s, a)["threads"] == 1}
    assert serial == {"channels_first", "channels_last"}
    row_steps = {plan(s, a, d)["row_step"] for s, a in PARALLEL_CASES for d in DTYPES
                 if plan(s, a)["family"] == "channels_last"}
    assert row_steps == {1, 4}      # cached and streaming channels-last kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", ALL_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_train_matches_reference(shape, axis, dtype, affine, rng):
    x = make_input(shape, axis, dtype, rng, offset=3.0)
    C = shape[axis]
    weight, bias = make_params(C, dtype, rng) if affine else (None, None)
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    x_before = x.copy()

    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, eps=1e-3, axis=axis,
                                              running_mean=rm, running_var=rv, momentum=0.3)
    y_ref, mean_ref, invstd_ref = ref.batch_norm_train(x, weight, bias, eps=1e-3, axis=axis,
                                                       running_mean=rm_ref, running_var=rv_ref,
                                                       momentum=0.3)
    assert y.dtype == mean.dtype == invstd.dtype == dtype
    assert mean.shape == invstd.shape == (C,)
    assert_close(y, y_ref, TOL_Y[dtype], "y")
    assert_rel(mean, ref.batch_stats(x, axis)[0], TOL_STAT[dtype], "mean")
    assert_rel(invstd, invstd_ref, TOL_STAT[dtype], "invstd")
    assert_rel(rm, rm_ref, TOL_STAT[dtype], "running_mean")
    assert_rel(rv, rv_ref, TOL_STAT[dtype], "running_var")
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", ALL_CASES)
def test_infer_matches_reference(shape, axis, dtype, rng):
    x = make_input(shape, axis, dtype, rng, offset=2.0)
    C = shape[axis]
    weight, bias = make_params(C, dtype, rng)
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.0, 3.0, C).astype(dtype)
    y = fastbn.batch_norm_infer(x, rm, rv, weight, bias, eps=1e-4, axis=axis)
    y_ref = ref.batch_norm_infer(x, rm, rv, weight, bias, eps=1e-4, axis=axis)
    assert y.dtype == dtype
    assert_close(y, y_ref, TOL_Y[dtype], "y")
    y_plain = fastbn.batch_norm_infer(x, rm, rv, axis=axis)
    assert_close(y_plain, ref.batch_norm_infer(x, rm, rv, axis=axis), TOL_Y[dtype], "y no affine")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_torch_style_batch_norm(dtype, training, rng):
    shape, axis = (6, 4, 5, 5), 1
    x = make_input(shape, axis, dtype, rng)
    weight, bias = make_params(4, dtype, rng)
    rm, rv = np.zeros(4, dtype), np.ones(4, dtype)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    y = fastbn.batch_norm(x, rm, rv, weight, bias, training, 0.2, 1e-4)
    y_ref = ref.batch_norm(x, rm_ref, rv_ref, weight, bias, training, 0.2, 1e-4)
    assert_close(y, y_ref, TOL_Y[dtype], "y")
    assert_rel(rm + 1, rm_ref + 1, TOL_STAT[dtype], "running_mean")
    assert_rel(rv, rv_ref, TOL_STAT[dtype], "running_var")
    if not training:
        np.testing.assert_array_equal(rm, np.zeros(4, dtype))


def test_training_without_running_stats_leaves_nothing_behind(rng):
    x = make_input((5, 3, 4), 1, np.float64, rng)
    y, mean, invstd = fastbn.batch_norm_train(x)
    assert_close(y, ref.batch_norm_train(x)[0], TOL_Y[np.float64])


def test_momentum_edges(rng):
    x = make_input((9, 4), 1, np.float64, rng)
    mean, var = ref.batch_stats(x)
    rm, rv = np.full(4, 7.0), np.full(4, 3.0)
    fastbn.batch_norm_train(x, running_mean=rm, running_var=rv, momentum=0.0)
    np.testing.assert_array_equal(rm, 7.0)
    np.testing.assert_array_equal(rv, 3.0)
    fastbn.batch_norm_train(x, running_mean=rm, running_var=rv, momentum=1.0)
    assert_rel(rm, mean, 1e-13)
    assert_rel(rv, var * 9 / 8, 1e-13)


def test_constant_channel_gives_beta(rng):
    """Zero variance: x - mean is exactly 0, so y is exactly beta."""
    x = np.full((4, 3, 5), 2.5, np.float32)
    x[:, 1] = rng.standard_normal((4, 5))
    y, mean, invstd = fastbn.batch_norm_train(x, bias=np.array([1.0, 0.0, -2.0], np.float32))
    np.testing.assert_array_equal(y[:, 0], 1.0)
    np.testing.assert_array_equal(y[:, 2], -2.0)
    assert mean[0] == 2.5 and invstd[0] == np.float32(1 / np.sqrt(1e-5))


def test_nan_stays_in_its_channel(rng):
    x = make_input((6, 3, 4), 1, np.float64, rng)
    x[2, 1, 3] = np.nan
    y, mean, invstd = fastbn.batch_norm_train(x)
    assert np.isnan(y[:, 1]).all() and np.isnan(mean[1])
    assert np.isfinite(y[:, [0, 2]]).all()
    y_ref = ref.batch_norm_train(x[:, [0, 2]])[0]
    assert_close(y[:, [0, 2]], y_ref, TOL_Y[np.float64])
