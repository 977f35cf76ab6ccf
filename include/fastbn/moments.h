/* fastbn — the partial results of the statistics stages, and how they merge.
 *
 * A statistics unit (a channel in batch norm) is summarised, over any subset of its values
 * (a block, a chunk of blocks, a thread's share, another process's share), by
 *
 *   moments      count    n
 *                shift    a value near their mean; any value is correct, one near the mean
 *                         keeps digits
 *                dev_sum  sum (x - shift)                 so   mean = shift + dev_sum / n
 *                m2       sum (x - mean)^2                     var  = m2 / n  (biased)
 *
 *   gradient     count    n
 *   sums         x_shift  m, a value near the mean of x (the saved mean)
 *                dy_shift q, a value of dy (or of g = dy * act'(y) when fused)
 *                dy       sum (dy - q)
 *                dy_xc    sum (dy - q) * (x - m)
 *                xc       sum (x - m)
 *
 * Both carry their shifts, so two partials merge wherever they were computed: in a block, a
 * chunk, a thread or another process (fbn_moments_merge, fbn_grad_merge). Keeping the mean
 * as shift + dev_sum / n is what makes inputs far from zero safe: the shift carries the large
 * part exactly and dev_sum only the small remainder.
 *
 * Arrays of partials, one per unit, are stored field by field (the partial format that
 * crosses stages, threads and processes): U units of moments are 4*U doubles,
 *     count[U] | shift[U] | dev_sum[U] | m2[U],
 * and U units of gradient sums 6*U doubles in the order above. */
#ifndef FASTBN_MOMENTS_H
#define FASTBN_MOMENTS_H

#include <math.h>
#include <stddef.h>

typedef ptrdiff_t fbn_index;  /* 64-bit element counts and offsets everywhere */

typedef struct {
    double count;
    double shift;
    double dev_sum;
    double m2;
} fbn_moments;

typedef struct {
    double count;
    double x_shift;
    double dy_shift;
    double dy;
    double dy_xc;
    double xc;
} fbn_grad_sums;

enum { FBN_MOMENT_FIELDS = 4, FBN_GRAD_FIELDS = 6 };
/* the partials are read and written as arrays of their fields (fbn_unit_get) */
typedef char fbn_moments_are_fields[sizeof(fbn_moments) == 4 * sizeof(double) ? 1 : -1];
typedef char fbn_grad_sums_are_fields[sizeof(fbn_grad_sums) == 6 * sizeof(double) ? 1 : -1];

/* The fields of gradient sums that add (the others are the shifts) */
static const int fbn_grad_sum_fields[4] = {0, 3, 4, 5};    /* count, dy, dy_xc, xc */

static const fbn_moments fbn_moments_empty = {0.0, 0.0, 0.0, 0.0};

/* Partial sums of a block's segments (see sum_segment in kernels_impl.h), added as a tree */
#define FBN_LANES 16

/* The lanes added as a tree: lane j + 8 onto lane j, then pairs 4 apart, 2 apart, 1 apart.
 * Written as loops, the first two levels are vector adds (docs/tuning.md). */
static inline double fbn_lane_total(const double *lane)
{
    double t[8], u[4];
#pragma omp simd
    for (int j = 0; j < 8; ++j) t[j] = lane[j] + lane[j + 8];
#pragma omp simd
    for (int j = 0; j < 4; ++j) u[j] = t[j] + t[j + 4];
    return (u[0] + u[2]) + (u[1] + u[3]);
}

/* A block's sum over runs of len values: its lanes' tree, then its rest. Runs shorter than
 * the lanes leave every lane at zero, so their tree is skipped. */
static inline double fbn_block_total(const double *lane, double rest, fbn_index len)
{
    return len >= FBN_LANES ? fbn_lane_total(lane) + rest : rest;
}

/* ------------------------------------------------------------------------------ moments */

/* a <- a (+) b for one unit, Chan, Golub & LeVeque's pairwise update:
 *     m2 = m2_a + m2_b + delta^2 * n_a n_b / n,   delta = mean_b - mean_a.
 * Both means are measured from a's shift, so delta is a difference of small numbers, and
 * b.shift - a.shift is exact when the shifts are close (Sterbenz). The counts enter as
 * reciprocals and weight = n_a n_b / n, computed by the callers (once for units that share
 * their counts). */
