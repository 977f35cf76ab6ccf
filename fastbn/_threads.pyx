# cython: language_level=3
"""Threads: how many threads a call may use, shared between calls, and safe after fork.

A call below its op's work threshold (fastbn._plan) runs on its caller's thread alone, with no
OpenMP region at all; a larger one reserves up to get_num_threads() threads. The counters
change with the GIL held. Results never depend on the thread count (the work split depends
on the shape only), so fewer threads change nothing but time.
"""
import os

cdef extern from "fastbn/platform.h" nogil:
    int fbn_max_threads()

cdef int _requested_threads = 0   # 0: follow OpenMP (OMP_NUM_THREADS, threadpoolctl)

# Calls from several Python threads share one pool of get_num_threads() threads: a call
# runs on its caller's thread plus as many OpenMP workers as the pool has free, so however
# many user threads call at once, fastbn adds at most get_num_threads() - 1 workers (it never
# multiplies user threads by OpenMP threads).
cdef int _busy_threads = 0          # callers and workers of the calls running now
cdef int _workers = 0               # OpenMP workers among them
cdef int _peak_workers = 0

# After fork: GNU libgomp keeps no fork handlers, so a child whose parent had started an
# OpenMP team inherits a pool of workers that do not exist, and its first parallel region
# waits for them forever. Such a child runs every call on its own thread (no OpenMP region at
# all); a child of a parent that never started a team has a fresh runtime and uses threads.
cdef bint _team_started = False     # this process has run a region of 2 threads or more
cdef bint _forked_serial = False    # this process is a child forked after that


def set_num_threads(n):
    """Use n threads in every fastbn call from now on, in every Python thread.

    ``None`` returns to the default: OpenMP's own setting, which OMP_NUM_THREADS and
    threadpoolctl control.
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
    if _forked_serial:
        return 1
    return _requested_threads if _requested_threads > 0 else fbn_max_threads()


cdef int threads_for(Py_ssize_t size, Py_ssize_t serial_below) noexcept:
    return 1 if size < serial_below else pool_threads()


cdef int reserve_threads(Py_ssize_t size, Py_ssize_t serial_below) noexcept:
    """Threads for a call of size values (1 below serial_below), out of those free now."""
    global _busy_threads, _workers, _peak_workers, _team_started
    cdef int n = max(1, min(threads_for(size, serial_below), pool_threads() - _busy_threads))
    if n > 1:
        _team_started = True
    _busy_threads += n
    _workers += n - 1
    _peak_workers = max(_peak_workers, _workers)
    return n


cdef void release_threads(int n) noexcept:
    global _busy_threads, _workers
    _busy_threads -= n
    _workers -= n - 1


def peak_workers(reset=False):
    """The most OpenMP workers fastbn calls used at once since the last reset (for tests)."""
    global _peak_workers
    peak = _peak_workers
    if reset:
        _peak_workers = _workers
    return peak


def forked_serial():
    """Whether this process is a forked child that runs every call on one thread."""
    return bool(_forked_serial)


def _after_fork_in_child():
    global _forked_serial, _busy_threads, _workers, _peak_workers
    if _team_started:
        _forked_serial = True
    # calls that other threads of the parent were running do not exist here
    _busy_threads = _workers = _peak_workers = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
