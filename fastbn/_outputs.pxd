# Output memory (fastbn/_outputs.pyx)
cimport numpy as cnp

cdef cnp.ndarray new_array(int ndim, cnp.npy_intp *dims, int typenum, Py_ssize_t itemsize)
