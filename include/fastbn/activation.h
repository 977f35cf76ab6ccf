/* fastbn — the activations a fused batch norm applies, and their derivatives from the output.
 *
 *   relu        y = max(z, 0)                     act'(z) from y: y > 0 ? 1 : 0
 *   leaky_relu  y = z > 0 ? z : slope * z         act'(z) from y: y > 0 ? 1 : slope  (slope >= 0)
 *   tanh        y = tanh z                        act'(z) from y: 1 - y^2 = (1 - y)(1 + y)
 *
 * The derivatives need only y, as oneDNN's "use_dst_for_bwd" eltwise ops: no mask is stored.
 * NaN stays NaN through every activation (comparisons with NaN are false). */
#ifndef FASTBN_ACTIVATION_H
#define FASTBN_ACTIVATION_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* The codes of fastbn/activations.py, the registry (the build checks that they agree) */
typedef enum {
    FBN_ACT_NONE = 0,
    FBN_ACT_RELU = 1,
    FBN_ACT_LEAKY_RELU = 2,
    FBN_ACT_TANH = 3
} fbn_activation;

/* exp(z) for z in [-708, 0] (callers keep z there), to about 1 ulp, in a form the compiler
 * vectorizes (no libm call, no branch):
 *     z = k ln2 + r, |r| <= ln2 / 2      k by the round-to-nearest of the 1.5 * 2^52 trick
 *     exp(z) = 2^k exp(r)               exp(r) by its Taylor series to r^13 (|error| < 4e-18)
 * 2^k is built from its bits (k >= -1022 in that range, a normal number). */
static inline double fbn_exp_nonpositive_f64(double z)
{
    const double round_shift = 0x1.8p52;
    const double k = (z * 0x1.71547652b82fep0 + round_shift) - round_shift;    /* z / ln2 */
    const double r = (z - k * 0x1.62e42fefa3800p-1) - k * 0x1.ef35793c7673p-45;  /* ln2 hi, lo */
    double p = 1.0 / 6227020800.0;                                               /* 1/13! */
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const int64_t bits = ((int64_t)k + 1023) << 52;
    double two_k;
    memcpy(&two_k, &bits, sizeof two_k);
    return p * two_k;
}

/* tanh to a few ulp of double:
 *   |z| < 1/4:  the odd Taylor series to z^21 (the next term is < 3e-18 relative)
 *   otherwise:  tanh |z| = (1 - e) / (1 + e), e = exp(-2|z|) <= 0.61, so 1 - e loses at most
 *               a factor 1.6 of e's accuracy; |z| is capped at 20, where tanh is 1 in double.
 * Both branches are computed and one is selected, so the loop vectorizes. */
static inline double fbn_tanh_f64(double z)
{
    const double a = fabs(z) < 20.0 ? fabs(z) : 20.0;       /* NaN -> 20, fixed below */
    const double s = a * a;
    double p = 18888466084.0 / 194896477400625.0;
    p = p * s - 443861162.0 / 1856156927625.0;
    p = p * s + 6404582.0 / 10854718875.0;
    p = p * s - 929569.0 / 638512875.0;
    p = p * s + 21844.0 / 6081075.0;
    p = p * s - 1382.0 / 155925.0;
    p = p * s + 62.0 / 2835.0;
    p = p * s - 17.0 / 315.0;
    p = p * s + 2.0 / 15.0;
    p = p * s - 1.0 / 3.0;
    const double series = a + a * (s * p);
    const double e = fbn_exp_nonpositive_f64(-2.0 * a);
    const double t = a < 0.25 ? series : (1.0 - e) / (1.0 + e);
    return z != z ? z : copysign(t, z);
}

/* The float32 versions, in float arithmetic (twice the SIMD lanes of double, and shorter
 * polynomials), within 1.51 ulp of float with FMA, 1.57 without (every float in [1/16, 16)).
 * exp(z) for z in [-87, 0]: as fbn_exp_nonpositive_f64,
 * with exp(r) by its Taylor series to r^7 (|error| < 6e-9 relative). */
static inline float fbn_exp_nonpositive_f32(float z)
{
    const float round_shift = 0x1.8p23f;
    const float k = (z * 0x1.715476p0f + round_shift) - round_shift;            /* z / ln2 */
    const float r = (z - k * 0x1.62e4p-1f) - k * 0x1.7f7d1cp-20f;                 /* ln2 hi, lo */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)k + 127) << 23;
    float two_k;
    memcpy(&two_k, &bits, sizeof two_k);
    return p * two_k;
}

/* tanh in float:
 *   |z| < 0.625:  z + z s P(s), s = z^2, P a degree-4 fit of (tanh z - z) / (z s)
 *                 (relative error of the fit < 5e-9)
 *   otherwise:    (1 - e) / (1 + e), e = exp(-2|z|) <= 0.29; |z| capped at 9.5, where tanh
 *                 rounds to 1 in float. */
static inline float fbn_tanh_f32(float z)
{
    const float a = fabsf(z) < 9.5f ? fabsf(z) : 9.5f;       /* NaN -> 9.5, fixed below */
    const float s = a * a;
    float p = -0x1.75e438p-8f;
    p = p * s + 0x1.52272ap-6f;
    p = p * s - 0x1.b83c70p-5f;
    p = p * s + 0x1.110728p-3f;
    p = p * s - 0x1.555532p-2f;
    const float series = a + a * (s * p);
    const float e = fbn_exp_nonpositive_f32(-2.0f * a);
    const float t = a < 0.625f ? series : (1.0f - e) / (1.0f + e);
    return z != z ? z : copysignf(t, z);
}

#endif /* FASTBN_ACTIVATION_H */
