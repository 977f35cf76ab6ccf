"""Problems: how a normalization maps onto the kernels' statistics units.

A normalization takes statistics over units of its input and applies an affine transform per
channel. The kernels know neither: they take moments of the units of a C-contiguous
(outer, U, inner) view, unit u being `outer` runs of `inner` values. A Problem says how an
input is that view:

    problems  P independent problems: x is the C-contiguous (P, outer, U, inner) view
    outer, units, inner   each problem's view for the statistics stage
    group     consecutive units merged (Chan's merge) into one statistics unit (1: none):
              channels-last GroupNorm takes each channel's moments, then merges a group's
    affine    how a value's affine channel follows from where it is: "unit" (the unit's
              index modulo the channel count: BatchNorm, InstanceNorm), "group" (channel
              within a unit of channels: GroupNorm), "inner" (position within the unit:
              LayerNorm, RMSNorm)

The table in docs/architecture.md lists the mappings; the functions below build them, and
statistics() runs the statistics stage over any of them. The apply stage with per-unit
statistics and per-channel affine parameters is the family's addition (docs/architecture.md,
"Add a normalization").
"""
from collections import namedtuple
import math

import numpy as np

from . import _kernels

Problem = namedtuple("Problem", "problems outer units inner group affine")


def _split(shape, axis):
    axis %= len(shape)
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def batch_norm(shape, axis=1):
    """One problem: the channels over the batch and every other axis."""
    outer, C, inner = _split(shape, axis)
    return Problem(1, outer, C, inner, 1, "unit")


def instance_norm(shape, axis=1):
    """Per sample and channel. Channels first: the samples' channels are one row of units;
    channels last: one problem per sample, its rows the channels-last kernels' rows."""
    N, spatial = shape[0], math.prod(shape[1:]) // shape[axis]
    C = shape[axis]
    if axis % len(shape) == 1:
        return Problem(1, 1, N * C, spatial, 1, "unit")
    return Problem(N, spatial, C, 1, 1, "unit")


def group_norm(shape, num_groups, axis=1):
    """Per sample and group of C / num_groups consecutive channels."""
    N, C = shape[0], shape[axis]
    spatial = math.prod(shape[1:]) // C
    if axis % len(shape) == 1:
        return Problem(1, 1, N * num_groups, (C // num_groups) * spatial, 1, "group")
    return Problem(N, spatial, C, 1, C // num_groups, "group")


def layer_norm(shape, normalized_ndim):
    """Per row of the last normalized_ndim axes (RMSNorm likewise, around zero)."""
    D = math.prod(shape[len(shape) - normalized_ndim:])
    return Problem(1, 1, math.prod(shape) // D, D, 1, "inner")


def statistics(x, problem):
    """The merged moments of each statistics unit: (P, 4, units // group) float64, the
    partial format, through the kernels' statistics and merge stages."""
    P, outer, U, inner, group = problem[:5]
    parts = _kernels.statistics_stage(np.ascontiguousarray(x), outer, U, inner, problems=P)
    merged = _kernels.merge_stage(problems_as_units(parts))           # (4, P*U)
    if group > 1:      # the channels of a group, merged in channel order
        merged = _kernels.merge_stage(np.moveaxis(merged.reshape(4, -1, group), 2, 0))
    return np.moveaxis(merged.reshape(4, P, U // group), 1, 0)


def problems_as_units(parts):
    """The (P, K, fields, U) chunk partials of P problems as (K, fields, P*U): merge_stage
    merges each unit over its chunks in order, so each problem's units merge as they would
    on their own."""
    P, K, fields, U = parts.shape
    return np.moveaxis(parts, 0, 2).reshape(K, fields, P * U)
