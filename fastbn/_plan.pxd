# The work split of a problem (fastbn/_plan.pyx): chunks, channel groups, row blocks, streaming

cdef enum:
    MIN_CHUNK = 16384     # values per chunk at least: smaller chunks cost more than they give
    MAX_CHUNKS = 64       # work items aimed for when channels are few: enough for 64 threads
    MIN_BLOCK_ROWS = 16   # channels-last statistics blocks: rows at least,
    MAX_BLOCK_ROWS = 64   # and at most, unless FBN_BLOCK values need more
    MIN_CHUNK_ROWS = 32   # channels-last chunks: their 3*C partial sums cost a small chunk's
                          # traffic again (docs/tuning.md)
    BACKWARD_BLOCKS = 8   # channels-last backward: blocks aimed at per problem (docs/tuning.md)
    STREAMING_BYTES = 16 << 20      # arrays this large stream from memory (L3 is 32 MB here)
    STREAM_TRAFFIC_BYTES = 48 << 20  # an op moving this much writes past the caches
    GROUP_BYTES = 16384   # channels-first channels this small go in groups of this many bytes,
    MAX_GROUP = 32        # so that their coefficients' latency chains overlap (docs/tuning.md)
    # Total values under which one thread does everything: a fork/join costs more than it
    # saves below them on 2 cores (docs/tuning.md)
    SERIAL_BELOW_STATS = 16384   # training, backward
    SERIAL_BELOW_ROWS = 32768    # training, backward, channels-last: each thread's 3*C partial
                                 # sums and their merge cost more than half the rows save
    SERIAL_BELOW_PASS = 32768    # inference
    # Values from which a call wakes sleeping workers; a smaller one hands work only to those
    # awake now. A worker woken from sleep comes tens of microseconds later, and after a pause
    # in the caller's calls to caches its other work has not warmed: with 2 ms of NumPy work
    # between calls, waking one did not pay below WAKE_FROM_* (docs/tuning.md, "Threads under
    # contention"); in a loop of calls, from WAKE_IN_LOOPS_FROM
    WAKE_FROM_STATS = 1 << 18    # whole training and backward calls (LayerNorm's and
                                 # RMSNorm's too): statistics and the output
    WAKE_FROM_PASS = 1 << 20     # one pass: inference, the family's stage entries, copies
    WAKE_IN_LOOPS_FROM = 1 << 17


cdef enum Op:
    OP_TRAIN, OP_INFER, OP_BACKWARD


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


cdef inline Py_ssize_t stats_serial_below(const Plan *p) noexcept nogil:
    """Values under which training and backward on p's problem run on one thread."""
    return SERIAL_BELOW_STATS if p.inner > 1 else SERIAL_BELOW_ROWS


cdef Plan make_plan(Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner, Py_ssize_t itemsize,
                    Op op) noexcept nogil
cdef Plan make_problems_plan(Py_ssize_t problems, Py_ssize_t outer, Py_ssize_t C,
                             Py_ssize_t inner, Py_ssize_t itemsize, Op op) noexcept nogil
cdef void set_traffic(Plan *p, Op op, Py_ssize_t nbytes, bint staged) noexcept nogil
cdef bint op_streams(const Plan *p, Op op, Py_ssize_t nbytes, bint staged) noexcept nogil


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline void chunk_range(Py_ssize_t total, Py_ssize_t k, Py_ssize_t nchunks,
                             Py_ssize_t *first, Py_ssize_t *last) noexcept nogil:
    """[first, last) of chunk k when total items are cut into nchunks near-equal chunks."""
    if nchunks == 1:             # no divisions: once per channel for small channels
        first[0] = 0
        last[0] = total
        return
    first[0] = k * total // nchunks
    last[0] = (k + 1) * total // nchunks


cdef inline void cl_chunk_rows(const Plan *p, Py_ssize_t k, Py_ssize_t *first_row,
                               Py_ssize_t *nrows) noexcept nogil:
    """First row and row count of channels-last chunk k (whole blocks)."""
    cdef Py_ssize_t first = 0, last = 0
    chunk_range(p.nblocks, k, p.nchunks, &first, &last)
    first_row[0] = first * p.block_rows
    nrows[0] = min(last * p.block_rows, p.outer) - first_row[0]
