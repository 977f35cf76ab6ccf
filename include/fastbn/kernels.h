/* fastbn — the inner loops, for float32 (suffix _f32) and float64 (suffix _f64).
 *
 * Every kernel works on the canonical view (outer, C, inner) of an array:
 *   channels-first family (inner > 1): channel c is `outer` runs of `inner` contiguous values,
 *       run o starting at x + (o*C + c)*inner. Kernels named *_runs take a block of runs.
 *   channels-last family (inner == 1): each row holds C contiguous channels.
 *       Kernels named *_rows take a block of rows and work on all channels at once.
 * No Python, no threads here: callers (fastbn/_kernels.pyx) split the work and own the order
 * in which partial results are combined. Statistics accumulate in double for both types.
 */
#ifndef FASTBN_KERNELS_H
#define FASTBN_KERNELS_H

#include <math.h>
#include "fastbn/moments.h"
#include "fastbn/activation.h"

/* Runtime dispatch: GCC compiles each kernel for AVX-512, AVX2+FMA and the portable baseline
 * and picks one when the module loads. Off for native builds (-march=native does better) and
 * where the compiler can't. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FBN_NO_DISPATCH) \
    && !defined(__AVX2__) && defined(__has_attribute)
#  if __has_attribute(target_clones)
#    define FBN_DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#    define FBN_DISPATCH_TARGETS "x86-64-v4,x86-64-v3,x86-64"
#  endif
#endif
#ifndef FBN_DISPATCH
#  define FBN_DISPATCH
#  define FBN_DISPATCH_TARGETS ""
#endif

/* Segment functions must be inlined into each dispatched kernel so that they are compiled
 * for that kernel's instruction set (left alone, GCC may keep one baseline copy). */
#if defined(__GNUC__)
#  define FBN_SEGMENT static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#  define FBN_SEGMENT static __forceinline
#else
#  define FBN_SEGMENT static inline
#endif

#if defined(_MSC_VER)
#  define FBN_RESTRICT __restrict
#else
#  define FBN_RESTRICT restrict
#endif

/* Values per statistics block: the unit of float64 partial sums, merged in order. A block
 * that must find its own shift is read twice, the second time from L1. Block boundaries
 * depend on the problem size only, never on the thread count. */
#define FBN_BLOCK 2048

/* Values per block of a fused pass: the activation (and residual) is applied to a block just
 * normalized, and the activation's derivative to a block of dy just before its sums, while
 * the block is in L1 */
#define FBN_FUSED_BLOCK 2048

/* Runs of at most this many values are normalized four at a time (normalize_span): that
 * pays the loop set-up and tail once per four runs, which wins up to ~44 values (C harness,
 * float32: one run at a time took 1.1-1.7x as long at 4-36 values) and loses beyond (1.2x
 * the one-at-a-time walk's time at 49 values, 1.5x at 196 and 256) */
#define FBN_SHORT_RUN 44

/* Calls SEGMENT(offset, n, ahead) for each segment of positions [e0, e1): offset is the
 * segment's first element relative to the channel's first element, and ahead the distance (in
 * elements) to the same place runs_ahead runs later, or 0 when that run begins at or after
 * position limit (a pass that reads from memory prefetches there, see FBN_PREFETCH_BYTES;
 * other passes give runs_ahead 0). */
#define FBN_CHANNEL_WALK(e0, e1, stride, len, limit, runs_ahead, SEGMENT)                \
    do {                                                                                 \
        fbn_index o_ = (e0) < (len) ? 0 : (e0) / (len), i_ = (e0) - o_ * (len);        \
        for (fbn_index e_ = (e0); e_ < (e1);) {                                          \
            const fbn_index n_ = ((len) - i_ < (e1) - e_) ? (len) - i_ : (e1) - e_;      \
            const fbn_index ahead_ =                                                     \
                (o_ + (runs_ahead)) * (len) < (limit) ? (runs_ahead) * (stride) : 0;     \
            SEGMENT(o_ * (stride) + i_, n_, ahead_);                                     \
            (void)ahead_;                       /* segments that don't prefetch */       \
            e_ += n_;                                                                    \
            i_ = 0;                                                                      \
            ++o_;                                                                        \
        }                                                                                \
    } while (0)

/* Prefetching in the passes that read a channel from memory. A channels-first channel is
 * `outer` runs of len values, C*len apart: the hardware prefetchers follow a run but start
 * over at every jump, and at runs of 3-13 KB the sums read at half the speed of one stream
 * (C harness, serial gradient sums over 51 MB: 3.1 ms as (32, 64, 3136) float32 runs, 1.5 ms
 * contiguous). Prefetching each line the same offset some runs ahead, at least
 * FBN_PREFETCH_BYTES of the channel ahead, took the runs to the contiguous speed. Walks over
 * less than FBN_PREFETCH_SPAN of memory don't prefetch: their arrays stay in L3 from one call
 * to the next, and the prefetches cost 3-10% (whole ops, 3-6 MB arrays); from 8 MB arrays on,
 * prefetching won 5-30%. */
#define FBN_PREFETCH_BYTES 8192
#define FBN_PREFETCH_SPAN (8 << 20)

/* FBN_PREFETCH_SPAN, a variable so that the tests can force either path */
static double fbn_prefetch_span = FBN_PREFETCH_SPAN;

