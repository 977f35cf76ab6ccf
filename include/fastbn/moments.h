/* fastbn — mergeable per-channel statistics.
 *
 * One channel's values, seen through any subset of them (a block, a chunk of blocks, a
 * thread's share, later another process's share), are summarised by
 *
 *     count    n
 *     shift    a value near their mean; any value is correct, one near the mean keeps digits
 *     dev_sum  sum (x - shift)                 so   mean = shift + dev_sum / n
 *     m2       sum (x - mean)^2                     var  = m2 / n  (biased)
 *
 * Keeping the mean as shift + dev_sum/n is what makes inputs far from zero safe: the shift
 * carries the large part exactly and dev_sum only the small remainder.
 */
#ifndef FASTBN_MOMENTS_H
#define FASTBN_MOMENTS_H

#include <stddef.h>

typedef ptrdiff_t fbn_index;  /* 64-bit element counts and offsets everywhere */

typedef struct {
    double count;
    double shift;
    double dev_sum;
    double m2;
} fbn_moments;

/* Partial sums of a block's segments (see sum_segment in kernels_impl.h), added as a tree */
#define FBN_LANES 16

/* The lanes added as a tree: lane j + 8 onto lane j, then pairs 4 apart, 2 apart, 1 apart.
 * Written as loops, the first two levels are vector adds; as one expression they were 15
 * scalar loads and adds, a quarter of a 49-value channel's gradient sums (C harness). */
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
 * the lanes leave every lane at zero: their tree is skipped, a tenth of the gradient sums of a
 * channel of 9-value runs (C harness). */
static inline double fbn_block_total(const double *lane, double rest, fbn_index len)
{
    return len >= FBN_LANES ? fbn_lane_total(lane) + rest : rest;
}

static const fbn_moments fbn_moments_empty = {0.0, 0.0, 0.0, 0.0};

/* a <- a (+) b for one channel, Chan, Golub & LeVeque's pairwise update:
 *     m2 = m2_a + m2_b + delta^2 * n_a n_b / n,   delta = mean_b - mean_a.
 * Both means are measured from a's shift, so delta is a difference of small numbers, and
 * b.shift - a.shift is exact when the shifts are close (Sterbenz). The counts enter as
 * reciprocals and weight = n_a n_b / n, computed once by the callers. */
static inline void fbn_merge_channel(double *shift_a, double *dev_a, double *m2_a, double inv_na,
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
    fbn_merge_channel(&a->shift, &a->dev_sum, &a->m2, 1.0 / a->count, b.shift, b.dev_sum, b.m2,
                      b.count, 1.0 / b.count, a->count * b.count / n);
    a->count = n;
}

/* The same for C channels that share their counts (blocks of channels-last rows), stored as
 * arrays: one reciprocal for all channels, and the loop vectorizes. */
static inline void fbn_moments_merge_rows(fbn_index C, double *count_a, double *shift_a,
                                          double *dev_a, double *m2_a, double count_b,
                                          const double *shift_b, const double *dev_b,
                                          const double *m2_b)
{
    if (count_b == 0.0) return;
    if (*count_a == 0.0) {
        for (fbn_index c = 0; c < C; ++c) {
            shift_a[c] = shift_b[c];
            dev_a[c] = dev_b[c];
            m2_a[c] = m2_b[c];
        }
        *count_a = count_b;
        return;
    }
    const double n = *count_a + count_b;
    const double inv_na = 1.0 / *count_a, inv_nb = 1.0 / count_b, weight = *count_a * count_b / n;
#pragma omp simd
    for (fbn_index c = 0; c < C; ++c)
        fbn_merge_channel(&shift_a[c], &dev_a[c], &m2_a[c], inv_na, shift_b[c], dev_b[c], m2_b[c],
                          count_b, inv_nb, weight);
    *count_a = n;
}

/* Sums the backward pass needs over one channel's values, m being the saved mean and q a
 * value of dy from the channel (shifts: far from zero, plain sums would lose digits):
 *     dy    = sum (dy - q)
 *     dy_xc = sum (dy - q) * (x - m)
 *     xc    = sum (x - m)        which recovers what rounding m to the data type lost. */
typedef struct {
    double dy;
    double dy_xc;
    double xc;
} fbn_grad_sums;

static const fbn_grad_sums fbn_grad_sums_empty = {0.0, 0.0, 0.0};

static inline void fbn_grad_sums_add(fbn_grad_sums *a, fbn_grad_sums b)
{
    a->dy += b.dy;
    a->dy_xc += b.dy_xc;
    a->xc += b.xc;
}

#endif /* FASTBN_MOMENTS_H */
