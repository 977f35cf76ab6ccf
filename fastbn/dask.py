"""Per-channel statistics of a Dask array, larger than memory: fastbn's moments of each chunk,
merged as a tree with the same Chan merge (fastbn.statistics), one pass over the data.

    import dask.array as da
    import fastbn.dask
    m = fastbn.dask.moments(da.from_zarr("data.zarr"), axis=1)   # a fastbn.Moments
    s = m.finish(eps=1e-5)          # mean, var, var_unbiased, invstd: float64 (C,) arrays

Dask is an optional dependency (pip install "fastbn[dask]"). Each chunk's partial is 4 float64
values per channel of the chunk; the chunks that hold the same channels are merged in groups of
split_every, then groups of groups, in the order of their blocks; chunks split along the
channel axis are merged per channel range and the ranges put side by side. The tree is built
of delayed calls on the partials as they are (the tree dask.array.reduction builds, without
its array bookkeeping: a partial is not a block of the array). The result agrees with
fastbn.moments of the whole array in memory to rounding (the merge order differs).
"""
import numpy as np

try:
    import dask
    import dask.array as da
except ImportError as e:
    raise ImportError("fastbn.dask needs Dask's arrays: pip install 'fastbn[dask]'") from e

from . import _rules
from .statistics import Moments, merge_moments, moments as _moments

__all__ = ["moments"]


def moments(darr, *, axis=1, split_every=8):
    """The Moments of a Dask array's values per channel (over every axis but `axis`),
    computed. darr: any of fastbn's storage dtypes, any chunking; split_every: partials per merge."""
    if not isinstance(darr, da.Array):
        raise TypeError(f"darr must be a dask.array.Array, got {type(darr).__name__}")
    if darr.dtype not in _rules.DATA_DTYPES:
        raise TypeError(f"darr must have dtype {_rules.DTYPE_NAMES}, got {darr.dtype}")
    if darr.ndim < 2:
        raise ValueError(f"darr must have at least 2 dimensions (batch and channels), "
                         f"got shape {darr.shape}")
    axis = _rules.axis(axis, darr.ndim)
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise ValueError(f"split_every must be an int >= 2, got {split_every!r}")

    # one row per chunk of channels: the blocks that hold those channels, in block order
    blocks = np.moveaxis(darr.to_delayed(), axis, 0).reshape(darr.numblocks[axis], -1)
    ranges = [_tree_merge([dask.delayed(_chunk_moments)(b, axis) for b in row], split_every)
              for row in blocks]
    return Moments(np.concatenate(dask.compute(*ranges), axis=1))


def _chunk_moments(block, axis):
    """A chunk's partial: (4, channels of the chunk) float64."""
    return _moments(block, axis=axis).data


def _merge(parts):
    return merge_moments(parts).data


def _tree_merge(parts, split_every):
    """The partials merged split_every at a time, in order, until one is left (delayed)."""
    while len(parts) > 1:
        parts = [dask.delayed(_merge)(parts[i:i + split_every])
                 for i in range(0, len(parts), split_every)]
    return parts[0]
