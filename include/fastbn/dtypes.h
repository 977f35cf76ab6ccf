/* fastbn — storage types: how a value is loaded from an array into the compute type and
 * stored back. The kernels (kernels_impl.h) load and store through these and nowhere else.
 *
 * The list of storage types is fastbn/_dtypes.py: each row names its suffix (f32, ...), its
 * storage C type and its compute suffix; the build instantiates kernels_impl.h once per row
 * (see kernels.h). A row's load and store are fbn_load_<suffix> and fbn_store_<suffix>.
 * Compute types are float (f32) and double (f64); statistics accumulate in double always.
 * Half-precision storage (f16, bf16) computes in float and rounds once, on store. */
#ifndef FASTBN_DTYPES_H
#define FASTBN_DTYPES_H

#include "fastbn/platform.h"

/* Loads and stores are inlined into each kernel (FBN_SEGMENT), so that they are compiled for
 * the kernel's instruction set: a float16 conversion left out of line is the baseline's
 * library call, 25x slower than F16C's vcvtph2ps. */

/* A row's FBN_STORAGE_IS_COMPUTE_<suffix> is 1 when values are stored as they are computed
 * (no conversion: the streaming stores' vector path applies). Its FBN_STAGES_<suffix> is 1
 * when the kernels convert its values in blocks (fbn_load_block_<suffix> and
 * fbn_store_block_<suffix>) and run the compute type's own segments on them (the staged
 * segments of kernels_impl.h); 0 when they convert each value where they use it. */

/* float32 storage, float32 compute */
#define FBN_STORAGE_IS_COMPUTE_f32 1
#define FBN_STAGES_f32 0
FBN_SEGMENT float fbn_load_f32(float v) { return v; }
FBN_SEGMENT float fbn_store_f32(float v) { return v; }

/* float64 storage, float64 compute */
#define FBN_STORAGE_IS_COMPUTE_f64 1
#define FBN_STAGES_f64 0
FBN_SEGMENT double fbn_load_f64(double v) { return v; }
FBN_SEGMENT double fbn_store_f64(double v) { return v; }

/* float16 storage, float32 compute. A store rounds to nearest even, once: overflow to inf,
 * nan to a quiet nan. The kernels convert float16 in blocks (below) where they can; these
 * single conversions are for the rest. How each CPU converts one value (as GCC 12 compiles
 * it):
 *  - aarch64: the native half type (_Float16: GCC 7+, clang), one instruction each way.
 *    Loads vectorize (fcvtl/fcvtl2). Stores are one fcvt per value: GCC 12 has no vector
 *    form of float -> _Float16 there, and the integer store below does not vectorize there
 *    either (its selects stay branches: about 20 instructions a value).
 *  - elsewhere (x86 included): integer operations and one float operation, which GCC 12
 *    vectorizes (loads in every clone, stores in the AVX2 and AVX-512 ones), where it leaves
 *    loops of _Float16 conversions scalar on x86 (one vcvtph2ps per value, 5-10x slower than
 *    these) and folds (double)(float)h into a library call per value.
 *    _Float16, where the compiler has it, is then only the storage type's name. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#define FBN_STORAGE_IS_COMPUTE_f16 0
#if defined(__FLT16_MAX__)
typedef _Float16 fbn_f16;
#else
typedef uint16_t fbn_f16;
#endif

#if defined(__aarch64__) && defined(__FLT16_MAX__)
#define FBN_F16_NATIVE 1
FBN_SEGMENT float fbn_load_f16(fbn_f16 v) { return (float)v; }
FBN_SEGMENT fbn_f16 fbn_store_f16(float v) { return (fbn_f16)v; }
#else
#define FBN_F16_NATIVE 0
FBN_SEGMENT float fbn_load_f16(fbn_f16 v)
{
    uint16_t h;
    memcpy(&h, &v, sizeof h);
    /* exponent and mantissa at float's places: the value times 2^-112 (a subnormal half
     * lands on a subnormal float), so one multiply rebiases normal and subnormal alike */
    const uint32_t magnitude = (uint32_t)(h & 0x7fffu) << 13;
    float f;
    memcpy(&f, &magnitude, sizeof f);
    f *= 0x1p112f;
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((h & 0x7c00u) == 0x7c00u)                          /* inf, nan */
        bits |= 0x7f800000u;
    bits |= (uint32_t)(h & 0x8000u) << 16;                 /* sign */
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Rounds to nearest even in integer operations and one addition (vectorized, unlike a loop of
 * conversions to _Float16): overflow to inf, nan to a quiet nan. */
FBN_SEGMENT fbn_f16 fbn_store_f16(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    const uint32_t sign = (u >> 16) & 0x8000u;
    u &= 0x7fffffffu;
    /* normal: rebias the exponent (-112 << 23), drop 13 mantissa bits to nearest even (a
     * carry may step the exponent, up to inf) */
    const uint32_t normal = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;
    /* under 2^-14, subnormal or zero: adding 0.5 puts the half's 10 mantissa bits at the
     * bottom of the float's, rounded to nearest even by the addition */
    float a;
    memcpy(&a, &u, sizeof a);
    a += 0.5f;
    uint32_t aligned;
    memcpy(&aligned, &a, sizeof aligned);
    uint32_t h = u < 0x38800000u ? aligned - 0x3f000000u : normal;
    h = u >= 0x47800000u ? (u > 0x7f800000u ? 0x7e00u : 0x7c00u) : h;   /* >= 65536, nan */
    const uint16_t bits = (uint16_t)(h | sign);
    fbn_f16 out;
    memcpy(&out, &bits, sizeof out);
    return out;
}
#endif /* FBN_F16_NATIVE */

