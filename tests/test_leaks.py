"""Resident memory does not grow over 1e5 calls of every entry point, error paths included."""
import gc
import os
import sys

import numpy as np
import pytest

import fastbn

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm"),
    pytest.mark.skipif(bool(os.environ.get("FASTBN_SANITIZED")),
                       reason="AddressSanitizer keeps freed memory in quarantine"),
]


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def calls():
    """One call of each kind: fast path, full path, out=, both layouts, errors."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    x_strided = rng.standard_normal((2, 3, 4, 8))[..., ::2]
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = np.empty_like(x)
    _, mean, invstd = fastbn.batch_norm_train(x)

    def expect_error(f):
        try:
            f()
        except (TypeError, ValueError):
            return
        raise AssertionError("no error")

    return [
        lambda: fastbn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv),
        lambda: fastbn.batch_norm_train(x_nhwc, w, b, axis=-1, out=np.empty_like(x_nhwc)),
        lambda: fastbn.batch_norm_train(x_strided, w.tolist()),
        lambda: fastbn.batch_norm_infer(x, rm, rv, w, b, out=out),
        lambda: fastbn.batch_norm_infer(x_strided, rm, rv),
        lambda: fastbn.batch_norm_backward(x, x, mean, invstd, w),
        lambda: fastbn.batch_norm_backward(x_strided.astype(np.float32), x_strided.astype(np.float32), mean, invstd),
        lambda: fastbn.batch_norm(x, rm, rv, w, b, training=False),
        lambda: (fastbn.set_num_threads(2), fastbn.get_num_threads(), fastbn.set_num_threads(None)),
        lambda: expect_error(lambda: fastbn.batch_norm_train(x, np.ones(4))),
        lambda: expect_error(lambda: fastbn.batch_norm_infer(x, rm, -rv)),
        lambda: expect_error(lambda: fastbn.batch_norm_backward(x[:1], x, mean, invstd)),
        lambda: expect_error(lambda: fastbn.batch_norm_train(x.astype(np.int32))),
        lambda: expect_error(lambda: fastbn.batch_norm_train(x, eps=-1.0)),
    ]


def test_no_growth_over_many_calls():
    fns = calls()
    for _ in range(10_000):                       # warm-up: caches, allocator pools
        for f in fns:
            f()
    gc.collect()
    before = resident_bytes()
    for _ in range(100_000):
        for f in fns:
            f()
    gc.collect()
    grown = resident_bytes() - before
    # 1.4 million calls: a leak of even 2 bytes per call would show
    assert grown < 2 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB"
