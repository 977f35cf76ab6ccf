"""The stages one at a time: the staged path gives the fast path's bits, partials merge in any
grouping, gradient sums merge across shifts, and fastbn.moments is the public face."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fastbn
from fastbn import _kernels, reference
from conftest import (DTYPES, PARALLEL_CASES, SMALL_CASES, TOL_STAT, assert_rel, canonical,
                      make_input, make_params)

CASES = SMALL_CASES[:6] + PARALLEL_CASES[:5]


def contiguous_case(shape, axis, dtype, rng):
    """x (and dy) as C-contiguous (outer, C, inner) arrays, as the stages take them."""
    outer, C, inner = canonical(shape, axis)
    x = make_input(shape, axis, dtype, rng, offset=30.0).reshape(outer, C, inner)
    dy = (rng.standard_normal(x.shape) + 2).astype(dtype)
    return x, dy, outer, C, inner


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_staged_forward_has_the_fast_paths_bits(shape, axis, dtype, rng):
    x, _, outer, C, inner = contiguous_case(shape, axis, dtype, rng)
    weight, bias = make_params(C, dtype, rng)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, running_mean=rm,
                                              running_var=rv)

    merged = _kernels.merge_stage(_kernels.statistics_stage(x, outer, C, inner))
    rm2, rv2 = np.zeros(C, dtype), np.ones(C, dtype)
    mean2, invstd2 = np.empty(C, dtype), np.empty(C, dtype)
    coef = _kernels.finish_train_stage(merged, x, weight, bias, 1e-5, rm2, rv2, 0.1, mean2,
                                       invstd2)
    y2 = np.empty_like(x)
    _kernels.normalize_stage(x, y2, outer, C, inner, coef)
    for a, b in ((y, y2), (mean, mean2), (invstd, invstd2), (rm, rm2), (rv, rv2)):
        assert a.tobytes() == b.tobytes()
    assert merged.tobytes() == fastbn.moments(x).data.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_staged_backward_has_the_fast_paths_bits(shape, axis, dtype, rng):
    x, dy, outer, C, inner = contiguous_case(shape, axis, dtype, rng)
    weight, bias = make_params(C, dtype, rng)
    _, mean, invstd = fastbn.batch_norm_train(x, weight, bias)
    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight)

    shift = _kernels.grad_shifts_stage(dy, C, inner, mean)
    parts = _kernels.grad_sums_stage(dy, x, outer, C, inner, mean, shift)
    merged = _kernels.merge_stage(parts)
    dweight2, dbias2 = np.empty(C, dtype), np.empty(C, dtype)
    coef = _kernels.finish_grad_stage(merged, x, invstd, weight, dweight2, dbias2)
    dx2 = np.empty_like(x)
    _kernels.grad_input_stage(dy, x, dx2, outer, C, inner, coef)
    for a, b in ((dx, dx2), (dweight, dweight2), (dbias, dbias2)):
        assert a.tobytes() == b.tobytes()


def test_moments_is_the_training_statistics():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((16, 5, 9, 7)) * 3 + 1e4).astype(np.float32)
    m = fastbn.moments(x)
    s = m.finish(eps=1e-5)
    ref_mean = x.astype(np.longdouble).mean(axis=(0, 2, 3))
    ref_var = x.astype(np.longdouble).var(axis=(0, 2, 3))
    assert_rel(s.mean, ref_mean, 1e-15, "mean")
    assert_rel(s.var, ref_var, 1e-12, "var")
    assert_rel(s.var_unbiased, ref_var * x.size / 5 / (x.size / 5 - 1), 1e-12, "var_unbiased")
    np.testing.assert_array_equal(m.count, np.full(5, x.size // 5))
    _, mean, invstd = fastbn.batch_norm_train(x)
    np.testing.assert_array_equal(mean, s.mean.astype(np.float32))
    np.testing.assert_array_equal(invstd, s.invstd.astype(np.float32))


@pytest.mark.parametrize("axis", [1, -1])
def test_moments_takes_any_layout(axis):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 6, 5, 3))
    moved = np.moveaxis(x, axis, 1)
    expected = reference.batch_norm_train(np.ascontiguousarray(moved))[1]
    strided = np.asfortranarray(x)[:, ::1]
    assert_rel(fastbn.moments(strided, axis=axis).mean, expected, 1e-13, "mean")


def split_points(draw, n):
    cuts = draw(st.lists(st.integers(1, max(1, n - 1)), max_size=4, unique=True))
    return sorted(c for c in cuts if 0 < c < n)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(DTYPES), layout=st.sampled_from([1, -1]),
       offset=st.sampled_from([0.0, 1e3, 1e6]))
def test_merging_in_any_grouping_equals_one_call(data, dtype, layout, offset):
    """Moments of batch slices, merged left to right or as a tree, give the statistics of the
    whole batch to a few ulp of float64 (float32 results: to their last bit or one)."""
    n = data.draw(st.integers(2, 40))
    shape = (n, 3, 4, 5) if layout == 1 else (n, 4, 5, 3)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = make_input(shape, layout, dtype, rng, offset=offset)
    cuts = split_points(data.draw, n)
    pieces = [fastbn.moments(p, axis=layout) for p in np.split(x, cuts) if len(p)]
    whole = fastbn.moments(x, axis=layout).finish()
    sequential = fastbn.merge_moments(pieces).finish()
    tree = pieces
    while len(tree) > 1:
        tree = [tree[i].merge(tree[i + 1]) if i + 1 < len(tree) else tree[i]
                for i in range(0, len(tree), 2)]
    eps = np.finfo(np.float64).eps
    for merged in (sequential, tree[0].finish()):
        # a merged mean's error scales with the values' spread, not with the mean itself
        # (which may be near zero): 64 ulp of |mean| + std
        scale = np.abs(whole.mean) + np.sqrt(whole.var)
        assert (np.abs(merged.mean - whole.mean) <= 64 * eps * scale).all(), "mean"
        assert_rel(merged.var, whole.var, 64 * eps, "var")
        # rounded to the data's type, the merged statistics are the one call's to 1 ulp
        if dtype == np.float32:
            for a, b in ((merged.mean, whole.mean), (merged.var, whole.var)):
                ulps = np.abs(a.astype(dtype).view(np.int32) - b.astype(dtype).view(np.int32))
                assert ulps.max() <= 1


def test_merge_with_empty_and_single_parts():
    x = np.arange(12.0).reshape(4, 3)
    empty = fastbn.moments(x[:0])
    one = fastbn.moments(x[:1])
    rest = fastbn.moments(x[1:])
    merged = fastbn.merge_moments([empty, one, empty, rest])
    assert merged.data.tobytes() == fastbn.merge_moments([one, rest]).data.tobytes()
    assert_rel(merged.finish().var, x.var(axis=0), 1e-15, "var")
    assert np.isnan(empty.finish().mean).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_sums_merge_across_shifts(dtype):
    """Two processes' sums around their own dy shifts (and another x shift) merge into the
    sums of the whole: what synchronized batch norm needs."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((12, 4, 9)) + 50).astype(dtype)
    dy = (rng.standard_normal((12, 4, 9)) - 7).astype(dtype)
    weight, _ = make_params(4, dtype, rng)
    _, mean, invstd = fastbn.batch_norm_train(x, weight)
    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight)

    parts = []
    for half in (slice(0, 5), slice(5, 12)):
        xs, dys = np.ascontiguousarray(x[half]), np.ascontiguousarray(dy[half])
        shift = _kernels.grad_shifts_stage(dys, 4, 9, mean)
        x_shift = (mean + dtype(0.25)).astype(dtype) if half.start else mean
        sums = _kernels.grad_sums_stage(dys, xs, len(xs), 4, 9, x_shift, shift)
        parts.append(_kernels.merge_stage(sums))
    merged = _kernels.merge_stage(np.stack(parts))
    dweight2, dbias2 = np.empty(4, dtype), np.empty(4, dtype)
    coef = _kernels.finish_grad_stage(merged, x, invstd, weight, dweight2, dbias2)
    dx2 = np.empty_like(x)
    _kernels.grad_input_stage(dy, x, dx2, 12, 4, 9, coef)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(dweight2, dweight, rtol=tol, atol=tol)
    np.testing.assert_allclose(dbias2, dbias, rtol=tol, atol=tol * abs(dbias).max())
    np.testing.assert_allclose(dx2, dx, rtol=tol, atol=tol)


