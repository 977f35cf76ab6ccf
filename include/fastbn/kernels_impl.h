/* fastbn — kernel bodies, included by kernels.h once per data type T = FBN_T.
 * No include guard on purpose. Shapes in comments use the canonical view (outer, C, inner). */
#define T FBN_T

/* ------------------------------------------------------------------------------------------
 * Statistics
 * ------------------------------------------------------------------------------------------ */

/* Moments of one block of a channel: nruns runs of len values, run r at x + r*stride.
 * Corrected two-pass, cheap because the block sits in L1 for the second read:
 *     shift = sum x / n
 *     d     = x - shift                       (exact near the mean: Sterbenz)
 *     m2    = sum d^2 - (sum d)^2 / n          (the correction undoes shift's rounding) */
FBN_DISPATCH static fbn_moments FBN_FN(moments_runs)(const T *x, fbn_index nruns,
                                                     fbn_index stride, fbn_index len)
{
    const double n = (double)(nruns * len);
    double sum = 0.0;
    for (fbn_index r = 0; r < nruns; ++r) {
        const T *xr = x + r * stride;
#pragma omp simd reduction(+:sum)
        for (fbn_index i = 0; i < len; ++i) sum += (double)xr[i];
    }
    const double shift = sum / n;

    double dev_sum = 0.0, dev_sq = 0.0;
    for (fbn_index r = 0; r < nruns; ++r) {
        const T *xr = x + r * stride;
#pragma omp simd reduction(+:dev_sum, dev_sq)
        for (fbn_index i = 0; i < len; ++i) {
            const double d = (double)xr[i] - shift;
            dev_sum += d;
            dev_sq += d * d;
        }
    }
    const double m2 = dev_sq - dev_sum * dev_sum / n;
    fbn_moments block = {n, shift, dev_sum, m2 < 0.0 ? 0.0 : m2};  /* NaN stays NaN */
    return block;
}

/* Moments of an nrows x C block of channels-last rows, every channel at once (vectorized
 * across channels). Same corrected two-pass as moments_runs; the count is nrows for each
 * channel. Writes C values into each of shift, dev_sum, m2. */
FBN_DISPATCH static void FBN_FN(moments_rows)(const T *x, fbn_index nrows, fbn_index C,
                                              double *FBN_RESTRICT shift,
                                              double *FBN_RESTRICT dev_sum,
                                              double *FBN_RESTRICT m2)
{
    const double n = (double)nrows;
    for (fbn_index c = 0; c < C; ++c) shift[c] = 0.0;
    for (fbn_index r = 0; r < nrows; ++r) {
        const T *row = x + r * C;
#pragma omp simd
        for (fbn_index c = 0; c < C; ++c) shift[c] += (double)row[c];
    }
    for (fbn_index c = 0; c < C; ++c) {
        shift[c] /= n;
        dev_sum[c] = 0.0;
        m2[c] = 0.0;                       /* holds sum d^2 until the correction below */
    }
    for (fbn_index r = 0; r < nrows; ++r) {
        const T *row = x + r * C;
#pragma omp simd
        for (fbn_index c = 0; c < C; ++c) {
            const double d = (double)row[c] - shift[c];
            dev_sum[c] += d;
            m2[c] += d * d;
        }
    }
    for (fbn_index c = 0; c < C; ++c) {
        const double v = m2[c] - dev_sum[c] * dev_sum[c] / n;
        m2[c] = v < 0.0 ? 0.0 : v;
    }
}

/* ------------------------------------------------------------------------------------------
 * Per-channel coefficients (scalar code, once per channel)
 * ------------------------------------------------------------------------------------------ */

/* From a channel's moments to what normalizing it needs:
 *     mean = hi + lo      hi = the mean rounded to T, so x - hi is exact near the mean
 *     var  = m2 / n       biased, as normalizing uses
 *     y    = ((x - hi) - lo) * scale + offset,   scale = gamma / sqrt(var + eps), offset = beta
 * Returns invstd in double; the caller keeps it (and mean, var) for the outputs. */
