/* fastbn — kernel bodies, included once per storage type (see kernels.h) with
 *   FBN_STORAGE         the storage C type S (float, double, ...)
 *   FBN_SUFFIX          its suffix: the kernels are fbn_<name>_<suffix>, the table
 *                       fbn_kernels_<suffix>, its load and store fbn_load_/fbn_store_<suffix>
 *   FBN_COMPUTE_SUFFIX  the compute type T: f32 (float) or f64 (double)
 * defined. No include guard on purpose.
 *
 * Values are loaded from the storage type into the compute type (LOAD) and stored back
 * (STORE) in the segments, nowhere else. The math lives in the segment functions, over n
 * contiguous values of one channel; walks (walks.h) and row loops call them. The
 * channels-last family (len == 1) has its own *_rows kernels, vectorized across channels. */
#include "fastbn/kernels.h"

#define FBN_PASTE2(a, b) a##b
#define FBN_PASTE(a, b) FBN_PASTE2(a, b)
#define FBN_FN(name) FBN_PASTE(FBN_PASTE(fbn_##name, _), FBN_SUFFIX)

#define S FBN_STORAGE
#define LOAD(v) FBN_PASTE(fbn_load_, FBN_SUFFIX)(v)
#define STORE(v) FBN_PASTE(fbn_store_, FBN_SUFFIX)(v)
#define TANH FBN_PASTE(fbn_tanh_, FBN_COMPUTE_SUFFIX)
#define FBN_COMPUTE_IS_f32 float
#define FBN_COMPUTE_IS_f64 double
#define T FBN_PASTE(FBN_COMPUTE_IS_, FBN_COMPUTE_SUFFIX)
/* 1 where a store rounds (half precision): a value is stored once, when it is final */
#define FBN_ROUNDS_ON_STORE (!FBN_PASTE(FBN_STORAGE_IS_COMPUTE_, FBN_SUFFIX))

/* Staged storage (FBN_STAGES_<suffix>, dtypes.h): a segment converts FBN_STAGE values at a
 * time into a buffer of the compute type (in L1), runs the compute type's own segment on it
 * (CFN(name): fbn_<name>_f32 for half storage, the same math in the same order, so the same
 * bits as converting each value where it is used) and converts what it wrote back. The
 * compute type's table is included before (fastbn/_dtypes.py lists float32 first). */
#define FBN_STAGED FBN_PASTE(FBN_STAGES_, FBN_SUFFIX)
#if FBN_STAGED
#define FBN_STAGE 512                 /* a multiple of FBN_LANES: the lanes stay as they were */
#define FBN_ROW_STAGE 2048            /* channels-last rows: whole rows, several at a time */
/* values in the part of n that starts at b, parts len long (the last one shorter) */
#define FBN_PART_LEN(n, b, len) ((n) - (b) < (len) ? (n) - (b) : (len))
#define FBN_STAGE_LEN(n, b) FBN_PART_LEN(n, b, FBN_STAGE)
#define CFN(name) FBN_PASTE(FBN_PASTE(fbn_##name, _), FBN_COMPUTE_SUFFIX)
#define LOAD_BLOCK(src, dst, n) FBN_PASTE(fbn_load_block_, FBN_SUFFIX)(src, dst, n)
#define STORE_BLOCK(src, dst, n) FBN_PASTE(fbn_store_block_, FBN_SUFFIX)(src, dst, n)
#endif

/* ------------------------------------------------------------------------------------------
 * Segments: the math, over n contiguous values of one channel
 * ------------------------------------------------------------------------------------------ */

/* the lines of FBN_LANES values at p (a sum's prefetch, ahead of the values it adds now) */
FBN_SEGMENT void FBN_FN(prefetch_lanes)(const S *p)
{
    for (size_t k = 0; k < FBN_LANES * sizeof(S); k += 64) fbn_prefetch((const char *)p + k);
}

/* the lines of n values at p (a staged segment's prefetch, a block ahead) */
FBN_SEGMENT void FBN_FN(prefetch_values)(const S *p, fbn_index n)
{
    for (size_t k = 0; k < (size_t)n * sizeof(S); k += 64) fbn_prefetch((const char *)p + k);
}

/* The segment sums add into FBN_LANES partial sums that their caller keeps over a whole
 * block, every segment of it, and adds as a tree once, at the block's end (fbn_lane_total):
 * lane j takes values j, j + FBN_LANES, ... of each segment; each segment's last
 * n % FBN_LANES values are summed apart (a dependency chain per segment, which the core
 * overlaps across segments) into a rest, added after the lanes. Fixed lanes make the order of
 * the additions the same under every instruction set (products contract to FMA where it has
 * one). Reading a channel from memory, a segment prefetches the lines `ahead` elements on as
 * it goes (0: none). */
FBN_SEGMENT void FBN_FN(sum_segment)(const S *x, fbn_index n, fbn_index ahead,
                                     double *FBN_RESTRICT sum, double *FBN_RESTRICT rest)
{
#if FBN_STAGED
    T xs[FBN_STAGE];
    for (fbn_index b = 0; b < n; b += FBN_STAGE) {
        const fbn_index m = FBN_STAGE_LEN(n, b);
        if (ahead != 0) FBN_FN(prefetch_values)(x + b + ahead, m);
        LOAD_BLOCK(x + b, xs, m);
        CFN(sum_segment)(xs, m, 0, sum, rest);
    }
#else
    fbn_index i = 0;
    for (; i + FBN_LANES <= n; i += FBN_LANES) {
        if (ahead != 0) FBN_FN(prefetch_lanes)(x + i + ahead);
#pragma omp simd
        for (int j = 0; j < FBN_LANES; ++j) sum[j] += (double)LOAD(x[i + j]);
    }
    double r = 0.0;
    for (; i < n; ++i) r += (double)LOAD(x[i]);
    *rest += r;
#endif
}

/* sum (x - shift) and sum (x - shift)^2 into lanes and rests; x - shift is exact near the
 * mean (Sterbenz) */
FBN_SEGMENT void FBN_FN(deviation_segment)(const S *x, fbn_index n, fbn_index ahead,
                                           double shift, double *FBN_RESTRICT s1,
                                           double *FBN_RESTRICT s2, double *FBN_RESTRICT rest)
{
#if FBN_STAGED
    T xs[FBN_STAGE];
    for (fbn_index b = 0; b < n; b += FBN_STAGE) {
        const fbn_index m = FBN_STAGE_LEN(n, b);
        if (ahead != 0) FBN_FN(prefetch_values)(x + b + ahead, m);
        LOAD_BLOCK(x + b, xs, m);
        CFN(deviation_segment)(xs, m, 0, shift, s1, s2, rest);
    }
#else
    fbn_index i = 0;
    for (; i + FBN_LANES <= n; i += FBN_LANES) {
        if (ahead != 0) FBN_FN(prefetch_lanes)(x + i + ahead);
#pragma omp simd
        for (int j = 0; j < FBN_LANES; ++j) {
            const double d = (double)LOAD(x[i + j]) - shift;
            s1[j] += d;
            s2[j] += d * d;
        }
    }
    double r1 = 0.0, r2 = 0.0;
    for (; i < n; ++i) {
        const double d = (double)LOAD(x[i]) - shift;
        r1 += d;
        r2 += d * d;
    }
    rest[0] += r1;
    rest[1] += r2;
#endif
}

/* y = (x - hi) * scale + offset: x - hi is exact near the mean (hi is the mean rounded to T;
 * what rounding left out is folded into offset, see train_coefficients) */
FBN_SEGMENT T FBN_FN(normalize_value)(T x, T hi, T scale, T offset)
{
    return (x - hi) * scale + offset;
}

/* dx = k_dy * (dy - g) + k_xc * (x - h) + k_0: h and g are the means of x and dy rounded to
 * T, so both subtractions are exact near the means (see grad_coefficients) */
FBN_SEGMENT T FBN_FN(grad_input_value)(T dy, T x, T h, T g, T k_dy, T k_xc, T k_0)
{
    return k_dy * (dy - g) + k_xc * (x - h) + k_0;
}

/* x and y may be the same array: each value is read before it is written, so no restrict */
FBN_SEGMENT void FBN_FN(normalize_segment)(const S *x, S *y, fbn_index n, T hi, T scale,
                                           T offset)
{
#if FBN_STAGED
    T xs[FBN_STAGE];
    for (fbn_index b = 0; b < n; b += FBN_STAGE) {
        const fbn_index m = FBN_STAGE_LEN(n, b);
        LOAD_BLOCK(x + b, xs, m);
        CFN(normalize_segment)(xs, xs, m, hi, scale, offset);
        STORE_BLOCK(xs, y + b, m);
    }
#else
#pragma omp simd
    for (fbn_index i = 0; i < n; ++i)
        y[i] = STORE(FBN_FN(normalize_value)(LOAD(x[i]), hi, scale, offset));
#endif
}

/* w[i] * v, or v where w is NULL (a literal NULL folds away in the inlined loops) */
FBN_SEGMENT T FBN_FN(weighted)(const T *w, fbn_index i, T v)
{
    return w == NULL ? v : w[i] * v;
}

/* sum (dy - q), sum (dy - q)(x - m), sum (x - m) into lanes and rests (see fbn_grad_sums;
 * lanes as above); with w, of w * dy in dy's place (the row-wise norms' gradient at xhat) */
FBN_SEGMENT void FBN_FN(grad_sums_segment)(const S *dy, const S *x, fbn_index n,
                                           fbn_index ahead, double m, double q,
                                           const T *FBN_RESTRICT w,
                                           double *FBN_RESTRICT s_dy,
                                           double *FBN_RESTRICT s_dy_xc,
                                           double *FBN_RESTRICT s_xc,
                                           double *FBN_RESTRICT rest)
{
#if FBN_STAGED
    T dys[FBN_STAGE], xs[FBN_STAGE];
    for (fbn_index b = 0; b < n; b += FBN_STAGE) {
        const fbn_index k = FBN_STAGE_LEN(n, b);
        if (ahead != 0) {
            FBN_FN(prefetch_values)(dy + b + ahead, k);
            FBN_FN(prefetch_values)(x + b + ahead, k);
        }
        LOAD_BLOCK(dy + b, dys, k);
        LOAD_BLOCK(x + b, xs, k);
        CFN(grad_sums_segment)(dys, xs, k, 0, m, q, w == NULL ? NULL : w + b, s_dy, s_dy_xc,
                               s_xc, rest);
    }
#else
    fbn_index i = 0;
    for (; i + FBN_LANES <= n; i += FBN_LANES) {
        if (ahead != 0) {
            FBN_FN(prefetch_lanes)(dy + i + ahead);
            FBN_FN(prefetch_lanes)(x + i + ahead);
        }
#pragma omp simd
        for (int j = 0; j < FBN_LANES; ++j) {
            const double xc = (double)LOAD(x[i + j]) - m;
            const double g = (double)FBN_FN(weighted)(w, i + j, LOAD(dy[i + j])) - q;
            s_dy[j] += g;
            s_dy_xc[j] += g * xc;
            s_xc[j] += xc;
        }
    }
    double r_dy = 0.0, r_dy_xc = 0.0, r_xc = 0.0;
    for (; i < n; ++i) {
        const double xc = (double)LOAD(x[i]) - m;
        const double g = (double)FBN_FN(weighted)(w, i, LOAD(dy[i])) - q;
        r_dy += g;
        r_dy_xc += g * xc;
        r_xc += xc;
    }
    rest[0] += r_dy;
    rest[1] += r_dy_xc;
    rest[2] += r_xc;
#endif
}

