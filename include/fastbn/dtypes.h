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

/* A row's FBN_STORAGE_IS_COMPUTE_<suffix> is 1 when values are stored as they are computed
 * (no conversion: the streaming stores' vector path applies) */

/* float32 storage, float32 compute */
#define FBN_STORAGE_IS_COMPUTE_f32 1
static inline float fbn_load_f32(float v) { return v; }
static inline float fbn_store_f32(float v) { return v; }

/* float64 storage, float64 compute */
#define FBN_STORAGE_IS_COMPUTE_f64 1
static inline double fbn_load_f64(double v) { return v; }
static inline double fbn_store_f64(double v) { return v; }

/* float16 storage, float32 compute. GCC >= 12 and clang have _Float16 on x86-64 and aarch64:
 * its conversions are the hardware's where the kernel's instruction set has them (F16C in
 * the x86-64-v3 and v4 clones: vcvtph2ps / vcvtps2ph; aarch64: fcvtl / fcvtn) and exact
 * library calls elsewhere. Other compilers get the same conversions in portable C. Both
 * round to nearest even, once. */
#define FBN_STORAGE_IS_COMPUTE_f16 0
#if defined(__FLT16_MAX__)
typedef _Float16 fbn_f16;
static inline float fbn_load_f16(fbn_f16 v) { return (float)v; }
static inline fbn_f16 fbn_store_f16(float v) { return (fbn_f16)v; }
#else
#include <stdint.h>
#include <string.h>
typedef uint16_t fbn_f16;
static inline float fbn_load_f16(fbn_f16 h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f,
                   mant = h & 0x3ffu;
    float f;
    if (exp == 0x1f) {                                    /* inf, nan */
        const uint32_t bits = sign | 0x7f800000u | (mant << 13);
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    f = exp == 0 ? (float)mant * 0x1p-24f                 /* subnormal, zero */
                 : (float)(mant | 0x400u) * ((float)(1u << exp) * 0x1p-25f);
    return sign ? -f : f;
}
static inline fbn_f16 fbn_store_f16(float v)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    const uint32_t abs = bits & 0x7fffffffu;
    if (abs >= 0x7f800000u)                               /* inf, nan (kept quiet) */
        return sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u | (uint16_t)((abs >> 13) & 0x3ffu) : 0);
    if (abs >= 0x477ff000u)                               /* rounds past 65504 */
        return sign | 0x7c00u;
    if (abs < 0x38800000u) {                              /* half subnormal or zero */
        float a;
        memcpy(&a, &abs, sizeof a);
        /* a * 2^24 rounded to an integer, to nearest even: that many units of 2^-24 */
        const float scaled = a * 0x1p24f, base = (float)(uint32_t)scaled, frac = scaled - base;
        uint32_t m = (uint32_t)base;
        if (frac > 0.5f || (frac == 0.5f && (m & 1u))) m++;
        return sign | (uint16_t)m;
    }
    /* normal: drop 13 mantissa bits, to nearest even (a carry may step the exponent) */
    const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
    return sign | (uint16_t)((rounded - 0x38000000u) >> 13);
}
#endif

/* bfloat16 storage (ml_dtypes' NumPy dtype), float32 compute: the upper half of a float32's
 * bits, so a load is a shift and a store rounds away the lower half, to nearest even. */
#include <stdint.h>
#include <string.h>
#define FBN_STORAGE_IS_COMPUTE_bf16 0
typedef uint16_t fbn_bf16;
static inline float fbn_load_bf16(fbn_bf16 v)
{
    const uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
static inline fbn_bf16 fbn_store_bf16(float v)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u)               /* nan: keep it a quiet nan */
        return (fbn_bf16)((bits >> 16) | 0x40u);
    return (fbn_bf16)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

#endif /* FASTBN_DTYPES_H */
