/* fastbn micro-benchmark harness: the one place that calls fastbn's C kernels.
 *
 * bench.c sees only the table below (fbn_calls: plain float32 arrays and sizes, no fastbn
 * type). Each variant object (variant.c, compiled once per variant by the Makefile with its
 * own HARNESS_* macros or compiler flags) defines FBN_CALLS_IMPL and includes this file: the
 * section at the end instantiates fastbn's float32 kernel table (include/fastbn/kernels.h)
 * and fills one fbn_calls with wrappers around its entries.
 *
 * When fastbn's kernel table changes, update the wrappers in the FBN_CALLS_IMPL section, and
 * variants.h for the overrides; bench.c should not need a change. */
#ifndef FBN_CALLS_H
#define FBN_CALLS_H

/* Coefficient vectors the caller fills, C values per row:
 *   normalize:   hi | scale | offset                  y  = (x - hi) * scale + offset
 *   grad input:  h | g | k_dy | k_xc | k_0            dx = k_dy (dy - g) + k_xc (x - h) + k_0 */
#define FBN_CALLS_NORM_COEFS 3
#define FBN_CALLS_GRAD_COEFS 5

/* doubles in a channels-last chunk's partial results and in a thread's scratch */
#define FBN_CALLS_CL_MOMENTS_PART(C) (4 * (C))     /* the partial format (moments.h) */
#define FBN_CALLS_CL_GRAD_PART(C) (6 * (C))
#define FBN_CALLS_CL_SCRATCH(C) (3 * (C))

/* The kernels of one variant, float32. Channels-first arrays are (outer, C, len) with len > 1;
 * channels-last arrays are nrows rows of C channels. The functions that return a double
 * return a checksum of what they computed (so no call is dead code). */
typedef struct {
    const char *name;
    /* FBN_PREFETCH_SPAN of this object: walks over fewer bytes don't prefetch (< 0: default) */
    void (*set_prefetch_span)(double bytes);

    /* channels-first */
    /* every channel's moments (mean, M2), each channel one walk as fastbn's chunk of one */
    double (*cf_moments)(const float *x, long outer, long C, long len);
    /* every channel's gradient sums around mean[c] and the dy shift q[c] */
    double (*cf_grad_sums)(const float *dy, const float *x, long outer, long C, long len,
                           const float *mean, const float *q);
    /* y from x over the whole array, one span walk; coef: NORM_COEFS * C */
    void (*cf_normalize)(const float *x, float *y, long outer, long C, long len,
                         const float *coef, int stream);
    /* dx from dy and x over the whole array, one span walk; coef: GRAD_COEFS * C */
    void (*cf_grad_input)(const float *dy, const float *x, float *dx, long outer, long C,
                          long len, const float *coef, int stream);
    /* the training forward (moments, coefficients, y) in groups of `group` channels, one call
     * a group, as fastbn does for channels that fit a group */
    double (*cf_train_groups)(const float *x, float *y, long outer, long C, long len,
                              long group);
    /* the backward (sums, coefficients, dx) in groups of `group` channels, one call a group */
    double (*cf_backward_groups)(const float *dy, const float *x, float *dx, long outer, long C,
                                 long len, long group, const float *mean, const float *invstd,
                                 const float *q);

    /* channels-last */
    /* one chunk of nrows rows in blocks of block_rows: moments into part (CL_MOMENTS_PART) */
    double (*cl_moments_chunk)(const float *x, long nrows, long C, long block_rows, int step,
                               double *part, double *scratch);
    /* one chunk: gradient sums around m and q (C each) into part (CL_GRAD_PART) */
    double (*cl_grad_sums_chunk)(const float *dy, const float *x, long nrows, long C,
                                 long block_rows, int step, const float *m, const float *q,
                                 double *part, double *scratch);
    void (*cl_normalize)(const float *x, float *y, long nrows, long C, int step,
                         const float *coef, int stream);
    void (*cl_grad_input)(const float *dy, const float *x, float *dx, long nrows, long C,
                          int step, const float *coef, int stream);

    /* inference coefficients from running statistics (gamma = 1, beta = 0) into coef
     * (NORM_COEFS * C); returns whether some running_var is negative */
    int (*infer_coefficients)(long C, const float *running_mean, const float *running_var,
                              double eps, float *coef);
} fbn_calls;