/* dx may be dy or x (in place) */
FBN_SEGMENT void FBN_FN(grad_input_segment)(const S *dy, const S *x, S *dx, fbn_index n, T h,
                                            T g, T k_dy, T k_xc, T k_0)
{
#if FBN_STAGED
    T dys[FBN_STAGE], xs[FBN_STAGE];
    for (fbn_index b = 0; b < n; b += FBN_STAGE) {
        const fbn_index m = FBN_STAGE_LEN(n, b);
        LOAD_BLOCK(dy + b, dys, m);
        LOAD_BLOCK(x + b, xs, m);
        CFN(grad_input_segment)(dys, xs, dys, m, h, g, k_dy, k_xc, k_0);
        STORE_BLOCK(dys, dx + b, m);
    }
#else
#pragma omp simd
    for (fbn_index i = 0; i < n; ++i)
        dx[i] = STORE(FBN_FN(grad_input_value)(LOAD(dy[i]), LOAD(x[i]), h, g, k_dy, k_xc, k_0));
#endif
}

/* Streaming segments, for outputs too large to stay in cache (the plan's streaming arrays):
 * non-temporal stores skip the read of each output line that a normal store makes first
 * (write-allocate), one memory transfer per line instead of two. Values before y's first
 * 16-byte boundary, and the last few, take the plain segment; the math is the same
 * expression, so the bits are the same. Storage types stored as they are computed only (a
 * converting store has no such vector form here): elsewhere `stream` is ignored. */
#if defined(FBN_STREAM) && FBN_PASTE(FBN_STORAGE_IS_COMPUTE_, FBN_SUFFIX)
#define FBN_STREAMS_HERE 1
typedef T FBN_FN(vec) __attribute__((vector_size(16)));
#define FBN_VEC ((fbn_index)(16 / sizeof(T)))

FBN_SEGMENT FBN_FN(vec) FBN_FN(vec_load)(const T *p)
{
    FBN_FN(vec) v;
    memcpy(&v, p, sizeof v);
    return v;
}

FBN_SEGMENT void FBN_FN(vec_stream)(T *p, FBN_FN(vec) v)
{
    _mm_stream_si128((__m128i *)p, (__m128i)v);
}

/* how many of n values at y come before its first 16-byte boundary (all n when y is not
 * aligned to T) */
FBN_SEGMENT fbn_index FBN_FN(stream_head)(const T *y, fbn_index n)
{
    const uintptr_t a = (uintptr_t)y;
    const fbn_index head = a % sizeof(T) != 0 ? n : (fbn_index)((16 - a % 16) % 16 / sizeof(T));
    return head < n ? head : n;
}
#endif

/* normalize_segment, with streaming stores when stream is set */
FBN_SEGMENT void FBN_FN(normalize_store)(const S *x, S *y, fbn_index n, T hi, T scale,
                                         T offset, int stream)
{
    fbn_index i = 0;
#ifdef FBN_STREAMS_HERE
    i = stream ? FBN_FN(stream_head)(y, n) : n;
    FBN_FN(normalize_segment)(x, y, i, hi, scale, offset);
    for (; i + FBN_VEC <= n; i += FBN_VEC)
        FBN_FN(vec_stream)(y + i, (FBN_FN(vec_load)(x + i) - hi) * scale + offset);
#else
    (void)stream;
#endif
    FBN_FN(normalize_segment)(x + i, y + i, n - i, hi, scale, offset);
}

/* grad_input_segment, with streaming stores when stream is set */
FBN_SEGMENT void FBN_FN(grad_input_store)(const S *dy, const S *x, S *dx, fbn_index n, T h,
                                          T g, T k_dy, T k_xc, T k_0, int stream)
{
    fbn_index i = 0;
#ifdef FBN_STREAMS_HERE
    i = stream ? FBN_FN(stream_head)(dx, n) : n;
    FBN_FN(grad_input_segment)(dy, x, dx, i, h, g, k_dy, k_xc, k_0);
    for (; i + FBN_VEC <= n; i += FBN_VEC)
        FBN_FN(vec_stream)(dx + i, k_dy * (FBN_FN(vec_load)(dy + i) - g)
                                   + k_xc * (FBN_FN(vec_load)(x + i) - h) + k_0);
#else
    (void)stream;
#endif
    FBN_FN(grad_input_segment)(dy + i, x + i, dx + i, n - i, h, g, k_dy, k_xc, k_0);
}

/* One channels-last row of C values, coefficients per channel, streaming stores */
FBN_SEGMENT void FBN_FN(normalize_row_stream)(const S *x, S *y, fbn_index C,
                                              const T *FBN_RESTRICT hi,
                                              const T *FBN_RESTRICT scale,
                                              const T *FBN_RESTRICT offset)
{
    fbn_index c = 0;
#ifdef FBN_STREAMS_HERE
    for (const fbn_index head = FBN_FN(stream_head)(y, C); c < head; ++c)
        y[c] = FBN_FN(normalize_value)(x[c], hi[c], scale[c], offset[c]);
    for (; c + FBN_VEC <= C; c += FBN_VEC)
        FBN_FN(vec_stream)(y + c, (FBN_FN(vec_load)(x + c) - FBN_FN(vec_load)(hi + c))
                                  * FBN_FN(vec_load)(scale + c) + FBN_FN(vec_load)(offset + c));
#endif
    /* the row's tail */
#pragma omp simd
    for (fbn_index k = c; k < C; ++k)
        y[k] = STORE(FBN_FN(normalize_value)(LOAD(x[k]), hi[k], scale[k], offset[k]));
}

FBN_SEGMENT void FBN_FN(grad_input_row_stream)(const S *dy, const S *x, S *dx, fbn_index C,
                                               const T *FBN_RESTRICT h,
                                               const T *FBN_RESTRICT g,
                                               const T *FBN_RESTRICT k_dy,
                                               const T *FBN_RESTRICT k_xc,
                                               const T *FBN_RESTRICT k_0)
{
    fbn_index c = 0;
#ifdef FBN_STREAMS_HERE
    for (const fbn_index head = FBN_FN(stream_head)(dx, C); c < head; ++c)
        dx[c] = FBN_FN(grad_input_value)(dy[c], x[c], h[c], g[c], k_dy[c], k_xc[c], k_0[c]);
    for (; c + FBN_VEC <= C; c += FBN_VEC)
        FBN_FN(vec_stream)(dx + c,
                           FBN_FN(vec_load)(k_dy + c) * (FBN_FN(vec_load)(dy + c) - FBN_FN(vec_load)(g + c))
                           + FBN_FN(vec_load)(k_xc + c) * (FBN_FN(vec_load)(x + c) - FBN_FN(vec_load)(h + c))
                           + FBN_FN(vec_load)(k_0 + c));
#endif
#pragma omp simd
    for (fbn_index k = c; k < C; ++k)
        dx[k] = STORE(FBN_FN(grad_input_value)(LOAD(dy[k]), LOAD(x[k]), h[k], g[k], k_dy[k],
                                               k_xc[k], k_0[k]));
}
#undef FBN_VEC

/* Fusion (see activation.h): the activation and residual after normalizing,
 *     y = act(bn(x) + residual),
 * and the gradient at the activation's input before the backward's sums,
 *     g = dy * act'(z), recovered from y.
 * Each is a pass over a block that was just written or is about to be read, so the block is
 * in L1: a fused op costs no pass over memory that the unfused op does not make. */

/* act(v) for one of the activations (the switch is on a literal in each loop below) */
FBN_SEGMENT T FBN_FN(act_value)(T v, int act, T slope)
{
    switch (act) {
    case FBN_ACT_RELU:       return v < 0 ? (T)0 : v;
    case FBN_ACT_LEAKY_RELU: return v < 0 ? v * slope : v;
    case FBN_ACT_TANH:       return TANH(v);
    default:                 return v;
    }
}

/* y = act(y + r) in place over n values (r may be NULL: no residual), act a literal */
FBN_SEGMENT void FBN_FN(epilogue_loop)(S *y, const S *r, fbn_index n, int act, T slope)
{
    if (r != NULL) {
#pragma omp simd
        for (fbn_index i = 0; i < n; ++i)
            y[i] = STORE(FBN_FN(act_value)(LOAD(y[i]) + LOAD(r[i]), act, slope));
    } else {
#pragma omp simd
        for (fbn_index i = 0; i < n; ++i)
            y[i] = STORE(FBN_FN(act_value)(LOAD(y[i]), act, slope));
    }
}

/* y = act(y + r) in place over n values (r may be NULL: no residual) */
FBN_SEGMENT void FBN_FN(epilogue_segment)(S *y, const S *r, fbn_index n, int act, T slope)
{
    switch (act) {
    case FBN_ACT_RELU:       FBN_FN(epilogue_loop)(y, r, n, FBN_ACT_RELU, slope); break;
    case FBN_ACT_LEAKY_RELU: FBN_FN(epilogue_loop)(y, r, n, FBN_ACT_LEAKY_RELU, slope); break;
    case FBN_ACT_TANH:       FBN_FN(epilogue_loop)(y, r, n, FBN_ACT_TANH, slope); break;
    default:                 if (r != NULL) FBN_FN(epilogue_loop)(y, r, n, FBN_ACT_NONE, slope); break;
    }
}

/* dy * act'(z) from y = act(z): as PyTorch's threshold_backward, leaky_relu_backward and
 * tanh_backward, with 1 - y^2 formed as (1 - y)(1 + y) in double (exact near |y| = 1) */
FBN_SEGMENT T FBN_FN(act_grad_value)(T dy, T y, int act, T slope)
{
    switch (act) {
    case FBN_ACT_RELU:       return y <= 0 ? (T)0 : dy;
    case FBN_ACT_LEAKY_RELU: return y > 0 ? dy : dy * slope;
    case FBN_ACT_TANH:       return (T)((double)dy * ((1.0 - (double)y) * (1.0 + (double)y)));
    default:                 return dy;
    }
}

/* g = dy * act'(z) over n values, act a literal; g may be dy or y (in place) */
FBN_SEGMENT void FBN_FN(act_grad_loop)(const S *dy, const S *y, S *g, fbn_index n, int act,
                                       T slope)
{
#if FBN_STAGED
    T dys[FBN_STAGE], ys[FBN_STAGE];
    for (fbn_index b = 0; b < n; b += FBN_STAGE) {
        const fbn_index m = FBN_STAGE_LEN(n, b);
        LOAD_BLOCK(dy + b, dys, m);
        LOAD_BLOCK(y + b, ys, m);
        CFN(act_grad_loop)(dys, ys, dys, m, act, slope);
        STORE_BLOCK(dys, g + b, m);
    }
#else
#pragma omp simd
    for (fbn_index i = 0; i < n; ++i)
        g[i] = STORE(FBN_FN(act_grad_value)(LOAD(dy[i]), LOAD(y[i]), act, slope));
#endif
}

