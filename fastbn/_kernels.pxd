# The C kernels of include/fastbn, declared once, with fused-type wrappers so the
# orchestration in _kernels.pyx is written once for float32 and float64.
# Each kernel appears three times (f32 and f64 declarations, one wrapper): keep them in step.
from cython cimport floating

cdef extern from "fastbn/platform.h" nogil:
    ctypedef Py_ssize_t fbn_index
    enum: FBN_BLOCK

    ctypedef struct fbn_moments:
        double count
        double shift
        double dev_sum
        double m2
    const fbn_moments fbn_moments_empty
    void fbn_moments_merge(fbn_moments *a, fbn_moments b)
    void fbn_moments_merge_rows(fbn_index C, double *count_a, double *shift_a, double *dev_a,
                                double *m2_a, double count_b, const double *shift_b,
                                const double *dev_b, const double *m2_b)

    enum:
        FBN_ACT_NONE
        FBN_ACT_RELU
        FBN_ACT_LEAKY_RELU
        FBN_ACT_TANH

    ctypedef struct fbn_grad_sums:
        double dy
        double dy_xc
        double xc
    const fbn_grad_sums fbn_grad_sums_empty
    void fbn_grad_sums_add(fbn_grad_sums *a, fbn_grad_sums b)

    ctypedef struct fbn_train_args:
        const void *weight
        const void *bias
        double eps
        void *running_mean
        void *running_var
        fbn_index running_mean_stride
        fbn_index running_var_stride
        double momentum
        void *save_mean
        void *save_invstd

    ctypedef struct fbn_grad_args:
        const void *mean
        const void *invstd
        const void *weight
        const void *shift
        void *dweight
        void *dbias
        const void *y
        void *grad
        int activation
        double negative_slope

    enum: FBN_PREFETCH_SPAN
    double fbn_prefetch_span
    fbn_index fbn_runs_ahead(fbn_index len, fbn_index stride, fbn_index limit,
                             fbn_index itemsize)

    int fbn_openmp_version()
    int fbn_max_threads()
    void fbn_barrier()
    const char *fbn_compiler()
    const char *fbn_build_flags()
    const char *fbn_baseline_simd()
    const char *fbn_dispatch_targets()
    const char *fbn_dispatch_selected()

    fbn_moments fbn_moments_channel_f32(const float *x, fbn_index stride, fbn_index len,
                                        fbn_index e0, fbn_index e1)
    fbn_moments fbn_moments_channel_f64(const double *x, fbn_index stride, fbn_index len,
                                        fbn_index e0, fbn_index e1)
    fbn_grad_sums fbn_grad_sums_channel_f32(const float *dy, const float *x, fbn_index stride,
                                            fbn_index len, fbn_index e0, fbn_index e1,
                                            double m, double q, const float *y, float *g,
                                            int act, float slope)
    fbn_grad_sums fbn_grad_sums_channel_f64(const double *dy, const double *x,
                                            fbn_index stride, fbn_index len, fbn_index e0,
                                            fbn_index e1, double m, double q, const double *y,
                                            double *g, int act, double slope)
    void fbn_normalize_span_f32(const float *x, const float *r, float *y, fbn_index C,
                                fbn_index len, fbn_index p0, fbn_index p1, const float *hi,
                                const float *scale, const float *offset, int act, float slope,
                                int stream)
    void fbn_normalize_span_f64(const double *x, const double *r, double *y, fbn_index C,
                                fbn_index len, fbn_index p0, fbn_index p1, const double *hi,
                                const double *scale, const double *offset, int act,
                                double slope, int stream)
    float fbn_act_grad_value_f32(float dy, float y, int act, float slope)
    double fbn_act_grad_value_f64(double dy, double y, int act, double slope)
    void fbn_moments_rows_chunk_f32(const float *x, fbn_index nrows, fbn_index C,
                                    fbn_index block_rows, int step, double *part, double *scratch)
    void fbn_moments_rows_chunk_f64(const double *x, fbn_index nrows, fbn_index C,
                                    fbn_index block_rows, int step, double *part, double *scratch)
    void fbn_grad_sums_rows_chunk_f32(const float *dy, const float *x, fbn_index nrows,
                                      fbn_index C, fbn_index block_rows, int step,
                                      const float *m, const float *q, double *part,
                                      double *scratch, const float *y, float *g, int act,
                                      float slope)
    void fbn_grad_sums_rows_chunk_f64(const double *dy, const double *x, fbn_index nrows,
                                      fbn_index C, fbn_index block_rows, int step,
                                      const double *m, const double *q, double *part,
                                      double *scratch, const double *y, double *g, int act,
                                      double slope)
    void fbn_normalize_rows_f32(const float *x, const float *r, float *y, fbn_index nrows,
                                fbn_index C, int step, const float *hi, const float *scale,
                                const float *offset, int act, float slope, int stream)
    void fbn_normalize_rows_f64(const double *x, const double *r, double *y, fbn_index nrows,
                                fbn_index C, int step, const double *hi, const double *scale,
                                const double *offset, int act, double slope, int stream)
    int fbn_infer_coefficients_f32(fbn_index C, const float *running_mean,
                                   const float *running_var, const float *weight,
                                   const float *bias, double eps, float *coef)
    int fbn_infer_coefficients_f64(fbn_index C, const double *running_mean,
                                   const double *running_var, const double *weight,
                                   const double *bias, double eps, double *coef)
    void fbn_grad_input_span_f32(const float *dy, const float *x, float *dx, fbn_index C,
                                 fbn_index len, fbn_index p0, fbn_index p1, const float *h,
                                 const float *g, const float *k_dy, const float *k_xc,
                                 const float *k_0, int stream)
    void fbn_grad_input_span_f64(const double *dy, const double *x, double *dx, fbn_index C,
                                 fbn_index len, fbn_index p0, fbn_index p1, const double *h,
                                 const double *g, const double *k_dy, const double *k_xc,
                                 const double *k_0, int stream)
    void fbn_grad_input_rows_f32(const float *dy, const float *x, float *dx, fbn_index nrows,
                                 fbn_index C, int step, const float *h, const float *g,
                                 const float *k_dy, const float *k_xc, const float *k_0,
                                 int stream)
    void fbn_grad_input_rows_f64(const double *dy, const double *x, double *dx,
                                 fbn_index nrows, fbn_index C, int step, const double *h,
                                 const double *g, const double *k_dy, const double *k_xc,
                                 const double *k_0, int stream)
    void fbn_train_finish_f32(fbn_moments m, fbn_index C, fbn_index c, const fbn_train_args *a,
                              float *coef)
    void fbn_train_finish_f64(fbn_moments m, fbn_index C, fbn_index c, const fbn_train_args *a,
                              double *coef)
    void fbn_train_group_f32(const float *x, const float *r, float *y, fbn_index C, fbn_index len,
                             fbn_index count, fbn_index c0, fbn_index c1,
                             const fbn_train_args *a, int act, float slope, fbn_moments *moments,
                             float *coef, int stream)
    void fbn_train_group_f64(const double *x, const double *r, double *y, fbn_index C,
                             fbn_index len, fbn_index count, fbn_index c0, fbn_index c1,
                             const fbn_train_args *a, int act, double slope,
                             fbn_moments *moments, double *coef, int stream)
    void fbn_grad_finish_f32(fbn_grad_sums s, double count, fbn_index C, fbn_index c,
                             const fbn_grad_args *a, float *coef)
    void fbn_grad_finish_f64(fbn_grad_sums s, double count, fbn_index C, fbn_index c,
                             const fbn_grad_args *a, double *coef)
    void fbn_backward_group_f32(const float *dy, const float *x, float *dx, fbn_index C,
                                fbn_index len, fbn_index count, fbn_index c0, fbn_index c1,
                                const fbn_grad_args *a, fbn_grad_sums *sums, float *coef,
                                int stream)
    void fbn_backward_group_f64(const double *dy, const double *x, double *dx, fbn_index C,
                                fbn_index len, fbn_index count, fbn_index c0, fbn_index c1,
                                const fbn_grad_args *a, fbn_grad_sums *sums, double *coef,
                                int stream)