#endif /* FBN_CALLS_H */

/* ------------------------------------------------------------------------------------------
 * The wrappers: compiled into each variant object, not into bench.c
 * ------------------------------------------------------------------------------------------ */
#if defined(FBN_CALLS_IMPL) && !defined(FBN_CALLS_IMPL_DONE)
#define FBN_CALLS_IMPL_DONE

#include <stdlib.h>
#include "fastbn/kernels.h"

/* fastbn's float32 kernel table, instantiated here as the build does for each row of
 * fastbn/_dtypes.py (kernels_impl.h goes through shim/, which applies the variant) */
#define FBN_STORAGE float
#define FBN_SUFFIX f32
#define FBN_COMPUTE_SUFFIX f32
#include "fastbn/kernels_impl.h"
#define K (&fbn_kernels_f32)

#ifndef FBN_CALLS_NAME
#  error "FBN_CALLS_NAME: the table's name (the Makefile sets it per variant)"
#endif
#define FBN_CALLS_STR2(x) #x
#define FBN_CALLS_STR(x) FBN_CALLS_STR2(x)

static void calls_set_prefetch_span(double bytes)
{
    fbn_prefetch_span = bytes < 0 ? FBN_PREFETCH_SPAN : bytes;
}

static fbn_grad_args calls_grad_args(const float *mean, const float *invstd, const float *q,
                                     float *dweight, float *dbias)
{
    fbn_grad_args a = {.mean = mean, .invstd = invstd, .weight = NULL, .shift = q,
                       .dweight = dweight, .dbias = dbias, .y = NULL, .grad = NULL,
                       .activation = FBN_ACT_NONE, .negative_slope = 0.0};
    return a;
}

static double calls_cf_moments(const float *x, long outer, long C, long len)
{
    double check = 0.0;
    for (long c = 0; c < C; ++c) {
        const fbn_moments m = K->moments_channel(x, C, len, c, 0, outer * len);
        check += m.shift + m.dev_sum + m.m2;
    }
    return check;
}

static double calls_cf_grad_sums(const float *dy, const float *x, long outer, long C, long len,
                                 const float *mean, const float *q)
{
    const fbn_grad_args a = calls_grad_args(mean, NULL, q, NULL, NULL);
    double check = 0.0;
    for (long c = 0; c < C; ++c) {
        const fbn_grad_sums s = K->grad_sums_channel(dy, x, C, len, c, 0, outer * len, &a);
        check += s.dy + s.dy_xc + s.xc;
    }
    return check;
}

static void calls_cf_normalize(const float *x, float *y, long outer, long C, long len,
                               const float *coef, int stream)
{
    K->normalize_span(x, NULL, y, C, len, 0, outer * C * len, coef, FBN_ACT_NONE, 0.0, stream);
}

static void calls_cf_grad_input(const float *dy, const float *x, float *dx, long outer, long C,
                                long len, const float *coef, int stream)
{
    K->grad_input_span(dy, x, dx, C, len, 0, outer * C * len, coef, stream);
}

/* the per-call buffers fastbn's orchestration would allocate, kept between calls */
static void *calls_buffer(void **buf, size_t *have, size_t need)
{
    if (need > *have) {
        free(*buf);
        *buf = malloc(need);
        *have = *buf == NULL ? 0 : need;
        if (*buf == NULL) abort();
    }
    return *buf;
}