/* y = act(normalize(x) + r) in one expression per value, stored once: for storage that rounds
 * on store, where storing normalize(x) and reading it back would round twice. Coefficients
 * at hi[i * cs] (cs 0: one channel's segment; 1: a channels-last row); r may be NULL; act a
 * literal. */
FBN_SEGMENT void FBN_FN(normalize_act_loop)(const S *x, const S *r, S *y, fbn_index n,
                                            const T *FBN_RESTRICT hi,
                                            const T *FBN_RESTRICT scale,
                                            const T *FBN_RESTRICT offset, fbn_index cs,
                                            int act, T slope)
{
#if FBN_STAGED
    T xs[FBN_STAGE], rs[FBN_STAGE];
    for (fbn_index b = 0; b < n; b += FBN_STAGE) {
        const fbn_index m = FBN_STAGE_LEN(n, b);
        LOAD_BLOCK(x + b, xs, m);
        if (r != NULL) LOAD_BLOCK(r + b, rs, m);
        CFN(normalize_act_loop)(xs, r != NULL ? rs : NULL, xs, m, hi + b * cs, scale + b * cs,
                                offset + b * cs, cs, act, slope);
        STORE_BLOCK(xs, y + b, m);
    }
#else
    if (r != NULL) {
#pragma omp simd
        for (fbn_index i = 0; i < n; ++i) {
            const T z = FBN_FN(normalize_value)(LOAD(x[i]), hi[i * cs], scale[i * cs],
                                                offset[i * cs]);
            y[i] = STORE(FBN_FN(act_value)(z + LOAD(r[i]), act, slope));
        }
    } else {
#pragma omp simd
        for (fbn_index i = 0; i < n; ++i) {
            const T z = FBN_FN(normalize_value)(LOAD(x[i]), hi[i * cs], scale[i * cs],
                                                offset[i * cs]);
            y[i] = STORE(FBN_FN(act_value)(z, act, slope));
        }
    }
#endif
}

FBN_SEGMENT void FBN_FN(normalize_act)(const S *x, const S *r, S *y, fbn_index n, const T *hi,
                                       const T *scale, const T *offset, fbn_index cs, int act,
                                       T slope)
{
    switch (act) {
    case FBN_ACT_RELU:
        FBN_FN(normalize_act_loop)(x, r, y, n, hi, scale, offset, cs, FBN_ACT_RELU, slope);
        break;
    case FBN_ACT_LEAKY_RELU:
        FBN_FN(normalize_act_loop)(x, r, y, n, hi, scale, offset, cs, FBN_ACT_LEAKY_RELU, slope);
        break;
    case FBN_ACT_TANH:
        FBN_FN(normalize_act_loop)(x, r, y, n, hi, scale, offset, cs, FBN_ACT_TANH, slope);
        break;
    default:
        FBN_FN(normalize_act_loop)(x, r, y, n, hi, scale, offset, cs, FBN_ACT_NONE, slope);
        break;
    }
}

/* g = dy * act'(z) over n values; g may be dy or y (in place) */
FBN_SEGMENT void FBN_FN(act_grad_segment)(const S *dy, const S *y, S *g, fbn_index n, int act,
                                          T slope)
{
    switch (act) {
    case FBN_ACT_RELU:       FBN_FN(act_grad_loop)(dy, y, g, n, FBN_ACT_RELU, slope); break;
    case FBN_ACT_LEAKY_RELU: FBN_FN(act_grad_loop)(dy, y, g, n, FBN_ACT_LEAKY_RELU, slope); break;
    case FBN_ACT_TANH:       FBN_FN(act_grad_loop)(dy, y, g, n, FBN_ACT_TANH, slope); break;
    default:
        if (g != dy) memcpy(g, dy, (size_t)n * sizeof(S));
        break;
    }
}

/* normalize_segment, then the epilogue, a block at a time while the block is in L1 */
FBN_SEGMENT void FBN_FN(normalize_fused_segment)(const S *x, const S *r, S *y, fbn_index n,
                                                 T hi, T scale, T offset, int act, T slope)
{
    if (FBN_ROUNDS_ON_STORE) {
        FBN_FN(normalize_act)(x, r, y, n, &hi, &scale, &offset, 0, act, slope);
        return;
    }
    for (fbn_index b = 0; b < n; b += FBN_FUSED_BLOCK) {
        const fbn_index m = n - b < FBN_FUSED_BLOCK ? n - b : FBN_FUSED_BLOCK;
        FBN_FN(normalize_segment)(x + b, y + b, m, hi, scale, offset);
        FBN_FN(epilogue_segment)(y + b, r != NULL ? r + b : NULL, m, act, slope);
    }
}

/* ------------------------------------------------------------------------------------------
 * Channel walks (channels-first): positions [e0, e1) of one channel
 * ------------------------------------------------------------------------------------------ */

/* sum x over positions [b, end) of a channel, one block of a walk that reads up to position
 * limit, prefetching runs_ahead runs on: its lanes added up once */
FBN_SEGMENT double FBN_FN(sum_block_walk)(const S *x, fbn_index stride, fbn_index len,
                                          fbn_index b, fbn_index end, fbn_index limit,
                                          fbn_index runs_ahead)
{
    double sum[FBN_LANES] = {0.0}, rest = 0.0;
    for (fbn_channel_walk w = fbn_channel_walk_begin(b, end, stride, len, limit, runs_ahead);
         fbn_channel_walk_next(&w);)
        FBN_FN(sum_segment)(x + w.offset, w.n, w.ahead, sum, &rest);
    return fbn_block_total(sum, rest, len);
}

/* sum (x - shift) and sum (x - shift)^2 over positions [b, end) of a channel, one block (as
 * sum_block_walk) */
FBN_SEGMENT void FBN_FN(deviation_block_walk)(const S *x, fbn_index stride, fbn_index len,
                                              fbn_index b, fbn_index end, fbn_index limit,
                                              fbn_index runs_ahead, double shift,
                                              double *dev_sum, double *dev_sq)
{
    double s1[FBN_LANES] = {0.0}, s2[FBN_LANES] = {0.0}, rest[2] = {0.0, 0.0};
    for (fbn_channel_walk w = fbn_channel_walk_begin(b, end, stride, len, limit, runs_ahead);
         fbn_channel_walk_next(&w);)
        FBN_FN(deviation_segment)(x + w.offset, w.n, w.ahead, shift, s1, s2, rest);
    *dev_sum = fbn_block_total(s1, rest[0], len);
    *dev_sq = fbn_block_total(s2, rest[1], len);
}

/* Moments of positions [e0, e1) of a channel, prefetching runs_ahead runs on, in blocks of
 * FBN_BLOCK positions merged in order (fbn_moments_merge). Each block is summed in one pass
 * around a shift near its mean,
 *     d = x - shift,   m2 = sum d^2 - (sum d)^2 / n       (d exact near the mean: Sterbenz)
 * and sum d^2 / m2 = 1 + (mean - shift)^2 / var is how many digits the subtraction loses:
 *   later blocks shift by the mean of the blocks before them (within a fraction of a
 *   standard deviation of theirs);
 *   the first block shifts by its first value, and if that loses more than a factor
 *   FBN_MAX_LOSS (a first value more than ~2.6 sd out) it takes its mean first (two passes).*/
#ifndef FBN_MAX_LOSS
#define FBN_MAX_LOSS 8.0
#endif
FBN_SEGMENT fbn_moments FBN_FN(moments_walk)(const S *x, fbn_index stride, fbn_index len,
                                             fbn_index e0, fbn_index e1, fbn_index runs_ahead)
{
    fbn_moments acc = fbn_moments_empty;
    for (fbn_index b = e0; b < e1; b += FBN_BLOCK) {
        const fbn_index end = (e1 - b < FBN_BLOCK) ? e1 : b + FBN_BLOCK;
        const double n = (double)(end - b);
        double shift, dev_sum, dev_sq;
        if (acc.count > 0.0) {
            shift = acc.shift + acc.dev_sum / acc.count;
        } else {
            const fbn_index o = b < len ? 0 : b / len;
            shift = (double)LOAD(x[o * stride + (b - o * len)]);
        }
        FBN_FN(deviation_block_walk)(x, stride, len, b, end, e1, runs_ahead, shift, &dev_sum,
                                     &dev_sq);
        double m2 = dev_sq - dev_sum * dev_sum / n;
        if (acc.count == 0.0 && !(dev_sq <= FBN_MAX_LOSS * m2) && dev_sq != 0.0) {
            shift = FBN_FN(sum_block_walk)(x, stride, len, b, end, e1, runs_ahead) / n;
            FBN_FN(deviation_block_walk)(x, stride, len, b, end, e1, runs_ahead, shift,
                                         &dev_sum, &dev_sq);
            m2 = dev_sq - dev_sum * dev_sum / n;
        }
        fbn_moments block = {n, shift, dev_sum, m2 < 0.0 ? 0.0 : m2};   /* NaN stays NaN */
        fbn_moments_merge(&acc, block);
    }
    return acc;
}

/* moments_walk with a literal prefetch distance: 0 compiles the prefetches out (a variable
 * distance in the segments' loops slowed the walks over cached channels, docs/tuning.md) */
FBN_SEGMENT fbn_moments FBN_FN(moments_range)(const S *x, fbn_index stride, fbn_index len,
                                              fbn_index e0, fbn_index e1)
{
    const fbn_index runs = fbn_runs_ahead(len, stride, e1, sizeof(S));
    return runs > 0 ? FBN_FN(moments_walk)(x, stride, len, e0, e1, runs)
                    : FBN_FN(moments_walk)(x, stride, len, e0, e1, 0);
}

FBN_DISPATCH static fbn_moments FBN_FN(moments_channel)(const void *x, fbn_index C,
                                                        fbn_index len, fbn_index c,
                                                        fbn_index e0, fbn_index e1)
{
    return FBN_FN(moments_range)((const S *)x + c * len, C * len, len, e0, e1);
}

/* y = normalize(x) over positions [e0, e1) of a channel, streaming stores if stream (a
 * literal), then the fence they need */
FBN_SEGMENT void FBN_FN(normalize_walk)(const S *x, S *y, fbn_index stride, fbn_index len,
                                        fbn_index e0, fbn_index e1, T hi, T scale, T offset,
                                        int stream)
{
    for (fbn_channel_walk w = fbn_channel_walk_begin(e0, e1, stride, len, e1, 0);
         fbn_channel_walk_next(&w);)
        FBN_FN(normalize_store)(x + w.offset, y + w.offset, w.n, hi, scale, offset, stream);
    if (stream) fbn_stream_fence();
}

/* y = act(normalize(x) + r) over positions [e0, e1) of a channel; r (the residual, laid out
 * as x) may be NULL, and act FBN_ACT_NONE. stream: the plain op streams its stores (a fused
 * one reads its blocks back, see normalize_rows). */
