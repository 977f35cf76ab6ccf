/* fastbn — what the build has: OpenMP or not, the compiler, the SIMD targets, and the
 * attributes and intrinsics the kernels use where the compiler has them.
 * The one place that touches omp.h, so a build without OpenMP compiles the same sources. */
#ifndef FASTBN_PLATFORM_H
#define FASTBN_PLATFORM_H

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

/* Runtime dispatch: GCC compiles each dispatched kernel for AVX-512, AVX2+FMA and the
 * portable baseline and picks one when the module loads. Off for native builds (-march=native
 * does better), where the compiler can't, and with FBN_NO_DISPATCH (the baseline alone). */
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

#if defined(__GNUC__) || defined(__clang__)
#  define fbn_prefetch(p) __builtin_prefetch(p)
#else
#  define fbn_prefetch(p) ((void)0)
#endif

/* Streaming (non-temporal) stores: GCC's and clang's vector extensions with SSE2's
 * non-temporal store, which every x86-64 clone has. Elsewhere the streaming segments are the
 * plain ones. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__SSE2__) && !defined(FBN_NO_STREAM)
#  include <emmintrin.h>
#  define FBN_STREAM 1
#  define fbn_stream_fence() _mm_sfence()   /* streaming stores are weakly ordered */
#else
#  define fbn_stream_fence() ((void)0)
#endif

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
