#include "fp_vmath.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fp_simd.h"

#define AI static inline __attribute__((always_inline))

/* Partial sums kept apart: one AVX-512 register, two AVX2 ones, four SSE ones. */
#define LANES 16

/* Below EXP_LO, e^x is under half the smallest subnormal (2^-150) and rounds to 0; at EXP_HI
 * (ln FLT_MAX rounded up) it already overflows to +inf. */
#define EXP_LO -103.972077f
#define EXP_HI 88.7228394f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f          /* 9 significant bits: k · LN2_HI is exact for |k| ≤ 150 */
#define LN2_LO -2.12194440054690583e-4f /* ln 2 − LN2_HI */

/* e^x = 2^k · e^r. k = round(x · log2 e) comes from adding 1.5 · 2^23, which leaves k in the
 * low bits of the sum; r = x − k · ln 2 with ln 2 split in two (k · LN2_HI is exact for
 * |k| ≤ 150); 2^k is applied as 2^(k/2) · 2^(k − k/2), two normal powers, so that subnormal
 * results round once. Inputs are clamped to [EXP_LO, EXP_HI] to keep k small: above, the
 * product overflows to +inf as it should, below, the select at the end gives 0. NaN passes
 * through the arithmetic. */
AI float exp_body(float x)
{
    const float magic = 12582912.0f; /* 1.5 · 2^23, bits 0x4b400000 */
    float xc = x < EXP_LO ? EXP_LO : x;
    xc = xc > EXP_HI ? EXP_HI : xc;
    float t = xc * LOG2E + magic;
    float k = t - magic;
    float r = xc - k * LN2_HI; /* exact */
    r = r - k * LN2_LO;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t tb;
    memcpy(&tb, &t, sizeof tb);
    int32_t k0 = tb - 0x4b400000, k1 = k0 / 2, k2 = k0 - k1;
    uint32_t b1 = (uint32_t)(k1 + 127) << 23, b2 = (uint32_t)(k2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    float y = p * s1 * s2;
    return x < EXP_LO ? 0.0f : y;
}

AI double exp_shift_body(float *restrict x, size_t n, float shift, int store)
{
    float acc[LANES] = {0};
    size_t j = 0;
    if (store) {
        for (; j + LANES <= n; j += LANES)
            for (int l = 0; l < LANES; l++) {
                float e = exp_body(x[j + l] - shift);
                x[j + l] = e;
                acc[l] += e;
            }
    } else {
        for (; j + LANES <= n; j += LANES)
            for (int l = 0; l < LANES; l++)
                acc[l] += exp_body(x[j + l] - shift);
    }
    double sum = 0;
    for (; j < n; j++) {
        float e = exp_body(x[j] - shift);
        if (store)
            x[j] = e;
        sum += (double)e;
    }
    for (int l = 0; l < LANES; l++)
        sum += (double)acc[l];
    return sum;
}

AI void swiglu_body(float *restrict a, const float *restrict g, const float *restrict u,
                    size_t n)
{
    for (size_t j = 0; j < n; j++)
        a[j] = g[j] / (1 + exp_body(-g[j])) * u[j];
}

AI void swiglu_bwd_body(float *restrict dg, float *restrict du, const float *restrict g,
                        const float *restrict u, const float *restrict da, size_t n)
{
    for (size_t j = 0; j < n; j++) {
        float sg = 1 / (1 + exp_body(-g[j]));
        du[j] = da[j] * g[j] * sg;
        dg[j] = da[j] * u[j] * sg * (1 + g[j] * (1 - sg));
    }
}

#define DEF(suffix, attr)                                                                      \
    attr static double exp_shift_##suffix(float *x, size_t n, float shift, int store)          \
    {                                                                                          \
        return exp_shift_body(x, n, shift, store);                                             \
    }                                                                                          \
    attr static void swiglu_##suffix(float *a, const float *g, const float *u, size_t n)       \
    {                                                                                          \
        swiglu_body(a, g, u, n);                                                               \
    }                                                                                          \
    attr static void swiglu_bwd_##suffix(float *dg, float *du, const float *g, const float *u, \
                                         const float *da, size_t n)                            \
    {                                                                                          \
        swiglu_bwd_body(dg, du, g, u, da, n);                                                  \
    }
FP_SIMD_VARIANTS(DEF)
#undef DEF

double fp_vexp_shift(float *x, size_t n, float shift, int store)
{
    return FP_SIMD_CALL(exp_shift, x, n, shift, store);
}

void fp_vswiglu(float *a, const float *g, const float *u, size_t n)
{
    FP_SIMD_CALL(swiglu, a, g, u, n);
}

void fp_vswiglu_bwd(float *dg, float *du, const float *g, const float *u, const float *da,
                    size_t n)
{
    FP_SIMD_CALL(swiglu_bwd, dg, du, g, u, da, n);
}
