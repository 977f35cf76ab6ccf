# cython: language_level=3
"""Output memory: large outputs come from a cache of freed blocks.

A fresh output of tens of MB costs the kernel's page zeroing on first touch, every call
(docs/tuning.md, CACHE_MIN_BYTES): large blocks go back to the system when freed. Outputs of
CACHE_MIN_BYTES or more therefore come from a small cache of freed blocks, the way ONNX
Runtime's arena works; set_output_cache(0) turns it off. Touched only with the GIL held.
"""
from libc.stdlib cimport malloc, free
import numpy as np
cimport numpy as cnp

cnp.import_array()

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


cdef cnp.ndarray new_array(int ndim, cnp.npy_intp *dims, int typenum, Py_ssize_t itemsize):
    """An uninitialized C-contiguous array of typenum (itemsize bytes a value), from the
    output cache when large."""
    global _cache_bytes
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
    """numpy.empty(shape, dtype) (C order), through the output cache."""
    cdef cnp.npy_intp dims[32]
    cdef int ndim = len(shape), i
    dtype = np.dtype(dtype)
    if ndim > 32 or dtype.hasobject:
        return np.empty(shape, dtype)
    for i in range(ndim):
        dims[i] = shape[i]
    return new_array(ndim, dims, dtype.num, dtype.itemsize)
