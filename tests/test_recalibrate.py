"""fastbn.recalibrate (precise BN): a layer's running statistics become the exact mean and
unbiased variance of all values of a stream of uneven batches, read once."""
import numpy as np
import pytest

import fastbn
from conftest import assert_rel, make_input


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1), ((4, 3), 1)])
def test_population_statistics_of_the_concatenated_data(shape, axis, dtype, rng):
    sizes = [7, 3, 12, 1]               # uneven, the last batch one sample
    batches = [make_input((n,) + shape[1:], axis, dtype, rng, offset=10.0) + 3.0 * k
               for k, n in enumerate(sizes)]
    whole = np.concatenate(batches).astype(np.float64)
    reduce = tuple(i for i in range(whole.ndim) if i != axis % whole.ndim)
    layer = fastbn.BatchNorm(3, axis=axis, dtype=dtype)

    assert fastbn.recalibrate(layer, iter(batches)) is layer       # a one-pass iterator
    tol = 1e-6 if dtype == np.float32 else 1e-13
    assert_rel(layer.running_mean, whole.mean(axis=reduce), tol, "running_mean")
    assert_rel(layer.running_var, whole.var(axis=reduce, ddof=1), tol, "running_var")
    assert layer.num_batches_tracked == 0

    # averaging the batches' statistics (fvcore, swa_utils) misses the batches' spread
    per_batch = np.mean([b.astype(np.float64).var(axis=reduce, ddof=1) for b in batches[:3]],
                        axis=0)
    assert (per_batch < 0.9 * layer.running_var).all()


def test_keras_layer_gets_the_population_variance(rng):
    x = rng.standard_normal((50, 4)) * 2
    layer = fastbn.recalibrate(fastbn.BatchNorm.keras(4, dtype=np.float64),
                               (x[i:i + 8] for i in range(0, 50, 8)))
    assert_rel(layer.running_var, x.var(axis=0), 1e-13, "running_var")


def test_arguments_and_nothing_written_on_error():
    layer = fastbn.BatchNorm(3, dtype=np.float64)
    with pytest.raises(TypeError, match="fastbn.BatchNorm"):
        fastbn.recalibrate("bn", [])
    with pytest.raises(ValueError, match="no running statistics"):
        fastbn.recalibrate(fastbn.BatchNorm(3, track_running_stats=False), [np.ones((2, 3))])
    with pytest.raises(ValueError, match="more than 1 value per channel, got 0"):
        fastbn.recalibrate(layer, [])
    with pytest.raises(ValueError, match="got 1"):
        fastbn.recalibrate(layer, [np.ones((1, 3))])
    with pytest.raises(ValueError, match="num_features=3"):
        fastbn.recalibrate(layer, [np.ones((4, 3)), np.ones((4, 5))])
    with pytest.raises(TypeError, match="dtype"):
        fastbn.recalibrate(layer, [np.ones((4, 3), np.float32)])
    assert (layer.running_mean == 0).all() and (layer.running_var == 1).all()
