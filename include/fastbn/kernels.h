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

#if defined(_MSC_VER)
#  define FBN_RESTRICT __restrict
#else
#  define FBN_RESTRICT restrict
#endif

#define FBN_T float
#define FBN_FN(name) fbn_##name##_f32
#include "fastbn/kernels_impl.h"
#undef FBN_T
#undef FBN_FN

#define FBN_T double
#define FBN_FN(name) fbn_##name##_f64
#include "fastbn/kernels_impl.h"
#undef FBN_T
#undef FBN_FN

#endif /* FASTBN_KERNELS_H */
