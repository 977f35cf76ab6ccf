# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The fast path: the common call, checked cheaply in C.

Per-call cost matters for small tensors (edge inference is often batch 1). These functions
take the common call -- C-contiguous ndarrays of a storage dtype, per-channel arrays of its
compute dtype (read-only ones may be float16, float32 or float64, converted as _api converts
them: a half-precision model's parameters are float16), a plain float eps/momentum, out= absent, the input itself, or a C-contiguous
array that does not overlap the inputs; in the forward, a residual of the same kind that out
does not overlap and a known activation -- with cheap C-level checks, and return None for
anything else. The checks read the rule definitions of fastbn._rules (ranges, dtypes,
activation names, the least count for training), so they accept only calls that
fastbn._api's full checks would pass unchanged; _api owns the error messages and the
conversions.
"""
cimport numpy as cnp

from fastbn._kernels cimport forward_train, forward_infer, backward
from fastbn._outputs cimport new_array
from fastbn import _rules
from fastbn.activations import ACTIVATIONS

cdef extern from "fastbn/dtypes.h" nogil:
    ctypedef unsigned short fbn_f16     # the header's storage type (_Float16 where there is one)
    float fbn_load_f16(fbn_f16 v)

cnp.import_array()

# The rules, as C values
cdef double EPS_LOW = _rules.EPS.low, EPS_HIGH = _rules.EPS.high
cdef double MOMENTUM_LOW = _rules.MOMENTUM.low, MOMENTUM_HIGH = _rules.MOMENTUM.high
cdef double SLOPE_LOW = _rules.NEGATIVE_SLOPE.low, SLOPE_HIGH = _rules.NEGATIVE_SLOPE.high
cdef Py_ssize_t MIN_TRAIN_COUNT = _rules.MIN_TRAIN_COUNT
cdef dict ACTIVATION_CODES = {name: a.code for name, a in ACTIVATIONS.items()}

cdef enum:
    MAX_STORAGE_TYPES = 16
cdef int _ndtypes = 0
cdef int _storage_typenums[MAX_STORAGE_TYPES]
cdef int _compute_typenums[MAX_STORAGE_TYPES]
for _dtype in _rules.DATA_DTYPES:
    _storage_typenums[_ndtypes] = _dtype.num
    _compute_typenums[_ndtypes] = _rules.compute_dtype(_dtype).num
    _ndtypes += 1


cdef inline int compute_typenum(int typenum) noexcept:
    """The compute dtype's number for a storage dtype's, -1 if it is none of them."""
    cdef int k
    for k in range(_ndtypes):
        if _storage_typenums[k] == typenum:
            return _compute_typenums[k]
    return -1


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


cdef inline bint float_vector(object v, Py_ssize_t C, bint optional):
    """v is None (where optional) or a plain (C,) array of float16, float32 or float64: a
    read-only parameter, which _api converts to the compute dtype (as_compute does here)."""
    if v is None:
        return optional
    if not cnp.PyArray_CheckExact(v):
        return False
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>v)
    return ((t == cnp.NPY_FLOAT16 or t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64)
            and channel_vector(v, t, C, False))


cdef object as_compute(object v, int compute):
    """A float_vector as an array of the compute dtype (float32 or float64): v itself, or a
    converted copy with NumPy's astype's bits (converted here: NumPy's cast costs 2 us an
    array, as much as a batch-1 call)."""
    if v is None or cnp.PyArray_TYPE(<cnp.ndarray>v) == compute:
        return v
    cdef cnp.npy_intp n = cnp.PyArray_DIM(<cnp.ndarray>v, 0), i
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, &n, compute, 0)
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>v)
    cdef const fbn_f16 *f16 = <const fbn_f16 *>cnp.PyArray_DATA(<cnp.ndarray>v)
    cdef const float *f32 = <const float *>cnp.PyArray_DATA(<cnp.ndarray>v)
    cdef const double *f64 = <const double *>cnp.PyArray_DATA(<cnp.ndarray>v)
    cdef float *to32 = <float *>cnp.PyArray_DATA(out)
    cdef double *to64 = <double *>cnp.PyArray_DATA(out)
    # one loop per pair, so that each vectorizes; float16 values are exact in float and
    # double, and double to float rounds to nearest even, as NumPy's cast
    if compute == cnp.NPY_FLOAT32 and t == cnp.NPY_FLOAT16:
        for i in range(n):
            to32[i] = fbn_load_f16(f16[i])
    elif compute == cnp.NPY_FLOAT32:
        for i in range(n):
            to32[i] = <float>f64[i]
    elif t == cnp.NPY_FLOAT16:
        for i in range(n):
            to64[i] = fbn_load_f16(f16[i])
    else:
        for i in range(n):
            to64[i] = f32[i]
    return out


cdef inline int typenum_of(object x):
    """x's type number if x is a plain array of a storage dtype, ndim >= 2, else -1."""
    if not cnp.PyArray_CheckExact(x):
        return -1
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef int t = cnp.PyArray_TYPE(a)
    if (compute_typenum(t) < 0 or cnp.PyArray_NDIM(a) < 2
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
    None or a name in the registry; negative_slope is a float in its range. The kernel's
    activation code and slope go to act and slope."""
    if residual is not None:
        if not (plain_array(residual, typenum)
                and cnp.PyArray_SAMESHAPE(<cnp.ndarray>residual, x)):
            return False
        if out is not None and not disjoint(<cnp.ndarray>out, <cnp.ndarray>residual):
            return False
    if activation is not None and (type(activation) is not str
                                   or activation not in ACTIVATION_CODES):
        return False
    if not plain_float(negative_slope, SLOPE_LOW, SLOPE_HIGH):
        return False
    act[0] = ACTIVATION_CODES[activation]
    slope[0] = <double>negative_slope
    return True


cdef inline cnp.ndarray output_for(cnp.ndarray x, object out):
    """out, or a new array like x."""
    if out is not None:
        return <cnp.ndarray>out
    return new_array(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x),
                     cnp.PyArray_ITEMSIZE(x))


cdef int plain_call(object x, object axis, object out, int *typenum, int *compute,
                    Py_ssize_t *C):
    """The channel axis (0..ndim-1) when x, axis and out take the common form, else -1; x's
    type number, its compute type's and its channel count go to typenum, compute and C."""
    cdef int t = typenum_of(x), ax
    if t < 0 or not plain_out(out, <cnp.ndarray>x, t):
        return -1
    ax = plain_axis(axis, cnp.PyArray_NDIM(<cnp.ndarray>x))
    if ax >= 0:
        typenum[0] = t
        compute[0] = compute_typenum(t)
        C[0] = cnp.PyArray_DIM(<cnp.ndarray>x, ax)
    return ax


cdef struct Forward:          # a forward call in the common form
    int axis, typenum, compute
    Py_ssize_t C, outer, inner
    int act                   # the activation's kernel code
    double slope


cdef bint plain_forward(x, axis, out, eps, weight, bias, residual, activation, negative_slope,
                        Forward *f):
    """What both forwards take in the common form: x, axis, out, eps, weight, bias and the
    fusion. f gets the call's facts."""
    f.axis = plain_call(x, axis, out, &f.typenum, &f.compute, &f.C)
    if f.axis < 0:
        return False
    if not (float_vector(weight, f.C, True) and float_vector(bias, f.C, True)
            and plain_float(eps, EPS_LOW, EPS_HIGH)
            and plain_fusion(residual, activation, negative_slope, <cnp.ndarray>x, out,
                             f.typenum, &f.act, &f.slope)):
        return False
    outer_inner(<cnp.ndarray>x, f.axis, &f.outer, &f.inner)
    return True


def infer_common(x, running_mean, running_var, weight, bias, eps, axis, out, residual,
                 activation, negative_slope):
    cdef Forward f
    if not (plain_forward(x, axis, out, eps, weight, bias, residual, activation,
                          negative_slope, &f)
            and float_vector(running_mean, f.C, False)
            and float_vector(running_var, f.C, False)):
        return None
    cdef cnp.ndarray y = output_for(<cnp.ndarray>x, out)
    forward_infer(<cnp.ndarray>x, y, f.outer, f.C, f.inner, as_compute(running_mean, f.compute),
                  as_compute(running_var, f.compute), as_compute(weight, f.compute),
                  as_compute(bias, f.compute), eps, residual, f.act, f.slope)
    return y


def train_common(x, weight, bias, eps, axis, running_mean, running_var, momentum, out,
                 residual, activation, negative_slope):
    cdef Forward f
    if not (plain_forward(x, axis, out, eps, weight, bias, residual, activation,
                          negative_slope, &f)
            and plain_float(momentum, MOMENTUM_LOW, MOMENTUM_HIGH)):
        return None
    if (running_mean is None) != (running_var is None):
        return None
    if running_mean is not None and not (
            channel_vector(running_mean, f.compute, f.C, False)
            and channel_vector(running_var, f.compute, f.C, False)
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_mean)
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_var)):
        return None
    if f.outer * f.inner < MIN_TRAIN_COUNT:       # _api raises the error
        return None
    cdef cnp.ndarray y = output_for(<cnp.ndarray>x, out)
    cdef cnp.npy_intp c_dim = f.C
    cdef cnp.ndarray mean = cnp.PyArray_EMPTY(1, &c_dim, f.compute, 0)
    cdef cnp.ndarray invstd = cnp.PyArray_EMPTY(1, &c_dim, f.compute, 0)
    forward_train(<cnp.ndarray>x, y, f.outer, f.C, f.inner, as_compute(weight, f.compute),
                  as_compute(bias, f.compute), eps, running_mean,
                  running_var, momentum, mean, invstd, residual, f.act, f.slope)
    return y, mean, invstd


def backward_common(dy, x, mean, invstd, weight, axis, out):
    cdef int t, s
    cdef Py_ssize_t C
    cdef int ax = plain_call(x, axis, out, &t, &s, &C)
    if ax < 0 or typenum_of(dy) != t or not plain_out(out, <cnp.ndarray>dy, t):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef cnp.ndarray dya = <cnp.ndarray>dy
    if not cnp.PyArray_SAMESHAPE(xa, dya):
        return None
    if not (channel_vector(mean, s, C, False) and channel_vector(invstd, s, C, False)
            and channel_vector(weight, s, C, True)):
        return None
    cdef Py_ssize_t outer, inner
    outer_inner(xa, ax, &outer, &inner)
    cdef cnp.ndarray dx = output_for(xa, out)
    cdef cnp.npy_intp c_dim = C
    cdef cnp.ndarray dweight = cnp.PyArray_EMPTY(1, &c_dim, s, 0)
    cdef cnp.ndarray dbias = cnp.PyArray_EMPTY(1, &c_dim, s, 0)
    backward(dya, xa, dx, outer, C, inner, mean, invstd, weight, dweight, dbias)
    return dx, dweight, dbias
