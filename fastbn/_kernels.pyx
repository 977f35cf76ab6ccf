# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Parallel orchestration of the kernels in include/fastbn.

How the work is split into blocks and chunks, which thread takes what, and the fixed order in
which partial results are combined. No validation here: fastbn._api hands over C-contiguous
arrays of one dtype, viewed as (outer, C, inner), with parameters already of that dtype.

Determinism: the blocks and chunks depend on the problem size only. Threads take whole chunks,
and chunk results are merged in chunk order, so every thread count gives the same bits.
"""
from cython.parallel cimport parallel, prange, threadid
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from libc.math cimport sqrt, INFINITY
import os

import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef enum:
    MIN_CHUNK = 16384     # values per chunk at least: smaller chunks cost more than they give
    MAX_CHUNKS = 64       # work items aimed for when channels are few: enough for 64 threads
    MIN_BLOCK_ROWS = 16   # channels-last statistics blocks: rows at least,
    MAX_BLOCK_ROWS = 64   # and at most, unless FBN_BLOCK values need more
    # Chunk results are 3*C (or 3*C + 1) doubles, written, then merged: at 16 rows a chunk
    # that was a fifth of the chunk's own traffic, and (256, 1024) float32 trained and
    # back-propagated 0.8-0.9x as fast as with chunks of 32 rows or more (in-process A/B)
    MIN_CHUNK_ROWS = 32
    # The backward's blocks aim at this many a problem (up to MAX_BLOCK_ROWS rows each):
    # (256, 1024) and (1024, 256) float32 backward took 0.82-0.88x the time of blocks aimed
    # at MAX_CHUNKS (16 rows each)
    BACKWARD_BLOCKS = 8
    STREAMING_BYTES = 16 << 20   # arrays this large stream from memory (L3 is 32 MB here)
    # An op whose traffic (its reads of the inputs, re-reads included, and its output) comes
    # to this much writes its output with non-temporal stores (kernels_impl.h): below it the
    # output may still be in L3 for whoever reads it next. Measured in chains of ops that
    # each read the last one's output (float32, 2 threads; streaming time / cached time):
    #   12.8 MB arrays: inference + a NumPy sum 1.47, channels-first train 1.12;
    #   19.3 MB: inference + sum 1.17 (traffic 39 MB), channels-last train 0.90 (58 MB),
    #            channels-first backward 0.93 (58 MB), channels-last backward 0.85-0.91;
    #   25.7 MB: 0.87-0.92 for every op (51 MB and more).
    STREAM_TRAFFIC_BYTES = 48 << 20
    # Channels-first channels small enough are taken GROUP_BYTES of data at a time: every
    # channel's statistics, then every channel's coefficients, then every channel's output.
    # A channel's coefficients are a chain of divisions and a square root (~60 cycles of
    # latency) that the core overlaps across the channels of a group, not across a statistics
    # pass; for a 49-value channel that chain took as long as its statistics.
    GROUP_BYTES = 16384
    MAX_GROUP = 32
    # Total values under which one thread does everything: a fork/join costs ~1.5 us here.
    # Measured on 2 cores (1 vs 2 threads): two threads win from ~8-16K values for the
    # statistics ops, from ~32K for a single elementwise pass.
    SERIAL_BELOW_STATS = 16384   # training, backward
    SERIAL_BELOW_PASS = 32768    # inference

SERIAL_THRESHOLDS = {"train": SERIAL_BELOW_STATS, "backward": SERIAL_BELOW_STATS,
                     "infer": SERIAL_BELOW_PASS}

# The fused activations (include/fastbn/activation.h), by the names the API takes
ACTIVATIONS = {None: FBN_ACT_NONE, "relu": FBN_ACT_RELU, "leaky_relu": FBN_ACT_LEAKY_RELU,
               "tanh": FBN_ACT_TANH}


# ------------------------------------------------------------------------------------ threads

cdef int _requested_threads = 0   # 0: follow OpenMP (OMP_NUM_THREADS, threadpoolctl)


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


# After fork: GNU libgomp keeps no fork handlers, so a child whose parent had started an
# OpenMP team inherits a pool of workers that do not exist, and its first parallel region
# waits for them forever. Such a child runs every call on its own thread (no OpenMP region at
# all); a child of a parent that never started a team has a fresh runtime and uses threads.
cdef bint _team_started = False     # this process has run a region of 2 threads or more
cdef bint _forked_serial = False    # this process is a child forked after that


def _after_fork_in_child():
    global _forked_serial, _busy_threads, _workers, _peak_workers
    if _team_started:
        _forked_serial = True
    # calls that other threads of the parent were running do not exist here
    _busy_threads = _workers = _peak_workers = 0


def forked_serial():
    """Whether this process is a forked child that runs every call on one thread."""
    return bool(_forked_serial)


cdef inline int pool_threads() noexcept:
    if _forked_serial:
        return 1
    return _requested_threads if _requested_threads > 0 else fbn_max_threads()


def get_num_threads():
    """The number of threads a large enough fastbn call uses."""
    return pool_threads()


cdef int threads_for(Py_ssize_t size, Py_ssize_t serial_below) noexcept:
    return 1 if size < serial_below else pool_threads()


# Calls from several Python threads share one pool of get_num_threads() threads: a call
# runs on its caller's thread plus as many OpenMP workers as the pool has free, so however
# many user threads call at once, fastbn adds at most get_num_threads() - 1 workers (it never
# multiplies user threads by OpenMP threads). Results do not depend on the thread count, so
# a smaller team changes nothing but time. The counters change with the GIL held.
cdef int _busy_threads = 0          # callers and workers of the calls running now
cdef int _workers = 0               # OpenMP workers among them
cdef int _peak_workers = 0


cdef int reserve_threads(Py_ssize_t size, Py_ssize_t serial_below) noexcept:
    global _busy_threads, _workers, _peak_workers
    global _team_started
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


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def peak_workers(reset=False):
    """The most OpenMP workers fastbn calls used at once since the last reset (for tests)."""
    global _peak_workers
    peak = _peak_workers
    if reset:
        _peak_workers = _workers
    return peak


def build_info():
    """Facts about this build, for ``python -m fastbn info``."""
    return {
        "openmp": fbn_openmp_version(),
        "compiler": fbn_compiler().decode(),
        "build_flags": fbn_build_flags().decode(),
        "baseline_simd": fbn_baseline_simd().decode(),
        "dispatch_targets": fbn_dispatch_targets().decode(),
        "dispatch_selected": fbn_dispatch_selected().decode(),
    }


# --------------------------------------------------------------------------------------- plan

cdef struct Plan:
    Py_ssize_t outer, C, inner
    Py_ssize_t count       # values per channel: outer * inner
    Py_ssize_t nchunks     # channels-first: chunks per channel (of positions);
                           # channels-last: chunks of row blocks. One chunk = one work item.
    Py_ssize_t group       # channels-first, one chunk per channel: channels per work item
    Py_ssize_t block_rows  # channels-last: rows per statistics block
    Py_ssize_t nblocks     # channels-last: row blocks
    int row_step           # channels-last: rows per step (4 in cache, 1 streaming)
    int stream             # the op's traffic is too large for cache: streaming stores


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef Py_ssize_t _stream_traffic_bytes = STREAM_TRAFFIC_BYTES


def _set_stream_traffic_bytes(Py_ssize_t nbytes):
    """Tests: ops whose traffic comes to nbytes or more stream their output from now on
    (-1: the default). Returns the previous threshold."""
    global _stream_traffic_bytes
    previous = _stream_traffic_bytes
    _stream_traffic_bytes = STREAM_TRAFFIC_BYTES if nbytes < 0 else nbytes
    return previous


def _set_prefetch_span(Py_ssize_t nbytes):
    """Tests: channels-first walks over nbytes of memory or more prefetch from now on (-1: the
    default, FBN_PREFETCH_SPAN in include/fastbn/kernels.h). Returns the previous span."""
    global fbn_prefetch_span
    previous = <Py_ssize_t>fbn_prefetch_span
    fbn_prefetch_span = FBN_PREFETCH_SPAN if nbytes < 0 else nbytes
    return previous


cdef enum Op:
    OP_TRAIN, OP_INFER, OP_BACKWARD


cdef bint op_streams(const Plan *p, Op op, Py_ssize_t nbytes) noexcept nogil:
    """Whether op's traffic on p's problem (nbytes an array) calls for streaming stores."""
    cdef Py_ssize_t reads     # arrays read from memory: x; x twice (statistics, then
                              # output); x and dy, or twice both
    # channels-first, one chunk a channel: each channel is read once, its statistics and its
    # output made while it is in cache
    cdef bint one_read = p.inner > 1 and p.nchunks == 1
    if op == OP_INFER:
        reads = 1
    elif op == OP_TRAIN:
        reads = 1 if one_read else 2
    else:
        reads = 2 if one_read else 4
    return (reads + 1) * nbytes >= _stream_traffic_bytes


cdef Plan make_plan(Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner, Py_ssize_t itemsize,
                    Op op) noexcept nogil:
    """Chunks (and channels-last blocks) for op on an (outer, C, inner) problem; all sizes
    >= 1."""
    cdef Py_ssize_t nbytes = outer * C * inner * itemsize
    cdef Plan p
    p.outer = outer
    p.C = C
    p.inner = inner
    p.count = outer * inner
    if inner > 1:
        # split channels into chunks only when they are too few to feed the threads
        p.block_rows = p.nblocks = 0
        p.nchunks = max(1, min(ceil_div(MAX_CHUNKS, C), p.count // MIN_CHUNK))
        p.group = max(1, min(MAX_GROUP, GROUP_BYTES // (p.count * itemsize)))
    else:
        # Each block costs ~15 operations per channel besides its rows (shift, merge): blocks of
        # up to MAX_BLOCK_ROWS rows amortize that, while leaving ~MAX_CHUNKS chunks to share.
        # The gradient sums have no shift to find, so no block is read twice: their blocks
        # aim at fewer rows per chunk's worth of overhead (BACKWARD_BLOCKS).
        p.block_rows = max(FBN_BLOCK // C,
                           min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, outer // (
                               BACKWARD_BLOCKS if op == OP_BACKWARD else MAX_CHUNKS))))
        p.nblocks = ceil_div(outer, p.block_rows)
        # and each chunk adds 3*C partial sums to write and merge: MIN_CHUNK_ROWS at least
        p.nchunks = max(1, min(MAX_CHUNKS, p.nblocks, outer * C // MIN_CHUNK,
                               outer // MIN_CHUNK_ROWS))
        p.group = 1
    # a shape-only choice (like everything in the plan), so results stay the same bits
    p.row_step = 1 if nbytes >= STREAMING_BYTES else 4
    p.stream = op_streams(&p, op, nbytes)
    return p


def plan(Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner, Py_ssize_t itemsize=4):
    """The work split for an (outer, C, inner) problem, as a dict (for tests and benchmarks)."""
    cdef Plan p = make_plan(outer, C, inner, itemsize, OP_TRAIN)
    cdef Py_ssize_t nbytes = outer * C * inner * itemsize
    return {"family": "channels_first" if inner > 1 else "channels_last",
            "nchunks": p.nchunks, "group": p.group, "block_rows": p.block_rows,
            "row_step": p.row_step,
            # runs ahead that a whole channel's reading walk prefetches (0: none)
            "prefetch_runs": fbn_runs_ahead(inner, C * inner, outer * inner, itemsize)
                             if inner > 1 else 0,
            "stream": {"train": bool(op_streams(&p, OP_TRAIN, nbytes)),
                       "infer": bool(op_streams(&p, OP_INFER, nbytes)),
                       "backward": bool(op_streams(&p, OP_BACKWARD, nbytes))},
            "threads": threads_for(outer * C * inner, SERIAL_BELOW_STATS),
            "threads_infer": threads_for(outer * C * inner, SERIAL_BELOW_PASS)}


cdef inline void chunk_range(Py_ssize_t total, Py_ssize_t k, Py_ssize_t nchunks,
                             Py_ssize_t *first, Py_ssize_t *last) noexcept nogil:
    """[first, last) of chunk k when total items are cut into nchunks near-equal chunks."""
    if nchunks == 1:             # no divisions: once per channel for small channels
        first[0] = 0
        last[0] = total
        return
    first[0] = k * total // nchunks
    last[0] = (k + 1) * total // nchunks


# ------------------------------------------------------------------------------ forward pass

# The training forward's arguments: fbn_train_args (include/fastbn/kernels.h).
# Normalizing coefficients, NORM_COEFS*C values: hi | scale | offset, so that
#     y = (x - hi[c]) * scale[c] + offset[c]          (see kernels_impl.h)
cdef enum:
    NORM_COEFS = 3
    GRAD_COEFS = 5


cdef struct Epilogue:        # the fused forward: y = act(bn(x) + residual)
    const void *residual     # laid out as x, or NULL
    int activation           # FBN_ACT_*
    double negative_slope


cdef inline const floating *residual_at(const Epilogue *ep, floating *like,
                                        Py_ssize_t offset) noexcept nogil:
    """The residual's element at offset, typed as `like` (NULL without a residual)."""
    if ep.residual == NULL:
        return NULL
    return <const floating *>ep.residual + offset

