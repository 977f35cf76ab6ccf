# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The drivers: each op as its stages, run in parallel over a planned problem.

    forward   statistics (chunk moments) -> merge (in chunk order) -> finish (coefficients,
              saved and running statistics) -> apply (normalize, fused epilogue)
    backward  gradient sums (chunk partials) -> merge -> finish (coefficients, dweight,
              dbias) -> apply (dx)

Each stage is a number of work items (a chunk, a channel range or a part of the array); an op
hands its stages to fastbn's thread pool (include/fastbn/pool.h), which runs them in order on
the caller and whichever workers come, an item at a time. Channels-first
channels small enough to stay in cache take the fused path instead: one work item runs all
stages over a group of whole channels (the kernels' train_group / backward_group). The stages
can also be called one at a time from Python (the *_stage functions below): that is how
fastbn.moments and the tests see them.

Arrays arrive C-contiguous, (outer, C, inner) >= 1, of a storage type of fastbn/_dtypes.py,
with per-channel arrays of its compute type: fastbn._api validates, this module does not.
The kernels of the array's storage type come from its table (fastbn/_tables.pxd).

Determinism: the chunks depend on the problem size only (fastbn/_plan.pyx). Threads take whole
chunks, and chunk results are merged in chunk order, so every thread count, and whichever
thread runs an item, gives the same bits.
"""
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset
import os
import numpy as np
cimport numpy as cnp

from fastbn._ckernels cimport *
from fastbn._tables cimport storage_tables
from fastbn._dtypes import available
from fastbn._plan cimport (Plan, Op, OP_TRAIN, OP_INFER, OP_BACKWARD, make_plan,
                           make_problems_plan, op_streams,
                           ceil_div, chunk_range, cl_chunk_rows, SERIAL_BELOW_STATS,
                           SERIAL_BELOW_PASS, MIN_CHUNK, MAX_CHUNKS, WAKE_FROM_STATS,
                           WAKE_FROM_PASS, WAKE_IN_LOOPS_FROM,
                           stats_serial_below)
from fastbn._threads cimport reserve_threads, release_threads, threads_for

cnp.import_array()


# ------------------------------------------------------------------------------ kernel tables

cdef enum:
    MAX_STORAGE_TYPES = 16

cdef int _ntables = 0
cdef int _typenums[MAX_STORAGE_TYPES]
cdef const fbn_kernel_table *_tables[MAX_STORAGE_TYPES]

_dtypes_here = {t.dtype: dtype for t, dtype in available()}
for _name, _address in storage_tables():
    if _name in _dtypes_here:       # its dtype exists here (bfloat16: ml_dtypes installed)
        _typenums[_ntables] = _dtypes_here[_name].num
        _tables[_ntables] = <const fbn_kernel_table *><size_t>_address
        _ntables += 1


cdef inline const fbn_kernel_table *table_of(cnp.ndarray x) except NULL:
    """The kernels of x's storage type."""
    cdef int typenum = cnp.PyArray_TYPE(x), k
    for k in range(_ntables):
        if _typenums[k] == typenum:
            return _tables[k]
    raise TypeError(f"fastbn has no kernels for dtype {x.dtype}")


def build_info():
    """Facts about this build, for ``python -m fastbn info``."""
    return {
        "openmp": fbn_openmp_version(),
        "compiler": fbn_compiler().decode(),
        "build_flags": fbn_build_flags().decode(),
        "baseline_simd": fbn_baseline_simd().decode(),
        "dispatch_targets": fbn_dispatch_targets().decode(),
        "dispatch_selected": fbn_dispatch_selected().decode(),
        "half_blocks": fbn_f16_blocks().decode(),
        "storage_types": [name for name, _ in storage_tables() if name in _dtypes_here],
    }


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
            "stream": {"train": bool(op_streams(&p, OP_TRAIN, nbytes, False)),
                       "infer": bool(op_streams(&p, OP_INFER, nbytes, False)),
                       "backward": bool(op_streams(&p, OP_BACKWARD, nbytes, False))},
            "threads": threads_for(outer * C * inner, stats_serial_below(&p)),
            "threads_infer": threads_for(outer * C * inner, SERIAL_BELOW_PASS)}


cdef extern from *:
    """
    /* tests: float16 <-> float32 by the kernels' block conversions, or one value at a time */
    static void fbn_convert_half(const void *src, void *dst, ptrdiff_t n, int to_half,
                                 int blocks)
    {
        if (to_half && blocks) fbn_store_block_f16((const float *)src, (fbn_f16 *)dst, n);
        else if (to_half) fbn_store_each_f16((const float *)src, (fbn_f16 *)dst, n);
        else if (blocks) fbn_load_block_f16((const fbn_f16 *)src, (float *)dst, n);
        else fbn_load_each_f16((const fbn_f16 *)src, (float *)dst, n);
    }
    """
    void fbn_convert_half(const void *src, void *dst, Py_ssize_t n, int to_half,
                          int blocks) noexcept nogil
    const char *fbn_f16_blocks()


def _convert_half(cnp.ndarray src, bint blocks):
    """Tests: a C-contiguous float16 array to float32, or a float32 one to float16 (flat), by the
    kernels' block conversions (blocks: the CPU's vector conversions where dtypes.h has them,
    see build_info()['half_blocks']) or one value at a time."""
    if not src.flags.c_contiguous or src.dtype not in (np.float16, np.float32):
        raise TypeError("src must be a C-contiguous float16 or float32 array")
    to_half = src.dtype == np.float32
    dst = np.empty(src.size, np.float16 if to_half else np.float32)
    fbn_convert_half(cnp.PyArray_DATA(src), cnp.PyArray_DATA(dst), src.size, to_half, blocks)
    return dst


def _set_prefetch_span(Py_ssize_t nbytes):
    """Tests: channels-first walks over nbytes of memory or more prefetch from now on (-1: the
    default, FBN_PREFETCH_SPAN in include/fastbn/walks.h). Returns the previous span."""
    global fbn_prefetch_span
    previous = <Py_ssize_t>fbn_prefetch_span
    fbn_prefetch_span = FBN_PREFETCH_SPAN if nbytes < 0 else nbytes
    return previous


# ------------------------------------------------------------------------------ the stages

cdef struct Epilogue:        # the fused forward: y = act(bn(x) + residual)
    const void *residual     # laid out as x, or NULL
    int activation           # FBN_ACT_*
    double negative_slope


cdef inline double *chunk_part(double *parts, Py_ssize_t k, Py_ssize_t fields,
                               Py_ssize_t C) noexcept nogil:
    """Chunk k's partials in an array of chunks, each `fields` rows of C (partial format)."""
    return parts + k * fields * C


cdef struct WorkItem:         # a work item of a statistics stage
    Py_ssize_t chunk          # its chunk
    Py_ssize_t channel        # channels-first: its channel
    Py_ssize_t first, last    # channels-first: its positions of the channel; channels-last: rows


