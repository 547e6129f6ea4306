/* Differential privacy (peft/privacy): the accountant against an independent computation and
 * a published value, the noise sampler's distribution, exact clipping of LoRA update vectors,
 * the noise's scale in both trust models, the strategies DP refuses. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fp_dp.h"
#include "fp_noise.h"
#include "fp_rdp.h"
#include "fp_test.h"

/* ---- the accountant ---- */

/* A_α = ∫ N(x; 0, z²) ((1 − q) + q·exp((2x − 1)/(2z²)))^α dx by the trapezoid rule in long
 * double, straight from the definition (Mironov, Talwar, Zhang 2019, §3.3): no log space, no
 * binomial sum, a wide fixed grid. For the moderate (α, z) used here it is far from overflow. */
static long double direct_a(double q, double z, double alpha)
{
    long double sum = 0, h = 4e-3L * z, lo = -40.0L * z, hi = 40.0L * z + alpha;
    for (long double x = lo; x <= hi; x += h) {
        long double g = expl(-x * x / (2.0L * z * z)) / (sqrtl(2.0L * (long double)M_PI) * z);
        long double m = (1 - q) + q * expl((2 * x - 1) / (2.0L * z * z));
        sum += g * powl(m, alpha) * h;
    }
    return sum;
}

static double orders_list(int i)
{
    return i < 99 ? 1 + (i + 1) / 10.0 : 11 + (i - 99);
}

/* (ε, δ) from the direct A_α over the same orders up to 20 (the optimum of every case below
 * lies inside that range). */
static double direct_epsilon(double q, double z, double rounds, double delta)
{
    double best = INFINITY;
    for (int i = 0; i < 99 + 10; i++) {
        double a = orders_list(i);
        double rdp = rounds * (double)(logl(direct_a(q, z, a)) / (a - 1));
        double eps = rdp + log((a - 1) / a) - (log(delta) + log(a)) / (a - 1);
        best = eps < best ? eps : best;
    }
    return best;
}

static void test_accountant(void **state)
{
    (void)state;
    static const double cases[][4] = {/* q, z, rounds, delta */
                                      {0.1, 1.0, 10, 1e-5},  {0.5, 1.5, 20, 1e-5},
                                      {0.01, 0.9, 200, 1e-6}, {1.0, 2.0, 5, 1e-5},
                                      {0.3, 1.2, 1, 1e-3}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        double q = cases[i][0], z = cases[i][1], t = cases[i][2], d = cases[i][3];
        double got = fp_rdp_epsilon(q, z, t, d, 0, NULL), want = direct_epsilon(q, z, t, d);
        if (fabs(got - want) > 1e-3 * want)
            fail_msg("q %g z %g T %g δ %g: ε %.6f, independently %.6f", q, z, t, d, got, want);
    }
    /* the integer-order binomial sum and the fractional-order integral agree where they meet */
    for (int a = 2; a <= 12; a += 5)
        assert_true(fabs(fp_rdp_order(0.05, 1.1, a) - fp_rdp_order(0.05, 1.1, a + 1e-9)) <
                    1e-6 * fp_rdp_order(0.05, 1.1, a));
    /* TF Privacy's tutorial: q = 256/60000, z = 1.1, 14063 steps, δ = 1e-5 → ε ≈ 3.01 with the
     * classic conversion; the tighter one is below it */
    double classic = fp_rdp_epsilon(256.0 / 60000, 1.1, 14063, 1e-5, 1, NULL);
    double tight = fp_rdp_epsilon(256.0 / 60000, 1.1, 14063, 1e-5, 0, NULL);
    if (fabs(classic - 3.01) > 0.01)
        fail_msg("TF Privacy's example: ε = %.4f, published 3.01", classic);
    assert_true(tight < classic);
    /* monotone in every argument */
    double base = fp_rdp_epsilon(0.2, 1.0, 50, 1e-5, 0, NULL);
    assert_true(fp_rdp_epsilon(0.3, 1.0, 50, 1e-5, 0, NULL) > base);
    assert_true(fp_rdp_epsilon(0.2, 1.2, 50, 1e-5, 0, NULL) < base);
    assert_true(fp_rdp_epsilon(0.2, 1.0, 60, 1e-5, 0, NULL) > base);
    assert_true(fp_rdp_epsilon(0.2, 1.0, 50, 1e-4, 0, NULL) < base);
    assert_true(fp_rdp_epsilon(0.2, 1.0, 0, 1e-5, 0, NULL) == 0);
    /* the inverses */
    double z;
    fp_err_t err = {0};
    assert_int_equal(fp_rdp_noise_for(0.2, 50, 4.0, 1e-5, &z, &err), 0);
    double e = fp_rdp_epsilon(0.2, z, 50, 1e-5, 0, NULL);
    assert_true(e <= 4.0 && e > 4.0 * 0.999);
    long r = fp_rdp_rounds_within(0.2, 1.0, 4.0, 1e-5);
    assert_true(fp_rdp_epsilon(0.2, 1.0, (double)r, 1e-5, 0, NULL) <= 4.0);
    assert_true(fp_rdp_epsilon(0.2, 1.0, (double)r + 1, 1e-5, 0, NULL) > 4.0);
}