cdef inline fbn_moments moments_channel(const floating *x, fbn_index stride, fbn_index len,
                                        fbn_index e0, fbn_index e1) noexcept nogil:
    if floating is float:
        return fbn_moments_channel_f32(x, stride, len, e0, e1)
    else:
        return fbn_moments_channel_f64(x, stride, len, e0, e1)


cdef inline fbn_grad_sums grad_sums_channel(const floating *dy, const floating *x,
                                            fbn_index stride, fbn_index len, fbn_index e0,
                                            fbn_index e1, double m, double q, const floating *y,
                                            floating *g, int act,
                                            floating slope) noexcept nogil:
    if floating is float:
        return fbn_grad_sums_channel_f32(dy, x, stride, len, e0, e1, m, q, y, g, act, slope)
    else:
        return fbn_grad_sums_channel_f64(dy, x, stride, len, e0, e1, m, q, y, g, act, slope)


cdef inline void normalize_span(const floating *x, const floating *r, floating *y, fbn_index C,
                                fbn_index len, fbn_index p0, fbn_index p1, const floating *hi,
                                const floating *scale, const floating *offset, int act,
                                floating slope, int stream) noexcept nogil:
    if floating is float:
        fbn_normalize_span_f32(x, r, y, C, len, p0, p1, hi, scale, offset, act, slope, stream)
    else:
        fbn_normalize_span_f64(x, r, y, C, len, p0, p1, hi, scale, offset, act, slope, stream)


cdef inline floating act_grad_value(floating dy, floating y, int act,
                                    floating slope) noexcept nogil:
    if floating is float:
        return fbn_act_grad_value_f32(dy, y, act, slope)
    else:
        return fbn_act_grad_value_f64(dy, y, act, slope)


