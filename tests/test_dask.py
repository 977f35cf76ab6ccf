"""fastbn.dask.moments: chunk partials tree-merged equal fastbn on the array in memory, for any
chunking (channels split across chunks included). Skipped without Dask."""
import numpy as np
import pytest

import fastbn
from conftest import assert_rel, make_input

da = pytest.importorskip("dask.array")
import fastbn.dask  # noqa: E402  (needs dask)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis,chunks", [
    ((40, 6, 5, 7), 1, (7, 6, 5, 7)),           # batch chunks, uneven last one
    ((40, 6, 5, 7), 1, (9, 4, 3, 7)),           # channels split: 4 + 2
    ((40, 5, 7, 6), -1, (13, 5, 2, 1)),         # channels last, one channel per chunk
    ((33, 8), 1, (1, 3)),                       # one row per chunk: a deep tree
    ((6, 7, 40), 2, (6, 7, 40)),                # one chunk
])
def test_equals_fastbn_in_memory(shape, axis, chunks, dtype, rng):
    x = make_input(shape, axis, dtype, rng, offset=1e3)
    whole = fastbn.moments(x, axis=axis).finish()
    merged = fastbn.dask.moments(da.from_array(x, chunks=chunks), axis=axis, split_every=3)
    np.testing.assert_array_equal(merged.count, fastbn.moments(x, axis=axis).count)
    s = merged.finish()
    for name in ("mean", "var", "var_unbiased", "invstd"):
        assert_rel(getattr(s, name), getattr(whole, name), 1e-13, name)


def test_data_larger_than_one_chunk_is_never_materialized():
    """A lazily generated array of 2**22 values in 64 chunks: only chunks are ever computed."""
    x = da.random.default_rng(0).standard_normal((256, 4, 64, 64), chunks=(4, 4, 64, 64)) + 5
    m = fastbn.dask.moments(x, axis=1)
    assert m.count.tolist() == [256 * 64 * 64] * 4
    s = m.finish()
    assert np.allclose(s.mean, 5, atol=0.01) and np.allclose(s.var, 1, atol=0.01)


def test_arguments_are_checked():
    with pytest.raises(TypeError, match="dask.array.Array"):
        fastbn.dask.moments(np.ones((3, 2)))
    with pytest.raises(TypeError, match="float32, float64"):
        fastbn.dask.moments(da.ones((3, 2), dtype=np.int32))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fastbn.dask.moments(da.ones(3))
    with pytest.raises(ValueError, match="split_every"):
        fastbn.dask.moments(da.ones((3, 2)), split_every=1)