/* Block conversions of float16, for the staged kernels (kernels_impl.h): n values between an
 * array and a float buffer in L1, with the CPU's vector conversions, 4-8 values an
 * instruction, where the loops of single conversions above stay at about 3 instructions a
 * value (x86) or one instruction a value (aarch64 stores). Same bits as fbn_load_f16 and
 * fbn_store_f16 for every value but signaling NaNs, which load as quiet ones:
 *  - x86: F16C's vcvtph2ps / vcvtps2ph (round to nearest even), eight values at a time and
 *    the last n % 8 one at a time, checked at run time: the baseline kernels run on CPUs
 *    without it.
 *  - aarch64: NEON's fcvtl / fcvtn, the last n % 4 values one at a time (the same rounding).
 *  - elsewhere: the single conversions above. */
#define FBN_STAGES_f16 1
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define FBN_F16_BLOCKS "f16c"
#define FBN_F16C 1              /* the blocks' vectors, where the CPU has them (fbn_has_f16c) */
__attribute__((target("avx,f16c"))) static inline void fbn_f16c_load(const fbn_f16 *src,
                                                                     float *dst, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; ++i) {
        uint16_t h;
        memcpy(&h, src + i, sizeof h);
        dst[i] = _cvtsh_ss(h);
    }
}

__attribute__((target("avx,f16c"))) static inline void fbn_f16c_store(const float *src,
                                                                      fbn_f16 *dst, ptrdiff_t n)
{
    const int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), nearest));
    for (; i < n; ++i) {
        const uint16_t h = _cvtss_sh(src[i], nearest);
        memcpy(dst + i, &h, sizeof h);
    }
}

/* __builtin_cpu_supports reads a word libgcc filled in when it loaded */
FBN_SEGMENT int fbn_has_f16c(void) { return __builtin_cpu_supports("f16c"); }
#elif FBN_F16_NATIVE && defined(__ARM_NEON)
#include <arm_neon.h>
#define FBN_F16_BLOCKS "neon"
#endif

/* the same, one value at a time (the last values of a block, and CPUs without the vectors) */
FBN_SEGMENT void fbn_load_each_f16(const fbn_f16 *src, float *dst, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; ++i) dst[i] = fbn_load_f16(src[i]);
}

FBN_SEGMENT void fbn_store_each_f16(const float *src, fbn_f16 *dst, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; ++i) dst[i] = fbn_store_f16(src[i]);
}

FBN_SEGMENT void fbn_load_block_f16(const fbn_f16 *src, float *dst, ptrdiff_t n)
{
    ptrdiff_t i = 0;
#if defined(FBN_F16C)
    if (fbn_has_f16c()) {
        fbn_f16c_load(src, dst, n);
        return;
    }
#elif defined(FBN_F16_BLOCKS)
    for (; i + 4 <= n; i += 4)
        vst1q_f32(dst + i, vcvt_f32_f16(vld1_f16((const float16_t *)(src + i))));
#endif
    fbn_load_each_f16(src + i, dst + i, n - i);
}

FBN_SEGMENT void fbn_store_block_f16(const float *src, fbn_f16 *dst, ptrdiff_t n)
{
    ptrdiff_t i = 0;
#if defined(FBN_F16C)
    if (fbn_has_f16c()) {
        fbn_f16c_store(src, dst, n);
        return;
    }
#elif defined(FBN_F16_BLOCKS)
    for (; i + 4 <= n; i += 4)
        vst1_f16((float16_t *)(dst + i), vcvt_f16_f32(vld1q_f32(src + i)));
#endif
    fbn_store_each_f16(src + i, dst + i, n - i);
}

/* The name of the vector conversions the float16 blocks use on this CPU ("" for none) */
static inline const char *fbn_f16_blocks(void)
{
#if defined(FBN_F16C)
    return fbn_has_f16c() ? FBN_F16_BLOCKS : "";
#elif defined(FBN_F16_BLOCKS)
    return FBN_F16_BLOCKS;
#else
    return "";
#endif
}

/* bfloat16 storage (ml_dtypes' NumPy dtype), float32 compute: the upper half of a float32's
 * bits, so a load is a shift and a store rounds away the lower half, to nearest even. */
#define FBN_STORAGE_IS_COMPUTE_bf16 0
#define FBN_STAGES_bf16 0       /* a load is a shift: nothing to gain from blocks */
typedef uint16_t fbn_bf16;
FBN_SEGMENT float fbn_load_bf16(fbn_bf16 v)
{
    const uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
FBN_SEGMENT fbn_bf16 fbn_store_bf16(float v)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u)               /* nan: keep it a quiet nan */
        return (fbn_bf16)((bits >> 16) | 0x40u);
    return (fbn_bf16)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

#endif /* FASTBN_DTYPES_H */
