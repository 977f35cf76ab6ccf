"""Thread count: every result bitwise identical for 1, 2, 3 and 4 threads; the controls work."""
import contextlib
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


# ------------------------------------------------------------------------- the thread pool

POOL = fastbn._kernels.build_info()["openmp"] and os.name == "posix"
pool_only = pytest.mark.skipif(not POOL, reason="this build runs every call on its caller")


@pool_only
def test_channels_last_statistics_have_their_own_serial_threshold(rng, threads):
    """Between the two thresholds (24K values), channels-last training and backward run on
    their caller alone (their per-thread partial sums cost more than half the rows save),
    channels-first ones take a worker; plan() reports what the calls do."""
    from fastbn import _plan
    below = _plan.SERIAL_THRESHOLDS
    assert below["train"] < 24576 < below["channels-last train/backward"]
    threads(2)
    for shape, axis, workers in (((1, 512, 48), -1, 0), ((1, 512, 48), 1, 1)):
        x = make_input(shape, axis, np.float32, rng, offset=1.0)
        weight, bias = make_params(shape[axis], x.dtype, rng)
        fastbn._threads.peak_workers(reset=True)
        y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis)
        fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd, weight, axis=axis)
        assert fastbn._threads.peak_workers() == workers, (shape, axis)
        assert plan(shape, axis)["threads"] == workers + 1


def one_thread_inputs(shape, axis, rng):
    """(x, axis, weight, bias, dy) for run_all: data 5 from zero."""
    x = make_input(shape, axis, np.float32, rng, offset=5.0)
    weight, bias = make_params(shape[axis], x.dtype, rng)
    return x, axis, weight, bias, rng.standard_normal(shape).astype(x.dtype)


def train_until(x, field, seconds=20):
    """batch_norm_train(x) until pool_info()[field] is nonzero after a call, for at most
    `seconds` (a busy machine may keep the workers away from any one call): its last value."""
    import time
    deadline = time.monotonic() + seconds
    while True:
        fastbn.batch_norm_train(x)
        value = fastbn._kernels.pool_info()[field]
        if value or time.monotonic() >= deadline:
            return value


@contextlib.contextmanager
def pool_without_backoff(spin_ns):
    """The pool never backs off, and idle workers poll spin_ns before they sleep (-1: never),
    whatever OMP_WAIT_POLICY says. The workers exist (a call large enough to wake them
    starts them)."""
    from fastbn import _plan
    fastbn._kernels._set_pool_backoff(False)
    fastbn._kernels._set_pool_spin(spin_ns)
    try:
        fastbn.batch_norm_train(np.ones((_plan.WAKE_THRESHOLDS["train/backward"], 1),
                                        np.float32), axis=-1)
        assert fastbn._kernels.pool_info()["workers"] >= 1
        yield
    finally:
        fastbn._kernels._set_pool_spin()
        fastbn._kernels._set_pool_backoff(True)


def assert_same_bits_as_one_thread(args, threads, n, run):
    """run() on n threads returns run_all(*args)'s bits on one."""
    threads(1)
    expected = run_all(*args)
    threads(n)
    for a, b in zip(run(), expected):
        assert a.tobytes() == b.tobytes()


@pool_only
@pytest.mark.parametrize("shape,axis", [((16, 64, 48, 48), 1), ((4096, 96), 1),
                                        ((16, 48, 48, 64), -1)])
def test_caller_finishes_alone_when_no_worker_comes(shape, axis, rng, threads):
    """Workers the OS never schedules: the caller takes every item itself, waits for none
    of them, and returns the same bits."""
    def away():
        fastbn._kernels._set_workers_away(True)
        try:
            got = run_all(*args)
            assert fastbn._kernels.pool_info()["last_helpers"] == 0
        finally:
            fastbn._kernels._set_workers_away(False)
        return got
    args = one_thread_inputs(shape, axis, rng)
    assert_same_bits_as_one_thread(args, threads, 4, away)


@pool_only
def test_workers_take_part(rng, threads):
    """Some call of many has a worker run part of it. A busy machine may keep the workers away
    from any one call, and then stops waking workers for a while: that is allowed, and
    not what this checks, so the back-off is off and the workers never sleep here."""
    threads(2)
    x = rng.standard_normal((32, 64, 32, 32)).astype(np.float32)
    with pool_without_backoff(spin_ns=-1):
        helped = train_until(x, "last_helpers")
    assert helped >= 1
    assert fastbn._kernels.pool_info()["workers"] >= 1


