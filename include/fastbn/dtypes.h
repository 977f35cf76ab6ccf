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
 * (no conversion: the streaming stores' vector path applies) */

/* float32 storage, float32 compute */
#define FBN_STORAGE_IS_COMPUTE_f32 1
FBN_SEGMENT float fbn_load_f32(float v) { return v; }
FBN_SEGMENT float fbn_store_f32(float v) { return v; }

/* float64 storage, float64 compute */
#define FBN_STORAGE_IS_COMPUTE_f64 1
FBN_SEGMENT double fbn_load_f64(double v) { return v; }
FBN_SEGMENT double fbn_store_f64(double v) { return v; }

/* float16 storage, float32 compute. A store rounds to nearest even, once: overflow to inf,
 * nan to a quiet nan. How each CPU converts (as GCC 12 compiles it):
 *  - aarch64: the native half type (_Float16: GCC 7+, clang), one instruction each way.
 *    Loads vectorize (fcvtl/fcvtl2). Stores are one fcvt per value: GCC 12 has no vector
 *    form of float -> _Float16 there, and the integer store below does not vectorize there
 *    either (its selects stay branches: about 20 instructions a value).
 *  - elsewhere (x86 included): integer operations and one float operation, which GCC 12
 *    vectorizes (loads in every clone, stores in the AVX2 and AVX-512 ones), where it leaves
 *    loops of _Float16 conversions scalar on x86 (one vcvtph2ps per value, 5-10x slower than
 *    these) and folds (double)(float)h into a library call per value.
 *    _Float16, where the compiler has it, is then only the storage type's name. */
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

/* bfloat16 storage (ml_dtypes' NumPy dtype), float32 compute: the upper half of a float32's
 * bits, so a load is a shift and a store rounds away the lower half, to nearest even. */
#define FBN_STORAGE_IS_COMPUTE_bf16 0
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
