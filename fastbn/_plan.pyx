# cython: language_level=3
"""The work split: how a problem is cut into chunks (and channels-last row blocks), which op
streams its output past the caches, and when a call runs on one thread.

Every choice here depends on the problem's shape only, never on the thread count, so results
are the same bits for any number of threads: threads take whole chunks, and chunk results are
merged in chunk order (fastbn/_kernels.pyx).
"""

cdef extern from "fastbn/kernels.h" nogil:
    enum: FBN_BLOCK

SERIAL_THRESHOLDS = {"train": SERIAL_BELOW_STATS, "backward": SERIAL_BELOW_STATS,
                     "channels-last train/backward": SERIAL_BELOW_ROWS,
                     "infer": SERIAL_BELOW_PASS}
WAKE_THRESHOLDS = {"train/backward": WAKE_FROM_STATS, "infer/stages": WAKE_FROM_PASS,
                   "in loops": WAKE_IN_LOOPS_FROM}

cdef Py_ssize_t _stream_traffic_bytes = STREAM_TRAFFIC_BYTES


def _set_stream_traffic_bytes(Py_ssize_t nbytes):
    """Tests: ops whose traffic comes to nbytes or more stream their output from now on
    (-1: the default). Returns the previous threshold."""
    global _stream_traffic_bytes
    previous = _stream_traffic_bytes
    _stream_traffic_bytes = STREAM_TRAFFIC_BYTES if nbytes < 0 else nbytes
    return previous


cdef bint op_streams(const Plan *p, Op op, Py_ssize_t nbytes, bint staged) noexcept nogil:
    """Whether op's traffic on p's problem (nbytes an array) calls for streaming stores: below
    it the output may still be in cache for whoever reads it next. staged: the op runs as
    the stage entries run it, each stage a pass of its own (never the fused path)."""
    cdef Py_ssize_t reads     # arrays read from memory: x; x twice (statistics, then
                              # output); x and dy, or twice both
    # channels-first, one chunk a channel: each channel is read once, its statistics and its
    # output made while it is in cache
    cdef bint one_read = not staged and p.inner > 1 and p.nchunks == 1
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
    set_traffic(&p, op, nbytes, False)
    return p


cdef Plan make_problems_plan(Py_ssize_t problems, Py_ssize_t outer, Py_ssize_t C,
                             Py_ssize_t inner, Py_ssize_t itemsize, Op op) noexcept nogil:
    """The stage entries' plan: make_plan's split of each of `problems` (outer, C, inner)
    problems run in one call (problems=P), for all of them: a problem is cut into chunks only as far as
    the problems' units together are too few to feed MAX_CHUNKS threads (each chunk adds its
    partials to write and merge), and rows per step and streaming stores follow the traffic
    of all the problems (many small problems stream from memory as one large one does) and
    of the staged passes (x read by the statistics, then again by the apply)."""
    cdef Plan p = make_plan(outer, C, inner, itemsize, op)
    cdef Py_ssize_t units = problems * (C if inner > 1 else 1)     # per chunk of a problem
    p.nchunks = max(1, min(p.nchunks, ceil_div(MAX_CHUNKS, units)))
    set_traffic(&p, op, problems * outer * C * inner * itemsize, True)
    return p


cdef void set_traffic(Plan *p, Op op, Py_ssize_t nbytes, bint staged) noexcept nogil:
    """The choices that follow from how much memory a call walks (nbytes an array): a
    shape-only choice (like everything in the plan), so results stay the same bits for any
    thread count."""
    p.row_step = 1 if nbytes >= STREAMING_BYTES else 4
    p.stream = op_streams(p, op, nbytes, staged)