def test_back_off_grows_through_an_episode_of_late_jobs():
    """Late jobs with on-time ones between them (a busy machine) double the back-off each
    time; four on-time jobs in a row end the episode, and the next late job waits 2 ms again.
    (Pure arithmetic: no threads.)"""
    ms = 1_000_000
    late, on_time = True, False
    waits = fastbn._kernels._backoff_waits([late, on_time, late, on_time, on_time, late])
    assert waits == [2 * ms, 0, 4 * ms, 0, 0, 8 * ms]
    waits = fastbn._kernels._backoff_waits([late] + [on_time] * 4 + [late])
    assert waits == [2 * ms] + [0] * 4 + [2 * ms]
    waits = fastbn._kernels._backoff_waits([late] * 10)
    assert waits[:6] == [2 * ms, 4 * ms, 8 * ms, 16 * ms, 32 * ms, 64 * ms]
    assert waits[6:] == [100 * ms] * 4                   # at most 0.1 s


@pool_only
@pytest.mark.parametrize("shape,axis", [((16, 64, 48, 48), 1), ((4096, 96), 1),
                                        ((16, 48, 48, 64), -1), ((8, 32, 16, 16), 1)])
def test_calls_in_openmp_regions_give_the_same_bits(shape, axis, rng, threads):
    """Next to another library's spinning OpenMP workers, calls run in OpenMP regions: the
    same items, the same bits."""
    def in_regions():
        fastbn._kernels._set_openmp_for(60)
        try:
            assert fastbn._kernels.pool_info()["openmp_for_s"] > 0
            return run_all(*args)
        finally:
            fastbn._kernels._set_openmp_for(0)
    args = one_thread_inputs(shape, axis, rng)
    assert_same_bits_as_one_thread(args, threads, 2, in_regions)


@pool_only
def test_another_threads_work_is_seen_and_the_pools_own_is_not(rng, threads):
    """A thread of this process running C code (NumPy, without the GIL) is what a slow call
    is blamed on before the machine; the pool's own workers, polling, are not."""
    import threading
    import time
    threads(2)
    fastbn._kernels._set_pool_spin(-1)          # the workers poll: runnable, and not others
    try:
        fastbn.batch_norm_train(rng.standard_normal((64, 64, 64)).astype(np.float32))
        quiet = [fastbn._kernels._others_running() for _ in range(20) if not time.sleep(0.01)]
        stop = threading.Event()
        a = np.ones(1 << 22)

        def numpy_work():
            out = np.empty_like(a)
            while not stop.is_set():
                np.multiply(a, 1.5, out=out)
        worker = threading.Thread(target=numpy_work)
        worker.start()
        try:
            busy = [fastbn._kernels._others_running() for _ in range(200)
                    if not time.sleep(0.005)]
        finally:
            stop.set()
            worker.join()
    finally:
        fastbn._kernels._set_pool_spin()
    assert not all(quiet)
    assert any(busy)


@pool_only
def test_small_calls_back_to_back_wake_the_workers(rng, threads):
    """Calls too short to wait for a sleeping worker, in a loop: they run on the caller and
    wake the workers for the next ones (which then take part where the OS runs them in time:
    not asserted, a busy machine may not)."""
    import time
    threads(2)
    x = rng.standard_normal((8, 32, 16, 16)).astype(np.float32)
    # 2 ms, not the default 50 us: calls count as back to back within the spin time, and one
    # loop round takes longer than 50 us under emulation (qemu)
    with pool_without_backoff(spin_ns=2_000_000):
        time.sleep(0.05)                            # and fall asleep
        assert fastbn._kernels.pool_info()["awake"] == 0
        awake = train_until(x, "awake")
    assert awake >= 1


@pool_only
def test_calls_after_a_pause_wake_no_worker_below_wake_from(rng, threads):
    """A 196K-value training call (between WAKE_IN_LOOPS_FROM and WAKE_FROM_STATS) after a
    pause runs on its caller: waking a worker would cost more than it saves. In a loop of
    such calls, the workers are woken and take part."""
    import time
    from fastbn import _plan
    threads(2)
    x = rng.standard_normal((192, 1024)).astype(np.float32)
    wake = _plan.WAKE_THRESHOLDS
    assert wake["in loops"] <= x.size < wake["train/backward"]
    with pool_without_backoff(spin_ns=2_000_000):   # back to back: within 2 ms (qemu)
        for _ in range(3):
            time.sleep(0.05)                        # a pause: the workers fall asleep
            assert fastbn._kernels.pool_info()["awake"] == 0
            fastbn.batch_norm_train(x)
            assert fastbn._kernels.pool_info()["last_helpers"] == 0
        helped = train_until(x, "last_helpers")
    assert helped >= 1


# ------------------------------------------------------------- CPUs: affinity and cgroups