cdef fbn_moments cf_chunk_moments(const floating *x, const Plan *p, Py_ssize_t c,
                                  Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t e0, e1
    chunk_range(p.count, k, p.nchunks, &e0, &e1)
    return moments_channel(x + c * p.inner, p.C * p.inner, p.inner, e0, e1)


# Channels-last chunk moments: a count and C-length shift | dev_sum | m2 arrays per chunk,
# stored in parts as [count (1) | shift (C) | dev_sum (C) | m2 (C)], CL_PART(C) doubles each.
cdef inline Py_ssize_t CL_PART(Py_ssize_t C) noexcept nogil:
    return 1 + 3 * C


cdef inline void cl_chunk_rows(const Plan *p, Py_ssize_t k, Py_ssize_t *first_row,
                               Py_ssize_t *nrows) noexcept nogil:
    """First row and row count of channels-last chunk k (whole blocks)."""
    cdef Py_ssize_t first, last
    chunk_range(p.nblocks, k, p.nchunks, &first, &last)
    first_row[0] = first * p.block_rows
    nrows[0] = min(last * p.block_rows, p.outer) - first_row[0]


cdef void cl_chunk_moments(const floating *x, const Plan *p, Py_ssize_t k, double *part,
                           double *scratch) noexcept nogil:
    """Chunk k's moments of every channel into part; scratch holds 3*C doubles."""
    cdef Py_ssize_t first_row, nrows
    cl_chunk_rows(p, k, &first_row, &nrows)
    moments_rows_chunk(x + first_row * p.C, nrows, p.C, p.block_rows, p.row_step, part, scratch)


cdef void normalize_part(const floating *x, floating *y, const Plan *p, const floating *coef,
                         const Epilogue *ep, Py_ssize_t t, Py_ssize_t nparts) noexcept nogil:
    """Part t of nparts equal parts of the elementwise pass y = act(f(x) + residual)."""
    cdef Py_ssize_t C = p.C, start, stop
    cdef floating slope = <floating>ep.negative_slope
    if p.inner > 1:
        chunk_range(p.outer * C * p.inner, t, nparts, &start, &stop)
        normalize_span(x, residual_at(ep, y, 0), y, C, p.inner, start, stop, coef, coef + C,
                       coef + 2 * C, ep.activation, slope, p.stream)
    else:
        chunk_range(p.outer, t, nparts, &start, &stop)
        normalize_rows(x + start * C, residual_at(ep, y, start * C), y + start * C,
                       stop - start, C, p.row_step, coef, coef + C, coef + 2 * C, ep.activation,
                       slope, p.stream)


cdef void normalize(const floating *x, floating *y, const Plan *p, const floating *coef,
                    const Epilogue *ep, int nthreads) noexcept nogil:
    """y from x and the coefficients, split evenly over the threads."""
    cdef Py_ssize_t t
    if nthreads == 1:       # no OpenMP region at all: entering one costs ~0.3 us
        normalize_part(x, y, p, coef, ep, 0, 1)
        return
    for t in prange(nthreads, schedule='static', num_threads=nthreads):
        normalize_part(x, y, p, coef, ep, t, nthreads)


cdef enum:
    MERGE_CHANNELS = 64   # channels-last: channels per work item when merging chunk results
    LINE_BYTES = 64       # a cache line
    LINE_DOUBLES = LINE_BYTES // 8


cdef void cl_merge_train(const double *parts, Py_ssize_t K, const Plan *p, Py_ssize_t c0,
                         Py_ssize_t c1, double *merged, floating *coef,
                         const fbn_train_args *a) noexcept nogil:
    """Channels [c0, c1): chunk results merged in chunk order (into merged, 3*C doubles),
    then finished. Each channel's merge order is fixed, whoever does it."""
    cdef Py_ssize_t C = p.C, n = c1 - c0, k, c
    cdef const double *part
    cdef double count = 0.0
    cdef double *shift = merged + c0
    cdef double *dev_sum = merged + C + c0
    cdef double *m2 = merged + 2 * C + c0
    cdef fbn_moments m
    for k in range(K):
        part = parts + k * CL_PART(C)
        fbn_moments_merge_rows(n, &count, shift, dev_sum, m2, part[0], part + 1 + c0,
                               part + 1 + C + c0, part + 1 + 2 * C + c0)
    for c in range(c0, c1):
        m.count = count
        m.shift = merged[c]
        m.dev_sum = merged[C + c]
        m.m2 = merged[2 * C + c]
        train_finish(m, C, c, a, coef)


cdef void cf_merge_train(const fbn_moments *parts, Py_ssize_t K, Py_ssize_t C, Py_ssize_t c,
                         floating *coef, const fbn_train_args *a) noexcept nogil:
    """Channel c: its chunk results (parts[c*K + k]) merged in chunk order, then finished."""
    cdef fbn_moments m = parts[c * K]
    cdef Py_ssize_t k
    for k in range(1, K):
        fbn_moments_merge(&m, parts[c * K + k])
    train_finish(m, C, c, a, coef)


cdef struct Work:
    void *parts          # channels-first split path: C*K per-chunk results
    double *cl_parts     # channels-last: K chunks of results
    double *scratch      # channels-last: 3*C doubles per thread, each thread's at a cache
                         # line: the row loops load and store these sums once per row, and
                         # an access split across two lines costs two (up to 1.9x measured)
    Py_ssize_t scratch_stride  # doubles from one thread's scratch to the next
    void *scratch_block  # the allocation scratch lies in


cdef int alloc_work(Work *w, const Plan *p, int nthreads, size_t cf_part_bytes,
                    Py_ssize_t cl_part_doubles) noexcept nogil:
    """Buffers for the chunk results (channels-first: one per channel and chunk).
    -1, with nothing left allocated, when out of memory."""
    cdef Py_ssize_t C = p.C, K = p.nchunks
    w.parts = NULL
    w.cl_parts = NULL
    w.scratch = NULL
    w.scratch_block = NULL
    if p.inner > 1:
        w.parts = malloc(C * K * cf_part_bytes)
        return -1 if w.parts == NULL else 0
    w.cl_parts = <double *>malloc(K * cl_part_doubles * sizeof(double))
    w.scratch_stride = ceil_div(3 * C, LINE_DOUBLES) * LINE_DOUBLES
    w.scratch_block = malloc((nthreads * w.scratch_stride + LINE_DOUBLES) * sizeof(double))
    w.scratch = <double *>(<size_t>w.scratch_block + (-<size_t>w.scratch_block) % LINE_BYTES)
    if w.cl_parts == NULL or w.scratch_block == NULL:
        free_work(w)
        return -1
    return 0


cdef void free_work(Work *w) noexcept nogil:
    free(w.parts)
    free(w.cl_parts)
    free(w.scratch_block)


cdef int forward_train_impl(const floating *x, floating *y, const Plan *p, const fbn_train_args *a,
                            const Epilogue *ep, int nthreads) noexcept nogil:
    """Batch statistics, saved statistics, running statistics, then y. -1: out of memory.

    One OpenMP region; its phases (chunk statistics, merge and finish per channel, y) are
    separated by explicit barriers: Cython ends each prange with nowait."""
    cdef Py_ssize_t C = p.C, K = p.nchunks, c, k, i, t
    cdef Py_ssize_t nmerge = ceil_div(C, MERGE_CHANNELS)
    cdef bint fused = p.inner > 1 and K == 1
    cdef Py_ssize_t ngroups = ceil_div(C, p.group)
    cdef Work w
    cdef fbn_moments *parts           # channels-first: parts[c*K + k] (parts[c] for groups)
    cdef double *cl_parts             # channels-last: chunk k at k * CL_PART(C)
    cdef floating *coef = <floating *>malloc(NORM_COEFS * C * sizeof(floating))
    if coef == NULL:
        return -1
    if alloc_work(&w, p, nthreads, sizeof(fbn_moments), CL_PART(C)) != 0:
        free(coef)
        return -1
    parts = <fbn_moments *>w.parts
    cl_parts = w.cl_parts

    with parallel(num_threads=nthreads, use_threads_if=nthreads > 1):
        if fused:
            # One group of channels per work item: their statistics, their coefficients,
            # then their y while the group is in cache.
            for i in prange(ngroups, schedule='static'):
                train_group(x, residual_at(ep, y, 0), y, C, p.inner, p.count, i * p.group,
                            min(C, (i + 1) * p.group), a, ep.activation,
                            <floating>ep.negative_slope, parts, coef, p.stream)
        elif p.inner > 1:
            for i in prange(C * K, schedule='static'):
                parts[i] = cf_chunk_moments(x, p, i // K, i % K)
            fbn_barrier()
            for c in prange(C, schedule='static'):
                cf_merge_train(parts, K, C, c, coef, a)
            fbn_barrier()
            for t in prange(nthreads, schedule='static'):
                normalize_part(x, y, p, coef, ep, t, nthreads)
        else:
            for k in prange(K, schedule='static'):
                cl_chunk_moments(x, p, k, cl_parts + k * CL_PART(C),
                                 w.scratch + threadid() * w.scratch_stride)
            fbn_barrier()
            for i in prange(nmerge, schedule='static'):
                cl_merge_train(cl_parts, K, p, i * MERGE_CHANNELS,
                               min(C, (i + 1) * MERGE_CHANNELS), w.scratch, coef, a)
            fbn_barrier()
            for t in prange(nthreads, schedule='static'):
                normalize_part(x, y, p, coef, ep, t, nthreads)
    free_work(&w)
    free(coef)
    return 0


cdef Py_ssize_t infer_impl(const floating *x, floating *y, const Plan *p,
                           const floating *running_mean, const floating *running_var,
                           const floating *weight, const floating *bias, double eps,
                           const Epilogue *ep, int nthreads) noexcept nogil:
    """y from the running statistics. -1: out of memory; c + 1: running_var[c] < 0."""
    cdef Py_ssize_t C = p.C, c
    cdef floating *coef = <floating *>malloc(NORM_COEFS * C * sizeof(floating))
    if coef == NULL:
        return -1
    if infer_coefficients(C, running_mean, running_var, weight, bias, eps, coef):
        free(coef)
        c = 0
        while not running_var[c] < 0:     # the first negative one (y is not touched yet)
            c += 1
        return c + 1
    normalize(x, y, p, coef, ep, nthreads)
    free(coef)
    return 0


# ----------------------------------------------------------------------------- backward pass

# The backward's arguments: fbn_grad_args (include/fastbn/kernels.h). Gradient coefficients,
# GRAD_COEFS*C values: h | g | k_dy | k_xc | k_0, so that
#     dx = k_dy[c] * (dy - g[c]) + k_xc[c] * (x - h[c]) + k_0[c]      (see kernels_impl.h)
# (backward_impl keeps the C dy shifts q after them)


cdef inline const floating *y_at(const fbn_grad_args *a, const floating *like,
                                 Py_ssize_t offset) noexcept nogil:
    if a.y == NULL:             # (a conditional expression made Cython drop the const)
        return NULL
    return <const floating *>a.y + offset


cdef inline floating *grad_at(const fbn_grad_args *a, const floating *like,
                              Py_ssize_t offset) noexcept nogil:
    return NULL if a.grad == NULL else <floating *>a.grad + offset


cdef void grad_shifts(const floating *dy, const Plan *p, const fbn_grad_args *a,
                      floating *q) noexcept nogil:
    """Each channel's dy shift q[c]: its first value of g = dy * act'(y) (g = dy without
    fusion), so that an offset in dy costs no digits. Every chunk sums g - q around it, so it
    is taken once, before the sums. After relu or leaky_relu, g is (near) zero wherever y <= 0,
    and a shift away from zero would add count * |q| to the sums' rounding: q = 0 there."""
    cdef Py_ssize_t c, first
    cdef const floating *y = y_at(a, dy, 0)
    for c in range(p.C):
        first = c * p.inner        # position 0 of channel c, in either family
        if a.activation == FBN_ACT_RELU or a.activation == FBN_ACT_LEAKY_RELU:
            q[c] = 0
        elif a.grad == NULL:
            q[c] = dy[first]
        else:
            q[c] = act_grad_value(dy[first], 0 if y == NULL else y[first], a.activation,
                                  <floating>a.negative_slope)


cdef fbn_grad_sums cf_chunk_grad_sums(const floating *dy, const floating *x, const Plan *p,
                                      Py_ssize_t c, Py_ssize_t k, double m,
                                      const fbn_grad_args *a) noexcept nogil:
    """Chunk k's gradient sums of channel c, around the mean m and the channel's shift q."""
    cdef Py_ssize_t e0, e1, offset = c * p.inner
    chunk_range(p.count, k, p.nchunks, &e0, &e1)
    return grad_sums_channel(dy + offset, x + offset, p.C * p.inner, p.inner, e0, e1, m,
                             (<const floating *>a.shift)[c], y_at(a, dy, offset),
                             grad_at(a, dy, offset), a.activation, <floating>a.negative_slope)


cdef void cl_chunk_grad_sums(const floating *dy, const floating *x, const Plan *p, Py_ssize_t k,
                             const fbn_grad_args *a, double *part, double *scratch) noexcept nogil:
    """Chunk k's gradient sums into part = [dy (C) | dy_xc (C) | xc (C)], around the means and
    the shifts q; scratch: 3*C."""
    cdef Py_ssize_t first_row, nrows, offset
    cl_chunk_rows(p, k, &first_row, &nrows)
    offset = first_row * p.C
    grad_sums_rows_chunk(dy + offset, x + offset, nrows, p.C, p.block_rows, p.row_step,
                         <const floating *>a.mean, <const floating *>a.shift, part, scratch,
                         y_at(a, dy, offset), grad_at(a, dy, offset), a.activation,
                         <floating>a.negative_slope)


cdef void grad_input_part(const floating *dy, const floating *x, floating *dx, const Plan *p,
                          const floating *coef, Py_ssize_t t, Py_ssize_t nparts) noexcept nogil:
    """Part t of nparts equal parts of the elementwise pass dx = f(dy, x)."""
    cdef Py_ssize_t C = p.C, start, stop
    if p.inner > 1:
        chunk_range(p.outer * C * p.inner, t, nparts, &start, &stop)
        grad_input_span(dy, x, dx, C, p.inner, start, stop, coef, coef + C, coef + 2 * C,
                        coef + 3 * C, coef + 4 * C, p.stream)
    else:
        chunk_range(p.outer, t, nparts, &start, &stop)
        grad_input_rows(dy + start * C, x + start * C, dx + start * C, stop - start, C,
                        p.row_step, coef, coef + C, coef + 2 * C, coef + 3 * C, coef + 4 * C,
                        p.stream)


cdef void merge_grad(const fbn_grad_sums *parts, Py_ssize_t K, const Plan *p, Py_ssize_t c,
                     floating *coef, const fbn_grad_args *a) noexcept nogil:
    """Channel c: its chunk sums (parts[c*K + k]) added in chunk order, then finished."""
    cdef fbn_grad_sums s = parts[c * K]
    cdef Py_ssize_t k
    for k in range(1, K):
        fbn_grad_sums_add(&s, parts[c * K + k])
    grad_finish(s, <double>p.count, p.C, c, a, coef)


cdef void cl_merge_grad(double *parts, Py_ssize_t K, const Plan *p, Py_ssize_t c0,
                        Py_ssize_t c1, floating *coef, const fbn_grad_args *a) noexcept nogil:
    """Channels [c0, c1): chunk sums (chunk k at parts + k*3*C) added in chunk order into
    chunk 0's, then finished."""
    cdef fbn_grad_sums s
    cdef Py_ssize_t C = p.C, c, k, j
    for k in range(1, K):
        for j in range(3):
            for c in range(c0, c1):
                parts[j * C + c] += parts[k * 3 * C + j * C + c]
    for c in range(c0, c1):
        s.dy = parts[c]
        s.dy_xc = parts[C + c]
        s.xc = parts[2 * C + c]
        grad_finish(s, <double>p.outer, C, c, a, coef)


cdef int backward_impl(const floating *dy, const floating *x, floating *dx, const Plan *p,
                       const fbn_grad_args *args, int nthreads) noexcept nogil:
    """dweight, dbias, then dx, in one OpenMP region (phases as in forward_train_impl).
    -1: out of memory."""
    cdef Py_ssize_t C = p.C, K = p.nchunks, c, k, i, t
    cdef Py_ssize_t nmerge = ceil_div(C, MERGE_CHANNELS)
    cdef bint fused = p.inner > 1 and K == 1
    cdef Py_ssize_t ngroups = ceil_div(C, p.group)
    cdef const floating *mean = <const floating *>args.mean
    # the dx pass reads g: the fused sums pass wrote it to grad
    cdef const floating *g = dy if args.grad == NULL else <const floating *>args.grad
    cdef fbn_grad_args a = args[0]
    cdef Work w
    cdef fbn_grad_sums *parts         # channels-first: parts[c*K + k] (parts[c] for groups)
    cdef double *cl_parts             # channels-last: chunk k at k * 3*C
    cdef floating *coef = <floating *>malloc((GRAD_COEFS + 1) * C * sizeof(floating))
    if coef == NULL:
        return -1
    if alloc_work(&w, p, nthreads, sizeof(fbn_grad_sums), 3 * C) != 0:
        free(coef)
        return -1
    parts = <fbn_grad_sums *>w.parts
    cl_parts = w.cl_parts
    grad_shifts(dy, p, &a, coef + GRAD_COEFS * C)
    a.shift = coef + GRAD_COEFS * C

    with parallel(num_threads=nthreads, use_threads_if=nthreads > 1):
        if fused:
            # One group of channels per work item (as in forward_train_impl): their sums,
            # their coefficients, then their dx while the group is in cache.
            for i in prange(ngroups, schedule='static'):
                backward_group(dy, x, dx, C, p.inner, p.count, i * p.group,
                               min(C, (i + 1) * p.group), &a, parts, coef, p.stream)
        elif p.inner > 1:
            for i in prange(C * K, schedule='static'):
                parts[i] = cf_chunk_grad_sums(dy, x, p, i // K, i % K, mean[i // K], &a)
            fbn_barrier()
            for c in prange(C, schedule='static'):
                merge_grad(parts, K, p, c, coef, &a)
            fbn_barrier()
            for t in prange(nthreads, schedule='static'):
                grad_input_part(g, x, dx, p, coef, t, nthreads)
        else:
            for k in prange(K, schedule='static'):
                cl_chunk_grad_sums(dy, x, p, k, &a, cl_parts + k * 3 * C,
                                   w.scratch + threadid() * w.scratch_stride)
            fbn_barrier()
            for i in prange(nmerge, schedule='static'):
                cl_merge_grad(cl_parts, K, p, i * MERGE_CHANNELS,
                              min(C, (i + 1) * MERGE_CHANNELS), coef, &a)
            fbn_barrier()
            for t in prange(nthreads, schedule='static'):
                grad_input_part(g, x, dx, p, coef, t, nthreads)
    free_work(&w)
    free(coef)
    return 0


# ---------------------------------------------------------------------------- Python entries
# Arrays arrive C-contiguous and of one dtype (float32 or float64); (outer, C, inner) >= 1.

cdef inline void *data_or_null(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline Py_ssize_t elem_stride(object a):
    return 0 if a is None else (<cnp.ndarray>a).strides[0] // (<cnp.ndarray>a).itemsize


cdef inline bint is_f32(cnp.ndarray a):
    return cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32


cdef inline Epilogue make_epilogue(residual, int activation, double negative_slope):
    cdef Epilogue ep
    ep.residual = data_or_null(residual)
    ep.activation = activation
    ep.negative_slope = negative_slope
    return ep


cpdef forward_train(cnp.ndarray x, cnp.ndarray y, Py_ssize_t outer, Py_ssize_t C,
                    Py_ssize_t inner, weight, bias, double eps, running_mean, running_var,
                    double momentum, cnp.ndarray save_mean, cnp.ndarray save_invstd, residual=None,
                    int activation=FBN_ACT_NONE, double negative_slope=0.0):
    """Training forward into y, save_mean, save_invstd; running statistics (1-D, any stride,
    or None) updated in place. With residual (like x) and activation (FBN_ACT_*), y is
    act(bn(x) + residual)."""
    cdef Plan p = make_plan(outer, C, inner, x.itemsize, OP_TRAIN)
    cdef Epilogue ep = make_epilogue(residual, activation, negative_slope)
    cdef fbn_train_args a
    cdef int nthreads, status
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *yp = cnp.PyArray_DATA(y)
    a.weight = data_or_null(weight)
    a.bias = data_or_null(bias)
    a.eps = eps
    a.running_mean = data_or_null(running_mean)
    a.running_var = data_or_null(running_var)
    a.running_mean_stride = elem_stride(running_mean)
    a.running_var_stride = elem_stride(running_var)
    a.momentum = momentum
    a.save_mean = cnp.PyArray_DATA(save_mean)
    a.save_invstd = cnp.PyArray_DATA(save_invstd)
    nthreads = reserve_threads(outer * C * inner, SERIAL_BELOW_STATS)
    try:
        if is_f32(x):
            with nogil:
                status = forward_train_impl(<const float *>xp, <float *>yp, &p, &a, &ep,
                                            nthreads)
        else:
            with nogil:
                status = forward_train_impl(<const double *>xp, <double *>yp, &p, &a, &ep,
                                            nthreads)
    finally:
        release_threads(nthreads)
    if status != 0:
        raise MemoryError("fastbn: out of memory for the per-channel partial statistics")


cpdef forward_infer(cnp.ndarray x, cnp.ndarray y, Py_ssize_t outer, Py_ssize_t C,
                    Py_ssize_t inner, cnp.ndarray running_mean, cnp.ndarray running_var,
                    weight, bias, double eps, residual=None, int activation=FBN_ACT_NONE,
                    double negative_slope=0.0):
    """Inference forward into y (act(bn(x) + residual) as in forward_train). Raises
    ValueError, before writing, if running_var < 0."""
    cdef Plan p = make_plan(outer, C, inner, x.itemsize, OP_INFER)
    cdef Epilogue ep = make_epilogue(residual, activation, negative_slope)
    cdef int nthreads
    cdef Py_ssize_t status
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *yp = cnp.PyArray_DATA(y)
    cdef void *rm = cnp.PyArray_DATA(running_mean)
    cdef void *rv = cnp.PyArray_DATA(running_var)
    cdef void *w = data_or_null(weight)
    cdef void *b = data_or_null(bias)
    nthreads = reserve_threads(outer * C * inner, SERIAL_BELOW_PASS)
    try:
        if is_f32(x):
            with nogil:
                status = infer_impl(<const float *>xp, <float *>yp, &p, <const float *>rm,
                                    <const float *>rv, <const float *>w, <const float *>b, eps,
                                    &ep, nthreads)
        else:
            with nogil:
                status = infer_impl(<const double *>xp, <double *>yp, &p, <const double *>rm,
                                    <const double *>rv, <const double *>w, <const double *>b,
                                    eps, &ep, nthreads)
    finally:
        release_threads(nthreads)
    if status == -1:
        raise MemoryError("fastbn: out of memory for the normalizing coefficients")
    if status > 0:
        channel = status - 1
        raise ValueError(f"running_var must be non-negative, got "
                         f"{float(running_var[channel])!r} for channel {channel}")


cpdef backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t outer, Py_ssize_t C,
               Py_ssize_t inner, cnp.ndarray mean, cnp.ndarray invstd, weight,
               cnp.ndarray dweight, cnp.ndarray dbias, y=None, grad=None,
               int activation=FBN_ACT_NONE, double negative_slope=0.0):
    """Gradients of the training forward into dx, dweight, dbias. With grad (like x), dy is
    the gradient of the fused output y = act(bn(x) + residual): g = dy * act'(y) (y is needed
    with an activation) goes to grad, the residual's gradient, and dx, dweight, dbias are
    those of g. grad must not be x; it may be dx, dy or y."""
    cdef Plan p = make_plan(outer, C, inner, x.itemsize, OP_BACKWARD)
    cdef fbn_grad_args a
    cdef int nthreads, status
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *dxp = cnp.PyArray_DATA(dx)
    a.mean = cnp.PyArray_DATA(mean)
    a.invstd = cnp.PyArray_DATA(invstd)
    a.weight = data_or_null(weight)
    a.dweight = cnp.PyArray_DATA(dweight)
    a.dbias = cnp.PyArray_DATA(dbias)
    a.y = data_or_null(y)
    a.grad = data_or_null(grad)
    a.activation = activation
    a.negative_slope = negative_slope
    a.shift = NULL
    nthreads = reserve_threads(outer * C * inner, SERIAL_BELOW_STATS)
    try:
        if is_f32(x):
            with nogil:
                status = backward_impl(<const float *>dyp, <const float *>xp, <float *>dxp, &p,
                                       &a, nthreads)
        else:
            with nogil:
                status = backward_impl(<const double *>dyp, <const double *>xp, <double *>dxp,
                                       &p, &a, nthreads)
    finally:
        release_threads(nthreads)
    if status != 0:
        raise MemoryError("fastbn: out of memory for the per-channel gradient sums")


def address(cnp.ndarray a):
    """The address of a's first element (identity test for out= aliasing)."""
    return <size_t>cnp.PyArray_DATA(a)


def parallel_copy(cnp.ndarray src, cnp.ndarray dst):
    """dst[...] = src for C-contiguous arrays of equal size, split over get_num_threads()
    threads: the memory-bandwidth yardstick of the benchmarks (one read, one write)."""
    cdef char *s = <char *>cnp.PyArray_DATA(src)
    cdef char *d = <char *>cnp.PyArray_DATA(dst)
    cdef Py_ssize_t nbytes = src.nbytes, start, stop
    global _team_started
    cdef int nthreads = pool_threads(), t
    if nthreads > 1:
        _team_started = True
    with nogil:
        for t in prange(nthreads, schedule='static', num_threads=nthreads):
            start = nbytes * t // nthreads
            stop = nbytes * (t + 1) // nthreads
            memcpy(d + start, s + start, stop - start)


# --------------------------------------------------------------------------- output memory
# A fresh output of tens of MB costs the kernel's page zeroing on first touch (~3 ms per
# 100 MB here), every call: large blocks go back to the system when freed. Outputs of
# CACHE_MIN_BYTES or more therefore come from a small cache of freed blocks, the way ONNX
# Runtime's arena works; set_output_cache(0) turns it off. Touched only with the GIL held.

cdef enum:
    CACHE_MIN_BYTES = 8 << 20

def _default_cache_limit():
    """1 GiB, or an eighth of the machine's memory where that is less (small devices)."""
    import os
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 1 << 30
    return min(1 << 30, physical // 8)


cdef Py_ssize_t _cache_limit = _default_cache_limit()   # bytes the cache may keep
cdef Py_ssize_t _cache_bytes = 0           # bytes it keeps now
cdef list _cache = []                      # free blocks: (nbytes, address), oldest first


def set_output_cache(nbytes):
    """Keep at most nbytes of freed output blocks for reuse (0: none). Default: 1 GiB, or an
    eighth of the machine's memory where that is less."""
    global _cache_limit
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    _cache_limit = nbytes
    while _cache_bytes > _cache_limit:
        _drop_oldest()


def get_output_cache():
    """(limit, bytes held now, blocks held now) of the output cache."""
    return _cache_limit, _cache_bytes, len(_cache)


cdef void _drop_oldest():
    global _cache_bytes
    cdef Py_ssize_t nbytes
    cdef size_t address
    nbytes, address = _cache.pop(0)
    _cache_bytes -= nbytes
    free(<void *>address)


cdef class _Block:
    """Owns one block of output memory (the base of the array on it): back to the cache, or
    to the system, when the array is gone."""
    cdef void *ptr
    cdef Py_ssize_t nbytes

    def __dealloc__(self):
        global _cache_bytes
        if self.nbytes > _cache_limit:
            free(self.ptr)
            return
        while _cache_bytes + self.nbytes > _cache_limit:
            _drop_oldest()
        _cache.append((self.nbytes, <size_t>self.ptr))
        _cache_bytes += self.nbytes


cdef cnp.ndarray new_array(int ndim, cnp.npy_intp *dims, int typenum):
    """An uninitialized C-contiguous array, from the output cache when large."""
    global _cache_bytes
    cdef Py_ssize_t itemsize = 4 if typenum == cnp.NPY_FLOAT32 else 8
    cdef Py_ssize_t nbytes = cnp.PyArray_MultiplyList(dims, ndim) * itemsize
    cdef Py_ssize_t i
    cdef void *ptr = NULL
    cdef _Block block
    cdef cnp.ndarray a
    if nbytes < CACHE_MIN_BYTES or _cache_limit == 0:
        return cnp.PyArray_EMPTY(ndim, dims, typenum, 0)
    for i in range(len(_cache) - 1, -1, -1):      # newest first: warmest in cache and TLB
        if _cache[i][0] == nbytes:
            ptr = <void *><size_t>_cache.pop(i)[1]
            _cache_bytes -= nbytes
            break
    if ptr == NULL:
        ptr = malloc(nbytes)
        if ptr == NULL:
            raise MemoryError(f"fastbn: cannot allocate {nbytes} bytes for the output")
    block = _Block.__new__(_Block)
    block.ptr = ptr
    block.nbytes = nbytes
    a = cnp.PyArray_SimpleNewFromData(ndim, dims, typenum, ptr)
    cnp.set_array_base(a, block)
    return a


def empty(shape, dtype):
    """numpy.empty(shape, dtype) for float32/float64 (C order), through the output cache."""
    cdef cnp.npy_intp dims[32]
    cdef int ndim = len(shape), i
    cdef int typenum = np.dtype(dtype).num
    if ndim > 32 or (typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64):
        return np.empty(shape, dtype)
    for i in range(ndim):
        dims[i] = shape[i]
    return new_array(ndim, dims, typenum)


# ------------------------------------------------------------------------- the common call
# Per-call cost matters for small tensors (edge inference is often batch 1). These functions
# take the common call -- C-contiguous float32/float64 ndarrays, per-channel arrays of x's
# dtype, a plain float eps/momentum, out= absent, the input itself, or a C-contiguous array
# that does not overlap the inputs; in the forward, a residual of the same kind that out does
# not overlap and a known activation -- with cheap C-level checks, and return
# None for anything else. They accept only calls that fastbn._api's full checks would pass
# unchanged; _api owns the error messages and the conversions.

cdef inline bint plain_array(object a, int typenum):
    """a is an exact ndarray of typenum, native byte order, C-contiguous."""
    return (cnp.PyArray_CheckExact(a) and cnp.PyArray_TYPE(<cnp.ndarray>a) == typenum
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a)
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a))


cdef inline bint channel_vector(object v, int typenum, Py_ssize_t C, bint optional):
    if v is None:
        return optional
    return (plain_array(v, typenum) and cnp.PyArray_NDIM(<cnp.ndarray>v) == 1
            and cnp.PyArray_DIM(<cnp.ndarray>v, 0) == C)


cdef inline int typenum_of(object x):
    """x's type number if x is a plain float32/float64 array of ndim >= 2, else -1."""
    if not cnp.PyArray_CheckExact(x):
        return -1
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef int t = cnp.PyArray_TYPE(a)
    if ((t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64) or cnp.PyArray_NDIM(a) < 2
            or not cnp.PyArray_ISNOTSWAPPED(a) or not cnp.PyArray_IS_C_CONTIGUOUS(a)
            or cnp.PyArray_SIZE(a) == 0):
        return -1
    return t


cdef inline int plain_axis(object axis, int ndim):
    """axis as 0..ndim-1 if it is a plain int in range, else -1."""
    if type(axis) is not int:
        return -1
    cdef long a = axis
    if a < -ndim or a >= ndim:
        return -1
    return a + ndim if a < 0 else a


cdef inline bint plain_float(object v, double low, double high):
    return type(v) is float and low <= <double>v <= high


cdef inline void outer_inner(cnp.ndarray x, int axis, Py_ssize_t *outer,
                             Py_ssize_t *inner) noexcept:
    """The canonical view's outer and inner sizes of a C-contiguous x (the entries plan)."""
    cdef int i
    outer[0] = inner[0] = 1
    for i in range(axis):
        outer[0] *= cnp.PyArray_DIM(x, i)
    for i in range(axis + 1, cnp.PyArray_NDIM(x)):
        inner[0] *= cnp.PyArray_DIM(x, i)


cdef inline bint disjoint(cnp.ndarray a, cnp.ndarray b):
    """No byte of C-contiguous a lies in b."""
    cdef char *pa = <char *>cnp.PyArray_DATA(a)
    cdef char *pb = <char *>cnp.PyArray_DATA(b)
    return pa + cnp.PyArray_NBYTES(a) <= pb or pb + cnp.PyArray_NBYTES(b) <= pa


cdef inline bint plain_out(object out, cnp.ndarray x, int typenum):
    """out is None, or a writeable plain array like x that is x itself or does not overlap it."""
    if out is None:
        return True
    if not (plain_array(out, typenum) and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out)
            and cnp.PyArray_SAMESHAPE(<cnp.ndarray>out, x)):
        return False
    return out is x or disjoint(<cnp.ndarray>out, x)


cdef inline bint plain_fusion(object residual, object activation, object negative_slope,
                              cnp.ndarray x, object out, int typenum, int *act, double *slope):
    """residual is None, or a plain array like x that out does not overlap; activation is
    None or a name in ACTIVATIONS; negative_slope is a float that is not NaN. The kernel's
    activation code and slope go to act and slope."""
    if residual is not None:
        if not (plain_array(residual, typenum)
                and cnp.PyArray_SAMESHAPE(<cnp.ndarray>residual, x)):
            return False
        if out is not None and not disjoint(<cnp.ndarray>out, <cnp.ndarray>residual):
            return False
    if activation is not None and (type(activation) is not str or activation not in ACTIVATIONS):
        return False
    if not plain_float(negative_slope, -INFINITY, INFINITY):
        return False
    act[0] = ACTIVATIONS[activation]
    slope[0] = <double>negative_slope
    return True


cdef inline cnp.ndarray output_for(cnp.ndarray x, object out):
    """out, or a new array like x."""
    if out is not None:
        return <cnp.ndarray>out
    return new_array(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x))