def test_moments_checks_its_arguments():
    with pytest.raises(TypeError, match="x must"):
        fastbn.moments("no")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fastbn.moments(np.zeros(3))
    with pytest.raises(ValueError, match="same channels"):
        fastbn.merge_moments([fastbn.moments(np.ones((2, 3))), fastbn.moments(np.ones((2, 4)))])
    with pytest.raises(ValueError, match="at least one"):
        fastbn.merge_moments([])
    with pytest.raises(ValueError, match="shape \\(4, C\\)"):
        fastbn.Moments(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="eps must be"):
        fastbn.moments(np.ones((2, 3))).finish(eps=-1.0)


@pytest.mark.parametrize("shape,axis", PARALLEL_CASES[:4])
def test_stages_give_the_same_bits_on_any_thread_count(shape, axis, threads, rng):
    """The passes over the data (statistics, apply, gradient sums, dx) split as the ops do."""
    x, dy, outer, C, inner = contiguous_case(shape, axis, np.float32, rng)
    _, mean, invstd = fastbn.batch_norm_train(x)
    results = []
    for n in (1, 2, 3):
        threads(n)
        merged = _kernels.merge_stage(_kernels.statistics_stage(x, outer, C, inner))
        coef = _kernels.finish_train_stage(merged, x, None, None, 1e-5, None, None, 0.1,
                                           np.empty(C, np.float32), np.empty(C, np.float32))
        y = np.empty_like(x)
        _kernels.normalize_stage(x, y, outer, C, inner, coef)
        shift = _kernels.grad_shifts_stage(dy, C, inner, mean)
        sums = _kernels.merge_stage(_kernels.grad_sums_stage(dy, x, outer, C, inner, mean, shift))
        grad_coef = _kernels.finish_grad_stage(sums, x, invstd, None, np.empty(C, np.float32),
                                               np.empty(C, np.float32))
        dx = np.empty_like(x)
        _kernels.grad_input_stage(dy, x, dx, outer, C, inner, grad_coef)
        results.append(b"".join(a.tobytes() for a in (merged, y, sums, dx)))
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,outer,C,inner", [(3, 100, 8, 1), (4, 3136, 64, 1), (2, 5000, 3, 1),
                                             (3, 2, 3, 5000)])