/* ---- the sampler ---- */

static void test_sampler(void **state)
{
    (void)state;
    uint8_t key[FP_NOISE_KEY] = {7};
    fp_noise_t *n;
    assert_int_equal(fp_noise_new(&n, key, NULL), 0);
    /* N_Z(0, σ²) for σ² = 1 and 9: the frequencies of −4..4 against the exact pmf (χ²) */
    for (uint64_t s2 = 1; s2 <= 9; s2 += 8) {
        enum { N = 400000, K = 9 };
        long cnt[K] = {0};
        for (int i = 0; i < N; i++) {
            int64_t z = fp_noise_discrete_gaussian(n, s2);
            if (z >= -4 && z <= 4)
                cnt[z + 4]++;
        }
        double norm = 0, chi2 = 0;
        for (int k = -200; k <= 200; k++)
            norm += exp(-(double)k * k / (2.0 * (double)s2));
        for (int k = -4; k <= 4; k++) {
            double e = N * exp(-(double)k * k / (2.0 * (double)s2)) / norm;
            chi2 += (cnt[k + 4] - e) * (cnt[k + 4] - e) / e;
        }
        if (chi2 > 40) /* 9 cells: P(χ² > 40) < 1e-5 */
            fail_msg("discrete Gaussian σ² = %llu: χ² = %.1f", (unsigned long long)s2, chi2);
    }
    /* the scaled noise: mean 0, variance s² */
    double s = 0, s2 = 0;
    enum { M = 200000 };
    for (int i = 0; i < M; i++) {
        double x = fp_noise_gaussian(n, 3.0);
        s += x;
        s2 += x * x;
    }
    assert_true(fabs(s / M) < 5 * 3.0 / sqrt(M));
    assert_true(fabs(s2 / M / 9.0 - 1) < 5 * sqrt(2.0 / M));
    /* the same key, the same stream; another key, another */
    fp_noise_t *a, *b;
    uint8_t k2[FP_NOISE_KEY] = {8};
    assert_int_equal(fp_noise_new(&a, key, NULL), 0);
    assert_int_equal(fp_noise_new(&b, k2, NULL), 0);
    fp_noise_t *a2;
    assert_int_equal(fp_noise_new(&a2, key, NULL), 0);
    uint64_t x = fp_noise_u64(a);
    assert_true(x == fp_noise_u64(a2));
    assert_true(x != fp_noise_u64(b));
    fp_noise_free(a);
    fp_noise_free(a2);
    fp_noise_free(b);
    fp_noise_free(n);
}

/* ---- LoRA update vectors ---- */

static const fp_module_desc_t layout[] = {
    {"model.layers.0.self_attn.q_proj", 24, 16, 8, 16.0, 0},
    {"model.layers.0.self_attn.v_proj", 12, 16, 8, 16.0, 0},
};

static fp_adapter_t *at_rank(int rank, uint64_t seed)
{
    fp_module_desc_t d[2];
    memcpy(d, layout, sizeof d);
    d[0].rank = d[1].rank = rank;
    return fpt_random_adapter(d, 2, seed, 0);
}

/* The update vector, computed here: ΔA and (s_u/s_g)·ΔB of every module, concatenated. */
static double *vector(const fp_adapter_t *u, const fp_adapter_t *s, int rg, int frozen, size_t *n)
{
    size_t cap = 0;
    for (int i = 0; i < u->n; i++)
        cap += (size_t)u->mods[i].rank * (size_t)(u->mods[i].d_in + u->mods[i].d_out);
    double *v = calloc(cap, sizeof *v);
    size_t k = 0;
    for (int i = 0; i < u->n; i++) {
        const fp_lora_module_t *m = &u->mods[i], *sm = &s->mods[i];
        double ratio = (m->alpha / m->rank) / (m->alpha / rg);
        for (size_t j = 0; !frozen && j < (size_t)m->rank * (size_t)m->d_in; j++)
            v[k++] = (double)m->A[j] - sm->A[j];
        for (size_t j = 0; j < (size_t)m->d_out * (size_t)m->rank; j++)
            v[k++] = ratio * ((double)m->B[j] - sm->B[j]);
    }
    *n = k;
    return v;
}