FBN_SEGMENT void FBN_FN(normalize_range)(const S *x, const S *r, S *y, fbn_index stride,
                                         fbn_index len, fbn_index e0, fbn_index e1, T hi,
                                         T scale, T offset, int act, T slope, int stream)
{
    if (r == NULL && act == FBN_ACT_NONE) {
        /* a literal flag each: a variable one stayed in the per-run loop (docs/tuning.md) */
        if (stream)
            FBN_FN(normalize_walk)(x, y, stride, len, e0, e1, hi, scale, offset, 1);
        else
            FBN_FN(normalize_walk)(x, y, stride, len, e0, e1, hi, scale, offset, 0);
        return;
    }
    for (fbn_channel_walk w = fbn_channel_walk_begin(e0, e1, stride, len, e1, 0);
         fbn_channel_walk_next(&w);)
        FBN_FN(normalize_fused_segment)(x + w.offset, r != NULL ? r + w.offset : NULL,
                                        y + w.offset, w.n, hi, scale, offset, act, slope);
}

/* Gradient sums of positions [b, end) of a channel around m and q, one block of a walk up
 * to position limit, prefetching runs_ahead runs on. With g (not NULL) the sums are of
 * g = dy * act'(y), which is written to g first (y may be NULL when act is FBN_ACT_NONE: g is
 * then a copy of dy). Adds the block's totals into acc. */
FBN_SEGMENT void FBN_FN(grad_sums_block_walk)(const S *dy, const S *x, fbn_index stride,
                                              fbn_index len, fbn_index b, fbn_index end,
                                              fbn_index limit, fbn_index runs_ahead,
                                              const S *y, S *g, int act, T slope,
                                              fbn_grad_sums *acc)
{
    double s_dy[FBN_LANES] = {0.0}, s_dy_xc[FBN_LANES] = {0.0}, s_xc[FBN_LANES] = {0.0};
    double rest[3] = {0.0, 0.0, 0.0};
    const double m = acc->x_shift, q = acc->dy_shift;
    for (fbn_channel_walk w = fbn_channel_walk_begin(b, end, stride, len, limit, runs_ahead);
         fbn_channel_walk_next(&w);) {
        const S *grad = dy + w.offset;
        if (g != NULL) {
            FBN_FN(act_grad_segment)(grad, y != NULL ? y + w.offset : NULL, g + w.offset, w.n,
                                     act, slope);
            grad = g + w.offset;
        }
        FBN_FN(grad_sums_segment)(grad, x + w.offset, w.n, w.ahead, m, q, NULL, s_dy, s_dy_xc,
                                  s_xc, rest);
    }
    const fbn_grad_sums block = {(double)(end - b), m, q, fbn_block_total(s_dy, rest[0], len),
                                 fbn_block_total(s_dy_xc, rest[1], len),
                                 fbn_block_total(s_xc, rest[2], len)};
    fbn_grad_merge(acc, block);
}

FBN_SEGMENT fbn_grad_sums FBN_FN(grad_sums_walk)(const S *dy, const S *x, fbn_index stride,
                                                 fbn_index len, fbn_index e0, fbn_index e1,
                                                 fbn_index runs_ahead, double m, double q,
                                                 const S *y, S *g, int act, T slope)
{
    fbn_grad_sums acc = fbn_grad_sums_empty(m, q);
    for (fbn_index b = e0; b < e1; b += FBN_BLOCK) {
        const fbn_index end = (e1 - b < FBN_BLOCK) ? e1 : b + FBN_BLOCK;
        FBN_FN(grad_sums_block_walk)(dy, x, stride, len, b, end, e1, runs_ahead, y, g, act,
                                     slope, &acc);
    }
    return acc;
}

/* Gradient sums of positions [e0, e1) of a channel around m and q, blocks merged in order
 * (a literal prefetch distance, as moments_range) */
FBN_SEGMENT fbn_grad_sums FBN_FN(grad_sums_range)(const S *dy, const S *x, fbn_index stride,
                                                  fbn_index len, fbn_index e0, fbn_index e1,
                                                  double m, double q, const S *y, S *g,
                                                  int act, T slope)
{
    const fbn_index runs = fbn_runs_ahead(len, stride, e1, sizeof(S));
    return runs > 0
        ? FBN_FN(grad_sums_walk)(dy, x, stride, len, e0, e1, runs, m, q, y, g, act, slope)
        : FBN_FN(grad_sums_walk)(dy, x, stride, len, e0, e1, 0, m, q, y, g, act, slope);
}

FBN_DISPATCH static fbn_grad_sums FBN_FN(grad_sums_channel)(const void *dy, const void *x,
                                                            fbn_index C, fbn_index len,
                                                            fbn_index c, fbn_index e0,
                                                            fbn_index e1,
                                                            const fbn_grad_args *a)
{
    const fbn_index first = c * len;
    const S *y = (const S *)a->y;
    S *g = (S *)a->grad;
    return FBN_FN(grad_sums_range)((const S *)dy + first, (const S *)x + first, C * len, len,
                                   e0, e1, ((const T *)a->mean)[c], ((const T *)a->shift)[c],
                                   y == NULL ? NULL : y + first, g == NULL ? NULL : g + first,
                                   a->activation, (T)a->negative_slope);
}

/* dx over positions [e0, e1) of a channel (see grad_input_value), streaming stores if stream
 * (a literal) */
FBN_SEGMENT void FBN_FN(grad_input_walk)(const S *dy, const S *x, S *dx, fbn_index stride,
                                         fbn_index len, fbn_index e0, fbn_index e1, T h, T g,
                                         T k_dy, T k_xc, T k_0, int stream)
{
    for (fbn_channel_walk w = fbn_channel_walk_begin(e0, e1, stride, len, e1, 0);
         fbn_channel_walk_next(&w);)
        FBN_FN(grad_input_store)(dy + w.offset, x + w.offset, dx + w.offset, w.n, h, g, k_dy,
                                 k_xc, k_0, stream);
    if (stream) fbn_stream_fence();
}

FBN_SEGMENT void FBN_FN(grad_input_range)(const S *dy, const S *x, S *dx, fbn_index stride,
                                          fbn_index len, fbn_index e0, fbn_index e1, T h, T g,
                                          T k_dy, T k_xc, T k_0, int stream)
{
    if (stream)
        FBN_FN(grad_input_walk)(dy, x, dx, stride, len, e0, e1, h, g, k_dy, k_xc, k_0, 1);
    else
        FBN_FN(grad_input_walk)(dy, x, dx, stride, len, e0, e1, h, g, k_dy, k_xc, k_0, 0);
}

/* ------------------------------------------------------------------------------------------
 * Span walks (channels-first): memory [p0, p1), coefficients per channel (C each)
 * ------------------------------------------------------------------------------------------ */

/* Four consecutive whole runs of len values, channels c0..c3 (runs this short pay their loop
 * set-up and tail once per four runs instead of once per run) */
FBN_SEGMENT void FBN_FN(normalize_runs4)(const S *x, S *y, fbn_index len, const T *hi,
                                         const T *scale, const T *offset, fbn_index c0,
                                         fbn_index c1, fbn_index c2, fbn_index c3)
{
    const T h0 = hi[c0], s0 = scale[c0], o0 = offset[c0], h1 = hi[c1], s1 = scale[c1], o1 = offset[c1];
    const T h2 = hi[c2], s2 = scale[c2], o2 = offset[c2], h3 = hi[c3], s3 = scale[c3], o3 = offset[c3];
#if FBN_STAGED
    T xs[4 * FBN_SHORT_RUN];
    if (len <= FBN_SHORT_RUN) {
        LOAD_BLOCK(x, xs, 4 * len);
        CFN(normalize_runs4)(xs, xs, len, hi, scale, offset, c0, c1, c2, c3);
        STORE_BLOCK(xs, y, 4 * len);
        return;
    }
#endif
#pragma omp simd
    for (fbn_index i = 0; i < len; ++i) {
        y[i] = STORE(FBN_FN(normalize_value)(LOAD(x[i]), h0, s0, o0));
        y[len + i] = STORE(FBN_FN(normalize_value)(LOAD(x[len + i]), h1, s1, o1));
        y[2 * len + i] = STORE(FBN_FN(normalize_value)(LOAD(x[2 * len + i]), h2, s2, o2));
        y[3 * len + i] = STORE(FBN_FN(normalize_value)(LOAD(x[3 * len + i]), h3, s3, o3));
    }
}

/* normalize over memory [p0, p1), one segment at a time, streaming stores if stream (a
 * literal) */
FBN_SEGMENT void FBN_FN(normalize_span_walk)(const S *x, S *y, fbn_index C, fbn_index len,
                                             fbn_index p0, fbn_index p1,
                                             const T *FBN_RESTRICT hi,
                                             const T *FBN_RESTRICT scale,
                                             const T *FBN_RESTRICT offset, int stream)
{
    for (fbn_span_walk w = fbn_span_walk_begin(p0, p1, C, len); fbn_span_walk_next(&w);)
        FBN_FN(normalize_store)(x + w.first, y + w.first, w.n, hi[w.channel], scale[w.channel],
                                offset[w.channel], stream);
    if (stream) fbn_stream_fence();
}

FBN_SEGMENT void FBN_FN(normalize_span_plain)(const S *x, S *y, fbn_index C, fbn_index len,
                                              fbn_index p0, fbn_index p1, int stream,
                                              const T *FBN_RESTRICT hi,
                                              const T *FBN_RESTRICT scale,
                                              const T *FBN_RESTRICT offset)
{
    const fbn_index run = p0 < len ? 0 : p0 / len;
    fbn_index c = run < C ? run : run % C, p = p0;
    if (len <= FBN_SHORT_RUN) {
        stream = 0;                                /* runs4 has cached stores only */
        if (p > run * len) {                       /* the rest of a run begun before p0 */
            const fbn_index n = ((run + 1) * len < p1 ? (run + 1) * len : p1) - p;
            FBN_FN(normalize_segment)(x + p, y + p, n, hi[c], scale[c], offset[c]);
            p += n;
            if (++c == C) c = 0;
        }
        for (; p + 4 * len <= p1; p += 4 * len) {
            const fbn_index c1 = c + 1 < C ? c + 1 : (c + 1) % C;
            const fbn_index c2 = c1 + 1 < C ? c1 + 1 : (c1 + 1) % C;
            const fbn_index c3 = c2 + 1 < C ? c2 + 1 : (c2 + 1) % C;
            FBN_FN(normalize_runs4)(x + p, y + p, len, hi, scale, offset, c, c1, c2, c3);
            c = c3 + 1 < C ? c3 + 1 : (c3 + 1) % C;
        }
        p0 = p;                                    /* the last runs, one at a time */
    }
    if (stream)
        FBN_FN(normalize_span_walk)(x, y, C, len, p0, p1, hi, scale, offset, 1);
    else
        FBN_FN(normalize_span_walk)(x, y, C, len, p0, p1, hi, scale, offset, 0);
}

