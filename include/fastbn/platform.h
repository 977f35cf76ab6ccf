/* fastbn — what the build has: OpenMP or not, the compiler, the SIMD targets.
 * The one place that touches omp.h, so a build without OpenMP compiles the same sources. */
#ifndef FASTBN_PLATFORM_H
#define FASTBN_PLATFORM_H

#include "fastbn/kernels.h"

#ifdef _OPENMP
#  include <omp.h>
static inline int fbn_openmp_version(void) { return _OPENMP; }
static inline int fbn_max_threads(void) { return omp_get_max_threads(); }
/* A barrier between the phases of one parallel region (Cython's prange ends in nowait) */
#  define fbn_barrier() _Pragma("omp barrier")
#else
static inline int fbn_openmp_version(void) { return 0; }
static inline int fbn_max_threads(void) { return 1; }
#  define fbn_barrier() ((void)0)
#endif

#if defined(__clang__)
#  define FBN_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#  define FBN_COMPILER "gcc " __VERSION__
#elif defined(_MSC_VER)
#  define FBN_STR2(x) #x
#  define FBN_STR(x) FBN_STR2(x)
#  define FBN_COMPILER "msvc " FBN_STR(_MSC_VER)
#else
#  define FBN_COMPILER "unknown"
#endif

static inline const char *fbn_compiler(void) { return FBN_COMPILER; }

/* The flags setup.py compiled with */
#ifndef FASTBN_BUILD_FLAGS
#  define FASTBN_BUILD_FLAGS ""
#endif
static inline const char *fbn_build_flags(void) { return FASTBN_BUILD_FLAGS; }

/* SIMD extensions the baseline build assumes (every kernel can use them) */
static inline const char *fbn_baseline_simd(void)
{
#if defined(__AVX512F__)
    return "avx512f";
#elif defined(__AVX2__)
    return "avx2";
#elif defined(__AVX__)
    return "avx";
#elif defined(__SSE2__) || defined(_M_X64)
    return "sse2";
#elif defined(__ARM_NEON)
    return "neon";
#else
    return "none";
#endif
}

/* Kernel variants compiled for runtime dispatch ("" when none) */
static inline const char *fbn_dispatch_targets(void) { return FBN_DISPATCH_TARGETS; }

/* The variant the dispatcher picks on this CPU */
static inline const char *fbn_dispatch_selected(void)
{
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    if (FBN_DISPATCH_TARGETS[0] != '\0') {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
        if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
        return "x86-64";
    }
#endif
    return "";
}

#endif /* FASTBN_PLATFORM_H */