/* Clipping: norm after = min(norm, C), direction kept — for fedavg (rank = r_global), ffa (A
 * frozen) and zeropad (a rank-4 site in a rank-8 federation). */
static void test_clip(void **state)
{
    (void)state;
    static const int cases[][3] = {{8, 8, 0}, {8, 8, 1}, {4, 8, 0}}; /* rank, r_global, frozen */
    for (size_t c = 0; c < 3; c++) {
        int rank = cases[c][0], rg = cases[c][1], frozen = cases[c][2];
        fp_adapter_t *s = at_rank(rank, 1), *u = at_rank(rank, 2);
        if (frozen) /* ffa: lora_A as sent */
            for (int i = 0; i < u->n; i++)
                memcpy(u->mods[i].A, s->mods[i].A,
                       (size_t)rank * (size_t)u->mods[i].d_in * sizeof(float));
        size_t n, n2;
        double *v0 = vector(u, s, rg, frozen, &n), before = fpt_norm(v0, n);
        assert_true(fabs(fp_dp_norm(u, s, rg, frozen) - before) < 1e-9 * before);
        double norm;
        int clipped;
        /* above C: onto it */
        fp_dp_clip(u, s, rg, frozen, before / 3, &norm, &clipped);
        assert_true(clipped);
        double *v1 = vector(u, s, rg, frozen, &n2), after = fpt_norm(v1, n2), dot = 0;
        for (size_t i = 0; i < n; i++)
            dot += v0[i] * v1[i];
        if (fabs(after - before / 3) > 1e-5 * before || fabs(dot / (before * after) - 1) > 1e-6)
            fail_msg("case %zu: norm %.9g (C %.9g), cosine %.9g", c, after, before / 3,
                     dot / (before * after));
        /* within C: untouched */
        fp_dp_clip(u, s, rg, frozen, after * 2, &norm, &clipped);
        assert_false(clipped);
        free(v0);
        free(v1);
        fp_adapter_free(s);
        fp_adapter_free(u);
    }
}

/* The noise in the aggregate: central (the coordinator adds N(0, σ²) to the sum, divided by
 * k) and distributed (each of k sites adds N(0, σ²/k) to its vector) give the same variance
 * per coordinate of the average, (σ/k)²; zeropad's rows divide by the sites that cover them. */
