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

static const fbn_moments fbn_moments_empty = {0.0, 0.0, 0.0, 0.0};

/* a <- a (+) b, Chan, Golub & LeVeque's pairwise update:
 *     m2 = m2_a + m2_b + delta^2 * n_a n_b / n,   delta = mean_b - mean_a.
 * Both means are measured from a's shift, so delta is a difference of small numbers, and
 * b.shift - a.shift is exact when the shifts are close (Sterbenz). */
static inline void fbn_moments_merge(fbn_moments *a, fbn_moments b)
{
    if (b.count == 0.0) return;
    if (a->count == 0.0) { *a = b; return; }
    const double n = a->count + b.count;
    const double shift_gap = b.shift - a->shift;
    const double delta = (shift_gap + b.dev_sum / b.count) - a->dev_sum / a->count;
    a->m2 += b.m2 + delta * delta * (a->count * b.count / n);
    a->dev_sum += b.dev_sum + b.count * shift_gap;
    a->count = n;
}

/* Sums the backward pass needs over one channel's values, m being the saved mean (a shift):
 *     dy    = sum dy
 *     dy_xc = sum dy * (x - m)
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