def _write(root, relative, text):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_own_cgroup_and_its_ancestors(tmp_path):
    from fastbn._cpus import cgroup_cpu_quota
    _write(tmp_path, "proc/self/cgroup", "0::/user.slice/app.scope\n")
    _write(tmp_path, "cg/user.slice/app.scope/cpu.max", "150000 100000\n")
    _write(tmp_path, "cg/user.slice/cpu.max", "max 100000\n")
    self_cgroup = str(tmp_path / "proc/self/cgroup")
    assert cgroup_cpu_quota(str(tmp_path / "cg"), self_cgroup) == 1.5
    _write(tmp_path, "cg/user.slice/cpu.max", "100000 100000\n")   # a parent's limit holds
    assert cgroup_cpu_quota(str(tmp_path / "cg"), self_cgroup) == 1.0
    _write(tmp_path, "cg/user.slice/cpu.max", "max 100000\n")
    _write(tmp_path, "cg/user.slice/app.scope/cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(str(tmp_path / "cg"), self_cgroup) is None


def test_cgroup_v2_inside_a_container_reads_the_root(tmp_path):
    """In a cgroup namespace the process's cgroup is "/", the mount's root its own."""
    from fastbn._cpus import cgroup_cpu_quota
    _write(tmp_path, "proc/self/cgroup", "0::/\n")
    _write(tmp_path, "cg/cpu.max", "200000 100000\n")
    assert cgroup_cpu_quota(str(tmp_path / "cg"), str(tmp_path / "proc/self/cgroup")) == 2.0


def test_cgroup_v1_cfs_quota(tmp_path):
    from fastbn._cpus import cgroup_cpu_quota
    _write(tmp_path, "proc/self/cgroup",
           "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n")
    _write(tmp_path, "cg/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "250000\n")
    _write(tmp_path, "cg/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    self_cgroup = str(tmp_path / "proc/self/cgroup")
    assert cgroup_cpu_quota(str(tmp_path / "cg"), self_cgroup) == 2.5
    _write(tmp_path, "cg/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_quota(str(tmp_path / "cg"), self_cgroup) is None


def test_no_cgroups_and_unreadable_files_mean_no_quota(tmp_path):
    from fastbn._cpus import cgroup_cpu_quota
    assert cgroup_cpu_quota(str(tmp_path / "cg"), str(tmp_path / "missing")) is None
    _write(tmp_path, "proc/self/cgroup", "0::/a\n")
    _write(tmp_path, "cg/a/cpu.max", "garbage\n")
    assert cgroup_cpu_quota(str(tmp_path / "cg"), str(tmp_path / "proc/self/cgroup")) is None


def test_the_default_is_capped_by_the_quota_rounded_up(monkeypatch, threads):
    """The smallest of OpenMP's count, the affinity mask and the quota, and info says which."""
    from fastbn import _cpus, _threads
    if not fastbn._kernels.build_info()["openmp"] or "OMP_NUM_THREADS" in os.environ:
        pytest.skip("needs OpenMP's own default")
    threads(None)
    monkeypatch.setattr(_cpus, "cgroup_cpu_quota", lambda *a: 0.5)
    _threads._find_usable_cpus()
    try:
        assert fastbn.get_num_threads() == 1
        assert "cgroup CPU quota (0.5 CPUs)" in _threads.threads_source()
        fastbn.set_num_threads(3)                  # set_num_threads keeps priority
        assert fastbn.get_num_threads() == 3
        assert _threads.threads_source() == "fastbn.set_num_threads"
    finally:
        fastbn.set_num_threads(None)
        monkeypatch.undo()
        _threads._find_usable_cpus()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity masks here")
def test_a_restricted_affinity_mask_caps_the_default():
    code = ("import os, fastbn\n"
            "from fastbn import _threads\n"
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "_threads._find_usable_cpus()\n"
            "print(fastbn.get_num_threads(), _threads.threads_source())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, cwd=tempfile.gettempdir()).stdout
    assert out.startswith("1 ")
    if fastbn._kernels.build_info()["openmp"] and len(os.sched_getaffinity(0)) > 1:
        assert "affinity mask (1 CPUs)" in out


def test_omp_num_threads_keeps_priority_over_the_cpus_found():
    code = ("import fastbn\n"
            "from fastbn import _cpus, _threads\n"
            "_cpus.cgroup_cpu_quota = lambda *a: 1.0\n"
            "_threads._find_usable_cpus()\n"
            "print(fastbn.get_num_threads(), _threads.threads_source())")
    out = _threads_in_subprocess(code, OMP_NUM_THREADS="3")
    if fastbn._kernels.build_info()["openmp"]:
        assert out == "3 OMP_NUM_THREADS=3"


def test_omp_wait_policy_is_honoured(monkeypatch):
    """OMP_WAIT_POLICY, where the user set it, decides how the pool's idle workers wait."""
    from fastbn import _kernels
    for policy, spin in (("PASSIVE", 0), ("active", -1), ("", 50000)):
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
        assert _kernels._default_spin_ns() == spin