static inline void fbn_merge_unit(double *shift_a, double *dev_a, double *m2_a, double inv_na,
                                  double shift_b, double dev_b, double m2_b, double count_b,
                                  double inv_nb, double weight)
{
    const double shift_gap = shift_b - *shift_a;
    const double delta = (shift_gap + dev_b * inv_nb) - *dev_a * inv_na;
    *m2_a += m2_b + delta * delta * weight;
    *dev_a += dev_b + count_b * shift_gap;
}

static inline void fbn_moments_merge(fbn_moments *a, fbn_moments b)
{
    if (b.count == 0.0) return;
    if (a->count == 0.0) { *a = b; return; }
    const double n = a->count + b.count;
    fbn_merge_unit(&a->shift, &a->dev_sum, &a->m2, 1.0 / a->count, b.shift, b.dev_sum, b.m2,
                   b.count, 1.0 / b.count, a->count * b.count / n);
    a->count = n;
}

/* Unit u's n fields out of, or into, an array of U units in the partial format (the
 * partials are plain arrays of doubles, field after field) */
static inline void fbn_unit_get(const double *part, fbn_index U, fbn_index u, void *unit, int n)
{
    double *fields = (double *)unit;       /* the partials are plain arrays of doubles */
    for (int f = 0; f < n; ++f) fields[f] = part[f * U + u];
}

static inline void fbn_unit_put(double *part, fbn_index U, fbn_index u, const void *unit, int n)
{
    const double *fields = (const double *)unit;
    for (int f = 0; f < n; ++f) part[f * U + u] = fields[f];
}

static inline fbn_moments fbn_moments_get(const double *part, fbn_index U, fbn_index u)
{
    fbn_moments m;
    fbn_unit_get(part, U, u, &m, FBN_MOMENT_FIELDS);
    return m;
}

static inline void fbn_moments_put(double *part, fbn_index U, fbn_index u, fbn_moments m)
{
    fbn_unit_put(part, U, u, &m, FBN_MOMENT_FIELDS);
}

/* Whether the n counts at count are all equal */
static inline int fbn_counts_shared(const double *count, fbn_index n)
{
    int differ = 0;
#pragma omp simd reduction(|:differ)
    for (fbn_index u = 0; u < n; ++u) differ |= count[u] != count[0];
    return !differ;
}

/* a <- a (+) b for n units that share their counts (each side's one count for all units):
 * one set of reciprocals, and the loop vectorizes */
static inline void fbn_moments_merge_shared(fbn_index n, double *count_a, double *shift_a,
                                            double *dev_a, double *m2_a, double count_b,
                                            const double *shift_b, const double *dev_b,
                                            const double *m2_b)
{
    if (count_b == 0.0) return;
    if (*count_a == 0.0) {
        for (fbn_index u = 0; u < n; ++u) {
            shift_a[u] = shift_b[u];
            dev_a[u] = dev_b[u];
            m2_a[u] = m2_b[u];
        }
        *count_a = count_b;
        return;
    }
    const double total = *count_a + count_b;
    const double inv_na = 1.0 / *count_a, inv_nb = 1.0 / count_b;
    const double weight = *count_a * count_b / total;
#pragma omp simd
    for (fbn_index u = 0; u < n; ++u)
        fbn_merge_unit(&shift_a[u], &dev_a[u], &m2_a[u], inv_na, shift_b[u], dev_b[u], m2_b[u],
                       count_b, inv_nb, weight);
    *count_a = total;
}

/* Units [u0, u1) of a <- a (+) b, arrays of U units in the partial format whose units share
 * their counts on each side: the chunks of one call (every unit of a chunk saw as many
 * values), merged without checking that */
static inline void fbn_moments_merge_chunk(double *a, const double *b, fbn_index U,
                                           fbn_index u0, fbn_index u1)
{
    double count = a[u0];
    if (u1 <= u0) return;
    fbn_moments_merge_shared(u1 - u0, &count, a + U + u0, a + 2 * U + u0, a + 3 * U + u0, b[u0],
                             b + U + u0, b + 2 * U + u0, b + 3 * U + u0);
    for (fbn_index u = u0; u < u1; ++u) a[u] = count;
}

/* Units [u0, u1) of a <- a (+) b, arrays of U units in the partial format, from anywhere.
 * Units that share their counts merge as chunks do; the result is the same either way. */
