# Threads: how many a call may use (fastbn/_threads.pyx)

cdef int pool_threads() noexcept
cdef int threads_for(Py_ssize_t size, Py_ssize_t serial_below) noexcept
cdef int reserve_threads(Py_ssize_t size, Py_ssize_t serial_below) noexcept
cdef void release_threads(int n) noexcept
