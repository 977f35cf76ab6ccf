/* fastbn — the row-wise normalizations, LayerNorm and RMSNorm: included by kernels_impl.h
 * (once per storage type, with its S, T, LOAD, STORE and FBN_FN), no include guard on purpose.
 *
 * A row is D contiguous values (the normalized trailing axes); its statistics are its own, its
 * affine is per position d within it. Each row is read from memory once per op: its statistics
 * (or gradient sums) are taken, then its output written while it is still in cache. The math
 * is batch norm's, over the row's values: moments_walk and train_coefficients for the forward,
 * grad_sums_segment and grad_coefficients for the backward. */

/* y = act(xhat * w + b + r), xhat = (x - hi) * scale + offset, over one row; r may be NULL,
 * act a literal. One expression per value, stored once (storage that rounds on store rounds
 * once); x, r and y may be the same array: each value is read before it is written. */
FBN_SEGMENT void FBN_FN(rows_apply_loop)(const S *x, const S *r, S *y, fbn_index D, T hi,
                                         T scale, T offset, const T *FBN_RESTRICT w,
                                         const T *FBN_RESTRICT b, int act, T slope)
{
    if (r != NULL) {
#pragma omp simd
        for (fbn_index i = 0; i < D; ++i) {
            const T z = FBN_FN(normalize_value)(LOAD(x[i]), hi, scale, offset) * w[i] + b[i];
            y[i] = STORE(FBN_FN(act_value)(z + LOAD(r[i]), act, slope));
        }
    } else {
#pragma omp simd
        for (fbn_index i = 0; i < D; ++i) {
            const T z = FBN_FN(normalize_value)(LOAD(x[i]), hi, scale, offset) * w[i] + b[i];
            y[i] = STORE(FBN_FN(act_value)(z, act, slope));
        }
    }
}

FBN_SEGMENT void FBN_FN(rows_apply)(const S *x, const S *r, S *y, fbn_index D, T hi, T scale,
                                    T offset, const T *w, const T *b, int act, T slope)
{
    switch (act) {
    case FBN_ACT_RELU:
        FBN_FN(rows_apply_loop)(x, r, y, D, hi, scale, offset, w, b, FBN_ACT_RELU, slope);
        break;
    case FBN_ACT_LEAKY_RELU:
        FBN_FN(rows_apply_loop)(x, r, y, D, hi, scale, offset, w, b, FBN_ACT_LEAKY_RELU, slope);
        break;
    case FBN_ACT_TANH:
        FBN_FN(rows_apply_loop)(x, r, y, D, hi, scale, offset, w, b, FBN_ACT_TANH, slope);
        break;
    default:
        FBN_FN(rows_apply_loop)(x, r, y, D, hi, scale, offset, w, b, FBN_ACT_NONE, slope);
        break;
    }
}

/* Row `row`'s coefficients, xhat = (x - hi) * scale + offset, and its saved statistics:
 *   LayerNorm  the row's moments in double (moments_walk: blocks of FBN_BLOCK around a shift,
 *              the first value's or the block's mean where that loses digits, Chan's merge),
 *              mean = hi + lo and invstd = 1 / sqrt(m2 / D + eps) as batch norm takes them
 *              (train_coefficients): x - hi is exact near the mean
 *   RMSNorm    invstd = 1 / sqrt(sum x^2 / D + eps), the sum in double (its terms are all
 *              positive: no shift is needed), hi = offset = 0 */
FBN_SEGMENT void FBN_FN(row_coefficients)(const S *x, fbn_index D, const fbn_rows_args *a,
                                          fbn_index row, T *hi, T *scale, T *offset)
{
    if (a->centred) {
        const fbn_moments m = FBN_FN(moments_walk)(x, D, D, 0, D, 0);
        const double invstd = FBN_FN(train_coefficients)(m, a->eps, 1.0, 0.0, hi, scale,
                                                         offset);
        ((T *)a->mean)[row] = *hi;
        ((T *)a->invstd)[row] = (T)invstd;
        return;
    }
    double s1[FBN_LANES] = {0.0}, s2[FBN_LANES] = {0.0}, rest[2] = {0.0, 0.0};
    FBN_FN(deviation_segment)(x, D, 0, 0.0, s1, s2, rest);
    const double invrms = 1.0 / sqrt(fbn_block_total(s2, rest[1], D) / (double)D + a->eps);
    *hi = 0;
    *scale = (T)invrms;
    *offset = 0;
    ((T *)a->invstd)[row] = (T)invrms;
}

FBN_DISPATCH static void FBN_FN(rows_forward_kernel)(const S *x, S *y, fbn_index D,
                                                     fbn_index r0, fbn_index r1,
                                                     const fbn_rows_args *a)
{
    const S *res = (const S *)a->residual;
    const T *w = (const T *)a->weight, *b = (const T *)a->bias;
    const T slope = (T)a->negative_slope;
    for (fbn_index row = r0; row < r1; ++row) {
        const fbn_index first = row * D;
        T hi, scale, offset;
        FBN_FN(row_coefficients)(x + first, D, a, row, &hi, &scale, &offset);
        FBN_FN(rows_apply)(x + first, res == NULL ? NULL : res + first, y + first, D, hi,
                           scale, offset, w, b, a->activation, slope);
    }
}

