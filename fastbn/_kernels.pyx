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
from libc.math cimport sqrt
cimport numpy as cnp

cnp.import_array()

cdef enum:
    BLOCK = 2048          # values per statistics block: its second read comes from L1
    MIN_CHUNK = 16384     # values per chunk at least: smaller chunks cost more than they give
    MAX_CHUNKS = 64       # work items aimed for when channels are few: enough for 64 threads
    SERIAL_BELOW = 65536  # total values under which one thread does everything (no fork/join)

SERIAL_THRESHOLD = SERIAL_BELOW


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


def get_num_threads():
    """The number of threads a large enough fastbn call uses."""
    return _requested_threads if _requested_threads > 0 else fbn_max_threads()


cdef int threads_for(Py_ssize_t size) noexcept:
    if size < SERIAL_BELOW:
        return 1
    return _requested_threads if _requested_threads > 0 else fbn_max_threads()


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
    # channels-first (inner > 1): a block is `block_runs` whole runs, or one of `pieces`
    # pieces of `piece_len` values of a run when runs are long
    Py_ssize_t block_runs, pieces, piece_len
    # channels-last (inner == 1): a block is `block_rows` rows of C channels
    Py_ssize_t block_rows
    Py_ssize_t nblocks    # blocks per channel (channels-first) or of all rows (channels-last)
    Py_ssize_t nchunks    # consecutive-block chunks, likewise: one chunk is one work item


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef Plan make_plan(Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner) noexcept nogil:
    """Blocks and chunks for an (outer, C, inner) problem; needs outer, C, inner >= 1."""
    cdef Plan p
    p.outer = outer
    p.C = C
    p.inner = inner
    p.block_rows = 0
    if inner > 1:
        if inner >= BLOCK:
            p.block_runs = 1
            p.pieces = ceil_div(inner, BLOCK)
            p.piece_len = ceil_div(inner, p.pieces)
        else:
            p.block_runs = BLOCK // inner
            p.pieces = 1
            p.piece_len = inner
        p.nblocks = ceil_div(outer, p.block_runs) * p.pieces
        # split channels into chunks only when they are too few to feed the threads
        p.nchunks = max(1, min(ceil_div(MAX_CHUNKS, C), p.nblocks, outer * inner // MIN_CHUNK))
    else:
        p.block_rows = max(1, BLOCK // C)
        p.block_runs = p.pieces = p.piece_len = 1
        p.nblocks = ceil_div(outer, p.block_rows)
        p.nchunks = max(1, min(MAX_CHUNKS, p.nblocks, outer * C // MIN_CHUNK))
    return p


def plan(Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner):
    """The work split for an (outer, C, inner) problem, as a dict (for tests and benchmarks)."""
    cdef Plan p = make_plan(outer, C, inner)
    return {"family": "channels_first" if inner > 1 else "channels_last",
            "nblocks": p.nblocks, "nchunks": p.nchunks,
            "block_runs": p.block_runs, "pieces": p.pieces, "block_rows": p.block_rows,
            "threads": threads_for(outer * C * inner)}


cdef inline void chunk_blocks(const Plan *p, Py_ssize_t k, Py_ssize_t *first,
                              Py_ssize_t *last) noexcept nogil:
    """Blocks [first, last) of chunk k."""
    first[0] = k * p.nblocks // p.nchunks
    last[0] = (k + 1) * p.nblocks // p.nchunks


cdef inline Py_ssize_t cf_block(const Plan *p, Py_ssize_t c, Py_ssize_t b, Py_ssize_t *nruns,
                                Py_ssize_t *length) noexcept nogil:
    """Offset of block b of channel c (channels-first); its run count and run length."""
    cdef Py_ssize_t first_run = (b // p.pieces) * p.block_runs
    cdef Py_ssize_t start = (b % p.pieces) * p.piece_len
    nruns[0] = min(p.block_runs, p.outer - first_run)
    length[0] = min(p.piece_len, p.inner - start)
    return (first_run * p.C + c) * p.inner + start


cdef inline Py_ssize_t cl_block(const Plan *p, Py_ssize_t b, Py_ssize_t *nrows) noexcept nogil:
    """First row of block b (channels-last) and its row count."""
    cdef Py_ssize_t first_row = b * p.block_rows
    nrows[0] = min(p.block_rows, p.outer - first_row)
    return first_row


# ------------------------------------------------------------------------------ forward pass

cdef struct TrainArgs:
    const void *weight       # C values, or NULL for gamma = 1
    const void *bias         # C values, or NULL for beta = 0
    double eps
    void *running_mean       # C values at a stride, or NULL
    void *running_var
    Py_ssize_t running_mean_stride
    Py_ssize_t running_var_stride
    double momentum
    void *save_mean          # C outputs
    void *save_invstd


# Normalizing coefficients, 4*C values: hi | lo | scale | offset, so that
#     y = ((x - hi[c]) - lo[c]) * scale[c] + offset[c]          (see kernels_impl.h)

cdef void finish_train_channel(floating *coef, Py_ssize_t C, Py_ssize_t c, fbn_moments m,
                               const TrainArgs *a) noexcept nogil:
    """Channel c's coefficients, saved mean and invstd, and running statistics."""
    cdef double gamma = 1.0 if a.weight == NULL else (<const floating *>a.weight)[c]
    cdef double beta = 0.0 if a.bias == NULL else (<const floating *>a.bias)[c]
    cdef double invstd = train_coefficients(m, a.eps, gamma, beta, &coef[c], &coef[C + c],
                                            &coef[2 * C + c], &coef[3 * C + c])
    (<floating *>a.save_mean)[c] = coef[c]
    (<floating *>a.save_invstd)[c] = <floating>invstd
    if a.running_mean != NULL:
        update_running(&(<floating *>a.running_mean)[c * a.running_mean_stride],
                       &(<floating *>a.running_var)[c * a.running_var_stride], m, a.momentum)


cdef fbn_moments cf_chunk_moments(const floating *x, const Plan *p, Py_ssize_t c,
                                  Py_ssize_t k) noexcept nogil:
    cdef fbn_moments acc = fbn_moments_empty
    cdef Py_ssize_t b, first, last, nruns, length, offset
    chunk_blocks(p, k, &first, &last)
    for b in range(first, last):
        offset = cf_block(p, c, b, &nruns, &length)
        fbn_moments_merge(&acc, moments_runs(x + offset, nruns, p.C * p.inner, length))
    return acc


cdef void cl_chunk_moments(const floating *x, const Plan *p, Py_ssize_t k, fbn_moments *acc,
                           double *scratch) noexcept nogil:
    """Chunk k's moments of every channel into acc[0:C]; scratch holds 3*C doubles."""
    cdef Py_ssize_t C = p.C, b, c, first, last, first_row, nrows
    cdef double *shift = scratch
    cdef double *dev_sum = scratch + C
    cdef double *m2 = scratch + 2 * C
    cdef fbn_moments block
    for c in range(C):
        acc[c] = fbn_moments_empty
    chunk_blocks(p, k, &first, &last)
    for b in range(first, last):
        first_row = cl_block(p, b, &nrows)
        moments_rows(x + first_row * C, nrows, C, shift, dev_sum, m2)
        block.count = <double>nrows
        for c in range(C):
            block.shift = shift[c]
            block.dev_sum = dev_sum[c]
            block.m2 = m2[c]
            fbn_moments_merge(&acc[c], block)


cdef void cf_chunk_normalize(const floating *x, floating *y, const Plan *p, Py_ssize_t c,
                             Py_ssize_t k, const floating *coef) noexcept nogil:
    cdef Py_ssize_t C = p.C, b, first, last, nruns, length, offset
    chunk_blocks(p, k, &first, &last)
    for b in range(first, last):
        offset = cf_block(p, c, b, &nruns, &length)
        normalize_runs(x + offset, y + offset, nruns, C * p.inner, length,
                       coef[c], coef[C + c], coef[2 * C + c], coef[3 * C + c])


cdef void normalize(const floating *x, floating *y, const Plan *p, const floating *coef,
                    int nthreads) noexcept nogil:
    """y from x and the coefficients, in parallel (an elementwise pass: any split is exact)."""
    cdef Py_ssize_t C = p.C, K = p.nchunks, i, b, first_row, nrows
    if p.inner > 1:
        for i in prange(C * K, schedule='static', num_threads=nthreads,
                        use_threads_if=nthreads > 1):
            cf_chunk_normalize(x, y, p, i // K, i % K, coef)
    else:
        for b in prange(p.nblocks, schedule='static', num_threads=nthreads,
                        use_threads_if=nthreads > 1):
            first_row = cl_block(p, b, &nrows)
            normalize_rows(x + first_row * C, y + first_row * C, nrows, C,
                           coef, coef + C, coef + 2 * C, coef + 3 * C)


cdef int forward_train_impl(const floating *x, floating *y, const Plan *p, const TrainArgs *a,
                            int nthreads) noexcept nogil:
    """Batch statistics, saved statistics, running statistics, then y. -1: out of memory."""
    cdef Py_ssize_t C = p.C, K = p.nchunks, c, k, i
    cdef floating *coef = <floating *>malloc(4 * C * sizeof(floating))
    cdef fbn_moments *parts = NULL
    cdef double *scratch = NULL
    cdef fbn_moments m
    if coef == NULL:
        return -1

    if p.inner > 1 and K == 1:
        # One channel per work item: its statistics, then y while the channel is in cache.
        for c in prange(C, schedule='static', num_threads=nthreads, use_threads_if=nthreads > 1):
            finish_train_channel(coef, C, c, cf_chunk_moments(x, p, c, 0), a)
            cf_chunk_normalize(x, y, p, c, 0, coef)
        free(coef)
        return 0

    # Few channels, or channels-last: per-chunk moments, merged in chunk order, then y.
    parts = <fbn_moments *>malloc(C * K * sizeof(fbn_moments))
    if p.inner == 1:
        scratch = <double *>malloc(nthreads * 3 * C * sizeof(double))
    if parts == NULL or (p.inner == 1 and scratch == NULL):
        free(coef)
        free(parts)
        free(scratch)
        return -1
    if p.inner > 1:       # parts[c*K + k]
        for i in prange(C * K, schedule='static', num_threads=nthreads,
                        use_threads_if=nthreads > 1):
            parts[i] = cf_chunk_moments(x, p, i // K, i % K)
        for c in range(C):
            m = parts[c * K]
            for k in range(1, K):
                fbn_moments_merge(&m, parts[c * K + k])
            finish_train_channel(coef, C, c, m, a)
    else:                 # parts[k*C + c]
        with parallel(num_threads=nthreads, use_threads_if=nthreads > 1):
            for k in prange(K, schedule='static'):
                cl_chunk_moments(x, p, k, parts + k * C, scratch + threadid() * 3 * C)
        for c in range(C):
            m = parts[c]
            for k in range(1, K):
                fbn_moments_merge(&m, parts[k * C + c])
            finish_train_channel(coef, C, c, m, a)
    normalize(x, y, p, coef, nthreads)
    free(parts)
    free(scratch)
    free(coef)
    return 0


cdef Py_ssize_t infer_impl(const floating *x, floating *y, const Plan *p,
                           const floating *running_mean, const floating *running_var,
                           const floating *weight, const floating *bias, double eps,
                           int nthreads) noexcept nogil:
    """y from the running statistics. -1: out of memory; c + 1: running_var[c] < 0."""
    cdef Py_ssize_t C = p.C, c
    cdef double gamma
    cdef floating *coef = <floating *>malloc(4 * C * sizeof(floating))
    if coef == NULL:
        return -1
    for c in range(C):
        if running_var[c] < 0:   # checked before y is touched
            free(coef)
            return c + 1
        gamma = 1.0 if weight == NULL else weight[c]
        coef[c] = running_mean[c]
        coef[C + c] = 0
        coef[2 * C + c] = <floating>(gamma / sqrt(<double>running_var[c] + eps))
        coef[3 * C + c] = 0 if bias == NULL else bias[c]
    normalize(x, y, p, coef, nthreads)
    free(coef)
    return 0


# ----------------------------------------------------------------------------- backward pass

cdef struct GradArgs:
    const void *mean         # C saved means (a shift: the exact mean is recovered from x)
    const void *invstd       # C saved 1/sqrt(var + eps)
    const void *weight       # C values, or NULL for gamma = 1
    void *dweight            # C outputs
    void *dbias


# Gradient coefficients, 5*C values: m | lo | k_dy | k_xc | k_0, so that
#     dx = k_dy[c] * dy + k_xc[c] * ((x - m[c]) - lo[c]) + k_0[c]      (see kernels_impl.h)

cdef void finish_grad_channel(floating *coef, Py_ssize_t C, Py_ssize_t c, fbn_grad_sums s,
                              double count, const GradArgs *a) noexcept nogil:
    cdef double gamma = 1.0 if a.weight == NULL else (<const floating *>a.weight)[c]
    cdef double dweight, dbias
    coef[c] = (<const floating *>a.mean)[c]
    grad_coefficients(s, count, (<const floating *>a.invstd)[c], gamma, &coef[C + c],
                      &coef[2 * C + c], &coef[3 * C + c], &coef[4 * C + c], &dweight, &dbias)
    (<floating *>a.dweight)[c] = <floating>dweight
    (<floating *>a.dbias)[c] = <floating>dbias


cdef fbn_grad_sums cf_chunk_grad_sums(const floating *dy, const floating *x, const Plan *p,
                                      Py_ssize_t c, Py_ssize_t k, double m) noexcept nogil:
    cdef fbn_grad_sums acc = fbn_grad_sums_empty
    cdef Py_ssize_t b, first, last, nruns, length, offset
    chunk_blocks(p, k, &first, &last)
    for b in range(first, last):
        offset = cf_block(p, c, b, &nruns, &length)
        fbn_grad_sums_add(&acc, grad_sums_runs(dy + offset, x + offset, nruns, p.C * p.inner,
                                               length, m))
    return acc


cdef void cl_chunk_grad_sums(const floating *dy, const floating *x, const Plan *p, Py_ssize_t k,
                             const floating *mean, fbn_grad_sums *acc,
                             double *scratch) noexcept nogil:
    """Chunk k's gradient sums of every channel into acc[0:C]; scratch holds 3*C doubles."""
    cdef Py_ssize_t C = p.C, b, c, first, last, first_row, nrows
    cdef double *s_dy = scratch
    cdef double *s_dy_xc = scratch + C
    cdef double *s_xc = scratch + 2 * C
    for c in range(C):
        acc[c] = fbn_grad_sums_empty
    chunk_blocks(p, k, &first, &last)
    for b in range(first, last):
        first_row = cl_block(p, b, &nrows)
        grad_sums_rows(dy + first_row * C, x + first_row * C, nrows, C, mean, s_dy, s_dy_xc, s_xc)
        for c in range(C):
            acc[c].dy += s_dy[c]
            acc[c].dy_xc += s_dy_xc[c]
            acc[c].xc += s_xc[c]


cdef void cf_chunk_grad_input(const floating *dy, const floating *x, floating *dx, const Plan *p,
                              Py_ssize_t c, Py_ssize_t k, const floating *coef) noexcept nogil:
    cdef Py_ssize_t C = p.C, b, first, last, nruns, length, offset
    chunk_blocks(p, k, &first, &last)
    for b in range(first, last):
        offset = cf_block(p, c, b, &nruns, &length)
        grad_input_runs(dy + offset, x + offset, dx + offset, nruns, C * p.inner, length,
                        coef[c], coef[C + c], coef[2 * C + c], coef[3 * C + c], coef[4 * C + c])


cdef int backward_impl(const floating *dy, const floating *x, floating *dx, const Plan *p,
                       const GradArgs *a, int nthreads) noexcept nogil:
    """dweight, dbias, then dx. -1: out of memory."""
    cdef Py_ssize_t C = p.C, K = p.nchunks, c, k, i, b, first_row, nrows
    cdef double count = <double>(p.outer * p.inner)
    cdef floating *coef = <floating *>malloc(5 * C * sizeof(floating))
    cdef fbn_grad_sums *parts = NULL
    cdef double *scratch = NULL
    cdef fbn_grad_sums s
    if coef == NULL:
        return -1

    if p.inner > 1 and K == 1:
        # One channel per work item: its sums, then dx while the channel is in cache.
        for c in prange(C, schedule='static', num_threads=nthreads, use_threads_if=nthreads > 1):
            finish_grad_channel(coef, C, c,
                                cf_chunk_grad_sums(dy, x, p, c, 0, (<const floating *>a.mean)[c]),
                                count, a)
            cf_chunk_grad_input(dy, x, dx, p, c, 0, coef)
        free(coef)
        return 0

    parts = <fbn_grad_sums *>malloc(C * K * sizeof(fbn_grad_sums))
    if p.inner == 1:
        scratch = <double *>malloc(nthreads * 3 * C * sizeof(double))
    if parts == NULL or (p.inner == 1 and scratch == NULL):
        free(coef)
        free(parts)
        free(scratch)
        return -1
    if p.inner > 1:       # parts[c*K + k]
        for i in prange(C * K, schedule='static', num_threads=nthreads,
                        use_threads_if=nthreads > 1):
            parts[i] = cf_chunk_grad_sums(dy, x, p, i // K, i % K,
                                          (<const floating *>a.mean)[i // K])
        for c in range(C):
            s = parts[c * K]
            for k in range(1, K):
                fbn_grad_sums_add(&s, parts[c * K + k])
            finish_grad_channel(coef, C, c, s, count, a)
        for i in prange(C * K, schedule='static', num_threads=nthreads,
                        use_threads_if=nthreads > 1):
            cf_chunk_grad_input(dy, x, dx, p, i // K, i % K, coef)
    else:                 # parts[k*C + c]
        with parallel(num_threads=nthreads, use_threads_if=nthreads > 1):
            for k in prange(K, schedule='static'):
                cl_chunk_grad_sums(dy, x, p, k, <const floating *>a.mean, parts + k * C,
                                   scratch + threadid() * 3 * C)
        for c in range(C):
            s = parts[c]
            for k in range(1, K):
                fbn_grad_sums_add(&s, parts[k * C + c])
            finish_grad_channel(coef, C, c, s, count, a)
        for b in prange(p.nblocks, schedule='static', num_threads=nthreads,
                        use_threads_if=nthreads > 1):
            first_row = cl_block(p, b, &nrows)
            grad_input_rows(dy + first_row * C, x + first_row * C, dx + first_row * C, nrows, C,
                            coef, coef + C, coef + 2 * C, coef + 3 * C, coef + 4 * C)
    free(parts)
    free(scratch)
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


def forward_train(cnp.ndarray x, cnp.ndarray y, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                  weight, bias, double eps, running_mean, running_var, double momentum,
                  cnp.ndarray save_mean, cnp.ndarray save_invstd):
    """Training forward into y, save_mean, save_invstd; running statistics (1-D, any stride,
    or None) updated in place."""
    cdef Plan p = make_plan(outer, C, inner)
    cdef TrainArgs a
    cdef int nthreads = threads_for(outer * C * inner), status
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
    if is_f32(x):
        with nogil:
            status = forward_train_impl(<const float *>xp, <float *>yp, &p, &a, nthreads)
    else:
        with nogil:
            status = forward_train_impl(<const double *>xp, <double *>yp, &p, &a, nthreads)
    if status != 0:
        raise MemoryError("fastbn: out of memory for the per-channel partial statistics")


def forward_infer(cnp.ndarray x, cnp.ndarray y, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                  cnp.ndarray running_mean, cnp.ndarray running_var, weight, bias, double eps):
    """Inference forward into y. Raises ValueError, before writing, if running_var < 0."""
    cdef Plan p = make_plan(outer, C, inner)
    cdef int nthreads = threads_for(outer * C * inner)
    cdef Py_ssize_t status
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *yp = cnp.PyArray_DATA(y)
    cdef void *rm = cnp.PyArray_DATA(running_mean)
    cdef void *rv = cnp.PyArray_DATA(running_var)
    cdef void *w = data_or_null(weight)
    cdef void *b = data_or_null(bias)
    if is_f32(x):
        with nogil:
            status = infer_impl(<const float *>xp, <float *>yp, &p, <const float *>rm,
                                <const float *>rv, <const float *>w, <const float *>b, eps,
                                nthreads)
    else:
        with nogil:
            status = infer_impl(<const double *>xp, <double *>yp, &p, <const double *>rm,
                                <const double *>rv, <const double *>w, <const double *>b, eps,
                                nthreads)
    if status == -1:
        raise MemoryError("fastbn: out of memory for the normalizing coefficients")
    if status > 0:
        raise ValueError(f"running_var must be non-negative, got {running_var[status - 1]!r} "
                         f"for channel {status - 1}")


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t outer, Py_ssize_t C,
             Py_ssize_t inner, cnp.ndarray mean, cnp.ndarray invstd, weight,
             cnp.ndarray dweight, cnp.ndarray dbias):
    """Gradients of the training forward into dx, dweight, dbias."""
    cdef Plan p = make_plan(outer, C, inner)
    cdef GradArgs a
    cdef int nthreads = threads_for(outer * C * inner), status
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *dxp = cnp.PyArray_DATA(dx)
    a.mean = cnp.PyArray_DATA(mean)
    a.invstd = cnp.PyArray_DATA(invstd)
    a.weight = data_or_null(weight)
    a.dweight = cnp.PyArray_DATA(dweight)
    a.dbias = cnp.PyArray_DATA(dbias)
    if is_f32(x):
        with nogil:
            status = backward_impl(<const float *>dyp, <const float *>xp, <float *>dxp, &p, &a,
                                   nthreads)
    else:
        with nogil:
            status = backward_impl(<const double *>dyp, <const double *>xp, <double *>dxp, &p,
                                   &a, nthreads)
    if status != 0:
        raise MemoryError("fastbn: out of memory for the per-channel gradient sums")


def address(cnp.ndarray a):
    """The address of a's first element (identity test for out= aliasing)."""
    return <size_t>cnp.PyArray_DATA(a)
