"""The normalization family as mappings onto the statistics stage (fastbn._problems): each
mapping's unit statistics are NumPy's over the right axes, both layouts."""
import numpy as np
import pytest

from fastbn import _problems
from fastbn.statistics import Moments

RNG = np.random.default_rng(5)
X_NCHW = RNG.standard_normal((3, 8, 5, 7)) * 2 + 40


def unit_stats(x, problem):
    parts = _problems.statistics(x, problem)
    stats = [Moments(p).finish() for p in parts]
    return (np.stack([s.mean for s in stats]).ravel(), np.stack([s.var for s in stats]).ravel())


def check(mean, var, ref_mean, ref_var):
    np.testing.assert_allclose(mean, ref_mean.ravel(), rtol=1e-14)
    np.testing.assert_allclose(var, ref_var.ravel(), rtol=1e-11)


def test_batch_norm():
    mean, var = unit_stats(X_NCHW, _problems.batch_norm(X_NCHW.shape, 1))
    check(mean, var, X_NCHW.mean(axis=(0, 2, 3)), X_NCHW.var(axis=(0, 2, 3)))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_instance_norm(layout):
    x = X_NCHW if layout == "nchw" else np.ascontiguousarray(X_NCHW.transpose(0, 2, 3, 1))
    axis = 1 if layout == "nchw" else -1
    mean, var = unit_stats(x, _problems.instance_norm(x.shape, axis))
    # per sample and channel, in the order the problem lists its units
    check(mean, var, X_NCHW.mean(axis=(2, 3)), X_NCHW.var(axis=(2, 3)))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_group_norm(layout):
    x = X_NCHW if layout == "nchw" else np.ascontiguousarray(X_NCHW.transpose(0, 2, 3, 1))
    axis = 1 if layout == "nchw" else -1
    mean, var = unit_stats(x, _problems.group_norm(x.shape, 4, axis))
    groups = X_NCHW.reshape(3, 4, 2, 5, 7)
    check(mean, var, groups.mean(axis=(2, 3, 4)), groups.var(axis=(2, 3, 4)))


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_layer_norm(ndim):
    mean, var = unit_stats(X_NCHW, _problems.layer_norm(X_NCHW.shape, ndim))
    axes = tuple(range(4 - ndim, 4))
    check(mean, var, X_NCHW.mean(axis=axes), X_NCHW.var(axis=axes))