static inline void fbn_moments_merge_units(double *a, const double *b, fbn_index U,
                                           fbn_index u0, fbn_index u1)
{
    if (u1 > u0 && fbn_counts_shared(a + u0, u1 - u0) && fbn_counts_shared(b + u0, u1 - u0)) {
        fbn_moments_merge_chunk(a, b, U, u0, u1);
        return;
    }
    for (fbn_index u = u0; u < u1; ++u) {
        fbn_moments m = fbn_moments_get(a, U, u);
        fbn_moments_merge(&m, fbn_moments_get(b, U, u));
        fbn_moments_put(a, U, u, m);
    }
}

/* The statistics of a unit's moments: mean, biased and unbiased variance, and
 * invstd = 1 / sqrt(var + eps). An empty unit gives NaN; one value, an infinite unbiased
 * variance. */
static inline void fbn_moments_finish(fbn_moments m, double eps, double *mean, double *var,
                                      double *var_unbiased, double *invstd)
{
    *mean = m.shift + m.dev_sum / m.count;
    *var = m.m2 / m.count;
    *var_unbiased = m.m2 / (m.count - 1.0);
    *invstd = 1.0 / sqrt(*var + eps);
}

/* ------------------------------------------------------------------------ gradient sums */

static inline fbn_grad_sums fbn_grad_sums_empty(double x_shift, double dy_shift)
{
    const fbn_grad_sums s = {0.0, x_shift, dy_shift, 0.0, 0.0, 0.0};
    return s;
}

/* a <- a (+) b. Sums around the same shifts add; b's sums around other shifts are moved to
 * a's first, dm = m_b - m_a, dq = q_b - q_a:
 *     sum (x - m_a)            = xc_b + n_b dm
 *     sum (dy - q_a)           = dy_b + n_b dq
 *     sum (dy - q_a)(x - m_a)  = dy_xc_b + dm dy_b + dq xc_b + n_b dq dm */
static inline void fbn_grad_merge(fbn_grad_sums *a, fbn_grad_sums b)
{
    if (a->count == 0.0 && b.count != 0.0) {
        *a = b;
        return;
    }
    if (b.x_shift != a->x_shift || b.dy_shift != a->dy_shift) {
        const double dm = b.x_shift - a->x_shift, dq = b.dy_shift - a->dy_shift;
        b.dy_xc += dm * b.dy + dq * b.xc + b.count * dq * dm;
        b.dy += b.count * dq;
        b.xc += b.count * dm;
    }
    a->count += b.count;
    a->dy += b.dy;
    a->dy_xc += b.dy_xc;
    a->xc += b.xc;
}

/* Units [u0, u1) of a <- a (+) b for sums around the same shifts: the chunks of one call
 * (every chunk takes the call's shifts), added without checking that */
static inline void fbn_grad_merge_chunk(double *a, const double *b, fbn_index U, fbn_index u0,
                                        fbn_index u1)
{
    for (int k = 0; k < 4; ++k) {
        double *to = a + fbn_grad_sum_fields[k] * U;
        const double *from = b + fbn_grad_sum_fields[k] * U;
#pragma omp simd
        for (fbn_index u = u0; u < u1; ++u) to[u] += from[u];
    }
}

/* Units [u0, u1) of a <- a (+) b, arrays of U units in the partial format, from anywhere.
 * Sums around the same shifts add (as chunks do); others move to a's shifts first
 * (fbn_grad_merge). */
static inline void fbn_grad_merge_units(double *a, const double *b, fbn_index U, fbn_index u0,
                                        fbn_index u1)
{
    int differ = 0;
#pragma omp simd reduction(|:differ)
    for (fbn_index u = u0; u < u1; ++u)
        differ |= (a[U + u] != b[U + u]) | (a[2 * U + u] != b[2 * U + u]) | (a[u] == 0.0);
    if (!differ) {
        fbn_grad_merge_chunk(a, b, U, u0, u1);
        return;
    }
    for (fbn_index u = u0; u < u1; ++u) {
        fbn_grad_sums s, t;
        fbn_unit_get(a, U, u, &s, FBN_GRAD_FIELDS);
        fbn_unit_get(b, U, u, &t, FBN_GRAD_FIELDS);
        fbn_grad_merge(&s, t);
        fbn_unit_put(a, U, u, &s, FBN_GRAD_FIELDS);
    }
}

#endif /* FASTBN_MOMENTS_H */