cdef int plain_call(object x, object axis, object out, int *typenum):
    """The channel axis (0..ndim-1) when x, axis and out take the common form, else -1;
    x's type number goes to typenum."""
    cdef int t = typenum_of(x)
    if t < 0 or not plain_out(out, <cnp.ndarray>x, t):
        return -1
    typenum[0] = t
    return plain_axis(axis, cnp.PyArray_NDIM(<cnp.ndarray>x))


def infer_common(x, running_mean, running_var, weight, bias, eps, axis, out, residual,
                 activation, negative_slope):
    cdef int t, act
    cdef double slope
    cdef int ax = plain_call(x, axis, out, &t)
    if ax < 0:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef Py_ssize_t C = cnp.PyArray_DIM(xa, ax)
    if not (channel_vector(running_mean, t, C, False) and channel_vector(running_var, t, C, False)
            and channel_vector(weight, t, C, True) and channel_vector(bias, t, C, True)
            and plain_float(eps, 0.0, INFINITY)
            and plain_fusion(residual, activation, negative_slope, xa, out, t, &act, &slope)):
        return None
    cdef Py_ssize_t outer, inner
    outer_inner(xa, ax, &outer, &inner)
    cdef cnp.ndarray y = output_for(xa, out)
    forward_infer(xa, y, outer, C, inner, running_mean, running_var, weight, bias, eps,
                  residual, act, slope)
    return y


