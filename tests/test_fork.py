"""After fork: a child's fastbn calls finish with the parent's bits and use threads, whatever
ran before.

The parent's workers do not exist in a child (fork copies only the calling thread): the pool
starts again there (include/fastbn/pool.h). Each scenario runs in a fresh interpreter with a
time limit, so a hang fails instead of blocking."""
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap

import pytest

import fastbn

SERIAL_BUILD = not fastbn._kernels.build_info()["openmp"]
pytestmark = pytest.mark.skipif("fork" not in mp.get_all_start_methods(),
                                reason="no fork start method on this platform")

SCENARIO = textwrap.dedent("""
    import multiprocessing as mp, sys
    import numpy as np
    import fastbn

    def run_all():
        rng = np.random.default_rng(0)
        out = []
        for shape, axis in (((32, 64, 28, 28), 1), ((4096, 256), 1), ((8, 28, 28, 64), -1)):
            x = (rng.standard_normal(shape) + 3.0).astype(np.float32)
            dy = rng.standard_normal(shape).astype(np.float32)
            C = shape[axis]
            rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
            y, mean, invstd = fastbn.batch_norm_train(x, axis=axis, running_mean=rm,
                                                      running_var=rv)
            out += [y, mean, invstd, rm, rv, fastbn.batch_norm_infer(x, rm, rv, axis=axis)]
            out += list(fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis))
        return b"".join(a.tobytes() for a in out)

    def child(conn, depth, child_threads):
        if child_threads:
            fastbn.set_num_threads(child_threads)
        result = run_all()
        report = [result == expected, fastbn.get_num_threads(),
                  fastbn._kernels.pool_info()["workers"], fastbn._threads.peak_workers(),
                  fastbn._kernels.pool_info()["openmp_for_s"]]
        if depth > 1:                                   # a child of the child
            inner, outer = mp.get_context("fork").Pipe()
            p = mp.get_context("fork").Process(target=child, args=(outer, depth - 1, 0))
            p.start()
            report.append(inner.recv())
            p.join()
        conn.send(report)

    parent_threads, child_threads, depth, openmp = map(int, sys.argv[1:5])
    fastbn.set_num_threads(parent_threads)
    if openmp:      # the parent's calls run in OpenMP regions, as next to PyTorch's workers
        fastbn._kernels._set_openmp_for(600)
    expected = run_all()
    fastbn._threads.peak_workers(reset=True)
    inner, outer = mp.get_context("fork").Pipe()
    p = mp.get_context("fork").Process(target=child, args=(outer, depth, child_threads))
    p.start()
    print(inner.recv())
    p.join()
""")


def scenario(parent_threads, child_threads=0, depth=1, openmp=0):
    """The child's report: [same bits, its threads, its pool's workers, its peak reserved
    workers, its seconds of calls in OpenMP regions left, (the grandchild's report)]."""
    try:
        out = subprocess.run([sys.executable, "-c", SCENARIO, str(parent_threads),
                              str(child_threads), str(depth), str(openmp)],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "OMP_NUM_THREADS": "2"})
    except subprocess.TimeoutExpired:
        pytest.fail("a forked child's fastbn call hung")
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip())


@pytest.mark.parametrize("parent_threads", [1, 2])
def test_child_uses_threads_with_the_same_bits(parent_threads):
    same, threads, workers, peak, _ = scenario(parent_threads=parent_threads, child_threads=2)
    assert same
    assert threads == 2 and peak == 1
    assert workers == (0 if SERIAL_BUILD else 1)   # started afresh in the child


def test_child_of_a_child_after_a_parallel_parent():
    report = scenario(parent_threads=2, child_threads=2, depth=2)
    assert report[0]
    grandchild = report[5]
    assert grandchild[0]
    assert grandchild[1] == 2
    assert grandchild[2] == (0 if SERIAL_BUILD else 1)


def test_child_after_a_parallel_parent_follows_omp_num_threads():
    same, threads, workers, peak, _ = scenario(parent_threads=2)
    assert same
    assert threads == (1 if SERIAL_BUILD else 2)


def test_child_of_a_parent_whose_calls_ran_in_openmp_regions():
    """GNU libgomp's threads do not survive fork: a child never runs a call in an OpenMP
    region (it would hang), whatever the parent did; its pool runs them."""
    same, threads, workers, peak, openmp_for_s = scenario(parent_threads=2, child_threads=2,
                                                          openmp=1)
    assert same
    assert openmp_for_s == 0
    assert workers == (0 if SERIAL_BUILD else 1)
