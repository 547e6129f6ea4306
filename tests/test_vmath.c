/* tests/test_vmath.c — the trainer's vectorised exp loops (peft/train/fp_vmath.c), every
 * variant this CPU runs (fp_simd_cap), against libm in double: exp within 2 ulp over its
 * whole range (subnormal results, overflow, NaN and infinities included), the lane sums
 * against a double sum, and SwiGLU forward and backward against their formulas in double. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_rng.h"
#include "fp_simd.h"
#include "fp_test.h"
#include "fp_vmath.h"

static const char *const isa[] = {"base", "avx2", "avx512"};

/* The CPU's level, every lower one being reachable through fp_simd_cap. */
static int top_level(void)
{
    return (int)fp_simd_cap(FP_SIMD_AVX512);
}

/* The spacing of floats at |e| (the smallest subnormal at 0): the unit of the bounds. */
static double ulp_at(float e)
{
    float a = fabsf(e);
    return (double)nextafterf(a, INFINITY) - (double)a;
}

/* |got − (float)exact| within max_ulp ulp, or both NaN, or both the same infinity. */
static int close_ulp(float got, double exact, double max_ulp)
{
    float e = (float)exact;
    if (isnan(e) || isnan(got))
        return isnan(e) && isnan(got);
    if (isinf(e) || isinf(got))
        return got == e;
    return fabs((double)got - exact) <= max_ulp * ulp_at(e);
}

/* Every float of [lo, hi) at a stride, through each variant's exp in chunks of 4093 (not a
 * multiple of the 16 lanes, so every chunk has a tail). */
static void check_exp_sweep(double lo, double hi, double step, float shift)
{
    enum { chunk = 4093 };
    static float x[chunk], y[chunk];
    double worst = 0, at = 0;
    size_t bad = 0;
    for (double x0 = lo; x0 < hi; x0 += step * chunk) {
        for (int j = 0; j < chunk; j++)
            x[j] = (float)(x0 + step * j);
        memcpy(y, x, sizeof y);
        fp_vexp_shift(y, chunk, shift, 1);
        for (int j = 0; j < chunk; j++) {
            double exact = exp((double)(x[j] - shift));
            if (!close_ulp(y[j], exact, 2)) {
                if (bad++ < 5)
                    printf("%s: exp(%.9g - %g) = %.9g, exact %.9g\n", isa[fp_simd_level()],
                           (double)x[j],
                           (double)shift, (double)y[j], exact);
            } else if (isfinite(exact) && exact > 0) {
                double u = fabs((double)y[j] - exact) / ulp_at((float)exact);
                if (u > worst) {
                    worst = u;
                    at = x[j];
                }
            }
        }
    }
    printf("%s: exp over [%g, %g) - %g: worst %.2f ulp at %.9g\n", isa[fp_simd_level()], lo, hi,
           (double)shift, worst, at);
    assert_int_equal(bad, 0);
}

static void test_exp_range(void **state)
{
    (void)state;
    int top = top_level();
    for (int v = top; v >= 0; v--) {
        assert_int_equal(fp_simd_cap((fp_simd_t)v), v);
        /* past both ends: 0 below the subnormals, +inf above FLT_MAX */
        check_exp_sweep(-110, 95, 1.1e-4, 0);
        /* the ends closely: the last subnormal and the overflow threshold */
        check_exp_sweep(-104.1, -103.1, 3e-7, 0);
        check_exp_sweep(88.70, 88.75, 1e-7, 0);
        /* a shift, as softmax and the loss use it */
        check_exp_sweep(-60, 30, 1e-4, 2.75f);
        float sp[] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 1.0f, -1e30f, 1e30f,
                      -87.3365479f, 88.7228394f, 88.7228317f, -103.972084f, -103.279f};
        size_t ns = sizeof sp / sizeof sp[0];
        float y[sizeof sp / sizeof sp[0]];
        memcpy(y, sp, sizeof sp);
        fp_vexp_shift(y, ns, 0, 1);
        for (size_t j = 0; j < ns; j++) {
            if (!close_ulp(y[j], exp((double)sp[j]), 2))
                fail_msg("%s: exp(%.9g) = %.9g, exact %.9g", isa[v], (double)sp[j],
                         (double)y[j], exp((double)sp[j]));
        }
        assert_true(y[2] == 0.0f && !signbit(y[2]));
        assert_true(y[3] == 1.0f && y[4] == 1.0f);
    }
    assert_int_equal(fp_simd_cap(FP_SIMD_AVX512), top);
}

/* The returned sum against a double sum of the stored values, for every length to 40 (tails)
 * and a long row; without store the row is left as it was and the sum is the same. */
