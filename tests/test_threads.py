"""Thread count: every result bitwise identical for 1, 2, 3 and 4 threads; the controls work."""
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import fastbn
from conftest import DTYPES, PARALLEL_CASES, make_input, make_params, plan


def run_all(x, axis, weight, bias, dy):
    C = x.shape[axis]
    rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis, running_mean=rm,
                                              running_var=rv)
    y_inf = fastbn.batch_norm_infer(x, rm, rv, weight, bias, axis=axis)
    grads = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    return (y, mean, invstd, rm, rv, y_inf) + grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", PARALLEL_CASES)
def test_bitwise_identical_for_any_thread_count(shape, axis, dtype, rng, threads):
    assert plan(shape, axis)["threads"] == fastbn.get_num_threads()  # the parallel path
    x = make_input(shape, axis, dtype, rng, offset=10.0)
    weight, bias = make_params(shape[axis], dtype, rng)
    dy = rng.standard_normal(shape).astype(dtype)
    results = {}
    for n in (1, 2, 3, 4):
        threads(n)
        assert fastbn.get_num_threads() == n
        results[n] = run_all(x, axis, weight, bias, dy)
    for n in (2, 3, 4):
        for a, b in zip(results[1], results[n]):
            assert a.tobytes() == b.tobytes(), f"{n} threads differ from 1"


def test_set_num_threads_checks_its_argument(threads):
    with pytest.raises(TypeError, match="n must be"):
        fastbn.set_num_threads(2.0)
    with pytest.raises(TypeError, match="n must be"):
        fastbn.set_num_threads(True)
    with pytest.raises(ValueError, match="n must be"):
        fastbn.set_num_threads(0)
    threads(3)
    assert fastbn.get_num_threads() == 3
    threads(None)
    assert fastbn.get_num_threads() >= 1


def _threads_in_subprocess(code, **env):
    # run outside the repository: the installed fastbn (from an unpacked sdist, the current
    # directory's fastbn/ is the source folder, without a build)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True, cwd=tempfile.gettempdir())
    return out.stdout.strip()


def test_omp_num_threads_is_honoured():
    info = _threads_in_subprocess("import fastbn; print(fastbn.get_num_threads())",
                                  OMP_NUM_THREADS="3")
    expected = "3" if fastbn._kernels.build_info()["openmp"] else "1"
    assert info == expected


def test_threadpoolctl_limits_the_pool():
    pytest.importorskip("threadpoolctl")
    if not fastbn._kernels.build_info()["openmp"]:
        pytest.skip("built without OpenMP")
    code = ("import fastbn, threadpoolctl\n"
            "with threadpoolctl.threadpool_limits(1):\n"
            "    print(fastbn.get_num_threads())")
    assert _threads_in_subprocess(code, OMP_NUM_THREADS="4") == "1"


def test_concurrent_python_threads_share_the_pool(rng):
    """8 Python threads at once on different arrays: the results of serial calls, bit for bit,
    and fastbn never adds more than get_num_threads() - 1 OpenMP workers to the callers'
    own threads (no user threads x OpenMP threads oversubscription)."""
    from concurrent.futures import ThreadPoolExecutor

    cases = []
    for i in range(8):
        shape, axis = ((4, 16, 48, 48), 1) if i % 2 else ((4, 48, 48, 16), -1)
        x = make_input(shape, axis, np.float32 if i % 4 < 2 else np.float64, rng, offset=i)
        weight, bias = make_params(shape[axis], x.dtype, rng)
        cases.append((x, axis, weight, bias, rng.standard_normal(shape).astype(x.dtype)))
    expected = [run_all(*c) for c in cases]
    fastbn._threads.peak_workers(reset=True)
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            results = list(pool.map(lambda c: run_all(*c), cases))
            for got, want in zip(results, expected):
                for a, b in zip(got, want):
                    assert a.tobytes() == b.tobytes()
    assert fastbn._threads.peak_workers() <= fastbn.get_num_threads() - 1