/* y = act(normalize(x) + r) over memory [p0, p1); r may be NULL, act FBN_ACT_NONE */
FBN_DISPATCH static void FBN_FN(normalize_span_kernel)(const S *x, const S *r, S *y, fbn_index C,
                                                       fbn_index len, fbn_index p0,
                                                       fbn_index p1, const T *FBN_RESTRICT hi,
                                                       const T *FBN_RESTRICT scale,
                                                       const T *FBN_RESTRICT offset, int act,
                                                       T slope, int stream)
{
    if (r == NULL && act == FBN_ACT_NONE) {
        FBN_FN(normalize_span_plain)(x, y, C, len, p0, p1, stream, hi, scale, offset);
        return;
    }
    if (FBN_ROUNDS_ON_STORE) {
        for (fbn_span_walk w = fbn_span_walk_begin(p0, p1, C, len); fbn_span_walk_next(&w);)
            FBN_FN(normalize_act)(x + w.first, r != NULL ? r + w.first : NULL, y + w.first, w.n,
                                  hi + w.channel, scale + w.channel, offset + w.channel, 0,
                                  act, slope);
        return;
    }
    for (fbn_index b = p0; b < p1; b += FBN_FUSED_BLOCK) {
        const fbn_index end = p1 - b < FBN_FUSED_BLOCK ? p1 : b + FBN_FUSED_BLOCK;
        FBN_FN(normalize_span_plain)(x, y, C, len, b, end, 0, hi, scale, offset);
        FBN_FN(epilogue_segment)(y + b, r != NULL ? r + b : NULL, end - b, act, slope);
    }
}

static void FBN_FN(normalize_span)(const void *x, const void *r, void *y, fbn_index C,
                                   fbn_index len, fbn_index p0, fbn_index p1, const void *coef,
                                   int act, double slope, int stream)
{
    const T *hi = (const T *)coef;
    FBN_FN(normalize_span_kernel)((const S *)x, (const S *)r, (S *)y, C, len, p0, p1, hi,
                                  hi + C, hi + 2 * C, act, (T)slope, stream);
}

/* dx over memory [p0, p1), streaming stores if stream (a literal) */
FBN_SEGMENT void FBN_FN(grad_input_span_walk)(const S *dy, const S *x, S *dx, fbn_index C,
                                              fbn_index len, fbn_index p0, fbn_index p1,
                                              const T *FBN_RESTRICT h,
                                              const T *FBN_RESTRICT g,
                                              const T *FBN_RESTRICT k_dy,
                                              const T *FBN_RESTRICT k_xc,
                                              const T *FBN_RESTRICT k_0, int stream)
{
    for (fbn_span_walk w = fbn_span_walk_begin(p0, p1, C, len); fbn_span_walk_next(&w);) {
        const fbn_index c = w.channel;
        FBN_FN(grad_input_store)(dy + w.first, x + w.first, dx + w.first, w.n, h[c], g[c],
                                 k_dy[c], k_xc[c], k_0[c], stream);
    }
    if (stream) fbn_stream_fence();
}

FBN_DISPATCH static void FBN_FN(grad_input_span_kernel)(const S *dy, const S *x, S *dx,
                                                        fbn_index C, fbn_index len,
                                                        fbn_index p0, fbn_index p1,
                                                        const T *FBN_RESTRICT h,
                                                        const T *FBN_RESTRICT g,
                                                        const T *FBN_RESTRICT k_dy,
                                                        const T *FBN_RESTRICT k_xc,
                                                        const T *FBN_RESTRICT k_0, int stream)
{
    if (stream)
        FBN_FN(grad_input_span_walk)(dy, x, dx, C, len, p0, p1, h, g, k_dy, k_xc, k_0, 1);
    else
        FBN_FN(grad_input_span_walk)(dy, x, dx, C, len, p0, p1, h, g, k_dy, k_xc, k_0, 0);
}

static void FBN_FN(grad_input_span)(const void *dy, const void *x, void *dx, fbn_index C,
                                    fbn_index len, fbn_index p0, fbn_index p1, const void *coef,
                                    int stream)
{
    const T *h = (const T *)coef;
    FBN_FN(grad_input_span_kernel)((const S *)dy, (const S *)x, (S *)dx, C, len, p0, p1, h,
                                   h + C, h + 2 * C, h + 3 * C, h + 4 * C, stream);
}

/* ------------------------------------------------------------------------------------------
 * Rows (channels-last): nrows x C blocks, all channels at once
 * ------------------------------------------------------------------------------------------ */

/* Channels-last rows are taken `step` at a time: with step 4, every C-length accumulator or
 * coefficient vector is loaded and stored once per four rows instead of once per row, which
 * pays while the data sit in cache; data streaming from memory go faster one row at a time
 * (step 1: one stream per array for the prefetchers). */

/* Staged channels-last moments convert whole rows, a multiple of four at a time (so the rows
 * are added in the same groups as unstaged), while four rows fit FBN_ROW_STAGE values; wider
 * rows take the per-value loops. */
#if FBN_STAGED
#define FBN_STAGED_ROWS(C) (4 * (C) <= FBN_ROW_STAGE)
#endif

/* sum[c] += x over an nrows x C block, four rows at a time with step 4 */
FBN_SEGMENT void FBN_FN(rows_add_values)(const S *x, fbn_index nrows, fbn_index C, int step,
                                         double *FBN_RESTRICT sum)
{
#if FBN_STAGED
    if (FBN_STAGED_ROWS(C)) {
        T xs[FBN_ROW_STAGE];
        const fbn_index rows = FBN_ROW_STAGE / C / 4 * 4;
        for (fbn_index r = 0; r < nrows; r += rows) {
            const fbn_index n = FBN_PART_LEN(nrows, r, rows);
            LOAD_BLOCK(x + r * C, xs, n * C);
            CFN(rows_add_values)(xs, n, C, step, sum);
        }
        return;
    }
#endif
    fbn_index r;
    for (r = 0; step == 4 && r + 4 <= nrows; r += 4) {
        const S *x0 = x + r * C, *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
#pragma omp simd
        for (fbn_index c = 0; c < C; ++c)
            sum[c] += ((double)LOAD(x0[c]) + (double)LOAD(x1[c]))
                      + ((double)LOAD(x2[c]) + (double)LOAD(x3[c]));
    }
    for (; r < nrows; ++r) {
        const S *x0 = x + r * C;
#pragma omp simd
        for (fbn_index c = 0; c < C; ++c) sum[c] += (double)LOAD(x0[c]);
    }
}

/* dev_sum[c] += x - shift[c] and m2[c] += (x - shift[c])^2 over an nrows x C block */
FBN_SEGMENT void FBN_FN(rows_add_deviations)(const S *x, fbn_index nrows, fbn_index C,
                                             int step, const double *FBN_RESTRICT shift,
                                             double *FBN_RESTRICT dev_sum,
                                             double *FBN_RESTRICT m2)
{
#if FBN_STAGED
    if (FBN_STAGED_ROWS(C)) {
        T xs[FBN_ROW_STAGE];
        const fbn_index rows = FBN_ROW_STAGE / C / 4 * 4;
        for (fbn_index r = 0; r < nrows; r += rows) {
            const fbn_index n = FBN_PART_LEN(nrows, r, rows);
            LOAD_BLOCK(x + r * C, xs, n * C);
            CFN(rows_add_deviations)(xs, n, C, step, shift, dev_sum, m2);
        }
        return;
    }
#endif
    fbn_index r;
    for (r = 0; step == 4 && r + 4 <= nrows; r += 4) {
        const S *x0 = x + r * C, *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
#pragma omp simd
        for (fbn_index c = 0; c < C; ++c) {
            const double d0 = (double)LOAD(x0[c]) - shift[c], d1 = (double)LOAD(x1[c]) - shift[c];
            const double d2 = (double)LOAD(x2[c]) - shift[c], d3 = (double)LOAD(x3[c]) - shift[c];
            dev_sum[c] += (d0 + d1) + (d2 + d3);
            m2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
        }
    }
    for (; r < nrows; ++r) {
        const S *x0 = x + r * C;
#pragma omp simd
        for (fbn_index c = 0; c < C; ++c) {
            const double d = (double)LOAD(x0[c]) - shift[c];
            dev_sum[c] += d;
            m2[c] += d * d;
        }
    }
}

/* Moments of an nrows x C block, every channel at once (vectorized across channels), as in
 * moments_walk: with have_shift == 0 the block finds its shift (two passes), otherwise
 * shift already holds the mean of the blocks before it (one pass). The count is nrows for
 * each channel. Writes C values into each of shift, dev_sum, m2. */
FBN_SEGMENT void FBN_FN(moments_rows_block)(const S *x, fbn_index nrows, fbn_index C, int step,
                                            int have_shift,
                                            double *FBN_RESTRICT shift,
                                            double *FBN_RESTRICT dev_sum,
                                            double *FBN_RESTRICT m2)
{
    const double inv_n = 1.0 / (double)nrows;
    for (fbn_index c = 0; c < C; ++c) dev_sum[c] = m2[c] = 0.0;
    if (!have_shift) {
        for (fbn_index c = 0; c < C; ++c) shift[c] = 0.0;
        FBN_FN(rows_add_values)(x, nrows, C, step, shift);
#pragma omp simd
        for (fbn_index c = 0; c < C; ++c) shift[c] *= inv_n;
    }
    /* m2 holds sum d^2 until the correction */
    FBN_FN(rows_add_deviations)(x, nrows, C, step, shift, dev_sum, m2);
#pragma omp simd
    for (fbn_index c = 0; c < C; ++c) {
        const double v = m2[c] - dev_sum[c] * dev_sum[c] * inv_n;
        m2[c] = v < 0.0 ? 0.0 : v;
    }
}

/* normalize_segment over nrows x C channels-last rows, with C-length coefficient vectors */
FBN_SEGMENT void FBN_FN(normalize_rows_plain)(const S *x, S *y, fbn_index nrows, fbn_index C,
                                              int step, int stream,
                                              const T *FBN_RESTRICT hi,
                                              const T *FBN_RESTRICT scale,
                                              const T *FBN_RESTRICT offset)
{
#if FBN_STAGED
    /* whole rows a stage at a time where a stage holds one, else row by row in stages */
    if (C > FBN_ROW_STAGE) {
        for (fbn_index r = 0; r < nrows; ++r)
            FBN_FN(normalize_act_loop)(x + r * C, NULL, y + r * C, C, hi, scale, offset, 1,
                                       FBN_ACT_NONE, (T)0);
        return;
    }
    T xs[FBN_ROW_STAGE];
    const fbn_index rows = FBN_ROW_STAGE / C;
    for (fbn_index r = 0; r < nrows; r += rows) {
        const fbn_index n = FBN_PART_LEN(nrows, r, rows);
        LOAD_BLOCK(x + r * C, xs, n * C);
        CFN(normalize_rows_plain)(xs, xs, n, C, step, 0, hi, scale, offset);
        STORE_BLOCK(xs, y + r * C, n * C);
    }
    return;
#endif
    fbn_index r;
    if (FBN_ROUNDS_ON_STORE)
        step = 4;       /* GCC 12 leaves the one-row loop of converting stores scalar */
    for (r = 0; step == 4 && r + 4 <= nrows; r += 4) {
        const S *x0 = x + r * C;
        S *y0 = y + r * C;
#pragma omp simd
        for (fbn_index c = 0; c < C; ++c) {
            const T h = hi[c], s = scale[c], o = offset[c];
            y0[c] = STORE(FBN_FN(normalize_value)(LOAD(x0[c]), h, s, o));
            y0[C + c] = STORE(FBN_FN(normalize_value)(LOAD(x0[C + c]), h, s, o));
            y0[2 * C + c] = STORE(FBN_FN(normalize_value)(LOAD(x0[2 * C + c]), h, s, o));
            y0[3 * C + c] = STORE(FBN_FN(normalize_value)(LOAD(x0[3 * C + c]), h, s, o));
        }
    }
    if (stream && !FBN_ROUNDS_ON_STORE) {     /* converting stores have no streaming form */
        for (; r < nrows; ++r)
            FBN_FN(normalize_row_stream)(x + r * C, y + r * C, C, hi, scale, offset);
        fbn_stream_fence();
        return;
    }
    for (; r < nrows; ++r) {
        const S *x0 = x + r * C;
        S *y0 = y + r * C;
#pragma omp simd
        for (fbn_index c = 0; c < C; ++c)
            y0[c] = STORE(FBN_FN(normalize_value)(LOAD(x0[c]), hi[c], scale[c], offset[c]));
    }
}

