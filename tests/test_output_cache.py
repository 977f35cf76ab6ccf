"""The output cache: large outputs reuse freed blocks, never a live array's, within the limit."""
import numpy as np
import pytest

import fastbn

SHAPE = (16, 64, 32, 64)           # 8 MiB of float32: large enough for the cache


@pytest.fixture
def cache():
    limit = fastbn.get_output_cache()[0]
    yield fastbn.set_output_cache
    fastbn.set_output_cache(limit)


def address(a):
    return a.__array_interface__["data"][0]


def test_results_are_those_of_fresh_memory(cache, rng):
    x = rng.standard_normal(SHAPE).astype(np.float32)
    dy = rng.standard_normal(SHAPE).astype(np.float32)
    cache(0)
    plain = fastbn.batch_norm_train(x)
    plain_grads = fastbn.batch_norm_backward(dy, x, plain[1], plain[2])
    cache(1 << 30)
    for _ in range(3):                       # the later rounds run on recycled blocks
        cached = fastbn.batch_norm_train(x)
        grads = fastbn.batch_norm_backward(dy, x, cached[1], cached[2])
        for a, b in zip(cached + grads, plain + plain_grads):
            assert a.tobytes() == b.tobytes()
        del cached, grads


def test_blocks_are_reused_only_after_the_array_is_gone(cache, rng):
    cache(1 << 30)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    mean, var = np.zeros(64, np.float32), np.ones(64, np.float32)
    y1 = fastbn.batch_norm_infer(x, mean, var)
    y2 = fastbn.batch_norm_infer(x, mean, var)
    assert address(y1) != address(y2)        # y1 is alive: its block is not handed out
    first = address(y1)
    del y1
    y3 = fastbn.batch_norm_infer(x, mean, var)
    assert address(y3) == first              # y1 is gone: its block comes back
    np.testing.assert_array_equal(y3, y2)
    assert y3.flags.writeable and y3.flags.c_contiguous


def test_the_limit_holds(cache, rng):
    x = rng.standard_normal(SHAPE).astype(np.float32)
    nbytes = x.nbytes
    cache(nbytes)                             # room for one block
    ys = [fastbn.batch_norm_infer(x, np.zeros(64, np.float32), np.ones(64, np.float32))
          for _ in range(3)]
    del ys
    limit, held, blocks = fastbn.get_output_cache()
    assert held <= limit and blocks == 1
    cache(0)
    assert fastbn.get_output_cache() == (0, 0, 0)
    y = fastbn.batch_norm_infer(x, np.zeros(64, np.float32), np.ones(64, np.float32))
    assert y.flags.owndata                    # no cache: a plain NumPy array


def test_small_outputs_are_plain_numpy_arrays(rng):
    y = fastbn.batch_norm_train(rng.standard_normal((4, 3, 5)))[0]
    assert y.flags.owndata


def test_set_output_cache_checks_its_argument(cache):
    with pytest.raises(TypeError, match="nbytes must be an int"):
        cache(1.5)
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        cache(-1)