cdef inline WorkItem work_item(const Plan *p, Py_ssize_t i) noexcept nogil:
    """Work item i: channels-first, chunk i % K of channel i // K; channels-last, chunk i of
    the rows."""
    cdef WorkItem w
    cdef Py_ssize_t nrows = 0
    w.first = w.last = 0
    if p.inner > 1:
        w.channel = i // p.nchunks
        w.chunk = i % p.nchunks
        chunk_range(p.count, w.chunk, p.nchunks, &w.first, &w.last)
    else:
        w.chunk = i
        w.channel = 0
        cl_chunk_rows(p, i, &w.first, &nrows)
        w.last = w.first + nrows
    return w


cdef void chunk_moments(const fbn_kernel_table *kern, const void *x, const Plan *p,
                        Py_ssize_t i, double *parts, double *scratch) noexcept nogil:
    """Statistics stage, work item i, into its chunk's partials (scratch: 3*C doubles)."""
    cdef WorkItem w = work_item(p, i)
    cdef double *part = chunk_part(parts, w.chunk, FBN_MOMENT_FIELDS, p.C)
    if p.inner > 1:
        fbn_moments_put(part, p.C, w.channel,
                        kern.moments_channel(x, p.C, p.inner, w.channel, w.first, w.last))
    else:
        kern.moments_rows(x, p.C, w.first, w.last, p.block_rows, p.row_step, part, scratch)


cdef void merge_range(double *parts, Py_ssize_t K, Py_ssize_t fields, Py_ssize_t C,
                      Py_ssize_t c0, Py_ssize_t c1, bint chunks) noexcept nogil:
    """Merge stage: units [c0, c1) of parts 1..K-1 merged into part 0, in order; fields 4:
    moments, 6: gradient sums. chunks: the parts are one call's chunks (their units share
    counts and shifts), merged without checking that; else they come from anywhere."""
    cdef Py_ssize_t k
    cdef double *part
    for k in range(1, K):
        part = chunk_part(parts, k, fields, C)
        if fields == FBN_MOMENT_FIELDS:
            if chunks:
                fbn_moments_merge_chunk(parts, part, C, c0, c1)
            else:
                fbn_moments_merge_units(parts, part, C, c0, c1)
        elif chunks:
            fbn_grad_merge_chunk(parts, part, C, c0, c1)
        else:
            fbn_grad_merge_units(parts, part, C, c0, c1)


cdef void normalize_part(const fbn_kernel_table *kern, const void *x, void *y, const Plan *p,
                         const void *coef, const Epilogue *ep, Py_ssize_t t,
                         Py_ssize_t nparts) noexcept nogil:
    """Apply stage: part t of nparts equal parts of y = act(f(x) + residual)."""
    cdef Py_ssize_t C = p.C, start = 0, stop = 0
    if p.inner > 1:
        chunk_range(p.outer * C * p.inner, t, nparts, &start, &stop)
        kern.normalize_span(x, ep.residual, y, C, p.inner, start, stop, coef, ep.activation,
                            ep.negative_slope, p.stream)
    else:
        chunk_range(p.outer, t, nparts, &start, &stop)
        kern.normalize_rows(x, ep.residual, y, C, start, stop, p.row_step, coef, ep.activation,
                            ep.negative_slope, p.stream)


cdef void chunk_grad_sums(const fbn_kernel_table *kern, const void *dy, const void *x,
                          const Plan *p, Py_ssize_t i, const fbn_grad_args *a, double *parts,
                          double *scratch) noexcept nogil:
    """Gradient sums stage, work item i, around the saved means and the shifts q (a.mean,
    a.shift), into its chunk's partials."""
    cdef WorkItem w = work_item(p, i)
    cdef double *part = chunk_part(parts, w.chunk, FBN_GRAD_FIELDS, p.C)
    cdef fbn_grad_sums sums
    if p.inner > 1:
        sums = kern.grad_sums_channel(dy, x, p.C, p.inner, w.channel, w.first, w.last, a)
        fbn_unit_put(part, p.C, w.channel, &sums, FBN_GRAD_FIELDS)
    else:
        kern.grad_sums_rows(dy, x, p.C, w.first, w.last, p.block_rows, p.row_step, a, part,
                            scratch)


cdef void grad_input_part(const fbn_kernel_table *kern, const void *g, const void *x, void *dx,
                          const Plan *p, const void *coef, Py_ssize_t t,
                          Py_ssize_t nparts) noexcept nogil:
    """Apply stage: part t of nparts equal parts of dx = f(g, x)."""
    cdef Py_ssize_t C = p.C, start = 0, stop = 0
    if p.inner > 1:
        chunk_range(p.outer * C * p.inner, t, nparts, &start, &stop)
        kern.grad_input_span(g, x, dx, C, p.inner, start, stop, coef, p.stream)
    else:
        chunk_range(p.outer, t, nparts, &start, &stop)
        kern.grad_input_rows(g, x, dx, C, start, stop, p.row_step, coef, p.stream)


# ------------------------------------------------------------------------- the whole ops

cdef extern from "fastbn/pool.h" nogil:
    ctypedef void (*fbn_item_fn)(void *ctx, Py_ssize_t item, int who) noexcept nogil
    ctypedef struct fbn_stage:
        fbn_item_fn run
        Py_ssize_t nitems
    int fbn_pool_run(const fbn_stage *stages, int nstages, void *ctx, int nthreads, int wake)
    enum: FBN_WAKE_NONE, FBN_WAKE_IN_LOOPS, FBN_WAKE_ALWAYS
    void fbn_pool_set_spin(long long ns)
    long long FBN_SPIN_NS_DEFAULT
    int fbn_pool_workers()
    long long fbn_pool_backing_off()
    void fbn_pool_set_workers_away(int away)
    long long fbn_pool_openmp_for()
    int fbn_pool_awake()
    void fbn_pool_set_openmp_for(long long ns)
    int fbn_others_running()
    void fbn_pool_set_backoff(int on)
    ctypedef struct fbn_backoff:
        pass
    fbn_backoff fbn_backoff_start()
    long long fbn_backoff_after(fbn_backoff *b, int late)


cdef int _last_helpers = 0


cdef inline void pool_run(const fbn_stage *stages, int nstages, void *ctx, int nthreads,
                          Py_ssize_t values, Py_ssize_t wake_from) noexcept nogil:
    """The stages in order, on this thread and up to nthreads - 1 of the pool's workers: those
    awake now; for a call of wake_from values or more (WAKE_FROM_*), those asleep too; from
    WAKE_IN_LOOPS_FROM values, those asleep too when the call comes back to back with the
    last."""
    global _last_helpers
    cdef int wake = (FBN_WAKE_ALWAYS if values >= wake_from else
                     FBN_WAKE_IN_LOOPS if values >= WAKE_IN_LOOPS_FROM else FBN_WAKE_NONE)
    _last_helpers = fbn_pool_run(stages, nstages, ctx, nthreads, wake)


cdef enum:
    APPLY_ITEMS_PER_THREAD = 4
    MERGE_CHANNELS = 64   # channels per work item when merging chunk results
    LINE_BYTES = 64       # a cache line
    LINE_DOUBLES = LINE_BYTES // 8


