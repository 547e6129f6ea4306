/* Server optimizers (peft/adapter/fp_server_opt.c): each one's two rounds on a hand example
 * against its formula written out; the factored momentum of exact strategies against a dense
 * float64 one (its truncation is the best of its rank: the residual is the tail of the dense
 * singular values). */
#include "fp_test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fp_rng.h"
#include "fp_server_opt.h"

#define N 3
static const double x0[N] = {1.0, -2.0, 0.5};
static const double d1[N] = {0.1, -0.3, 0.0};
static const double d2[N] = {-0.2, 0.05, 0.4};

/* Runs two rounds of kind on the example: x after each round in got1, got2. */
static void two_rounds(fp_sopt_kind_t kind, const fp_sopt_cfg_t *base, double got1[N],
                       double got2[N])
{
    fp_sopt_cfg_t c = *base;
    c.kind = kind;
    assert_int_equal(fp_sopt_check(&c, NULL), 0);
    float x[N], d[N], m[N], v[N];
    for (int i = 0; i < N; i++)
        x[i] = (float)x0[i];
    fp_sopt_init(&c, m, v, N);
    for (int i = 0; i < N; i++)
        d[i] = (float)d1[i];
    fp_sopt_step(&c, x, d, m, v, N);
    for (int i = 0; i < N; i++) {
        got1[i] = x[i];
        d[i] = (float)d2[i];
    }
    fp_sopt_step(&c, x, d, m, v, N);
    for (int i = 0; i < N; i++)
        got2[i] = x[i];
}

static double sgn(double a) { return a > 0 ? 1 : a < 0 ? -1 : 0; }

static void expect(const char *what, const double *got, const double *want)
{
    for (int i = 0; i < N; i++)
        if (fabs(got[i] - want[i]) > 2e-6 * (1 + fabs(want[i])))
            fail_msg("%s[%d]: %.9g, formula %.9g", what, i, got[i], want[i]);
}

static void test_each_optimizer_two_rounds(void **state)
{
    (void)state;
    const double lr = 0.5, b1 = 0.9, b2 = 0.99, tau = 1e-2;
    fp_sopt_cfg_t cfg = {FP_SOPT_SGD, lr, b1, b2, tau};
    double g1[N], g2[N], w1[N], w2[N];

    /* sgd: x + η·Δ each round */
    two_rounds(FP_SOPT_SGD, &cfg, g1, g2);
    for (int i = 0; i < N; i++) {
        w1[i] = x0[i] + lr * d1[i];
        w2[i] = w1[i] + lr * d2[i];
    }
    expect("sgd round 1", g1, w1);
    expect("sgd round 2", g2, w2);

    /* avgm: m1 = Δ1, m2 = β·Δ1 + Δ2 */
    two_rounds(FP_SOPT_AVGM, &cfg, g1, g2);
    for (int i = 0; i < N; i++) {
        w1[i] = x0[i] + lr * d1[i];
        w2[i] = w1[i] + lr * (b1 * d1[i] + d2[i]);
    }
    expect("avgm round 1", g1, w1);
    expect("avgm round 2", g2, w2);

    /* adagrad: v0 = τ², v1 = τ² + Δ1², v2 = v1 + Δ2² */
    two_rounds(FP_SOPT_ADAGRAD, &cfg, g1, g2);
    for (int i = 0; i < N; i++) {
        double m1 = (1 - b1) * d1[i], v1 = tau * tau + d1[i] * d1[i];
        double m2 = b1 * m1 + (1 - b1) * d2[i], v2 = v1 + d2[i] * d2[i];
        w1[i] = x0[i] + lr * m1 / (sqrt(v1) + tau);
        w2[i] = w1[i] + lr * m2 / (sqrt(v2) + tau);
    }
    expect("adagrad round 1", g1, w1);
    expect("adagrad round 2", g2, w2);

    /* adam: v1 = β2·τ² + (1−β2)·Δ1² */
    two_rounds(FP_SOPT_ADAM, &cfg, g1, g2);
    for (int i = 0; i < N; i++) {
        double m1 = (1 - b1) * d1[i], v1 = b2 * tau * tau + (1 - b2) * d1[i] * d1[i];
        double m2 = b1 * m1 + (1 - b1) * d2[i], v2 = b2 * v1 + (1 - b2) * d2[i] * d2[i];
        w1[i] = x0[i] + lr * m1 / (sqrt(v1) + tau);
        w2[i] = w1[i] + lr * m2 / (sqrt(v2) + tau);
    }
    expect("adam round 1", g1, w1);
    expect("adam round 2", g2, w2);

    /* yogi: v1 = τ² − (1−β2)·Δ1²·sign(τ² − Δ1²) */
    two_rounds(FP_SOPT_YOGI, &cfg, g1, g2);
    for (int i = 0; i < N; i++) {
        double q1 = d1[i] * d1[i], q2 = d2[i] * d2[i];
        double m1 = (1 - b1) * d1[i], v1 = tau * tau - (1 - b2) * q1 * sgn(tau * tau - q1);
        double m2 = b1 * m1 + (1 - b1) * d2[i], v2 = v1 - (1 - b2) * q2 * sgn(v1 - q2);
        w1[i] = x0[i] + lr * m1 / (sqrt(v1) + tau);
        w2[i] = w1[i] + lr * m2 / (sqrt(v2) + tau);
    }
    expect("yogi round 1", g1, w1);
    expect("yogi round 2", g2, w2);

    /* adam and yogi differ once v grows past Δ² (here on the second round's third entry) */
    double a2[N], y2[N];
    two_rounds(FP_SOPT_ADAM, &cfg, g1, a2);
    two_rounds(FP_SOPT_YOGI, &cfg, g1, y2);
    assert_true(fabs(a2[2] - y2[2]) > 1e-6);
}

