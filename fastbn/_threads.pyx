# cython: language_level=3
"""Threads: how many threads a call may use, shared between calls.

A call below its op's work threshold (fastbn._plan) runs on its caller's thread alone; a
larger one reserves up to get_num_threads() threads: its caller and workers of fastbn's pool
(include/fastbn/pool.h, which also starts again after fork). The counters change with the
GIL held. Results never depend on the thread count (the work split depends on the shape
only), so fewer threads change nothing but time.
"""
import os

from fastbn import _cpus

cdef extern from "fastbn/platform.h" nogil:
    int fbn_max_threads()

cdef int _requested_threads = 0   # 0: the default

# The default: OpenMP's thread count where the user set it (OMP_NUM_THREADS, or threadpoolctl
# and omp_set_num_threads since fastbn was imported), else the smallest of OpenMP's count, the
# affinity mask and the cgroup CPU quota (fastbn/_cpus.py).
cdef int _openmp_at_import = fbn_max_threads()
cdef bint _openmp_env = "OMP_NUM_THREADS" in os.environ
cdef int _usable_cpus = 1 << 16
_limits = []


def _find_usable_cpus():
    global _usable_cpus, _limits
    _limits = _cpus.usable_cpus()
    _usable_cpus = min(n for n, _ in _limits)


_find_usable_cpus()

# Calls from several Python threads share one pool of get_num_threads() threads: a call
# runs on its caller's thread plus as many workers as the pool has free, so however many user
# threads call at once, fastbn adds at most get_num_threads() - 1 workers (it never
# multiplies user threads by fastbn's threads).
cdef int _busy_threads = 0          # callers and workers of the calls running now
cdef int _workers = 0               # workers among them
cdef int _peak_workers = 0


def set_num_threads(n):
    """Use n threads in every fastbn call from now on, in every Python thread.

    ``None`` returns to the default: OMP_NUM_THREADS or threadpoolctl's limit where the user
    set one, else the CPUs this process may use (its affinity mask and cgroup CPU quota, and
    no more than OpenMP's count).
    """
    global _requested_threads
    if n is None:
        _requested_threads = 0
        return
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be a positive int or None, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be a positive int or None, got {n}")
    _requested_threads = min(n, 1 << 16)


def get_num_threads():
    """The number of threads a large enough fastbn call uses."""
    return pool_threads()


cdef int pool_threads() noexcept:
    if _requested_threads > 0:
        return _requested_threads
    cdef int openmp = fbn_max_threads()
    if _openmp_env or openmp != _openmp_at_import:
        return openmp
    return min(openmp, _usable_cpus)


def threads_source():
    """Where get_num_threads()'s number comes from, in words."""
    cdef int openmp = fbn_max_threads()
    if _requested_threads > 0:
        return "fastbn.set_num_threads"
    if _openmp_env:
        return f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}"
    if openmp != _openmp_at_import:
        return "OpenMP's setting, changed since import (threadpoolctl or omp_set_num_threads)"
    n = pool_threads()
    found = [what for count, what in [(openmp, f"OpenMP's count ({openmp})")] + _limits
             if count == n]
    return " = ".join(found)


cdef int threads_for(Py_ssize_t size, Py_ssize_t serial_below) noexcept:
    return 1 if size < serial_below else pool_threads()


cdef int reserve_threads(Py_ssize_t size, Py_ssize_t serial_below) noexcept:
    """Threads for a call of size values (1 below serial_below), out of those free now."""
    global _busy_threads, _workers, _peak_workers
    cdef int n = max(1, min(threads_for(size, serial_below), pool_threads() - _busy_threads))
    _busy_threads += n
    _workers += n - 1
    _peak_workers = max(_peak_workers, _workers)
    return n


cdef void release_threads(int n) noexcept:
    global _busy_threads, _workers
    _busy_threads -= n
    _workers -= n - 1


def peak_workers(reset=False):
    """The most workers fastbn calls reserved at once since the last reset (for tests)."""
    global _peak_workers
    peak = _peak_workers
    if reset:
        _peak_workers = _workers
    return peak


def _after_fork_in_child():
    global _busy_threads, _workers, _peak_workers
    _find_usable_cpus()     # a child may be moved to other CPUs
    # calls that other threads of the parent were running do not exist here
    _busy_threads = _workers = _peak_workers = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
