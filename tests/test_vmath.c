/* tests/test_vmath.c — the trainer's vectorised exp loops (peft/train/fp_vmath.c) at every
 * vector level this CPU runs, against libm in double: exp within 2 ulp on ~2 million samples
 * over its whole range (subnormal results within one rounding, exact 0 and +inf at the ends,
 * NaN), the lane sums against a double sum, SwiGLU forward and backward against their
 * formulas in double, and every level giving the same bits. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_rng.h"
#include "fp_simd.h"
#include "fp_test.h"
#include "fp_vmath.h"

static const char *const isa[] = {"base", "avx2", "avx512"};

/* The spacing of floats at |e| (the smallest subnormal at 0): the unit of the bounds. */
static double ulp_at(float e)
{
    float a = fabsf(e);
    return (double)nextafterf(a, INFINITY) - (double)a;
}

/* got against e^x: both NaN, or the same infinity, or within max_ulp ulp; where e^x is
 * subnormal, within one rounding (half of 2^-149) of the value before it, which carries
 * e^r's own error (under an ulp of a normal float, 2^-23 relative). */
static int close_ulp(float got, double exact, double max_ulp)
{
    float e = (float)exact;
    if (isnan(e) || isnan(got))
        return isnan(e) && isnan(got);
    if (isinf(e) || isinf(got))
        return got == e;
    if (exact < 0x1p-126)
        return fabs((double)got - exact) <= 0x1p-150 + 0x1p-23 * exact;
    return fabs((double)got - exact) <= max_ulp * ulp_at(e);
}

/* Floats of [lo, hi) at a stride through exp, in chunks of 4093 (not a multiple of the 16
 * lanes, so every chunk has a tail). */
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
    for (int v = fpt_simd_top(); v >= 0; v--) {
        fpt_simd_use(v);
        /* past both ends: 0 below the subnormals, +inf above FLT_MAX */
        check_exp_sweep(-110, 95, 1.1e-4, 0);
        /* the ends closely: the last subnormal and the overflow threshold */
        check_exp_sweep(-104.1, -103.1, 3e-7, 0);
        check_exp_sweep(88.70, 88.75, 1e-7, 0);
        /* a shift, as softmax and the loss use it */
        check_exp_sweep(-60, 30, 1e-4, 2.75f);
        const float lo = -103.972077f, hi = 88.7228394f; /* fp_vmath.c's EXP_LO, EXP_HI */
        float sp[] = {NAN,  INFINITY, -INFINITY, 0.0f, -0.0f, 1.0f, -1e30f, 1e30f,
                      -87.3365479f, lo, nextafterf(lo, -INFINITY), hi, nextafterf(hi, 0)};
        size_t ns = sizeof sp / sizeof sp[0];
        float y[sizeof sp / sizeof sp[0]];
        memcpy(y, sp, sizeof sp);
        fp_vexp_shift(y, ns, 0, 1);
        for (size_t j = 0; j < ns; j++) {
            if (!close_ulp(y[j], exp((double)sp[j]), 2))
                fail_msg("%s: exp(%.9g) = %.9g, exact %.9g", isa[v], (double)sp[j],
                         (double)y[j], exp((double)sp[j]));
        }
        /* exactly: e^-inf and e^-1e30 are +0, e^0 is 1; at EXP_LO the smallest subnormal,
         * below it 0; at EXP_HI +inf, below it finite */
        assert_true(y[2] == 0.0f && !signbit(y[2]) && y[6] == 0.0f && !signbit(y[6]));
        assert_true(y[3] == 1.0f && y[4] == 1.0f);
        assert_true(y[9] == 0x1p-149f && y[10] == 0.0f);
        assert_true(isinf(y[11]) && isfinite(y[12]));
    }
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
    for (int v = fpt_simd_top(); v >= 0; v--) {
        fpt_simd_use(v);
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
    for (int v = fpt_simd_top(); v >= 0; v--) {
        fpt_simd_use(v);
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
}

/* Every level gives the base level's bits: values, sums and SwiGLU both ways (no fused
 * multiply-adds in any of them). */
static void test_levels_agree(void **state)
{
    (void)state;
    enum { len = 1000 + 9 };
    static float x[len], g[len], u[len], da[len], out[3][5][len];
    double sum[3];
    fp_rng_t r;
    fp_rng_seed(&r, 13);
    fp_rng_fill_normal(&r, x, len, 30.0);
    fp_rng_fill_normal(&r, g, len, 6.0);
    fp_rng_fill_normal(&r, u, len, 1.0);
    fp_rng_fill_normal(&r, da, len, 1.0);
    int top = fpt_simd_top();
    for (int v = top; v >= 0; v--) {
        fpt_simd_use(v);
        memcpy(out[v][0], x, sizeof x);
        sum[v] = fp_vexp_shift(out[v][0], len, 0.5f, 1);
        fp_vswiglu(out[v][1], g, u, len);
        fp_vswiglu_bwd(out[v][2], out[v][3], g, u, da, len);
    }
    for (int v = top; v > 0; v--) {
        if (sum[v] != sum[0])
            fail_msg("%s: sum %.17g, base %.17g", isa[v], sum[v], sum[0]);
        for (int k = 0; k < 4; k++)
            if (memcmp(out[v][k], out[0][k], sizeof x) != 0)
                fail_msg("%s: output %d differs from the base level's", isa[v], k);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_exp_range, fpt_simd_restore),
        cmocka_unit_test_teardown(test_exp_sums, fpt_simd_restore),
        cmocka_unit_test_teardown(test_swiglu, fpt_simd_restore),
        cmocka_unit_test_teardown(test_levels_agree, fpt_simd_restore),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