static void test_names_and_bounds(void **state)
{
    (void)state;
    fp_sopt_kind_t k;
    fp_err_t err = {0};
    for (int i = 0; i <= FP_SOPT_YOGI; i++) {
        assert_int_equal(fp_sopt_parse(fp_sopt_name((fp_sopt_kind_t)i), &k, &err), 0);
        assert_int_equal(k, i);
    }
    assert_int_equal(fp_sopt_parse("fedadam", &k, &err), -EINVAL);
    assert_err_contains(&err, "'fedadam'");
    fp_sopt_cfg_t bad[] = {{FP_SOPT_SGD, 0, 0, 0, 0}, {FP_SOPT_AVGM, 1, 1.0, 0, 0},
                           {FP_SOPT_ADAM, 1, 0.9, 1.0, 1e-3}, {FP_SOPT_YOGI, 1, 0.9, 0.99, 0}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(fp_sopt_check(&bad[i], &err), -EINVAL);
}

/* Dense M (d_out × d_in, row-major, float64) = c·B·A added. */
static void dense_add(double *M, const float *B, const float *A, int d_out, int d_in, int r,
                      double c)
{
    fpt_dense_add(M, B, A, d_out, d_in, r, c);
}

static void test_lowrank_momentum_against_dense(void **state)
{
    (void)state;
    enum { DO = 9, DI = 7, RD = 2 };
    const double beta = 0.9;
    fp_rng_t rng;
    fp_rng_seed(&rng, 20261205);
    for (int r = 2; r <= 4; r += 2) { /* r = 4: nothing cut in round 2 (rank 2 + 2) */
        float MB[DO * 4] = {0}, MA[4 * DI] = {0}, DB[DO * RD], DA[RD * DI];
        double prev[DO * DI] = {0}; /* β·(the kept momentum) + Δ, dense */
        for (int round = 0; round < 4; round++) {
            for (int i = 0; i < DO * RD; i++)
                DB[i] = (float)fp_rng_normal(&rng);
            for (int i = 0; i < RD * DI; i++)
                DA[i] = (float)fp_rng_normal(&rng);
            double dense[DO * DI] = {0};
            dense_add(dense, MB, MA, DO, DI, r, beta); /* the momentum kept, decayed */
            dense_add(dense, DB, DA, DO, DI, RD, 1.0);
            memcpy(prev, dense, sizeof dense);
            double trunc;
            fp_err_t err = {0};
            assert_int_equal(fp_sopt_lowrank_momentum(DO, DI, beta, MB, MA, r, DB, DA, RD,
                                                      &trunc, &err), 0);
            double s[DI], all = 0, tail = 0;
            fpt_singular_values(prev, DO, DI, s);
            for (int i = 0; i < DI; i++) {
                all += s[i] * s[i];
                tail += i >= r ? s[i] * s[i] : 0;
            }
            double want = sqrt(tail / all);
            if (fabs(trunc - want) > 1e-5)
                fail_msg("r %d round %d: truncation %.8g reported, dense %.8g", r, round, trunc,
                         want);
            double kept[DO * DI] = {0}, res = 0;
            dense_add(kept, MB, MA, DO, DI, r, 1.0);
            for (int i = 0; i < DO * DI; i++)
                res += (prev[i] - kept[i]) * (prev[i] - kept[i]);
            /* the best rank r: its residual is exactly the dense tail (Eckart–Young) */
            if (fabs(sqrt(res) - sqrt(tail)) > 1e-5 * sqrt(all))
                fail_msg("r %d round %d: residual %.8g, the dense tail %.8g", r, round,
                         sqrt(res), sqrt(tail));
            if (r == 4 && round == 0 && trunc != 0)
                fail_msg("rank 2 momentum cut at rank 4");
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_each_optimizer_two_rounds),
        cmocka_unit_test(test_names_and_bounds),
        cmocka_unit_test(test_lowrank_momentum_against_dense),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
