/* fp_vmath.h — the float trainer's element-wise loops that call exp: softmax's and the loss's
 * exponentials and the SwiGLU activation, forward and backward.
 *
 * exp is evaluated as 2^k · e^r (k = round(x / ln 2), |r| ≤ ln 2 / 2, e^r by its Taylor
 * series to r^7) in plain arithmetic, so the loops vectorise where libm's expf, called once
 * per element, does not (it may set errno). It is within 2 ulp of the exact value: 1.22 ulp
 * at worst over every float, checked once exhaustively (test_vmath samples ~2 million), and
 * subnormal results within 0.78 of 2^-149; like expf it gives 0 below -103.972077, +inf from
 * 88.7228394 (ln FLT_MAX rounded up) and NaN for NaN. Each loop is compiled for AVX-512,
 * AVX2+FMA and the baseline without fused multiply-adds, so every level gives the same bits,
 * and runs the CPU's (fp_simd.h). The float64 reference (fp_transformer64.c) keeps libm. */
#ifndef FP_VMATH_H
#define FP_VMATH_H

#include <stddef.h>

/* x[j] = e^(x[j] − shift) for j < n when store, x untouched otherwise; returns
 * Σ_j e^(x[j] − shift), summed in 16 float lanes and then in double. */
double fp_vexp_shift(float *x, size_t n, float shift, int store);

/* a = silu(g) ∘ u, silu(g) = g · σ(g); the three arrays of n do not overlap. */
void fp_vswiglu(float *a, const float *g, const float *u, size_t n);

/* The gradient of fp_vswiglu given da:  du = da ∘ silu(g),
 * dg = da ∘ u ∘ σ(g) ∘ (1 + g ∘ (1 − σ(g))); the five arrays of n do not overlap. */
void fp_vswiglu_bwd(float *dg, float *du, const float *g, const float *u, const float *da,
                    size_t n);

#endif