/* y = act(normalize(x) + r) over nrows x C rows; r may be NULL, act FBN_ACT_NONE. stream:
 * the plain op streams its stores; a fused one does not, as its epilogue reads each block
 * back from L1. */
FBN_DISPATCH static void FBN_FN(normalize_rows_kernel)(const S *x, const S *r, S *y,
                                                       fbn_index nrows, fbn_index C, int step,
                                                       const T *FBN_RESTRICT hi,
                                                       const T *FBN_RESTRICT scale,
                                                       const T *FBN_RESTRICT offset, int act,
                                                       T slope, int stream)
{
    if (r == NULL && act == FBN_ACT_NONE) {
        FBN_FN(normalize_rows_plain)(x, y, nrows, C, step, stream, hi, scale, offset);
        return;
    }
    if (FBN_ROUNDS_ON_STORE) {
        for (fbn_index row = 0; row < nrows; ++row)
            FBN_FN(normalize_act)(x + row * C, r != NULL ? r + row * C : NULL, y + row * C, C,
                                  hi, scale, offset, 1, act, slope);
        return;
    }
    const fbn_index block = C < FBN_FUSED_BLOCK ? FBN_FUSED_BLOCK / C : 1;    /* rows */
    for (fbn_index b = 0; b < nrows; b += block) {
        const fbn_index n = nrows - b < block ? nrows - b : block;
        FBN_FN(normalize_rows_plain)(x + b * C, y + b * C, n, C, step, 0, hi, scale, offset);
        FBN_FN(epilogue_segment)(y + b * C, r != NULL ? r + b * C : NULL, n * C, act, slope);
    }
}

static void FBN_FN(normalize_rows)(const void *x, const void *r, void *y, fbn_index C,
                                   fbn_index r0, fbn_index r1, int step, const void *coef,
                                   int act, double slope, int stream)
{
    const fbn_index first = r0 * C;
    const T *hi = (const T *)coef;
    FBN_FN(normalize_rows_kernel)((const S *)x + first,
                                  r == NULL ? NULL : (const S *)r + first, (S *)y + first,
                                  r1 - r0, C, step, hi, hi + C, hi + 2 * C, act, (T)slope,
                                  stream);
}

/* Gradient sums of an nrows x C block around the shifts m and q (C each); writes C-length
 * s_dy, s_dy_xc, s_xc. Not staged: converting dy and x in blocks did not pay here (the
 * double sums bound it; docs/tuning.md). */
FBN_SEGMENT void FBN_FN(grad_sums_rows_block)(const S *dy, const S *x, fbn_index nrows,
                                              fbn_index C, int step, const T *FBN_RESTRICT m,
                                              const T *FBN_RESTRICT q,
                                              double *FBN_RESTRICT s_dy,
                                              double *FBN_RESTRICT s_dy_xc,
                                              double *FBN_RESTRICT s_xc)
{
    fbn_index r;
    for (fbn_index c = 0; c < C; ++c) s_dy[c] = s_dy_xc[c] = s_xc[c] = 0.0;
    for (r = 0; step == 4 && r + 4 <= nrows; r += 4) {
        const S *x0 = x + r * C, *g0 = dy + r * C;
#pragma omp simd
        for (fbn_index c = 0; c < C; ++c) {
            const double mc = (double)m[c], qc = (double)q[c];
            const double a0 = (double)LOAD(x0[c]) - mc, a1 = (double)LOAD(x0[C + c]) - mc;
            const double a2 = (double)LOAD(x0[2 * C + c]) - mc;
            const double a3 = (double)LOAD(x0[3 * C + c]) - mc;
            const double b0 = (double)LOAD(g0[c]) - qc, b1 = (double)LOAD(g0[C + c]) - qc;
            const double b2 = (double)LOAD(g0[2 * C + c]) - qc;
            const double b3 = (double)LOAD(g0[3 * C + c]) - qc;
            s_dy[c] += (b0 + b1) + (b2 + b3);
            s_dy_xc[c] += (b0 * a0 + b1 * a1) + (b2 * a2 + b3 * a3);
            s_xc[c] += (a0 + a1) + (a2 + a3);
        }
    }
    for (; r < nrows; ++r) {
        const S *x0 = x + r * C, *g0 = dy + r * C;
#pragma omp simd
        for (fbn_index c = 0; c < C; ++c) {
            const double a = (double)LOAD(x0[c]) - (double)m[c];
            const double b = (double)LOAD(g0[c]) - (double)q[c];
            s_dy[c] += b;
            s_dy_xc[c] += b * a;
            s_xc[c] += a;
        }
    }
}

/* dx over one channels-last row of C values, coefficients per channel */
FBN_SEGMENT void FBN_FN(grad_input_row)(const S *dy, const S *x, S *dx, fbn_index C,
                                        const T *FBN_RESTRICT h, const T *FBN_RESTRICT g,
                                        const T *FBN_RESTRICT k_dy,
                                        const T *FBN_RESTRICT k_xc,
                                        const T *FBN_RESTRICT k_0)
{
#if FBN_STAGED
    T dys[FBN_STAGE], xs[FBN_STAGE];
    for (fbn_index b = 0; b < C; b += FBN_STAGE) {
        const fbn_index m = FBN_STAGE_LEN(C, b);
        LOAD_BLOCK(dy + b, dys, m);
        LOAD_BLOCK(x + b, xs, m);
        CFN(grad_input_row)(dys, xs, dys, m, h + b, g + b, k_dy + b, k_xc + b, k_0 + b);
        STORE_BLOCK(dys, dx + b, m);
    }
#else
#pragma omp simd
    for (fbn_index c = 0; c < C; ++c)
        dx[c] = STORE(FBN_FN(grad_input_value)(LOAD(dy[c]), LOAD(x[c]), h[c], g[c], k_dy[c],
                                               k_xc[c], k_0[c]));
#endif
}

/* grad_input_segment over nrows x C channels-last rows, with C-length coefficient vectors */
FBN_DISPATCH static void FBN_FN(grad_input_rows_kernel)(const S *dy, const S *x, S *dx,
                                                        fbn_index nrows, fbn_index C, int step,
                                                        const T *FBN_RESTRICT h,
                                                        const T *FBN_RESTRICT g,
                                                        const T *FBN_RESTRICT k_dy,
                                                        const T *FBN_RESTRICT k_xc,
                                                        const T *FBN_RESTRICT k_0, int stream)
{
#if FBN_STAGED
    /* whole rows a stage at a time where a stage holds one, else row by row in stages */
    if (C > FBN_ROW_STAGE) {
        for (fbn_index r = 0; r < nrows; ++r)
            FBN_FN(grad_input_row)(dy + r * C, x + r * C, dx + r * C, C, h, g, k_dy, k_xc, k_0);
        return;
    }
    T dys[FBN_ROW_STAGE], xs[FBN_ROW_STAGE];
    const fbn_index rows = FBN_ROW_STAGE / C;
    for (fbn_index r = 0; r < nrows; r += rows) {
        const fbn_index n = FBN_PART_LEN(nrows, r, rows);
        LOAD_BLOCK(dy + r * C, dys, n * C);
        LOAD_BLOCK(x + r * C, xs, n * C);
        for (fbn_index k = 0; k < n; ++k)
            CFN(grad_input_row)(dys + k * C, xs + k * C, dys + k * C, C, h, g, k_dy, k_xc, k_0);
        STORE_BLOCK(dys, dx + r * C, n * C);
    }
    return;
#endif
    fbn_index r;
    if (FBN_ROUNDS_ON_STORE)
        step = 4;       /* as in normalize_rows_plain */
    for (r = 0; step == 4 && r + 4 <= nrows; r += 4) {
        const S *x0 = x + r * C, *g0 = dy + r * C;
        S *d0 = dx + r * C;
#pragma omp simd
        for (fbn_index c = 0; c < C; ++c) {
            const T hc = h[c], gc = g[c], a = k_dy[c], b = k_xc[c], z = k_0[c];
            d0[c] = STORE(FBN_FN(grad_input_value)(LOAD(g0[c]), LOAD(x0[c]), hc, gc, a, b, z));
            d0[C + c] = STORE(FBN_FN(grad_input_value)(LOAD(g0[C + c]), LOAD(x0[C + c]), hc, gc,
                                                       a, b, z));
            d0[2 * C + c] = STORE(FBN_FN(grad_input_value)(LOAD(g0[2 * C + c]),
                                                           LOAD(x0[2 * C + c]), hc, gc, a, b, z));
            d0[3 * C + c] = STORE(FBN_FN(grad_input_value)(LOAD(g0[3 * C + c]),
                                                           LOAD(x0[3 * C + c]), hc, gc, a, b, z));
        }
    }
    if (stream && !FBN_ROUNDS_ON_STORE) {
        for (; r < nrows; ++r)
            FBN_FN(grad_input_row_stream)(dy + r * C, x + r * C, dx + r * C, C, h, g, k_dy, k_xc,
                                          k_0);
        fbn_stream_fence();
        return;
    }
    for (; r < nrows; ++r)
        FBN_FN(grad_input_row)(dy + r * C, x + r * C, dx + r * C, C, h, g, k_dy, k_xc, k_0);
}

static void FBN_FN(grad_input_rows)(const void *g, const void *x, void *dx, fbn_index C,
                                    fbn_index r0, fbn_index r1, int step, const void *coef,
                                    int stream)
{
    const fbn_index first = r0 * C;
    const T *h = (const T *)coef;
    FBN_FN(grad_input_rows_kernel)((const S *)g + first, (const S *)x + first, (S *)dx + first,
                                   r1 - r0, C, step, h, h + C, h + 2 * C, h + 3 * C, h + 4 * C,
                                   stream);
}