cdef inline void moments_rows_chunk(const floating *x, fbn_index nrows, fbn_index C,
                                    fbn_index block_rows, int step, double *part,
                                    double *scratch) noexcept nogil:
    if floating is float:
        fbn_moments_rows_chunk_f32(x, nrows, C, block_rows, step, part, scratch)
    else:
        fbn_moments_rows_chunk_f64(x, nrows, C, block_rows, step, part, scratch)

cdef inline void grad_sums_rows_chunk(const floating *dy, const floating *x, fbn_index nrows,
                                      fbn_index C, fbn_index block_rows, int step,
                                      const floating *m, const floating *q, double *part,
                                      double *scratch, const floating *y, floating *g, int act,
                                      floating slope) noexcept nogil:
    if floating is float:
        fbn_grad_sums_rows_chunk_f32(dy, x, nrows, C, block_rows, step, m, q, part, scratch,
                                     y, g, act, slope)
    else:
        fbn_grad_sums_rows_chunk_f64(dy, x, nrows, C, block_rows, step, m, q, part, scratch,
                                     y, g, act, slope)

cdef inline void normalize_rows(const floating *x, const floating *r, floating *y,
                                fbn_index nrows, fbn_index C, int step, const floating *hi,
                                const floating *scale, const floating *offset, int act,
                                floating slope, int stream) noexcept nogil:
    if floating is float:
        fbn_normalize_rows_f32(x, r, y, nrows, C, step, hi, scale, offset, act, slope, stream)
    else:
        fbn_normalize_rows_f64(x, r, y, nrows, C, step, hi, scale, offset, act, slope, stream)




cdef inline bint infer_coefficients(fbn_index C, const floating *running_mean,
                                    const floating *running_var, const floating *weight,
                                    const floating *bias, double eps,
                                    floating *coef) noexcept nogil:
    """The coefficients into coef; true when some running_var is negative."""
    if floating is float:
        return fbn_infer_coefficients_f32(C, running_mean, running_var, weight, bias, eps, coef)
    else:
        return fbn_infer_coefficients_f64(C, running_mean, running_var, weight, bias, eps, coef)

cdef inline void grad_input_span(const floating *dy, const floating *x, floating *dx,
                                 fbn_index C, fbn_index len, fbn_index p0, fbn_index p1,
                                 const floating *h, const floating *g, const floating *k_dy,
                                 const floating *k_xc, const floating *k_0,
                                 int stream) noexcept nogil:
    if floating is float:
        fbn_grad_input_span_f32(dy, x, dx, C, len, p0, p1, h, g, k_dy, k_xc, k_0, stream)
    else:
        fbn_grad_input_span_f64(dy, x, dx, C, len, p0, p1, h, g, k_dy, k_xc, k_0, stream)

cdef inline void grad_input_rows(const floating *dy, const floating *x, floating *dx,
                                 fbn_index nrows, fbn_index C, int step, const floating *h,
                                 const floating *g, const floating *k_dy, const floating *k_xc,
                                 const floating *k_0, int stream) noexcept nogil:
    if floating is float:
        fbn_grad_input_rows_f32(dy, x, dx, nrows, C, step, h, g, k_dy, k_xc, k_0, stream)
    else:
        fbn_grad_input_rows_f64(dy, x, dx, nrows, C, step, h, g, k_dy, k_xc, k_0, stream)

cdef inline void grad_finish(fbn_grad_sums s, double count, fbn_index C, fbn_index c,
                             const fbn_grad_args *a, floating *coef) noexcept nogil:
    if floating is float:
        fbn_grad_finish_f32(s, count, C, c, a, coef)
    else:
        fbn_grad_finish_f64(s, count, C, c, a, coef)

cdef inline void backward_group(const floating *dy, const floating *x, floating *dx, fbn_index C,
                                fbn_index len, fbn_index count, fbn_index c0, fbn_index c1,
                                const fbn_grad_args *a, fbn_grad_sums *sums, floating *coef,
                                int stream) noexcept nogil:
    if floating is float:
        fbn_backward_group_f32(dy, x, dx, C, len, count, c0, c1, a, sums, coef, stream)
    else:
        fbn_backward_group_f64(dy, x, dx, C, len, count, c0, c1, a, sums, coef, stream)

cdef inline void train_finish(fbn_moments m, fbn_index C, fbn_index c, const fbn_train_args *a,
                              floating *coef) noexcept nogil:
    if floating is float:
        fbn_train_finish_f32(m, C, c, a, coef)
    else:
        fbn_train_finish_f64(m, C, c, a, coef)

cdef inline void train_group(const floating *x, const floating *r, floating *y, fbn_index C,
                             fbn_index len, fbn_index count, fbn_index c0, fbn_index c1,
                             const fbn_train_args *a, int act, floating slope,
                             fbn_moments *moments, floating *coef, int stream) noexcept nogil:
    if floating is float:
        fbn_train_group_f32(x, r, y, C, len, count, c0, c1, a, act, slope, moments, coef, stream)
    else:
        fbn_train_group_f64(x, r, y, C, len, count, c0, c1, a, act, slope, moments, coef, stream)
