# The C interface of include/fastbn (kernels.h), declared once for every storage type: the
# kernels of a storage type are the entries of its fbn_kernel_table (fastbn/_tables.pxd).

cdef extern from "fastbn/kernels.h" nogil:
    ctypedef Py_ssize_t fbn_index
    enum: FBN_BLOCK
    enum: FBN_NORM_COEFS, FBN_GRAD_COEFS
    enum: FBN_MOMENT_FIELDS, FBN_GRAD_FIELDS
    enum: FBN_PREFETCH_SPAN

    ctypedef struct fbn_moments:
        double count
        double shift
        double dev_sum
        double m2
    const fbn_moments fbn_moments_empty
    void fbn_moments_merge(fbn_moments *a, fbn_moments b)
    void fbn_moments_merge_units(double *a, const double *b, fbn_index U, fbn_index u0,
                                 fbn_index u1)
    void fbn_moments_merge_chunk(double *a, const double *b, fbn_index U, fbn_index u0,
                                 fbn_index u1)
    void fbn_moments_finish(fbn_moments m, double eps, double *mean, double *var,
                            double *var_unbiased, double *invstd)
    fbn_moments fbn_moments_get(const double *part, fbn_index U, fbn_index u)
    void fbn_moments_put(double *part, fbn_index U, fbn_index u, fbn_moments m)

    ctypedef struct fbn_grad_sums:
        double count
        double x_shift
        double dy_shift
        double dy
        double dy_xc
        double xc
    void fbn_grad_merge(fbn_grad_sums *a, fbn_grad_sums b)
    void fbn_grad_merge_units(double *a, const double *b, fbn_index U, fbn_index u0,
                              fbn_index u1)
    void fbn_grad_merge_chunk(double *a, const double *b, fbn_index U, fbn_index u0,
                              fbn_index u1)
    void fbn_unit_put(double *part, fbn_index U, fbn_index u, const void *unit, int n)

    enum:
        FBN_ACT_NONE
        FBN_ACT_RELU
        FBN_ACT_LEAKY_RELU
        FBN_ACT_TANH

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

    ctypedef struct fbn_rows_args:
        const void *weight
        const void *bias
        double eps
        int centred
        void *mean
        void *invstd
        const void *residual
        const void *y
        void *grad
        int activation
        double negative_slope

    ctypedef struct fbn_kernel_table:
        const char *suffix
        size_t storage_size
        size_t compute_size
        fbn_moments (*moments_channel)(const void *x, fbn_index C, fbn_index len, fbn_index c,
                                       fbn_index e0, fbn_index e1) noexcept nogil
        void (*moments_rows)(const void *x, fbn_index C, fbn_index r0, fbn_index r1,
                             fbn_index block_rows, int step, double *part,
                             double *scratch) noexcept nogil
        void (*grad_shifts)(const void *dy, fbn_index C, fbn_index len,
                            const fbn_grad_args *a, void *q) noexcept nogil
        fbn_grad_sums (*grad_sums_channel)(const void *dy, const void *x, fbn_index C,
                                           fbn_index len, fbn_index c, fbn_index e0,
                                           fbn_index e1, const fbn_grad_args *a) noexcept nogil
        void (*grad_sums_rows)(const void *dy, const void *x, fbn_index C, fbn_index r0,
                               fbn_index r1, fbn_index block_rows, int step,
                               const fbn_grad_args *a, double *part,
                               double *scratch) noexcept nogil
        void (*train_finish)(const double *moments, fbn_index C, fbn_index c0, fbn_index c1,
                             const fbn_train_args *a, void *coef, int grouped) noexcept nogil
        int (*infer_coefficients)(fbn_index C, const void *running_mean,
                                  const void *running_var, const void *weight,
                                  const void *bias, double eps, void *coef) noexcept nogil
        void (*grad_finish)(const double *sums, fbn_index C, fbn_index c0, fbn_index c1,
                            const fbn_grad_args *a, void *coef, int grouped) noexcept nogil
        void (*normalize_span)(const void *x, const void *r, void *y, fbn_index C,
                               fbn_index len, fbn_index p0, fbn_index p1, const void *coef,
                               int act, double slope, int stream) noexcept nogil
        void (*normalize_rows)(const void *x, const void *r, void *y, fbn_index C,
                               fbn_index r0, fbn_index r1, int step, const void *coef, int act,
                               double slope, int stream) noexcept nogil
        void (*grad_input_span)(const void *g, const void *x, void *dx, fbn_index C,
                                fbn_index len, fbn_index p0, fbn_index p1, const void *coef,
                                int stream) noexcept nogil
        void (*grad_input_rows)(const void *g, const void *x, void *dx, fbn_index C,
                                fbn_index r0, fbn_index r1, int step, const void *coef,
                                int stream) noexcept nogil
        void (*normalize_channels)(const void *x, const void *r, void *y, fbn_index C,
                                   fbn_index len, fbn_index count, fbn_index c0, fbn_index c1,
                                   const void *coef, int act, double slope,
                                   int stream) noexcept nogil
        void (*grad_input_channels)(const void *g, const void *x, void *dx, fbn_index C,
                                    fbn_index len, fbn_index count, fbn_index c0, fbn_index c1,
                                    const void *coef, int stream) noexcept nogil
        void (*train_group)(const void *x, const void *r, void *y, fbn_index C, fbn_index len,
                            fbn_index count, fbn_index c0, fbn_index c1,
                            const fbn_train_args *a, int act, double slope,
                            fbn_moments *moments, void *coef, int stream) noexcept nogil
        void (*backward_group)(const void *dy, const void *x, void *dx, fbn_index C,
                               fbn_index len, fbn_index count, fbn_index c0, fbn_index c1,
                               const fbn_grad_args *a, fbn_grad_sums *sums, void *coef,
                               int stream) noexcept nogil
        void (*rows_forward)(const void *x, void *y, fbn_index D, fbn_index r0, fbn_index r1,
                             const fbn_rows_args *a) noexcept nogil
        void (*rows_backward)(const void *dy, const void *x, void *dx, fbn_index D,
                              fbn_index r0, fbn_index r1, const fbn_rows_args *a,
                              double *dweight, double *dbias) noexcept nogil

    double fbn_prefetch_span
    fbn_index fbn_runs_ahead(fbn_index len, fbn_index stride, fbn_index limit,
                             fbn_index itemsize)

    int fbn_openmp_version()
    void fbn_barrier()
    const char *fbn_compiler()
    const char *fbn_build_flags()
    const char *fbn_baseline_simd()
    const char *fbn_dispatch_targets()
    const char *fbn_dispatch_selected()