/* A chunk of channels-last rows, [r0, r1), in blocks of block_rows, each block's moments
 * merged in order, into part (4*C doubles, the partial format). scratch: 3*C. */
FBN_DISPATCH static void FBN_FN(moments_rows_kernel)(const S *x, fbn_index nrows, fbn_index C,
                                                     fbn_index block_rows, int step,
                                                     double *FBN_RESTRICT part,
                                                     double *FBN_RESTRICT scratch)
{
    double *shift = part + C, *dev_sum = part + 2 * C, *m2 = part + 3 * C;
    double count = 0.0;
    for (fbn_index r = 0; r < nrows; r += block_rows) {
        const fbn_index n = nrows - r < block_rows ? nrows - r : block_rows;
        if (count > 0.0) {         /* later blocks: shift = the mean so far */
            const double inv_count = 1.0 / count;
#pragma omp simd
            for (fbn_index c = 0; c < C; ++c) scratch[c] = shift[c] + dev_sum[c] * inv_count;
        }
        FBN_FN(moments_rows_block)(x + r * C, n, C, step, count > 0.0, scratch, scratch + C,
                                   scratch + 2 * C);
        fbn_moments_merge_shared(C, &count, shift, dev_sum, m2, (double)n, scratch,
                                 scratch + C, scratch + 2 * C);
    }
    for (fbn_index c = 0; c < C; ++c) part[c] = count;
}

static void FBN_FN(moments_rows)(const void *x, fbn_index C, fbn_index r0, fbn_index r1,
                                 fbn_index block_rows, int step, double *part, double *scratch)
{
    FBN_FN(moments_rows_kernel)((const S *)x + r0 * C, r1 - r0, C, block_rows, step, part,
                                scratch);
}

/* A chunk of channels-last rows, [r0, r1): block sums of the gradient around the saved
 * means and the shifts q (a->mean, a->shift), added in order into part (6*C doubles, the
 * partial format). scratch: 3*C. Fused (a->grad set), each block's g = dy * act'(y) is
 * written to a->grad first and summed instead of dy (see grad_sums_block_walk). */
FBN_DISPATCH static void FBN_FN(grad_sums_rows_kernel)(const S *dy, const S *x,
                                                       fbn_index nrows, fbn_index C,
                                                       fbn_index block_rows, int step,
                                                       const T *FBN_RESTRICT m,
                                                       const T *FBN_RESTRICT q,
                                                       double *FBN_RESTRICT part,
                                                       double *FBN_RESTRICT scratch,
                                                       const S *y, S *g, int act, T slope)
{
    double *sums = part + 3 * C;     /* dy | dy_xc | xc: the fields that add */
    for (fbn_index r = 0; r < nrows; r += block_rows) {
        const fbn_index n = nrows - r < block_rows ? nrows - r : block_rows;
        const S *grad = dy + r * C;
        double *block = r == 0 ? sums : scratch;     /* the first block's sums go to part */
        if (g != NULL) {
            FBN_FN(act_grad_segment)(grad, y != NULL ? y + r * C : NULL, g + r * C, n * C, act,
                                     slope);
            grad = g + r * C;
        }
        FBN_FN(grad_sums_rows_block)(grad, x + r * C, n, C, step, m, q, block, block + C,
                                     block + 2 * C);
        if (r > 0) {
#pragma omp simd
            for (fbn_index c = 0; c < 3 * C; ++c) sums[c] += scratch[c];
        }
    }
    for (fbn_index c = 0; c < C; ++c) {
        part[c] = (double)nrows;
        part[C + c] = (double)m[c];
        part[2 * C + c] = (double)q[c];
    }
}

static void FBN_FN(grad_sums_rows)(const void *dy, const void *x, fbn_index C, fbn_index r0,
                                   fbn_index r1, fbn_index block_rows, int step,
                                   const fbn_grad_args *a, double *part, double *scratch)
{
    const fbn_index first = r0 * C;
    FBN_FN(grad_sums_rows_kernel)((const S *)dy + first, (const S *)x + first, r1 - r0, C,
                                  block_rows, step, (const T *)a->mean, (const T *)a->shift,
                                  part, scratch,
                                  a->y == NULL ? NULL : (const S *)a->y + first,
                                  a->grad == NULL ? NULL : (S *)a->grad + first,
                                  a->activation, (T)a->negative_slope);
}

/* ------------------------------------------------------------------------------------------
 * Per-channel coefficients (scalar code, once per channel)
 * ------------------------------------------------------------------------------------------ */

/* From a channel's moments to what normalizing it needs:
 *     mean = hi + lo      hi = the mean rounded to T, so x - hi is exact near the mean,
 *                         lo = what rounding left out (two-sum)
 *     var  = m2 / n       biased, as normalizing uses;  invstd = 1 / sqrt(var + eps)
 *     y    = (x - mean) * scale + beta = (x - hi) * scale + offset
 *            with scale = gamma * invstd and offset = beta - lo * scale (formed in double)
 * Returns invstd in double; the caller keeps it (and mean, var) for the outputs. */
static inline double FBN_FN(train_coefficients)(fbn_moments m, double eps, double gamma,
                                                double beta, T *hi, T *scale, T *offset)
{
    const double inv_n = 1.0 / m.count;
    const double mean_rest = m.dev_sum * inv_n;
    const T mean_hi = (T)(m.shift + mean_rest);
    const double lo = (m.shift - (double)mean_hi) + mean_rest;
    const double invstd = 1.0 / sqrt(m.m2 * inv_n + eps);
    const double a = gamma * invstd;
    *hi = mean_hi;
    *scale = (T)a;
    *offset = (T)(beta - lo * a);
    return invstd;
}

/* Inference coefficients (running statistics), C channels at once, vectorized:
 *     hi = running_mean, scale = gamma / sqrt(running_var + eps), offset = beta
 * weight or bias may be NULL (gamma = 1, beta = 0). Returns whether some running_var is
 * negative (the check rides along in the vectorized loop); the caller then raises before it
 * writes anything. */
FBN_DISPATCH static int FBN_FN(infer_coefficients_kernel)(fbn_index C, const T *running_mean,
                                                          const T *running_var,
                                                          const T *weight, const T *bias,
                                                          double eps, T *FBN_RESTRICT coef)
{
    T *hi = coef, *scale = coef + C, *offset = coef + 2 * C;
    int negative = 0;
#pragma omp simd reduction(|:negative)
    for (fbn_index c = 0; c < C; ++c) {
        const double gamma = weight == NULL ? 1.0 : (double)weight[c];
        negative |= running_var[c] < 0;
        hi[c] = running_mean[c];
        scale[c] = (T)(gamma / sqrt((double)running_var[c] + eps));
        offset[c] = bias == NULL ? 0 : bias[c];
    }
    return negative;
}