static void FBN_FN(rows_forward)(const void *x, void *y, fbn_index D, fbn_index r0,
                                 fbn_index r1, const fbn_rows_args *a)
{
    FBN_FN(rows_forward_kernel)((const S *)x, (S *)y, D, r0, r1, a);
}

/* One row's backward. With g = w * dy the gradient at xhat (dy after the activation's
 * derivative, when fused) and invstd the saved statistic,
 *   LayerNorm  dx = invstd (g - mean(g) - xhat mean(g xhat)),   xhat = (x - mu) invstd
 *   RMSNorm    dx = invstd (g - xhat mean(g xhat)),             xhat = x invstd
 * which is batch norm's backward of one channel with gamma = 1, over the row: its sums of g
 * around m (the saved mean, a shift: the exact mean mu is recovered from x; 0 for RMSNorm)
 * and q = 0 give the coefficients (grad_coefficients), dx = k_dy (g - g_mean) + k_xc (x - h)
 * + k_0. RMSNorm sets sum (x - m) and sum g to zero: mu = 0 and no mean(g) term. In the same
 * pass, per position, dweight += dy xhat and dbias += dy (xhat from x - h, exact near the
 * mean, and h - mu in double). dx may be dy or x. */
FBN_SEGMENT void FBN_FN(row_backward)(const S *dy, const S *x, S *dx, fbn_index D,
                                      const T *FBN_RESTRICT w, double m, double invstd,
                                      int centred, double *FBN_RESTRICT dweight,
                                      double *FBN_RESTRICT dbias)
{
    double s_dy[FBN_LANES] = {0.0}, s_dy_xc[FBN_LANES] = {0.0}, s_xc[FBN_LANES] = {0.0};
    double rest[3] = {0.0, 0.0, 0.0};
    FBN_FN(grad_sums_segment)(dy, x, D, 0, m, 0.0, w, s_dy, s_dy_xc, s_xc, rest);
    fbn_grad_sums s = {(double)D, m, 0.0, fbn_block_total(s_dy, rest[0], D),
                       fbn_block_total(s_dy_xc, rest[1], D), fbn_block_total(s_xc, rest[2], D)};
    if (!centred) s.dy = s.xc = 0.0;
    T h, g_mean, k_dy, k_xc, k_0;
    double unused_dweight, unused_dbias;      /* a channel's, not the row's positions' */
    FBN_FN(grad_coefficients)(s, invstd, 1.0, &h, &g_mean, &k_dy, &k_xc, &k_0,
                              &unused_dweight, &unused_dbias);
    const double h_gap = ((double)h - m) - s.xc / s.count;      /* h - mu */
#pragma omp simd
    for (fbn_index i = 0; i < D; ++i) {
        const T dyv = LOAD(dy[i]), xv = LOAD(x[i]);
        dweight[i] += (double)dyv * (((double)(xv - h) + h_gap) * invstd);
        dbias[i] += (double)dyv;
        dx[i] = STORE(FBN_FN(grad_input_value)(w[i] * dyv, xv, h, g_mean, k_dy, k_xc, k_0));
    }
}

FBN_DISPATCH static void FBN_FN(rows_backward_kernel)(const S *dy, const S *x, S *dx,
                                                      fbn_index D, fbn_index r0, fbn_index r1,
                                                      const fbn_rows_args *a,
                                                      double *FBN_RESTRICT dweight,
                                                      double *FBN_RESTRICT dbias)
{
    const S *y = (const S *)a->y;
    S *grad = (S *)a->grad;
    const T *w = (const T *)a->weight, *mean = (const T *)a->mean;
    const T *invstd = (const T *)a->invstd;
    const T slope = (T)a->negative_slope;
    for (fbn_index row = r0; row < r1; ++row) {
        const fbn_index first = row * D;
        const S *g = dy + first;
        if (grad != NULL) {      /* fused: g = dy * act'(y), the residual's gradient, first */
            FBN_FN(act_grad_segment)(dy + first, y == NULL ? NULL : y + first, grad + first, D,
                                     a->activation, slope);
            g = grad + first;
        }
        FBN_FN(row_backward)(g, x + first, dx + first, D, w,
                             a->centred ? (double)mean[row] : 0.0, (double)invstd[row],
                             a->centred, dweight, dbias);
    }
}

static void FBN_FN(rows_backward)(const void *dy, const void *x, void *dx, fbn_index D,
                                  fbn_index r0, fbn_index r1, const fbn_rows_args *a,
                                  double *dweight, double *dbias)
{
    FBN_FN(rows_backward_kernel)((const S *)dy, (const S *)x, (S *)dx, D, r0, r1, a, dweight,
                                 dbias);
}