static inline double FBN_FN(train_coefficients)(fbn_moments m, double eps, double gamma,
                                                double beta, T *hi, T *lo, T *scale, T *offset)
{
    const double mean_rest = m.dev_sum / m.count;
    const T mean_hi = (T)(m.shift + mean_rest);
    const double invstd = 1.0 / sqrt(m.m2 / m.count + eps);
    *hi = mean_hi;
    *lo = (T)((m.shift - (double)mean_hi) + mean_rest);    /* two-sum: what hi left out */
    *scale = (T)(gamma * invstd);
    *offset = (T)beta;
    return invstd;
}

/* PyTorch's running statistics, with the unbiased variance n/(n-1) of the batch:
 *     running <- (1 - momentum) * running + momentum * batch */
static inline void FBN_FN(update_running)(T *running_mean, T *running_var, fbn_moments m,
                                          double momentum)
{
    const double mean = m.shift + m.dev_sum / m.count;
    const double var_unbiased = m.m2 / (m.count - 1.0);
    *running_mean = (T)((1.0 - momentum) * (double)*running_mean + momentum * mean);
    *running_var = (T)((1.0 - momentum) * (double)*running_var + momentum * var_unbiased);
}

/* Backward of y = (x - mu) * invstd * gamma + beta with batch statistics, per channel:
 *     mu      = m + lo,  lo = sum (x - m) / n         the exact batch mean: m is only a shift
 *     S       = sum dy (x - mu) = dy_xc - lo * sum dy
 *     dbias   = sum dy
 *     dweight = invstd * S
 *     dx      = gamma invstd (dy - sum dy / n - (x - mu) invstd^2 S / n)
 *             = k_dy * dy + k_xc * ((x - m) - lo) + k_0
 * with k_dy = gamma invstd, k_xc = -gamma invstd^3 S / n, k_0 = -gamma invstd sum dy / n. */
static inline void FBN_FN(grad_coefficients)(fbn_grad_sums s, double count, double invstd,
                                             double gamma, T *lo, T *k_dy, T *k_xc, T *k_0,
                                             double *dweight, double *dbias)
{
    const double mean_rest = s.xc / count;
    const double dy_xmu = s.dy_xc - mean_rest * s.dy;
    const double g_inv = gamma * invstd;
    *lo = (T)mean_rest;
    *k_dy = (T)g_inv;
    *k_xc = (T)(-g_inv * invstd * invstd * dy_xmu / count);
    *k_0 = (T)(-g_inv * s.dy / count);
    *dweight = invstd * dy_xmu;
    *dbias = s.dy;
}

/* ------------------------------------------------------------------------------------------
 * Elementwise passes. x and y may be the same array (in place): each element is read before
 * it is written, so no restrict on them.
 * ------------------------------------------------------------------------------------------ */

/* y = ((x - hi) - lo) * scale + offset over a block of runs of one channel */
FBN_DISPATCH static void FBN_FN(normalize_runs)(const T *x, T *y, fbn_index nruns,
                                                fbn_index stride, fbn_index len,
                                                T hi, T lo, T scale, T offset)
{
    for (fbn_index r = 0; r < nruns; ++r) {
        const T *xr = x + r * stride;
        T *yr = y + r * stride;
#pragma omp simd
        for (fbn_index i = 0; i < len; ++i) yr[i] = ((xr[i] - hi) - lo) * scale + offset;
    }
}

/* The same over nrows x C channels-last rows, with C-length coefficient vectors */
FBN_DISPATCH static void FBN_FN(normalize_rows)(const T *x, T *y, fbn_index nrows, fbn_index C,
                                                const T *FBN_RESTRICT hi,
                                                const T *FBN_RESTRICT lo,
                                                const T *FBN_RESTRICT scale,
                                                const T *FBN_RESTRICT offset)
{
    for (fbn_index r = 0; r < nrows; ++r) {
        const T *row = x + r * C;
        T *out = y + r * C;
#pragma omp simd
        for (fbn_index c = 0; c < C; ++c) out[c] = ((row[c] - hi[c]) - lo[c]) * scale[c] + offset[c];
    }
}