static void test_noise_scale(void **state)
{
    (void)state;
    uint8_t key[FP_NOISE_KEY] = {9};
    fp_noise_t *rng;
    assert_int_equal(fp_noise_new(&rng, key, NULL), 0);
    const double sigma = 0.8;
    const int k = 4;
    /* central: noise on a zero average */
    fp_adapter_t *z = at_rank(8, 3);
    for (int i = 0; i < z->n; i++) {
        memset(z->mods[i].A, 0, 8 * 16 * sizeof(float));
        memset(z->mods[i].B, 0, (size_t)z->mods[i].d_out * 8 * sizeof(float));
    }
    int ranks[4] = {8, 8, 8, 8}, zranks[4] = {8, 4, 4, 2};
    double s2 = 0;
    long cnt = 0;
    for (int trial = 0; trial < 300; trial++) {
        fp_adapter_t *m = NULL;
        fp_adapter_clone(z, &m, NULL);
        fp_dp_noise_average(m, ranks, k, 0, sigma, rng);
        for (int i = 0; i < m->n; i++) {
            for (int j = 0; j < 8 * 16; j++, cnt++)
                s2 += (double)m->mods[i].A[j] * m->mods[i].A[j];
            for (int j = 0; j < m->mods[i].d_out * 8; j++, cnt++)
                s2 += (double)m->mods[i].B[j] * m->mods[i].B[j];
        }
        fp_adapter_free(m);
    }
    double want = (sigma / k) * (sigma / k), tol = 6 * sqrt(2.0 / (double)cnt);
    if (fabs(s2 / (double)cnt / want - 1) > tol)
        fail_msg("central: variance %.6g, want %.6g", s2 / (double)cnt, want);
    /* distributed: k shares, summed, divided by k */
    double d2 = 0;
    long dn = 0;
    for (int trial = 0; trial < 300; trial++) {
        fp_adapter_t *sum = NULL;
        fp_adapter_clone(z, &sum, NULL);
        for (int s = 0; s < k; s++) {
            fp_adapter_t *u = NULL;
            fp_adapter_clone(z, &u, NULL);
            fp_dp_add_noise(u, 8, 0, sigma / sqrt((double)k), rng);
            for (int i = 0; i < u->n; i++) {
                for (int j = 0; j < 8 * 16; j++)
                    sum->mods[i].A[j] += u->mods[i].A[j] / k;
                for (int j = 0; j < u->mods[i].d_out * 8; j++)
                    sum->mods[i].B[j] += u->mods[i].B[j] / k;
            }
            fp_adapter_free(u);
        }
        for (int i = 0; i < sum->n; i++) {
            for (int j = 0; j < 8 * 16; j++, dn++)
                d2 += (double)sum->mods[i].A[j] * sum->mods[i].A[j];
            for (int j = 0; j < sum->mods[i].d_out * 8; j++, dn++)
                d2 += (double)sum->mods[i].B[j] * sum->mods[i].B[j];
        }
        fp_adapter_free(sum);
    }
    if (fabs(d2 / (double)dn / want - 1) > 6 * sqrt(2.0 / (double)dn))
        fail_msg("distributed: variance %.6g, want %.6g (as central)", d2 / (double)dn, want);
    /* zeropad coverage: rows 0-1 by 4 sites, 2-3 by 3, 4-7 by 1 */
    double row2[8] = {0};
    long rown[8] = {0};
    for (int trial = 0; trial < 400; trial++) {
        fp_adapter_t *m = NULL;
        fp_adapter_clone(z, &m, NULL);
        fp_dp_noise_average(m, zranks, k, 0, sigma, rng);
        for (int r = 0; r < 8; r++)
            for (int j = 0; j < 16; j++, rown[r]++)
                row2[r] += (double)m->mods[0].A[r * 16 + j] * m->mods[0].A[r * 16 + j];
        fp_adapter_free(m);
    }
    static const int cover[8] = {4, 4, 3, 3, 1, 1, 1, 1};
    for (int r = 0; r < 8; r++) {
        double w = (sigma / cover[r]) * (sigma / cover[r]);
        if (fabs(row2[r] / (double)rown[r] / w - 1) > 6 * sqrt(2.0 / (double)rown[r]))
            fail_msg("zeropad row %d: variance %.6g, want %.6g", r, row2[r] / (double)rown[r], w);
    }
    /* distributed verification's bound holds for a clipped vector with its share */
    fp_adapter_t *s = at_rank(8, 4), *u = at_rank(8, 5);
    double norm;
    int clipped;
    fp_dp_clip(u, s, 8, 0, 1.0, &norm, &clipped);
    fp_dp_add_noise(u, 8, 0, 0.05, rng);
    assert_true(fp_dp_norm(u, s, 8, 0) <= fp_dp_noised_bound(1.0, 0.05, fp_dp_dims(u, 0)));
    fp_adapter_free(s);
    fp_adapter_free(u);
    fp_adapter_free(z);
    fp_noise_free(rng);
}

static void test_combinations(void **state)
{
    (void)state;
    fp_err_t err = {0};
    assert_int_equal(fp_dp_check(FP_STRAT_FFA, FP_DP_DISTRIBUTED, 0, &err), 0);
    assert_int_equal(fp_dp_check(FP_STRAT_FEDAVG, FP_DP_CENTRAL, 0, &err), 0);
    assert_int_equal(fp_dp_check(FP_STRAT_ZEROPAD, FP_DP_CENTRAL, 0, &err), 0);
    assert_int_equal(fp_dp_check(FP_STRAT_ZEROPAD, FP_DP_DISTRIBUTED, 0, &err), -ENOTSUP);
    assert_err_contains(&err, "under-noised");
    assert_int_equal(fp_dp_check(FP_STRAT_ZEROPAD, FP_DP_CENTRAL, 1, &err), -ENOTSUP);
    for (int s = FP_STRAT_FLEXLORA; s <= FP_STRAT_FLORIST; s++) {
        assert_int_equal(fp_dp_check((fp_strategy_t)s, FP_DP_CENTRAL, 0, &err), -ENOTSUP);
        assert_err_contains(&err, "nonlinearly");
    }
    assert_int_equal(fp_dp_check(FP_STRAT_FLORA, FP_DP_OFF, 0, &err), 0);
    /* adaptive clipping: C moves toward the quantile; the update's share of z */
    assert_true(fp_dp_next_clip(1.0, 4.0, 4, 0.5, 0.2) < 1.0); /* all below: shrink */
    assert_true(fp_dp_next_clip(1.0, 0.0, 4, 0.5, 0.2) > 1.0);
    assert_true(fabs(fp_dp_update_multiplier(1.0, 1.0) - 1 / sqrt(0.75)) < 1e-12);
    assert_true(isnan(fp_dp_update_multiplier(1.0, 0.4)));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accountant),
        cmocka_unit_test(test_sampler),
        cmocka_unit_test(test_clip),
        cmocka_unit_test(test_noise_scale),
        cmocka_unit_test(test_combinations),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