static int FBN_FN(infer_coefficients)(fbn_index C, const void *running_mean,
                                      const void *running_var, const void *weight,
                                      const void *bias, double eps, void *coef)
{
    return FBN_FN(infer_coefficients_kernel)(C, (const T *)running_mean, (const T *)running_var,
                                             (const T *)weight, (const T *)bias, eps,
                                             (T *)coef);
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

/* Channel c's coefficients into coef (hi | scale | offset, C values each), its saved mean and
 * invstd, and its running statistics, from its moments */
static inline void FBN_FN(train_finish_channel)(fbn_moments m, fbn_index C, fbn_index c,
                                                const fbn_train_args *a, T *coef)
{
    const double gamma = a->weight == NULL ? 1.0 : (double)((const T *)a->weight)[c];
    const double beta = a->bias == NULL ? 0.0 : (double)((const T *)a->bias)[c];
    const double invstd = FBN_FN(train_coefficients)(m, a->eps, gamma, beta, &coef[c],
                                                     &coef[C + c], &coef[2 * C + c]);
    ((T *)a->save_mean)[c] = coef[c];
    ((T *)a->save_invstd)[c] = (T)invstd;
    if (a->running_mean != NULL)
        FBN_FN(update_running)(&((T *)a->running_mean)[c * a->running_mean_stride],
                               &((T *)a->running_var)[c * a->running_var_stride], m,
                               a->momentum);
}

/* train_finish_channel for channels [c0, c1), from their moments in the partial format, as
 * train_group computes them: in the dispatched clone, whose instruction set may contract
 * products to FMA */
FBN_DISPATCH static void FBN_FN(train_finish_grouped)(const double *moments, fbn_index C,
                                                      fbn_index c0, fbn_index c1,
                                                      const fbn_train_args *a, T *coef)
{
    for (fbn_index c = c0; c < c1; ++c)
        FBN_FN(train_finish_channel)(fbn_moments_get(moments, C, c), C, c, a, coef);
}

/* train_finish_channel for channels [c0, c1), from their moments in the partial format: as
 * the chunked paths compute them, or (grouped) as the fused channels-first path does */
static void FBN_FN(train_finish)(const double *moments, fbn_index C, fbn_index c0,
                                 fbn_index c1, const fbn_train_args *a, void *coef,
                                 int grouped)
{
    if (grouped) {
        FBN_FN(train_finish_grouped)(moments, C, c0, c1, a, (T *)coef);
        return;
    }
    for (fbn_index c = c0; c < c1; ++c)
        FBN_FN(train_finish_channel)(fbn_moments_get(moments, C, c), C, c, a, (T *)coef);
}

/* The channels-first training forward of channels [c0, c1), each of them whole, a group small
 * enough to stay in cache (as backward_group): every channel's moments (into moments[c]),
 * then every channel's coefficients and statistics, then every channel's
 * y = act(normalize(x) + r) (r, laid out as x, may be NULL; y may be x). */
FBN_DISPATCH static void FBN_FN(train_group_kernel)(const S *x, const S *r, S *y, fbn_index C,
                                                    fbn_index len, fbn_index count,
                                                    fbn_index c0, fbn_index c1,
                                                    const fbn_train_args *a, int act, T slope,
                                                    fbn_moments *FBN_RESTRICT moments,
                                                    T *FBN_RESTRICT coef, int stream)
{
    for (fbn_index c = c0; c < c1; ++c)
        moments[c] = FBN_FN(moments_range)(x + c * len, C * len, len, 0, count);
    for (fbn_index c = c0; c < c1; ++c) FBN_FN(train_finish_channel)(moments[c], C, c, a, coef);
    for (fbn_index c = c0; c < c1; ++c) {
        const fbn_index first = c * len;
        FBN_FN(normalize_range)(x + first, r == NULL ? NULL : r + first, y + first, C * len,
                                len, 0, count, coef[c], coef[C + c], coef[2 * C + c], act,
                                slope, stream);
    }
}

static void FBN_FN(train_group)(const void *x, const void *r, void *y, fbn_index C,
                                fbn_index len, fbn_index count, fbn_index c0, fbn_index c1,
                                const fbn_train_args *a, int act, double slope,
                                fbn_moments *moments, void *coef, int stream)
{
    FBN_FN(train_group_kernel)((const S *)x, (const S *)r, (S *)y, C, len, count, c0, c1, a,
                               act, (T)slope, moments, (T *)coef, stream);
}

/* Backward of y = (x - mu) * invstd * gamma + beta with batch statistics, per channel, from
 * the sums around the shifts m (the saved mean) and q (a dy value; fbn_grad_sums):
 *     mu      = m + lo,  lo = sum (x - m) / n         the exact batch mean: m is only a shift
 *     S       = sum dy (x - mu) = dy_xc - lo * sum (dy - q)      (sum (x - mu) = 0)
 *     dbias   = sum dy = sum (dy - q) + n q
 *     dweight = invstd * S
 *     dx      = gamma invstd (dy - sum dy / n - (x - mu) invstd^2 S / n)
 *             = k_dy * (dy - g) + k_xc * (x - h) + k_0
 * with h = mu and g = sum dy / n rounded to T (x - h and dy - g are exact near the means, so
 * neither an offset in dy nor a saved mean far from the data costs digits),
 * k_dy = gamma invstd, k_xc = -gamma invstd^3 S / n, and what the roundings left out,
 * k_0 = k_dy (g - sum dy / n) + k_xc (h - mu), formed in double. */
static inline void FBN_FN(grad_coefficients)(fbn_grad_sums s, double invstd, double gamma,
                                             T *h, T *g, T *k_dy, T *k_xc, T *k_0,
                                             double *dweight, double *dbias)
{
    const double m = s.x_shift, q = s.dy_shift;
    const double inv_count = 1.0 / s.count;
    const double lo = s.xc * inv_count;
    const double dy_rest = s.dy * inv_count;              /* mean of dy - q */
    const double dy_xmu = s.dy_xc - lo * s.dy;
    const double kd = gamma * invstd;
    const double kx = -kd * invstd * invstd * dy_xmu * inv_count;
    const T h_t = (T)(m + lo), g_t = (T)(q + dy_rest);
    *h = h_t;
    *g = g_t;
    *k_dy = (T)kd;
    *k_xc = (T)kx;
    *k_0 = (T)(kd * (((double)g_t - q) - dy_rest) + kx * (((double)h_t - m) - lo));
    *dweight = invstd * dy_xmu;
    *dbias = s.dy + s.count * q;
}

/* Channel c's gradient coefficients into coef (h | g | k_dy | k_xc | k_0, C values each), its
 * dweight and dbias, from its sums */
static inline void FBN_FN(grad_finish_channel)(fbn_grad_sums s, fbn_index C, fbn_index c,
                                               const fbn_grad_args *a, T *coef)
{
    const double gamma = a->weight == NULL ? 1.0 : (double)((const T *)a->weight)[c];
    double dweight, dbias;
    FBN_FN(grad_coefficients)(s, ((const T *)a->invstd)[c], gamma, &coef[c], &coef[C + c],
                              &coef[2 * C + c], &coef[3 * C + c], &coef[4 * C + c], &dweight,
                              &dbias);
    ((T *)a->dweight)[c] = (T)dweight;
    ((T *)a->dbias)[c] = (T)dbias;
}

/* grad_finish_channel for channels [c0, c1) as backward_group computes them (see
 * train_finish_grouped) */
FBN_DISPATCH static void FBN_FN(grad_finish_grouped)(const double *sums, fbn_index C,
                                                     fbn_index c0, fbn_index c1,
                                                     const fbn_grad_args *a, T *coef)
{
    for (fbn_index c = c0; c < c1; ++c) {
        fbn_grad_sums s;
        fbn_unit_get(sums, C, c, &s, FBN_GRAD_FIELDS);
        FBN_FN(grad_finish_channel)(s, C, c, a, coef);
    }
}

/* grad_finish_channel for channels [c0, c1), from their sums in the partial format (grouped:
 * as train_finish) */
static void FBN_FN(grad_finish)(const double *sums, fbn_index C, fbn_index c0, fbn_index c1,
                                const fbn_grad_args *a, void *coef, int grouped)
{
    if (grouped) {
        FBN_FN(grad_finish_grouped)(sums, C, c0, c1, a, (T *)coef);
        return;
    }
    for (fbn_index c = c0; c < c1; ++c) {
        fbn_grad_sums s;
        fbn_unit_get(sums, C, c, &s, FBN_GRAD_FIELDS);
        FBN_FN(grad_finish_channel)(s, C, c, a, (T *)coef);
    }
}

/* Each channel's dy shift q[c]: its first value of g = dy * act'(y) (g = dy without fusion),
 * so that an offset in dy costs no digits; every chunk sums g - q around it. After relu or
 * leaky_relu, g is (near) zero wherever y <= 0, and a shift away from zero would add
 * count * |q| to the sums' rounding: q = 0 there. */
static void FBN_FN(grad_shifts)(const void *dyv, fbn_index C, fbn_index len,
                                const fbn_grad_args *a, void *qv)
{
    const S *dy = (const S *)dyv, *y = (const S *)a->y;
    T *q = (T *)qv;
    for (fbn_index c = 0; c < C; ++c) {
        const fbn_index first = c * len;        /* position 0 of channel c, in either family */
        if (a->activation == FBN_ACT_RELU || a->activation == FBN_ACT_LEAKY_RELU)
            q[c] = 0;
        else if (a->grad == NULL)
            q[c] = LOAD(dy[first]);
        else
            q[c] = FBN_FN(act_grad_value)(LOAD(dy[first]), y == NULL ? (T)0 : LOAD(y[first]),
                                          a->activation, (T)a->negative_slope);
    }
}

/* The channels-first backward of channels [c0, c1), each of them whole (count positions, runs
 * of len values C*len apart), a group small enough to stay in cache: every channel's sums
 * (into sums[c]), then every channel's coefficients, dweight and dbias (their latency chains
 * overlap across the group), then every channel's dx. One call per group: per-channel calls
 * through the dispatcher cost as much as a short channel's sums. */
FBN_DISPATCH static void FBN_FN(backward_group_kernel)(const S *dy, const S *x, S *dx,
                                                       fbn_index C, fbn_index len,
                                                       fbn_index count, fbn_index c0,
                                                       fbn_index c1, const fbn_grad_args *a,
                                                       fbn_grad_sums *FBN_RESTRICT sums,
                                                       T *FBN_RESTRICT coef, int stream)
{
    const S *y = (const S *)a->y;
    S *grad = (S *)a->grad;
    const T *mean = (const T *)a->mean, *shift = (const T *)a->shift;
    const T slope = (T)a->negative_slope;
    const S *g = grad == NULL ? dy : grad;     /* the dx pass reads what the sums pass wrote */
    for (fbn_index c = c0; c < c1; ++c) {
        const fbn_index first = c * len;
        sums[c] = FBN_FN(grad_sums_range)(dy + first, x + first, C * len, len, 0, count,
                                          mean[c], shift[c], y == NULL ? NULL : y + first,
                                          grad == NULL ? NULL : grad + first, a->activation,
                                          slope);
    }
    for (fbn_index c = c0; c < c1; ++c) FBN_FN(grad_finish_channel)(sums[c], C, c, a, coef);
    for (fbn_index c = c0; c < c1; ++c) {
        const fbn_index first = c * len;
        FBN_FN(grad_input_range)(g + first, x + first, dx + first, C * len, len, 0, count,
                                 coef[c], coef[C + c], coef[2 * C + c], coef[3 * C + c],
                                 coef[4 * C + c], stream);
    }
}

static void FBN_FN(backward_group)(const void *dy, const void *x, void *dx, fbn_index C,
                                   fbn_index len, fbn_index count, fbn_index c0, fbn_index c1,
                                   const fbn_grad_args *a, fbn_grad_sums *sums, void *coef,
                                   int stream)
{
    FBN_FN(backward_group_kernel)((const S *)dy, (const S *)x, (S *)dx, C, len, count, c0, c1,
                                  a, sums, (T *)coef, stream);
}

/* The apply stage of the fused paths on its own: channels [c0, c1) of a channels-first
 * problem, whole, by channel walks, as train_group and backward_group apply them */
FBN_DISPATCH static void FBN_FN(normalize_channels)(const void *xv, const void *rv, void *yv, fbn_index C,
                                       fbn_index len, fbn_index count, fbn_index c0,
                                       fbn_index c1, const void *coef_v, int act,
                                       double slope, int stream)
{
    const S *x = (const S *)xv, *r = (const S *)rv;
    S *y = (S *)yv;
    const T *coef = (const T *)coef_v;
    for (fbn_index c = c0; c < c1; ++c) {
        const fbn_index first = c * len;
        FBN_FN(normalize_range)(x + first, r == NULL ? NULL : r + first, y + first, C * len,
                                len, 0, count, coef[c], coef[C + c], coef[2 * C + c], act,
                                (T)slope, stream);
    }
}

FBN_DISPATCH static void FBN_FN(grad_input_channels)(const void *gv, const void *xv, void *dxv, fbn_index C,
                                        fbn_index len, fbn_index count, fbn_index c0,
                                        fbn_index c1, const void *coef_v, int stream)
{
    const S *g = (const S *)gv, *x = (const S *)xv;
    S *dx = (S *)dxv;
    const T *coef = (const T *)coef_v;
    for (fbn_index c = c0; c < c1; ++c) {
        const fbn_index first = c * len;
        FBN_FN(grad_input_range)(g + first, x + first, dx + first, C * len, len, 0, count,
                                 coef[c], coef[C + c], coef[2 * C + c], coef[3 * C + c],
                                 coef[4 * C + c], stream);
    }
}

/* the row-wise normalizations (LayerNorm, RMSNorm), from the segments and coefficients above */
#include "fastbn/rows_impl.h"

/* The table of this storage type's kernels */
#define FBN_STRING2(x) #x
#define FBN_STRING(x) FBN_STRING2(x)
static const fbn_kernel_table FBN_FN(kernels) = {
    FBN_STRING(FBN_SUFFIX),
    sizeof(S),
    sizeof(T),
    FBN_FN(moments_channel),
    FBN_FN(moments_rows),
    FBN_FN(grad_shifts),
    FBN_FN(grad_sums_channel),
    FBN_FN(grad_sums_rows),
    FBN_FN(train_finish),
    FBN_FN(infer_coefficients),
    FBN_FN(grad_finish),
    FBN_FN(normalize_span),
    FBN_FN(normalize_rows),
    FBN_FN(grad_input_span),
    FBN_FN(grad_input_rows),
    FBN_FN(normalize_channels),
    FBN_FN(grad_input_channels),
    FBN_FN(train_group),
    FBN_FN(backward_group),
    FBN_FN(rows_forward),
    FBN_FN(rows_backward),
};

#undef S
#undef FBN_ROUNDS_ON_STORE
#undef FBN_STAGED
#undef FBN_STAGE
#undef FBN_STAGE_LEN
#undef FBN_PART_LEN
#undef FBN_ROW_STAGE
#undef FBN_STAGED_ROWS
#undef CFN
#undef LOAD_BLOCK
#undef STORE_BLOCK
#undef T
#undef LOAD
#undef STORE
#undef TANH
#undef FBN_FN
#undef FBN_STREAMS_HERE
#undef FBN_COMPUTE_IS_f32
#undef FBN_COMPUTE_IS_f64
#undef FBN_STRING
#undef FBN_STRING2