def train_common(x, weight, bias, eps, axis, running_mean, running_var, momentum, out,
                 residual, activation, negative_slope):
    cdef int t, act
    cdef double slope
    cdef int ax = plain_call(x, axis, out, &t)
    if ax < 0:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef Py_ssize_t C = cnp.PyArray_DIM(xa, ax)
    if not (channel_vector(weight, t, C, True) and channel_vector(bias, t, C, True)
            and plain_float(eps, 0.0, INFINITY) and plain_float(momentum, 0.0, 1.0)
            and plain_fusion(residual, activation, negative_slope, xa, out, t, &act, &slope)):
        return None
    if (running_mean is None) != (running_var is None):
        return None
    if running_mean is not None and not (
            channel_vector(running_mean, t, C, False) and channel_vector(running_var, t, C, False)
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_mean)
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_var)):
        return None
    cdef Py_ssize_t outer, inner
    outer_inner(xa, ax, &outer, &inner)
    if outer * inner < 2:       # one value per channel: _api raises the error
        return None
    cdef cnp.ndarray y = output_for(xa, out)
    cdef cnp.npy_intp c_dim = C
    cdef cnp.ndarray mean = cnp.PyArray_EMPTY(1, &c_dim, t, 0)
    cdef cnp.ndarray invstd = cnp.PyArray_EMPTY(1, &c_dim, t, 0)
    forward_train(xa, y, outer, C, inner, weight, bias, eps, running_mean, running_var,
                  momentum, mean, invstd, residual, act, slope)
    return y, mean, invstd


def backward_common(dy, x, mean, invstd, weight, axis, out):
    cdef int t
    cdef int ax = plain_call(x, axis, out, &t)
    if ax < 0 or typenum_of(dy) != t or not plain_out(out, <cnp.ndarray>dy, t):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef cnp.ndarray dya = <cnp.ndarray>dy
    if not cnp.PyArray_SAMESHAPE(xa, dya):
        return None
    cdef Py_ssize_t C = cnp.PyArray_DIM(xa, ax)
    if not (channel_vector(mean, t, C, False) and channel_vector(invstd, t, C, False)
            and channel_vector(weight, t, C, True)):
        return None
    cdef Py_ssize_t outer, inner
    outer_inner(xa, ax, &outer, &inner)
    cdef cnp.ndarray dx = output_for(xa, out)
    cdef cnp.npy_intp c_dim = C
    cdef cnp.ndarray dweight = cnp.PyArray_EMPTY(1, &c_dim, t, 0)
    cdef cnp.ndarray dbias = cnp.PyArray_EMPTY(1, &c_dim, t, 0)
    backward(dya, xa, dx, outer, C, inner, mean, invstd, weight, dweight, dbias)
    return dx, dweight, dbias