/* How many runs ahead a read walk over positions below limit of a channel (runs of len values
 * stride apart) prefetches: 0 when no run lies that far ahead, or the walk spans too little
 * memory to come from it */
static inline fbn_index fbn_runs_ahead(fbn_index len, fbn_index stride, fbn_index limit,
                                       fbn_index itemsize)
{
    const fbn_index run_bytes = len * itemsize;
    if ((limit - len) * itemsize < FBN_PREFETCH_BYTES)
        return 0;                     /* without a division: once per channel of a group */
    if ((double)limit / (double)len * (double)stride * (double)itemsize < fbn_prefetch_span)
        return 0;
    const fbn_index runs = (FBN_PREFETCH_BYTES + run_bytes - 1) / run_bytes;
    return runs * len < limit ? runs : 0;
}

/* Runs the walk given twice over, as runs says: with runs_ahead = runs, or with the constant 0,
 * which compiles the prefetches out (a test of a variable distance in the segments' loops
 * made the sums 1.1-1.2x slower on channels read from cache, C harness) */
#define FBN_PREFETCH_CASES(runs, ...)                                                    \
    do {                                                                                 \
        if ((runs) > 0) {                                                                \
            const fbn_index runs_ahead = (runs);                                         \
            __VA_ARGS__;                                                                 \
        } else {                                                                         \
            const fbn_index runs_ahead = 0;                                              \
            __VA_ARGS__;                                                                 \
        }                                                                                \
    } while (0)

#if defined(__GNUC__) || defined(__clang__)
#  define fbn_prefetch(p) __builtin_prefetch(p)
#else
#  define fbn_prefetch(p) ((void)0)
#endif

/* Calls SEGMENT(p, n, c) for each segment of memory [p0, p1), c being its channel */
#define FBN_SPAN_WALK(p0, p1, C, len, SEGMENT)                                           \
    do {                                                                                 \
        const fbn_index run_ = (p0) < (len) ? 0 : (p0) / (len);                          \
        fbn_index i_ = (p0) - run_ * (len), c_ = run_ < (C) ? run_ : run_ % (C);         \
        for (fbn_index p_ = (p0); p_ < (p1);) {                                          \
            const fbn_index n_ = ((len) - i_ < (p1) - p_) ? (len) - i_ : (p1) - p_;      \
            SEGMENT(p_, n_, c_);                                                         \
            p_ += n_;                                                                    \
            i_ = 0;                                                                      \
            if (++c_ == (C)) c_ = 0;                                                     \
        }                                                                                \
    } while (0)

/* Runs the walk given twice over, as the stream flag says: with stream_on the constant 1,
 * then the streaming fence, or with stream_on the constant 0. A walk whose segments test a
 * variable flag kept the test in its per-run loop, and GCC compiled the cached walk 1.2-1.5x
 * slower (C harness, float32 runs of 49-256 values); with a constant each copy is the plain
 * loop. */
#define FBN_STREAM_CASES(stream, ...)                                                   \
    do {                                                                                 \
        if (stream) {                                                                    \
            const int stream_on = 1;                                                     \
            __VA_ARGS__;                                                                 \
            fbn_stream_fence();                                                          \
        } else {                                                                         \
            const int stream_on = 0;                                                     \
            __VA_ARGS__;                                                                 \
        }                                                                                \
    } while (0)

/* Streaming stores (stream_head and the segments that use it in kernels_impl.h): GCC's and
 * clang's vector extensions with SSE2's non-temporal store, which every x86-64 clone has.
 * Elsewhere the streaming segments are the plain ones. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__SSE2__) && !defined(FBN_NO_STREAM)
#  include <emmintrin.h>
#  include <stdint.h>
#  include <string.h>
#  define FBN_STREAM 1
#  define fbn_stream_fence() _mm_sfence()   /* streaming stores are weakly ordered */
#else
#  define fbn_stream_fence() ((void)0)
#endif

/* The training forward's per-channel vectors, C values each of the data's type (float or
 * double, as the kernel's suffix says) */
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

/* The backward's per-channel vectors, C values each of the data's type (float or double, as
 * the kernel's suffix says), and its fusion: with grad set, dy is the gradient of the fused
 * output y = act(bn(x) + residual), and the sums pass writes g = dy * act'(y) (the residual's
 * gradient) to grad, laid out as x, for the dx pass to read. */
typedef struct {
    const void *mean;        /* the saved means (a shift: the exact mean is recovered from x) */
    const void *invstd;      /* the saved 1/sqrt(var + eps) */
    const void *weight;      /* gamma, or NULL for gamma = 1 */
    const void *shift;       /* each channel's dy shift q, its first g (see grad_sums_segment) */
    void *dweight;           /* outputs */
    void *dbias;
    const void *y;           /* the fused forward's output (NULL without an activation) */
    void *grad;              /* NULL: no fusion, g is dy */
    int activation;          /* FBN_ACT_* */
    double negative_slope;
} fbn_grad_args;

#define FBN_T float
#define FBN_FN(name) fbn_##name##_f32
#define FBN_TANH fbn_tanhf
#include "fastbn/kernels_impl.h"
#undef FBN_T
#undef FBN_FN
#undef FBN_TANH

#define FBN_T double
#define FBN_FN(name) fbn_##name##_f64
#define FBN_TANH fbn_tanh
#include "fastbn/kernels_impl.h"
#undef FBN_T
#undef FBN_FN
#undef FBN_TANH

#endif /* FASTBN_KERNELS_H */