static void test_exp_sums(void **state)
{
    (void)state;
    enum { len = 4096 };
    static float x[len], y[len], z[len];
    fp_rng_t g;
    fp_rng_seed(&g, 7);
    fp_rng_fill_normal(&g, x, len, 3.0);
    int top = top_level();
    for (int v = top; v >= 0; v--) {
        fp_simd_cap((fp_simd_t)v);
        for (size_t m = 0; m <= len; m = m < 40 ? m + 1 : (m < len ? len : len + 1)) {
            memcpy(y, x, sizeof y);
            memcpy(z, x, sizeof z);
            double s = fp_vexp_shift(y, m, 1.5f, 1);
            double s0 = fp_vexp_shift(z, m, 1.5f, 0);
            assert_memory_equal(z, x, sizeof z);
            assert_memory_equal(y + m, x + m, (len - m) * sizeof(float));
            double ref = 0;
            for (size_t j = 0; j < m; j++) {
                assert_true(close_ulp(y[j], exp((double)(x[j] - 1.5f)), 2));
                ref += (double)y[j];
            }
            /* 16 lanes of positive terms: each lane's float sum has at most m/16 roundings */
            double bound = ((double)m / 16 + 2) * ldexp(1, -24) * ref;
            if (fabs(s - ref) > bound || s != s0)
                fail_msg("%s, n %zu: sum %.17g (%.17g without store), exact %.17g", isa[v], m,
                         s, s0, ref);
        }
    }
    fp_simd_cap(FP_SIMD_AVX512);
}

/* got against ref within bound, or both NaN, or the same infinity; values under 1e-30 count
 * as 0 (float's own range: e^88.8 already overflows, so σ(−88.8) is 0 to any float code). */
static int near(float got, double ref, double bound)
{
    if (isnan(ref) || isinf(ref))
        return (isnan(ref) && isnan(got)) || (double)got == ref;
    return fabs((double)got - ref) <= bound + 1e-30;
}

/* SwiGLU's forward and backward against their formulas in double. The backward's dg has
 * 1 + g(1 − σ(g)) in it, which cancels near g ≈ −1.28 and, for large g, takes σ(g)'s
 * rounding (an ulp of 1) times g: its bound is relative to |da·u·σ(g)|·(1 + |g|), not to the
 * result. Nothing past n is written. */
static void test_swiglu(void **state)
{
    (void)state;
    enum { len = 2816 + 13 };
    static float g[len], u[len], da[len], a[len], dg[len], du[len], pat[len];
    fp_rng_t r;
    fp_rng_seed(&r, 11);
    fp_rng_fill_normal(&r, g, len, 4.0);
    fp_rng_fill_normal(&r, u, len, 1.0);
    fp_rng_fill_normal(&r, da, len, 1.0);
    float sp[] = {0.0f, -0.0f, 88.8f, -88.8f, 104.5f, -104.5f, 200,       -200,
                  -1.2785f, 30, -30, NAN,   INFINITY, -INFINITY, 1e30f, -1e30f};
    memcpy(g, sp, sizeof sp);
    memset(pat, 0x7f, sizeof pat);
    const double eps = ldexp(1, -24);
    int top = top_level();
    for (int v = top; v >= 0; v--) {
        fp_simd_cap((fp_simd_t)v);
        for (size_t m = 1; m <= len; m = m < 40 ? m + 1 : (m < len ? len : len + 1)) {
            memcpy(a, pat, sizeof a);
            memcpy(dg, pat, sizeof dg);
            memcpy(du, pat, sizeof du);
            fp_vswiglu(a, g, u, m);
            fp_vswiglu_bwd(dg, du, g, u, da, m);
            for (size_t j = 0; j < m; j++) {
                double gj = g[j], sg = 1 / (1 + exp(-gj));
                double ref_a = gj * sg * u[j], ref_du = da[j] * gj * sg;
                double ref_dg = da[j] * u[j] * sg * (1 + gj * (1 - sg));
                double scale_dg = fabs(da[j] * u[j] * sg) * (1 + fabs(gj));
                if (!near(a[j], ref_a, 8 * eps * fabs(ref_a)) ||
                    !near(du[j], ref_du, 8 * eps * fabs(ref_du)) ||
                    !near(dg[j], ref_dg, 12 * eps * scale_dg))
                    fail_msg("%s, n %zu, g %.9g: a %.9g (%.9g), du %.9g (%.9g), dg %.9g (%.9g)",
                             isa[v], m, gj, (double)a[j], ref_a, (double)du[j], ref_du,
                             (double)dg[j], ref_dg);
            }
            assert_memory_equal(a + m, pat, (len - m) * sizeof(float));
            assert_memory_equal(dg + m, pat, (len - m) * sizeof(float));
            assert_memory_equal(du + m, pat, (len - m) * sizeof(float));
        }
    }
    fp_simd_cap(FP_SIMD_AVX512);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exp_range),
        cmocka_unit_test(test_exp_sums),
        cmocka_unit_test(test_swiglu),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
