/* fastbn — the kernels' interface: one table of kernels per storage type.
 *
 * Every kernel works on the canonical view (outer, C, inner) of an array:
 *   channels-first family (inner > 1): channel c is `outer` runs of `inner` contiguous values,
 *       run o starting at x + (o*C + c)*inner. Channel walks (walks.h) cover them.
 *   channels-last family (inner == 1): each row holds C contiguous channels.
 *       Kernels named *_rows take a block of rows and work on all channels at once.
 * No Python, no threads here: callers (fastbn/_kernels.pyx) split the work and own the order
 * in which partial results (moments.h) are merged.
 *
 * The stages, and the kernels of each (a table's entries):
 *   statistics  moments_channel, moments_rows     -> moments partials (moments.h)
 *               grad_shifts, grad_sums_channel, grad_sums_rows -> gradient partials
 *   finish      train_finish, infer_coefficients, grad_finish -> coefficients, saved and
 *               running statistics, dweight and dbias
 *   apply       normalize_span, normalize_rows, grad_input_span, grad_input_rows
 *   fused       train_group, backward_group: the three stages over a group of whole
 *               channels-first channels while they are in cache (the fast path)
 *   row-wise    rows_forward, rows_backward: LayerNorm and RMSNorm, every stage of a row
 *               while it is in cache (statistics per row, affine per position in it)
 *
 * Data arrays (x, y, dy, dx, the residual, g) are of the storage type; per-channel arrays
 * (weight, bias, running and saved statistics, coefficients) of the compute type; statistics
 * accumulate in double. A table is made by including kernels_impl.h with FBN_STORAGE (the
 * storage C type), FBN_SUFFIX (its suffix, e.g. f32) and FBN_COMPUTE_SUFFIX (f32 or f64)
 * defined: the build does this once per row of fastbn/_dtypes.py (see _tables.pxd.tp);
 * benchmarks/harness shows it done by hand. */
#ifndef FASTBN_KERNELS_H
#define FASTBN_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include "fastbn/platform.h"
#include "fastbn/dtypes.h"
#include "fastbn/moments.h"
#include "fastbn/walks.h"
#include "fastbn/activation.h"

/* Values per statistics block: the unit of float64 partial sums, merged in order. A block
 * that must find its own shift is read twice, the second time from L1. Block boundaries
 * depend on the problem size only, never on the thread count. */
#define FBN_BLOCK 2048

/* Values per block of a fused pass: the activation (and residual) is applied to a block just
 * normalized, and the activation's derivative to a block of dy just before its sums, while
 * the block is in L1 */
#define FBN_FUSED_BLOCK 2048

/* Runs of at most this many values are normalized four at a time (normalize_span): that pays
 * the loop set-up and tail once per four runs, which wins for short runs and loses for longer
 * ones (docs/tuning.md) */
#define FBN_SHORT_RUN 44

/* Coefficients, C values each, laid out one after another in one array of the compute type:
 *   normalizing  hi | scale | offset          y = (x - hi) * scale + offset
 *   gradient     h | g | k_dy | k_xc | k_0     dx = k_dy (dy - g) + k_xc (x - h) + k_0 */
enum { FBN_NORM_COEFS = 3, FBN_GRAD_COEFS = 5 };

/* The training forward's per-channel vectors, C values each of the compute type */
typedef struct {
    const void *weight;      /* gamma, or NULL for gamma = 1 */
    const void *bias;        /* beta, or NULL for beta = 0 */
    double eps;
    void *running_mean;      /* C values running_*_stride elements apart, or NULL */
    void *running_var;
    fbn_index running_mean_stride;
    fbn_index running_var_stride;
    double momentum;
    void *save_mean;         /* outputs */
    void *save_invstd;
} fbn_train_args;

/* The backward's per-channel vectors, C values each of the compute type, and its fusion:
 * with grad set, dy is the gradient of the fused output y = act(bn(x) + residual), and the
 * sums pass writes g = dy * act'(y) (the residual's gradient) to grad, laid out as x (storage
 * type), for the dx pass to read. */
typedef struct {
    const void *mean;        /* the saved means (a shift: the exact mean is recovered from x) */
    const void *invstd;      /* the saved 1/sqrt(var + eps) */
    const void *weight;      /* gamma, or NULL for gamma = 1 */
    const void *shift;       /* each channel's dy shift q (grad_shifts) */
    void *dweight;           /* outputs */
    void *dbias;
    const void *y;           /* the fused forward's output (NULL without an activation) */
    void *grad;              /* NULL: no fusion, g is dy */
    int activation;          /* FBN_ACT_* */
    double negative_slope;
} fbn_grad_args;

/* The row-wise normalizations (LayerNorm, RMSNorm): statistics per row of D contiguous values,
 * the affine per position within the row (D values of the compute type each). */
typedef struct {
    const void *weight;      /* gamma: D values (not NULL: the caller passes ones) */
    const void *bias;        /* beta: D values (not NULL: zeros) */
    double eps;
    int centred;             /* 1: LayerNorm, around the row mean; 0: RMSNorm, around zero */
    void *mean;              /* per row, compute type: the forward writes (centred only), */
    void *invstd;            /* the backward reads them (RMSNorm: invstd is 1 / rms) */
    const void *residual;    /* forward: added before the activation (laid out as x), or NULL */
    const void *y;           /* backward: the fused forward's output (NULL without activation) */
    void *grad;              /* backward: where g = dy * act'(y) goes (laid out as x), or NULL */
    int activation;          /* FBN_ACT_* */
    double negative_slope;
} fbn_rows_args;