static double calls_cf_train_groups(const float *x, float *y, long outer, long C, long len,
                                    long group)
{
    static void *moments, *coef, *saved;
    static size_t moments_bytes, coef_bytes, saved_bytes;
    fbn_moments *m = calls_buffer(&moments, &moments_bytes, C * sizeof(fbn_moments));
    float *k = calls_buffer(&coef, &coef_bytes, FBN_CALLS_NORM_COEFS * C * sizeof(float));
    float *s = calls_buffer(&saved, &saved_bytes, 2 * C * sizeof(float));
    fbn_train_args a = {.weight = NULL, .bias = NULL, .eps = 1e-5, .running_mean = NULL,
                        .running_var = NULL, .momentum = 0.1, .save_mean = s,
                        .save_invstd = s + C};
    for (long c0 = 0; c0 < C; c0 += group)
        K->train_group(x, NULL, y, C, len, outer * len, c0, c0 + group < C ? c0 + group : C, &a,
                       FBN_ACT_NONE, 0.0, m, k, 0);
    return (double)s[0] + (double)s[2 * C - 1];
}

static double calls_cf_backward_groups(const float *dy, const float *x, float *dx, long outer,
                                       long C, long len, long group, const float *mean,
                                       const float *invstd, const float *q)
{
    static void *sums, *coef, *grads;
    static size_t sums_bytes, coef_bytes, grads_bytes;
    fbn_grad_sums *s = calls_buffer(&sums, &sums_bytes, C * sizeof(fbn_grad_sums));
    float *k = calls_buffer(&coef, &coef_bytes, FBN_CALLS_GRAD_COEFS * C * sizeof(float));
    float *d = calls_buffer(&grads, &grads_bytes, 2 * C * sizeof(float));
    const fbn_grad_args a = calls_grad_args(mean, invstd, q, d, d + C);
    for (long c0 = 0; c0 < C; c0 += group)
        K->backward_group(dy, x, dx, C, len, outer * len, c0, c0 + group < C ? c0 + group : C,
                          &a, s, k, 0);
    return (double)d[0] + (double)d[2 * C - 1];
}

static double calls_cl_moments_chunk(const float *x, long nrows, long C, long block_rows,
                                     int step, double *part, double *scratch)
{
    K->moments_rows(x, C, 0, nrows, block_rows, step, part, scratch);
    return part[0] + part[C] + part[4 * C - 1];
}

static double calls_cl_grad_sums_chunk(const float *dy, const float *x, long nrows, long C,
                                       long block_rows, int step, const float *m,
                                       const float *q, double *part, double *scratch)
{
    const fbn_grad_args a = calls_grad_args(m, NULL, q, NULL, NULL);
    K->grad_sums_rows(dy, x, C, 0, nrows, block_rows, step, &a, part, scratch);
    return part[3 * C] + part[6 * C - 1];
}

static void calls_cl_normalize(const float *x, float *y, long nrows, long C, int step,
                               const float *coef, int stream)
{
    K->normalize_rows(x, NULL, y, C, 0, nrows, step, coef, FBN_ACT_NONE, 0.0, stream);
}

static void calls_cl_grad_input(const float *dy, const float *x, float *dx, long nrows, long C,
                                int step, const float *coef, int stream)
{
    K->grad_input_rows(dy, x, dx, C, 0, nrows, step, coef, stream);
}

static int calls_infer_coefficients(long C, const float *running_mean, const float *running_var,
                                    double eps, float *coef)
{
    return K->infer_coefficients(C, running_mean, running_var, NULL, NULL, eps, coef);
}

const fbn_calls FBN_CALLS_NAME = {
    FBN_CALLS_STR(FBN_CALLS_NAME),
    calls_set_prefetch_span,
    calls_cf_moments,
    calls_cf_grad_sums,
    calls_cf_normalize,
    calls_cf_grad_input,
    calls_cf_train_groups,
    calls_cf_backward_groups,
    calls_cl_moments_chunk,
    calls_cl_grad_sums_chunk,
    calls_cl_normalize,
    calls_cl_grad_input,
    calls_infer_coefficients,
};

#undef K
#endif /* FBN_CALLS_IMPL */