/* ------------------------------------------------------------------------------------------
 * Backward
 * ------------------------------------------------------------------------------------------ */

/* sum dy, sum dy (x - m), sum (x - m) over a block of runs of one channel (see moments.h) */
FBN_DISPATCH static fbn_grad_sums FBN_FN(grad_sums_runs)(const T *dy, const T *x,
                                                         fbn_index nruns, fbn_index stride,
                                                         fbn_index len, double m)
{
    double s_dy = 0.0, s_dy_xc = 0.0, s_xc = 0.0;
    for (fbn_index r = 0; r < nruns; ++r) {
        const T *xr = x + r * stride;
        const T *dyr = dy + r * stride;
#pragma omp simd reduction(+:s_dy, s_dy_xc, s_xc)
        for (fbn_index i = 0; i < len; ++i) {
            const double xc = (double)xr[i] - m;
            const double g = (double)dyr[i];
            s_dy += g;
            s_dy_xc += g * xc;
            s_xc += xc;
        }
    }
    fbn_grad_sums block = {s_dy, s_dy_xc, s_xc};
    return block;
}

/* The same sums for an nrows x C block of channels-last rows; writes C values into each */
FBN_DISPATCH static void FBN_FN(grad_sums_rows)(const T *dy, const T *x, fbn_index nrows,
                                                fbn_index C, const T *FBN_RESTRICT m,
                                                double *FBN_RESTRICT s_dy,
                                                double *FBN_RESTRICT s_dy_xc,
                                                double *FBN_RESTRICT s_xc)
{
    for (fbn_index c = 0; c < C; ++c) s_dy[c] = s_dy_xc[c] = s_xc[c] = 0.0;
    for (fbn_index r = 0; r < nrows; ++r) {
        const T *row = x + r * C;
        const T *g_row = dy + r * C;
#pragma omp simd
        for (fbn_index c = 0; c < C; ++c) {
            const double xc = (double)row[c] - (double)m[c];
            const double g = (double)g_row[c];
            s_dy[c] += g;
            s_dy_xc[c] += g * xc;
            s_xc[c] += xc;
        }
    }
}

/* dx = k_dy * dy + k_xc * ((x - m) - lo) + k_0 over a block of runs of one channel.
 * dx may be dy or x (in place). */
FBN_DISPATCH static void FBN_FN(grad_input_runs)(const T *dy, const T *x, T *dx, fbn_index nruns,
                                                 fbn_index stride, fbn_index len, T m, T lo,
                                                 T k_dy, T k_xc, T k_0)
{
    for (fbn_index r = 0; r < nruns; ++r) {
        const T *xr = x + r * stride;
        const T *dyr = dy + r * stride;
        T *dxr = dx + r * stride;
#pragma omp simd
        for (fbn_index i = 0; i < len; ++i)
            dxr[i] = k_dy * dyr[i] + k_xc * ((xr[i] - m) - lo) + k_0;
    }
}

/* The same over nrows x C channels-last rows, with C-length coefficient vectors */
FBN_DISPATCH static void FBN_FN(grad_input_rows)(const T *dy, const T *x, T *dx, fbn_index nrows,
                                                 fbn_index C, const T *FBN_RESTRICT m,
                                                 const T *FBN_RESTRICT lo,
                                                 const T *FBN_RESTRICT k_dy,
                                                 const T *FBN_RESTRICT k_xc,
                                                 const T *FBN_RESTRICT k_0)
{
    for (fbn_index r = 0; r < nrows; ++r) {
        const T *row = x + r * C;
        const T *g_row = dy + r * C;
        T *out = dx + r * C;
#pragma omp simd
        for (fbn_index c = 0; c < C; ++c)
            out[c] = k_dy[c] * g_row[c] + k_xc[c] * ((row[c] - m[c]) - lo[c]) + k_0[c];
    }
}

#undef T