cdef struct Work:
    double *parts        # K chunks of partials (fields*C doubles each), or, on the fused
                         # channels-first path, C one-unit partials for the groups' use
    double *scratch      # channels-last: 3*C doubles per thread, each thread's at a cache
                         # line: the row loops load and store these sums once per row, and an
                         # access split across two lines costs two (docs/tuning.md)
    Py_ssize_t scratch_stride  # doubles from one thread's scratch to the next
    void *scratch_block  # the allocation scratch lies in
    void *coef           # coefficients (compute type), and what follows them


cdef int alloc_work(Work *w, const Plan *p, int nthreads, Py_ssize_t fields,
                    size_t coef_bytes) noexcept nogil:
    """Buffers for the chunk partials, the rows' scratch and the coefficients. -1, with
    nothing left allocated, when out of memory."""
    cdef Py_ssize_t C = p.C
    w.scratch = NULL
    w.scratch_block = NULL
    w.parts = <double *>malloc(max(1, p.nchunks * fields * C) * sizeof(double))
    w.coef = malloc(max(<size_t>1, coef_bytes))
    if p.inner == 1:
        w.scratch_stride = ceil_div(3 * C, LINE_DOUBLES) * LINE_DOUBLES
        w.scratch_block = malloc((nthreads * w.scratch_stride + LINE_DOUBLES) * sizeof(double))
        w.scratch = <double *>(<size_t>w.scratch_block + (-<size_t>w.scratch_block) % LINE_BYTES)
    if w.parts == NULL or w.coef == NULL or (p.inner == 1 and w.scratch_block == NULL):
        free_work(w)
        return -1
    return 0


cdef void free_work(Work *w) noexcept nogil:
    free(w.parts)
    free(w.scratch_block)
    free(w.coef)
    w.parts = w.scratch_block = w.coef = NULL


cdef inline double *thread_scratch(Work *w, int who) noexcept nogil:
    return NULL if w.scratch == NULL else w.scratch + who * w.scratch_stride


cdef struct Job:             # what a call's work items read (the pool passes it to each)
    const fbn_kernel_table *kern
    const Plan *p
    const void *x
    const void *dy           # backward: the incoming gradient
    const void *g            # backward: what the dx stage reads (dy, or the fused g)
    void *out                # y, or dx
    const fbn_train_args *train
    const fbn_grad_args *grad
    const Epilogue *ep
    Work *w
    const void *coef         # the apply stage's coefficients
    Py_ssize_t napply        # the apply stage's items
    # P problems in one stage (problem_item): each runs `item` over its per_problem items,
    # on data, coefficients, per-channel vectors and partials this far past the previous one's
    fbn_item_fn item
    Py_ssize_t per_problem
    Py_ssize_t data_step     # bytes: x, dy, g, out, the residual, the fused y and grad
    Py_ssize_t coef_step     # bytes
    Py_ssize_t vec_step      # bytes: the backward's means and shifts
    Py_ssize_t parts_step    # doubles


