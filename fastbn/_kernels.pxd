# The drivers' entries other Cython modules call (fastbn/_kernels.pyx)
cimport numpy as cnp

cpdef forward_train(cnp.ndarray x, cnp.ndarray y, Py_ssize_t outer, Py_ssize_t C,
                    Py_ssize_t inner, weight, bias, double eps, running_mean, running_var,
                    double momentum, cnp.ndarray save_mean, cnp.ndarray save_invstd,
                    residual=*, int activation=*, double negative_slope=*)
cpdef forward_infer(cnp.ndarray x, cnp.ndarray y, Py_ssize_t outer, Py_ssize_t C,
                    Py_ssize_t inner, cnp.ndarray running_mean, cnp.ndarray running_var,
                    weight, bias, double eps, residual=*, int activation=*,
                    double negative_slope=*)
cpdef backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t outer, Py_ssize_t C,
               Py_ssize_t inner, cnp.ndarray mean, cnp.ndarray invstd, weight,
               cnp.ndarray dweight, cnp.ndarray dbias, y=*, grad=*, int activation=*,
               double negative_slope=*)