/* The kernels of one storage type. Data pointers (whole arrays: the kernels find a channel
 * or a row range themselves) are of the storage type, `coef` and `q` of the compute type;
 * slopes are converted to the compute type inside. */
typedef struct {
    const char *suffix;
    size_t storage_size;     /* bytes of a stored value */
    size_t compute_size;     /* bytes of a per-channel value */

    /* statistics: moments of positions [e0, e1) of channel c; of channels-last rows
     * [r0, r1) into part (4*C doubles, the partial format; scratch 3*C) */
    fbn_moments (*moments_channel)(const void *x, fbn_index C, fbn_index len, fbn_index c,
                                   fbn_index e0, fbn_index e1);
    void (*moments_rows)(const void *x, fbn_index C, fbn_index r0, fbn_index r1,
                         fbn_index block_rows, int step, double *part, double *scratch);
    /* each channel's dy shift q[c] (C values of the compute type) */
    void (*grad_shifts)(const void *dy, fbn_index C, fbn_index len, const fbn_grad_args *a,
                        void *q);
    /* gradient sums around a->mean[c] and a->shift[c], of positions [e0, e1) of channel c;
     * of rows [r0, r1) into part (6*C doubles; scratch 3*C) */
    fbn_grad_sums (*grad_sums_channel)(const void *dy, const void *x, fbn_index C,
                                       fbn_index len, fbn_index c, fbn_index e0, fbn_index e1,
                                       const fbn_grad_args *a);
    void (*grad_sums_rows)(const void *dy, const void *x, fbn_index C, fbn_index r0,
                           fbn_index r1, fbn_index block_rows, int step,
                           const fbn_grad_args *a, double *part, double *scratch);

    /* finish: channels [c0, c1)'s coefficients (and the outputs in a) from their partials
     * (the partial format, C units); grouped: to the bit as the fused stages below compute
     * them (they are compiled per instruction set, where products may contract to FMA) */
    void (*train_finish)(const double *moments, fbn_index C, fbn_index c0, fbn_index c1,
                         const fbn_train_args *a, void *coef, int grouped);
    int (*infer_coefficients)(fbn_index C, const void *running_mean, const void *running_var,
                              const void *weight, const void *bias, double eps, void *coef);
    void (*grad_finish)(const double *sums, fbn_index C, fbn_index c0, fbn_index c1,
                        const fbn_grad_args *a, void *coef, int grouped);

    /* apply: y = act(normalize(x) + r) over memory [p0, p1) or rows [r0, r1) (r may be
     * NULL); dx from g (dy, or the fused sums' g) and x */
    void (*normalize_span)(const void *x, const void *r, void *y, fbn_index C, fbn_index len,
                           fbn_index p0, fbn_index p1, const void *coef, int act,
                           double slope, int stream);
    void (*normalize_rows)(const void *x, const void *r, void *y, fbn_index C, fbn_index r0,
                           fbn_index r1, int step, const void *coef, int act, double slope,
                           int stream);
    void (*grad_input_span)(const void *g, const void *x, void *dx, fbn_index C,
                            fbn_index len, fbn_index p0, fbn_index p1, const void *coef,
                            int stream);
    void (*grad_input_rows)(const void *g, const void *x, void *dx, fbn_index C, fbn_index r0,
                            fbn_index r1, int step, const void *coef, int stream);

    /* apply over channels [c0, c1) of a channels-first problem, whole (as the fused stages
     * below apply them) */
    void (*normalize_channels)(const void *x, const void *r, void *y, fbn_index C,
                               fbn_index len, fbn_index count, fbn_index c0, fbn_index c1,
                               const void *coef, int act, double slope, int stream);
    void (*grad_input_channels)(const void *g, const void *x, void *dx, fbn_index C,
                                fbn_index len, fbn_index count, fbn_index c0, fbn_index c1,
                                const void *coef, int stream);

    /* fused stages over channels [c0, c1) of a channels-first problem, each whole */
    void (*train_group)(const void *x, const void *r, void *y, fbn_index C, fbn_index len,
                        fbn_index count, fbn_index c0, fbn_index c1, const fbn_train_args *a,
                        int act, double slope, fbn_moments *moments, void *coef, int stream);
    void (*backward_group)(const void *dy, const void *x, void *dx, fbn_index C,
                           fbn_index len, fbn_index count, fbn_index c0, fbn_index c1,
                           const fbn_grad_args *a, fbn_grad_sums *sums, void *coef,
                           int stream);

    /* row-wise norms over rows [r0, r1) of D values, each row's passes while it is in cache:
     * forward, y = act(xhat * weight + bias + residual) and each row's mean and invstd;
     * backward, dx, and the rows' dweight and dbias sums added to D doubles each */
    void (*rows_forward)(const void *x, void *y, fbn_index D, fbn_index r0, fbn_index r1,
                         const fbn_rows_args *a);
    void (*rows_backward)(const void *dy, const void *x, void *dx, fbn_index D, fbn_index r0,
                          fbn_index r1, const fbn_rows_args *a, double *dweight,
                          double *dbias);
} fbn_kernel_table;

#endif /* FASTBN_KERNELS_H */