cdef inline Py_ssize_t apply_items(const Plan *p, int nthreads) noexcept nogil:
    """Items of an apply stage: a few per thread, so that a thread that comes late or runs
    slow leaves its share to the others; none under MIN_CHUNK values."""
    return max(1, min(APPLY_ITEMS_PER_THREAD * nthreads, p.outer * p.C * p.inner // MIN_CHUNK))


cdef void train_group_item(void *ctx, Py_ssize_t i, int who) noexcept nogil:
    # one group of channels: their statistics, their coefficients, then their y while the
    # group is in cache
    cdef Job *j = <Job *>ctx
    cdef const Plan *p = j.p
    j.kern.train_group(j.x, j.ep.residual, j.out, p.C, p.inner, p.count, i * p.group,
                       min(p.C, (i + 1) * p.group), j.train, j.ep.activation,
                       j.ep.negative_slope, <fbn_moments *>j.w.parts, j.w.coef, p.stream)


cdef void moments_item(void *ctx, Py_ssize_t i, int who) noexcept nogil:
    cdef Job *j = <Job *>ctx
    chunk_moments(j.kern, j.x, j.p, i, j.w.parts, thread_scratch(j.w, who))


cdef void train_finish_item(void *ctx, Py_ssize_t i, int who) noexcept nogil:
    # channels [c0, c1): the chunks' moments merged in chunk order, then finished
    cdef Job *j = <Job *>ctx
    cdef Py_ssize_t C = j.p.C, c0 = i * MERGE_CHANNELS, c1 = min(C, c0 + MERGE_CHANNELS)
    merge_range(j.w.parts, j.p.nchunks, FBN_MOMENT_FIELDS, C, c0, c1, True)
    j.kern.train_finish(j.w.parts, C, c0, c1, j.train, j.w.coef, False)


cdef void normalize_item(void *ctx, Py_ssize_t i, int who) noexcept nogil:
    cdef Job *j = <Job *>ctx
    normalize_part(j.kern, j.x, j.out, j.p, j.coef, j.ep, i, j.napply)


cdef void normalize_group_item(void *ctx, Py_ssize_t i, int who) noexcept nogil:
    # the apply stage alone, by whole channel groups (the staged path of the fused one)
    cdef Job *j = <Job *>ctx
    cdef const Plan *p = j.p
    j.kern.normalize_channels(j.x, j.ep.residual, j.out, p.C, p.inner, p.count, i * p.group,
                              min(p.C, (i + 1) * p.group), j.coef, j.ep.activation,
                              j.ep.negative_slope, p.stream)


cdef void grad_input_group_item(void *ctx, Py_ssize_t i, int who) noexcept nogil:
    # the dx stage alone, by whole channel groups (the staged path of the fused one)
    cdef Job *j = <Job *>ctx
    cdef const Plan *p = j.p
    j.kern.grad_input_channels(j.g, j.x, j.out, p.C, p.inner, p.count, i * p.group,
                               min(p.C, (i + 1) * p.group), j.coef, p.stream)


cdef void backward_group_item(void *ctx, Py_ssize_t i, int who) noexcept nogil:
    # one group of channels: their sums, their coefficients, then their dx while in cache
    cdef Job *j = <Job *>ctx
    cdef const Plan *p = j.p
    j.kern.backward_group(j.dy, j.x, j.out, p.C, p.inner, p.count, i * p.group,
                          min(p.C, (i + 1) * p.group), j.grad, <fbn_grad_sums *>j.w.parts,
                          j.w.coef, p.stream)


cdef void grad_sums_item(void *ctx, Py_ssize_t i, int who) noexcept nogil:
    cdef Job *j = <Job *>ctx
    chunk_grad_sums(j.kern, j.dy, j.x, j.p, i, j.grad, j.w.parts, thread_scratch(j.w, who))


cdef void grad_finish_item(void *ctx, Py_ssize_t i, int who) noexcept nogil:
    # channels [c0, c1): the chunks' sums merged in chunk order, then finished
    cdef Job *j = <Job *>ctx
    cdef Py_ssize_t C = j.p.C, c0 = i * MERGE_CHANNELS, c1 = min(C, c0 + MERGE_CHANNELS)
    merge_range(j.w.parts, j.p.nchunks, FBN_GRAD_FIELDS, C, c0, c1, True)
    j.kern.grad_finish(j.w.parts, C, c0, c1, j.grad, j.w.coef, False)


cdef void grad_input_item(void *ctx, Py_ssize_t i, int who) noexcept nogil:
    cdef Job *j = <Job *>ctx
    grad_input_part(j.kern, j.g, j.x, j.out, j.p, j.coef, i, j.napply)


cdef inline fbn_stage stage(fbn_item_fn run, Py_ssize_t nitems) noexcept nogil:
    cdef fbn_stage s
    s.run = run
    s.nitems = nitems
    return s


cdef inline const void *past(const void *a, Py_ssize_t nbytes) noexcept nogil:
    if a == NULL:
        return NULL
    return <const void *>(<const char *>a + nbytes)


cdef void problem_item(void *ctx, Py_ssize_t i, int who) noexcept nogil:
    # item i of the problems' items: the problem's own item, on a copy of the job whose
    # pointers are that problem's (the per-thread scratch is shared: a thread runs one item at
    # a time)
    cdef Job *j = <Job *>ctx
    cdef Py_ssize_t k = i // j.per_problem, d = k * j.data_step
    cdef Job local = j[0]
    cdef Epilogue ep
    cdef fbn_grad_args a
    cdef Work w
    local.x = past(j.x, d)
    local.dy = past(j.dy, d)
    local.g = past(j.g, d)
    local.out = <void *>past(j.out, d)
    local.coef = past(j.coef, k * j.coef_step)
    if j.ep != NULL:
        ep = j.ep[0]
        ep.residual = past(ep.residual, d)
        local.ep = &ep
    if j.grad != NULL:
        a = j.grad[0]
        a.mean = past(a.mean, k * j.vec_step)
        a.shift = past(a.shift, k * j.vec_step)
        a.y = past(a.y, d)
        a.grad = <void *>past(a.grad, d)
        local.grad = &a
    if j.w != NULL:
        w = j.w[0]
        w.parts = NULL if w.parts == NULL else w.parts + k * j.parts_step
        local.w = &w
    j.item(&local, i - k * j.per_problem, who)


cdef inline fbn_stage over_problems(Job *j, fbn_stage s, Py_ssize_t problems) noexcept nogil:
    """The stage s of one problem as a stage over `problems` problems laid out one after
    another (the steps in j set by the caller): each problem's items are its own chunks, so
    its results do not depend on the thread count or on the other problems' values."""
    if problems == 1:
        return s
    j.item = s.run
    j.per_problem = s.nitems
    return stage(problem_item, problems * s.nitems)


cdef inline Py_ssize_t problem_count(problems) except -1:
    """The `problems` argument of the stage entries: None (one problem, results without a
    problem axis) or P >= 1."""
    if problems is None:
        return 1
    if problems < 1:
        raise ValueError(f"problems must be positive, got {problems}")
    return problems


cdef inline Py_ssize_t statistics_items(const Plan *p) noexcept nogil:
    """Items of a statistics stage: channels-first, each chunk of each channel; channels-last,
    each chunk of rows."""
    return p.C * p.nchunks if p.inner > 1 else p.nchunks


cdef int forward_train_impl(const fbn_kernel_table *kern, const void *x, void *y, const Plan *p,
                            const fbn_train_args *a, const Epilogue *ep,
                            int nthreads) noexcept nogil:
    """Batch statistics, saved and running statistics, then y: statistics -> merge and finish
    -> apply, or one stage of whole channel groups (fastbn/_plan.pyx). -1: out of memory."""
    cdef Work w
    cdef Job j
    cdef fbn_stage stages[3]
    if alloc_work(&w, p, nthreads, FBN_MOMENT_FIELDS, FBN_NORM_COEFS * p.C * kern.compute_size):
        return -1
    j.kern, j.p, j.x, j.out, j.train, j.ep, j.w = kern, p, x, y, a, ep, &w
    j.coef = w.coef
    j.napply = apply_items(p, nthreads)
    if p.inner > 1 and p.nchunks == 1:
        stages[0] = stage(train_group_item, ceil_div(p.C, p.group))
        pool_run(stages, 1, &j, nthreads, p.count * p.C, WAKE_FROM_STATS)
    else:
        stages[0] = stage(moments_item, statistics_items(p))
        stages[1] = stage(train_finish_item, ceil_div(p.C, MERGE_CHANNELS))
        stages[2] = stage(normalize_item, j.napply)
        pool_run(stages, 3, &j, nthreads, p.count * p.C, WAKE_FROM_STATS)
    free_work(&w)
    return 0


cdef Py_ssize_t infer_impl(const fbn_kernel_table *kern, const void *x, void *y, const Plan *p,
                           const void *running_mean, const void *running_var,
                           const void *weight, const void *bias, double eps,
                           const Epilogue *ep, int nthreads) noexcept nogil:
    """y from the running statistics. -1: out of memory; 1: some running_var < 0 (y is not
    touched)."""
    cdef Job j
    cdef fbn_stage apply
    cdef void *coef = malloc(FBN_NORM_COEFS * p.C * kern.compute_size)
    if coef == NULL:
        return -1
    if kern.infer_coefficients(p.C, running_mean, running_var, weight, bias, eps, coef):
        free(coef)
        return 1
    if nthreads == 1:       # the one-thread path costs nothing to set up
        normalize_part(kern, x, y, p, coef, ep, 0, 1)
    else:
        j.kern, j.p, j.x, j.out, j.ep, j.coef = kern, p, x, y, ep, coef
        j.napply = apply_items(p, nthreads)
        apply = stage(normalize_item, j.napply)
        pool_run(&apply, 1, &j, nthreads, p.count * p.C, WAKE_FROM_PASS)
    free(coef)
    return 0


cdef int backward_impl(const fbn_kernel_table *kern, const void *dy, const void *x, void *dx,
                       const Plan *p, const fbn_grad_args *args, int nthreads) noexcept nogil:
    """dweight, dbias, then dx (stages as in forward_train_impl). -1: out of memory."""
    cdef fbn_grad_args a = args[0]
    cdef Work w
    cdef Job j
    cdef fbn_stage stages[3]
    # the coefficients, then the C dy shifts q
    if alloc_work(&w, p, nthreads, FBN_GRAD_FIELDS,
                  (FBN_GRAD_COEFS + 1) * p.C * kern.compute_size):
        return -1
    a.shift = <char *>w.coef + FBN_GRAD_COEFS * p.C * kern.compute_size
    kern.grad_shifts(dy, p.C, p.inner, &a, <void *>a.shift)
    j.kern, j.p, j.x, j.dy, j.out, j.grad, j.w = kern, p, x, dy, dx, &a, &w
    # the dx stage reads g: the fused sums stage wrote it to grad
    j.g = dy if args.grad == NULL else args.grad
    j.coef = w.coef
    j.napply = apply_items(p, nthreads)
    if p.inner > 1 and p.nchunks == 1:
        stages[0] = stage(backward_group_item, ceil_div(p.C, p.group))
        pool_run(stages, 1, &j, nthreads, p.count * p.C, WAKE_FROM_STATS)
    else:
        stages[0] = stage(grad_sums_item, statistics_items(p))
        stages[1] = stage(grad_finish_item, ceil_div(p.C, MERGE_CHANNELS))
        stages[2] = stage(grad_input_item, j.napply)
        pool_run(stages, 3, &j, nthreads, p.count * p.C, WAKE_FROM_STATS)
    free_work(&w)
    return 0


# ---------------------------------------------------------------------------- Python entries

cdef inline void *data_or_null(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline Py_ssize_t elem_stride(object a):
    return 0 if a is None else (<cnp.ndarray>a).strides[0] // (<cnp.ndarray>a).itemsize


cdef inline Epilogue make_epilogue(residual, int activation, double negative_slope):
    cdef Epilogue ep
    ep.residual = data_or_null(residual)
    ep.activation = activation
    ep.negative_slope = negative_slope
    return ep


cdef fbn_train_args train_args(weight, bias, double eps, running_mean, running_var,
                               double momentum, cnp.ndarray save_mean, cnp.ndarray save_invstd):
    cdef fbn_train_args a
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
    return a


cdef fbn_grad_args grad_args(cnp.ndarray mean, cnp.ndarray invstd, weight, dweight, dbias,
                             y, grad, int activation, double negative_slope):
    cdef fbn_grad_args a
    a.mean = cnp.PyArray_DATA(mean)
    a.invstd = cnp.PyArray_DATA(invstd)
    a.weight = data_or_null(weight)
    a.dweight = data_or_null(dweight)
    a.dbias = data_or_null(dbias)
    a.y = data_or_null(y)
    a.grad = data_or_null(grad)
    a.activation = activation
    a.negative_slope = negative_slope
    a.shift = NULL
    return a


cpdef forward_train(cnp.ndarray x, cnp.ndarray y, Py_ssize_t outer, Py_ssize_t C,
                    Py_ssize_t inner, weight, bias, double eps, running_mean, running_var,
                    double momentum, cnp.ndarray save_mean, cnp.ndarray save_invstd, residual=None,
                    int activation=FBN_ACT_NONE, double negative_slope=0.0):
    """Training forward into y, save_mean, save_invstd; running statistics (1-D, any stride,
    or None) updated in place. With residual (like x) and activation (FBN_ACT_*), y is
    act(bn(x) + residual)."""
    cdef const fbn_kernel_table *kern = table_of(x)
    cdef Plan p = make_plan(outer, C, inner, x.itemsize, OP_TRAIN)
    cdef Epilogue ep = make_epilogue(residual, activation, negative_slope)
    cdef fbn_train_args a = train_args(weight, bias, eps, running_mean, running_var, momentum,
                                       save_mean, save_invstd)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *yp = cnp.PyArray_DATA(y)
    cdef int status
    cdef int nthreads = reserve_threads(outer * C * inner, stats_serial_below(&p))
    with nogil:
        status = forward_train_impl(kern, xp, yp, &p, &a, &ep, nthreads)
    release_threads(nthreads)
    if status != 0:
        raise MemoryError("fastbn: out of memory for the per-channel partial statistics")


cpdef forward_infer(cnp.ndarray x, cnp.ndarray y, Py_ssize_t outer, Py_ssize_t C,
                    Py_ssize_t inner, cnp.ndarray running_mean, cnp.ndarray running_var,
                    weight, bias, double eps, residual=None, int activation=FBN_ACT_NONE,
                    double negative_slope=0.0):
    """Inference forward into y (act(bn(x) + residual) as in forward_train). Raises
    ValueError, before writing, if running_var < 0."""
    cdef const fbn_kernel_table *kern = table_of(x)
    cdef Plan p = make_plan(outer, C, inner, x.itemsize, OP_INFER)
    cdef Epilogue ep = make_epilogue(residual, activation, negative_slope)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *yp = cnp.PyArray_DATA(y)
    cdef void *rm = cnp.PyArray_DATA(running_mean)
    cdef void *rv = cnp.PyArray_DATA(running_var)
    cdef void *w = data_or_null(weight)
    cdef void *b = data_or_null(bias)
    cdef Py_ssize_t status
    cdef int nthreads = reserve_threads(outer * C * inner, SERIAL_BELOW_PASS)
    with nogil:
        status = infer_impl(kern, xp, yp, &p, rm, rv, w, b, eps, &ep, nthreads)
    release_threads(nthreads)
    if status == -1:
        raise MemoryError("fastbn: out of memory for the normalizing coefficients")
    if status == 1:
        channel = int(np.argmax(running_var < 0))
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
    cdef const fbn_kernel_table *kern = table_of(x)
    cdef Plan p = make_plan(outer, C, inner, x.itemsize, OP_BACKWARD)
    cdef fbn_grad_args a = grad_args(mean, invstd, weight, dweight, dbias, y, grad, activation,
                                     negative_slope)
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *dxp = cnp.PyArray_DATA(dx)
    cdef int status
    cdef int nthreads = reserve_threads(outer * C * inner, stats_serial_below(&p))
    with nogil:
        status = backward_impl(kern, dyp, xp, dxp, &p, &a, nthreads)
    release_threads(nthreads)
    if status != 0:
        raise MemoryError("fastbn: out of memory for the per-channel gradient sums")


# ---------------------------------------------------------------------- row-wise norms
# LayerNorm and RMSNorm (include/fastbn/rows_impl.h): rows of D contiguous values, each row's
# statistics and output made in one pass of a work item. Items are blocks of whole rows fixed
# by the shape; the backward's dweight and dbias are each item's partial sums, added in item
# order, so every thread count gives the same bits.

cdef enum:
    ROW_ITEM_ROWS = 16      # backward: rows per item at least, so that the items' partial sums
                            # (2*D doubles each) come to at most a byte per value of x
    MERGE_COLUMNS = 4096    # positions per work item when the partial sums are added


cdef inline Py_ssize_t row_items(Py_ssize_t nrows, Py_ssize_t D,
                                 Py_ssize_t min_rows) noexcept nogil:
    """Work items of a row-wise op: blocks of whole rows of MIN_CHUNK values or more, at most
    MAX_CHUNKS of them (by the shape only)."""
    return max(1, min(MAX_CHUNKS, nrows * D // MIN_CHUNK, nrows // min_rows))


cdef struct RowsJob:
    const fbn_kernel_table *kern
    const void *x
    const void *dy
    void *out                # y, or dx
    Py_ssize_t D, nrows, nitems
    const fbn_rows_args *a
    double *parts            # backward: each item's dweight | dbias sums (2*D doubles)


cdef void rows_forward_item(void *ctx, Py_ssize_t i, int who) noexcept nogil:
    cdef RowsJob *j = <RowsJob *>ctx
    cdef Py_ssize_t r0 = 0, r1 = 0
    chunk_range(j.nrows, i, j.nitems, &r0, &r1)
    j.kern.rows_forward(j.x, j.out, j.D, r0, r1, j.a)


cdef void rows_backward_item(void *ctx, Py_ssize_t i, int who) noexcept nogil:
    cdef RowsJob *j = <RowsJob *>ctx
    cdef Py_ssize_t r0 = 0, r1 = 0
    cdef double *part = j.parts + 2 * i * j.D
    chunk_range(j.nrows, i, j.nitems, &r0, &r1)
    j.kern.rows_backward(j.dy, j.x, j.out, j.D, r0, r1, j.a, part, part + j.D)


cdef void rows_merge_item(void *ctx, Py_ssize_t i, int who) noexcept nogil:
    # positions [d0, d1) of dweight and dbias: the items' sums added into item 0's, in order
    cdef RowsJob *j = <RowsJob *>ctx
    cdef Py_ssize_t D = j.D, d0 = i * MERGE_COLUMNS, d1 = min(D, d0 + MERGE_COLUMNS), k, d
    cdef double *part
    for k in range(1, j.nitems):
        part = j.parts + 2 * k * D
        for d in range(d0, d1):
            j.parts[d] += part[d]
            j.parts[D + d] += part[D + d]


cdef fbn_rows_args rows_args(cnp.ndarray weight, bias, double eps, bint centred, mean,
                             cnp.ndarray invstd, residual, y, grad, int activation,
                             double negative_slope):
    cdef fbn_rows_args a
    a.weight = cnp.PyArray_DATA(weight)
    a.bias = data_or_null(bias)
    a.eps = eps
    a.centred = centred
    a.mean = data_or_null(mean)
    a.invstd = cnp.PyArray_DATA(invstd)
    a.residual = data_or_null(residual)
    a.y = data_or_null(y)
    a.grad = data_or_null(grad)
    a.activation = activation
    a.negative_slope = negative_slope
    return a


cdef run_rows(RowsJob *j, fbn_stage *stages, int nstages, Py_ssize_t values):
    cdef int nthreads = reserve_threads(values, SERIAL_BELOW_STATS)
    try:
        with nogil:
            pool_run(stages, nstages, j, nthreads, values, WAKE_FROM_STATS)
    finally:
        release_threads(nthreads)


def rows_forward(cnp.ndarray x, cnp.ndarray y, Py_ssize_t D, cnp.ndarray weight,
                 cnp.ndarray bias, double eps, bint centred, mean, cnp.ndarray invstd,
                 residual=None, int activation=FBN_ACT_NONE, double negative_slope=0.0):
    """LayerNorm (centred) or RMSNorm forward of x's rows of D values into y, with each row's
    mean (centred only) and invstd (1 / rms) into mean and invstd; with residual (like x) and
    activation, y = act(norm(x) + residual). weight and bias: D values of the compute type
    (ones and zeros where the op has none)."""
    cdef fbn_rows_args a = rows_args(weight, bias, eps, centred, mean, invstd, residual, None,
                                     None, activation, negative_slope)
    cdef RowsJob j
    cdef fbn_stage apply
    j.kern, j.x, j.out, j.D, j.a = table_of(x), cnp.PyArray_DATA(x), cnp.PyArray_DATA(y), D, &a
    j.nrows = x.size // D
    j.nitems = row_items(j.nrows, D, 1)
    apply = stage(rows_forward_item, j.nitems)
    run_rows(&j, &apply, 1, x.size)


def rows_backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t D,
                  cnp.ndarray weight, bint centred, mean, cnp.ndarray invstd, y=None,
                  grad=None, int activation=FBN_ACT_NONE, double negative_slope=0.0):
    """Gradients of rows_forward into dx; returns (2, D) float64, the sums dweight and dbias
    (dy * xhat and dy over the rows). With grad (like x), dy is the gradient of the fused
    output: g = dy * act'(y) goes to grad (the residual's gradient) and the gradients are g's.
    grad must not be x; it may be dx, dy or y."""
    cdef fbn_rows_args a = rows_args(weight, None, 0.0, centred, mean, invstd, None, y, grad,
                                     activation, negative_slope)
    cdef RowsJob j
    cdef fbn_stage stages[2]
    j.kern, j.x, j.dy, j.out, j.D, j.a = table_of(x), cnp.PyArray_DATA(x), \
        cnp.PyArray_DATA(dy), cnp.PyArray_DATA(dx), D, &a
    j.nrows = x.size // D
    j.nitems = row_items(j.nrows, D, ROW_ITEM_ROWS)
    cdef cnp.ndarray parts = np.zeros((j.nitems, 2, D))
    j.parts = <double *>cnp.PyArray_DATA(parts)
    stages[0] = stage(rows_backward_item, j.nitems)
    stages[1] = stage(rows_merge_item, ceil_div(D, MERGE_COLUMNS))
    run_rows(&j, stages, 2, x.size)
    return parts[0]


# ------------------------------------------------------------------ the stages, one at a time
# The same stage functions as the ops above, each called on its own: (outer, C, inner) arrays
# as the entries take them; partials in the partial format, float64 arrays of shape
# (fields, C) for a problem and (K, fields, C) for its K chunks (include/fastbn/moments.h).
# The passes over the data run on the op's threads, split as the op splits them (the same
# bits for any thread count): synchronized batch norm runs on these entries.
# problems=P runs P such problems laid out one after another ((P, outer, C, inner) data, a
# problem axis first on the per-problem arrays) in one pool job, without a call's overhead per
# problem; each problem is split alike, in chunks, rows per step and streaming chosen for all
# P problems together (make_problems_plan: fewer chunks a problem, as many problems give the
# threads enough items).

def statistics_stage(cnp.ndarray x, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                     problems=None):
    """The moments of each of the training plan's chunks: (K, 4, C) float64 ((P, K, 4, C)
    for problems=P). Channels-first channels on the fused path are one chunk each."""
    cdef const fbn_kernel_table *kern = table_of(x)
    cdef Py_ssize_t P = problem_count(problems)
    cdef Plan p = make_problems_plan(P, outer, C, inner, x.itemsize, OP_TRAIN)
    cdef cnp.ndarray parts = np.zeros((P, p.nchunks, FBN_MOMENT_FIELDS, C))
    cdef Work w
    cdef Job j
    cdef fbn_stage moments
    cdef int nthreads = reserve_threads(P * outer * C * inner, SERIAL_BELOW_STATS)
    memset(&j, 0, sizeof(j))
    j.data_step = outer * C * inner * x.itemsize
    j.parts_step = p.nchunks * FBN_MOMENT_FIELDS * C
    moments = over_problems(&j, stage(moments_item, statistics_items(&p)), P)
    try:
        if alloc_work(&w, &p, nthreads, 0, 0):
            raise MemoryError("fastbn: out of memory for the statistics' scratch")
        j.kern, j.p, j.x, j.w = kern, &p, cnp.PyArray_DATA(x), &w
        free(w.parts)                   # the chunks' partials go straight to `parts`
        w.parts = <double *>cnp.PyArray_DATA(parts)
        with nogil:
            pool_run(&moments, 1, &j, nthreads, P * p.count * C, WAKE_FROM_PASS)
        w.parts = NULL
        free_work(&w)
    finally:
        release_threads(nthreads)
    return parts[0] if problems is None else parts


def merge_stage(cnp.ndarray parts):
    """(K, fields, U) chunk partials merged in order: (fields, U), a copy. fields 4: moments,
    6: gradient sums."""
    parts = np.ascontiguousarray(parts, dtype=np.float64)
    cdef Py_ssize_t K = parts.shape[0], fields = parts.shape[1], U = parts.shape[2]
    cdef cnp.ndarray merged = parts.copy()
    cdef double *mp = <double *>cnp.PyArray_DATA(merged)
    merge_range(mp, K, fields, U, 0, U, False)
    return merged[0]


def finish_moments_stage(cnp.ndarray part, double eps):
    """(4, U) moments to float64 arrays (mean, biased var, unbiased var, invstd)."""
    part = np.ascontiguousarray(part, dtype=np.float64)
    cdef Py_ssize_t U = part.shape[1], u
    cdef const double *pp = <const double *>cnp.PyArray_DATA(part)
    cdef double[::1] mean = np.empty(U), var = np.empty(U)
    cdef double[::1] var_unbiased = np.empty(U), invstd = np.empty(U)
    for u in range(U):
        fbn_moments_finish(fbn_moments_get(pp, U, u), eps, &mean[u], &var[u], &var_unbiased[u],
                           &invstd[u])
    return mean.base, var.base, var_unbiased.base, invstd.base


def finish_train_stage(cnp.ndarray part, cnp.ndarray like, weight, bias, double eps,
                       running_mean, running_var, double momentum, cnp.ndarray save_mean,
                       cnp.ndarray save_invstd):
    """(4, C) moments to the coefficients (3*C values of save_mean's dtype), the saved and
    the running statistics, for data like `like` ((outer, C, inner)), as its forward does."""
    cdef const fbn_kernel_table *kern = table_of(like)
    cdef Py_ssize_t C = part.shape[1]
    cdef Plan p = make_plan(like.shape[0], C, like.shape[2], like.itemsize, OP_TRAIN)
    cdef fbn_train_args a = train_args(weight, bias, eps, running_mean, running_var, momentum,
                                       save_mean, save_invstd)
    cdef cnp.ndarray coef = np.empty(FBN_NORM_COEFS * C, save_mean.dtype)
    part = np.ascontiguousarray(part, dtype=np.float64)
    kern.train_finish(<const double *>cnp.PyArray_DATA(part), C, 0, C, &a,
                      cnp.PyArray_DATA(coef), p.inner > 1 and p.nchunks == 1)
    return coef


def normalize_stage(cnp.ndarray x, cnp.ndarray y, Py_ssize_t outer, Py_ssize_t C,
                    Py_ssize_t inner, cnp.ndarray coef, residual=None,
                    int activation=FBN_ACT_NONE, double negative_slope=0.0, problems=None):
    """y = act(normalize(x) + residual) from the coefficients (3*C values; (P, 3, C) for
    problems=P), as the training forward applies them (by whole channels where its plan
    groups them)."""
    cdef Py_ssize_t P = problem_count(problems)
    cdef Plan p = make_problems_plan(P, outer, C, inner, x.itemsize, OP_TRAIN)
    cdef Epilogue ep = make_epilogue(residual, activation, negative_slope)
    cdef Job j
    cdef fbn_stage apply
    cdef int nthreads = reserve_threads(P * outer * C * inner, SERIAL_BELOW_STATS)
    memset(&j, 0, sizeof(j))
    j.kern, j.p, j.x, j.out, j.ep = table_of(x), &p, cnp.PyArray_DATA(x), cnp.PyArray_DATA(y), &ep
    j.coef = cnp.PyArray_DATA(coef)
    j.napply = apply_items(&p, nthreads)
    if inner > 1 and p.nchunks == 1:
        apply = stage(normalize_group_item, ceil_div(C, p.group))
    else:
        apply = stage(normalize_item, j.napply)
    j.data_step = outer * C * inner * x.itemsize
    j.coef_step = FBN_NORM_COEFS * C * coef.itemsize
    apply = over_problems(&j, apply, P)
    try:
        with nogil:
            pool_run(&apply, 1, &j, nthreads, P * p.count * C, WAKE_FROM_PASS)
    finally:
        release_threads(nthreads)


def grad_shifts_stage(cnp.ndarray dy, Py_ssize_t C, Py_ssize_t inner, cnp.ndarray like_mean,
                      y=None, grad=None, int activation=FBN_ACT_NONE,
                      double negative_slope=0.0):
    """Each channel's dy shift q (C values of like_mean's dtype), as the backward takes them."""
    cdef const fbn_kernel_table *kern = table_of(dy)
    cdef fbn_grad_args a = grad_args(like_mean, like_mean, None, None, None, y, grad,
                                     activation, negative_slope)
    cdef cnp.ndarray q = np.empty(C, like_mean.dtype)
    kern.grad_shifts(cnp.PyArray_DATA(dy), C, inner, &a, cnp.PyArray_DATA(q))
    return q


def grad_sums_stage(cnp.ndarray dy, cnp.ndarray x, Py_ssize_t outer, Py_ssize_t C,
                    Py_ssize_t inner, cnp.ndarray mean, cnp.ndarray shift, y=None, grad=None,
                    int activation=FBN_ACT_NONE, double negative_slope=0.0, problems=None):
    """The gradient sums of each of the backward plan's chunks around mean and shift (C
    values each; (P, C) for problems=P): (K, 6, C) float64 ((P, K, 6, C)). With grad,
    g = dy * act'(y) is written there first."""
    cdef const fbn_kernel_table *kern = table_of(x)
    cdef Py_ssize_t P = problem_count(problems)
    cdef Plan p = make_problems_plan(P, outer, C, inner, x.itemsize, OP_BACKWARD)
    cdef fbn_grad_args a = grad_args(mean, mean, None, None, None, y, grad, activation,
                                     negative_slope)
    cdef cnp.ndarray parts = np.zeros((P, p.nchunks, FBN_GRAD_FIELDS, C))
    cdef Work w
    cdef Job j
    cdef fbn_stage sums
    cdef int nthreads = reserve_threads(P * outer * C * inner, SERIAL_BELOW_STATS)
    memset(&j, 0, sizeof(j))
    j.data_step = outer * C * inner * x.itemsize
    j.vec_step = C * mean.itemsize
    j.parts_step = p.nchunks * FBN_GRAD_FIELDS * C
    sums = over_problems(&j, stage(grad_sums_item, statistics_items(&p)), P)
    a.shift = cnp.PyArray_DATA(shift)
    try:
        if alloc_work(&w, &p, nthreads, 0, 0):
            raise MemoryError("fastbn: out of memory for the gradient sums' scratch")
        j.kern, j.p, j.x, j.dy, j.grad, j.w = table_of(x), &p, cnp.PyArray_DATA(x), \
            cnp.PyArray_DATA(dy), &a, &w
        free(w.parts)                   # the chunks' sums go straight to `parts`
        w.parts = <double *>cnp.PyArray_DATA(parts)
        with nogil:
            pool_run(&sums, 1, &j, nthreads, P * p.count * C, WAKE_FROM_PASS)
        w.parts = NULL
        free_work(&w)
    finally:
        release_threads(nthreads)
    return parts[0] if problems is None else parts


def finish_grad_stage(cnp.ndarray part, cnp.ndarray like, cnp.ndarray invstd, weight,
                      cnp.ndarray dweight, cnp.ndarray dbias):
    """(6, C) gradient sums to the coefficients (5*C values of invstd's dtype), dweight and
    dbias, for data like `like` ((outer, C, inner)), as its backward does."""
    cdef const fbn_kernel_table *kern = table_of(like)
    cdef Py_ssize_t C = part.shape[1]
    cdef Plan p = make_plan(like.shape[0], C, like.shape[2], like.itemsize, OP_BACKWARD)
    cdef fbn_grad_args a = grad_args(invstd, invstd, weight, dweight, dbias, None, None,
                                     FBN_ACT_NONE, 0.0)
    cdef cnp.ndarray coef = np.empty(FBN_GRAD_COEFS * C, invstd.dtype)
    part = np.ascontiguousarray(part, dtype=np.float64)
    kern.grad_finish(<const double *>cnp.PyArray_DATA(part), C, 0, C, &a,
                     cnp.PyArray_DATA(coef), p.inner > 1 and p.nchunks == 1)
    return coef


def grad_input_stage(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t outer,
                     Py_ssize_t C, Py_ssize_t inner, cnp.ndarray coef, problems=None):
    """dx from g (dy, or the fused g) and x, and the gradient coefficients (5*C values;
    (P, 5, C) for problems=P), as the backward applies them (by whole channels where its plan
    groups them)."""
    cdef Py_ssize_t P = problem_count(problems)
    cdef Plan p = make_problems_plan(P, outer, C, inner, x.itemsize, OP_BACKWARD)
    cdef Job j
    cdef fbn_stage apply
    cdef int nthreads = reserve_threads(P * outer * C * inner, SERIAL_BELOW_STATS)
    memset(&j, 0, sizeof(j))
    j.kern, j.p, j.x, j.g, j.out = table_of(x), &p, cnp.PyArray_DATA(x), cnp.PyArray_DATA(g), \
        cnp.PyArray_DATA(dx)
    j.coef = cnp.PyArray_DATA(coef)
    j.napply = apply_items(&p, nthreads)
    if inner > 1 and p.nchunks == 1:
        apply = stage(grad_input_group_item, ceil_div(C, p.group))
    else:
        apply = stage(grad_input_item, j.napply)
    j.data_step = outer * C * inner * x.itemsize
    j.coef_step = FBN_GRAD_COEFS * C * coef.itemsize
    apply = over_problems(&j, apply, P)
    try:
        with nogil:
            pool_run(&apply, 1, &j, nthreads, P * p.count * C, WAKE_FROM_PASS)
    finally:
        release_threads(nthreads)


# --------------------------------------------------------------------------------- helpers

def address(cnp.ndarray a):
    """The address of a's first element (identity test for out= aliasing)."""
    return <size_t>cnp.PyArray_DATA(a)


cdef struct Copy:
    const char *src
    char *dst
    Py_ssize_t nbytes, nparts


cdef void copy_item(void *ctx, Py_ssize_t i, int who) noexcept nogil:
    cdef Copy *c = <Copy *>ctx
    cdef Py_ssize_t start = 0, stop = 0
    chunk_range(c.nbytes, i, c.nparts, &start, &stop)
    memcpy(c.dst + start, c.src + start, stop - start)


def parallel_copy(cnp.ndarray src, cnp.ndarray dst):
    """dst[...] = src for C-contiguous arrays of equal size, split over get_num_threads()
    threads: the memory-bandwidth yardstick of the benchmarks (one read, one write)."""
    cdef Copy c
    cdef fbn_stage copy
    cdef int nthreads = reserve_threads(src.nbytes, 0)
    c.src = <const char *>cnp.PyArray_DATA(src)
    c.dst = <char *>cnp.PyArray_DATA(dst)
    c.nbytes = src.nbytes
    c.nparts = nthreads
    copy = stage(copy_item, nthreads)
    try:
        with nogil:
            pool_run(&copy, 1, &c, nthreads, src.size, WAKE_FROM_PASS)
    finally:
        release_threads(nthreads)


def pool_info():
    """The thread pool: workers started, those awake now, how many ran part of the last
    parallel call, the seconds for which no sleeping worker is woken (workers came late: a
    busy machine), and those for which calls run in an OpenMP region (another library's
    OpenMP workers spin in this process)."""
    return {"workers": fbn_pool_workers(), "awake": fbn_pool_awake(),
            "last_helpers": _last_helpers,
            "no_wake_for_s": fbn_pool_backing_off() * 1e-9,
            "openmp_for_s": fbn_pool_openmp_for() * 1e-9}


def _default_spin_ns():
    """How long idle workers poll before they sleep: OMP_WAIT_POLICY's choice where the user
    made one (passive: sleep at once; active: never sleep), else FBN_SPIN_NS_DEFAULT."""
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip().lower()
    return {"passive": 0, "active": -1}.get(policy, FBN_SPIN_NS_DEFAULT)


def _set_pool_spin(ns=None):
    """How long idle workers poll for the next job before sleeping (ns; -1: never sleep;
    None: the default)."""
    fbn_pool_set_spin(_default_spin_ns() if ns is None else ns)


_set_pool_spin()


def _set_pool_backoff(bint on):
    """Tests: whether a call the machine slowed stops the next calls waking workers."""
    fbn_pool_set_backoff(on)


def _backoff_waits(lates):
    """Tests: the nanoseconds for which no sleeping worker is woken after each of a sequence
    of jobs, late (true) or on time, from the back-off's start."""
    cdef fbn_backoff b = fbn_backoff_start()
    return [fbn_backoff_after(&b, bool(late)) for late in lates]


def _set_workers_away(bint away):
    """Tests: workers take no items from now on, as if the OS never scheduled them."""
    fbn_pool_set_workers_away(away)


def _set_openmp_for(double seconds):
    """Tests: calls run in an OpenMP region for this long from now (never in a forked child)."""
    fbn_pool_set_openmp_for(<long long>(seconds * 1e9))


def _others_running():
    """Tests: whether a thread of this process other than the caller and the pool's workers is
    runnable now (what sends calls to an OpenMP region after a slow one)."""
    return bool(fbn_others_running())