def test_problems_give_each_problems_own_calls_bits(P, outer, C, inner, dtype, threads, rng):
    """problems=P runs P problems in one job; for problems this small its plan is each one's
    own (chunks, rows per step, no streaming), so each problem's results are its own call's
    bits, on any thread count, with the fused activation and residual."""
    shape = (P, outer, C, inner)
    x = (rng.standard_normal(shape) + 3).astype(dtype)
    dy, residual, y_fused = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    coef, grad_coef = (rng.standard_normal((P, n, C)).astype(dtype) for n in (3, 5))
    mean, shift = (rng.standard_normal((P, C)).astype(dtype) for _ in range(2))
    for n in (1, 2):
        threads(n)
        parts = _kernels.statistics_stage(x, outer, C, inner, problems=P)
        assert parts.tobytes() == np.stack(
            [_kernels.statistics_stage(x[p], outer, C, inner) for p in range(P)]).tobytes()
        y, y_own = np.empty_like(x), np.empty_like(x)
        _kernels.normalize_stage(x, y, outer, C, inner, coef, residual, 2, 0.1, problems=P)
        for p in range(P):
            _kernels.normalize_stage(x[p], y_own[p], outer, C, inner, coef[p], residual[p], 2,
                                     0.1)
        assert y.tobytes() == y_own.tobytes()
        g, g_own = np.empty_like(x), np.empty_like(x)
        sums = _kernels.grad_sums_stage(dy, x, outer, C, inner, mean, shift, y_fused, g, 2, 0.1,
                                        problems=P)
        sums_own = [_kernels.grad_sums_stage(dy[p], x[p], outer, C, inner, mean[p], shift[p],
                                             y_fused[p], g_own[p], 2, 0.1) for p in range(P)]
        assert sums.tobytes() == np.stack(sums_own).tobytes()
        assert g.tobytes() == g_own.tobytes()
        _kernels.grad_input_stage(g, x, y, outer, C, inner, grad_coef, problems=P)
        for p in range(P):
            _kernels.grad_input_stage(g_own[p], x[p], y_own[p], outer, C, inner, grad_coef[p])
        assert y.tobytes() == y_own.tobytes()


@pytest.mark.parametrize("P,outer,C,inner", [(24, 4096, 16, 1), (20, 1, 2, 65536)])
def test_problems_planned_together_give_the_same_bits_on_any_thread_count(P, outer, C, inner,
                                                                         threads, rng):
    """Many problems take fewer chunks each than their own calls (make_problems_plan): still
    the same bits on any thread count, and each problem's moments are its own."""
    x = (rng.standard_normal((P, outer, C, inner)) * 2 + 50).astype(np.float32)
    results = []
    for n in (1, 2, 3):
        threads(n)
        parts = _kernels.statistics_stage(x, outer, C, inner, problems=P)
        results.append(parts.tobytes())
    assert results[0] == results[1] == results[2]
    assert parts.shape[1] < _kernels.plan(outer, C, inner)["nchunks"]     # planned together
    merged = np.stack([_kernels.merge_stage(part) for part in parts])     # (P, 4, C)
    count, shift, dev_sum, m2 = np.moveaxis(merged, 1, 0)
    xd = x.astype(np.float64)
    np.testing.assert_allclose(shift + dev_sum / count, xd.mean(axis=(1, 3)), rtol=1e-12)
    np.testing.assert_allclose(m2 / count, xd.var(axis=(1, 3)), rtol=1e-9)
