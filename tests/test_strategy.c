/* What the strategies mean (fp_strategy.h), against dense float64 references: the restart
 * running total, its exact truncation, the norm bound and its clipping, the checks on an
 * update, the initial adapter and a site's local start. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fp_strategy.h"
#include "fp_test.h"

static const fp_module_desc_t layout[] = {
    {"model.layers.0.self_attn.q_proj", 24, 16, 8, 16.0, 0},
    {"model.layers.0.self_attn.v_proj", 12, 16, 8, 16.0, 0},
};
#define NL 2

static fp_adapter_t *random_at(int rank, double alpha, int rslora, uint64_t seed)
{
    fp_module_desc_t d[NL];
    memcpy(d, layout, sizeof d);
    for (int i = 0; i < NL; i++) {
        d[i].rank = rank;
        d[i].alpha = alpha;
        d[i].rslora = rslora;
    }
    fp_adapter_t *ad = fpt_random_adapter(d, NL, seed, 0);
    assert_non_null(ad);
    return ad;
}

/* Dense ΔW of module name in ad (s·B·A), added to dw with coefficient c. */
static void dense(double *dw, const fp_adapter_t *ad, const char *name, double c)
{
    const fp_lora_module_t *m = &ad->mods[fp_adapter_find(ad, name)];
    fpt_dense_add(dw, m->B, m->A, m->d_out, m->d_in, m->rank, c * fp_module_scale(m));
}

static double dense_norm2(const fp_adapter_t *u, const fp_adapter_t *start)
{
    double sum = 0;
    for (int i = 0; i < NL; i++) {
        size_t n = (size_t)layout[i].d_out * (size_t)layout[i].d_in;
        double *dw = calloc(n, sizeof *dw);
        dense(dw, u, layout[i].name, 1);
        if (start)
            dense(dw, start, layout[i].name, -1);
        double nm = fpt_norm(dw, n);
        sum += nm * nm;
        free(dw);
    }
    return sum;
}

/* total + delta, stacked: exact, at the summed rank, for both scale conventions. */
static void test_accumulate_exact(void **state)
{
    (void)state;
    for (int rs = 0; rs < 2; rs++) {
        fp_adapter_t *t = random_at(3, 16, rs, 1), *d = random_at(2, 16, rs, 2), *o = NULL;
        fp_err_t err = {0};
        assert_int_equal(fp_strategy_accumulate(t, d, 0, &o, &err), 0);
        for (int i = 0; i < NL; i++) {
            size_t n = (size_t)layout[i].d_out * (size_t)layout[i].d_in;
            double *want = calloc(n, sizeof *want), *got = calloc(n, sizeof *got);
            dense(want, t, layout[i].name, 1);
            dense(want, d, layout[i].name, 1);
            dense(got, o, layout[i].name, 1);
            assert_int_equal(o->mods[fp_adapter_find(o, layout[i].name)].rank, 5);
            double rel = fpt_diff_norm(got, want, n) / fpt_norm(want, n);
            if (rel > 1e-6)
                fail_msg("module %s (rslora %d): relative error %.3g", layout[i].name, rs, rel);
            free(want);
            free(got);
        }
        fp_adapter_free(t);
        fp_adapter_free(d);
        fp_adapter_free(o);
    }
}

/* Above the cap: the best rank-cap approximation (Eckart–Young: the error is exactly the
 * energy of the dropped singular values). */
static void test_accumulate_cap(void **state)
{
    (void)state;
    fp_adapter_t *t = random_at(4, 16, 0, 3), *d = random_at(4, 16, 0, 4), *o = NULL;
    fp_err_t err = {0};
    const int cap = 3;
    assert_int_equal(fp_strategy_accumulate(t, d, cap, &o, &err), 0);
    for (int i = 0; i < NL; i++) {
        int r = layout[i].d_out, c = layout[i].d_in;
        size_t n = (size_t)r * (size_t)c;
        double *sum = calloc(n, sizeof *sum), *got = calloc(n, sizeof *got);
        double *s = calloc((size_t)(r < c ? r : c), sizeof *s);
        dense(sum, t, layout[i].name, 1);
        dense(sum, d, layout[i].name, 1);
        dense(got, o, layout[i].name, 1);
        assert_int_equal(o->mods[fp_adapter_find(o, layout[i].name)].rank, cap);
        fpt_singular_values(sum, r, c, s);
        double tail = 0;
        for (int k = cap; k < (r < c ? r : c); k++)
            tail += s[k] * s[k];
        double e = fpt_diff_norm(got, sum, n);
        if (fabs(e * e - tail) > 1e-4 * tail)
            fail_msg("module %s: error² %.6g, dropped energy %.6g", layout[i].name, e * e, tail);
        free(sum);
        free(got);
        free(s);
    }
    fp_adapter_free(o);
    /* at or under the cap: untouched stacking */
    assert_int_equal(fp_strategy_accumulate(t, d, 8, &o, &err), 0);
    assert_int_equal(o->mods[0].rank, 8);
    fp_adapter_free(o);
    fp_adapter_free(t);
    fp_adapter_free(d);
}

/* The norm bound: below it nothing changes; above it refuse, or clip onto it (restart:
 * scaled exactly; continue: moved back toward the start, to within the bound). */
static void test_bound(void **state)
{
    (void)state;
    fp_err_t err = {0};
    double norm;
    int clipped;
    /* restart: the upload is the contribution */
    fp_adapter_t *u = random_at(4, 16, 0, 5);
    double full = sqrt(dense_norm2(u, NULL));
    assert_int_equal(fp_strategy_bound(u, NULL, NULL, full * 2, 1, &norm, &clipped, &err), 0);
    assert_false(clipped);
    assert_true(fabs(norm - full) < 1e-6 * full);
    assert_int_equal(fp_strategy_bound(u, NULL, NULL, full / 3, 0, &norm, &clipped, &err), -EDOM);
    assert_err_contains(&err, "above the bound");
    assert_int_equal(fp_strategy_bound(u, NULL, NULL, full / 3, 1, &norm, &clipped, &err), 0);
    assert_true(clipped);
    double after = sqrt(dense_norm2(u, NULL));
    if (fabs(after - full / 3) > 1e-5 * full)
        fail_msg("restart clip: norm %.9g, bound %.9g", after, full / 3);
    fp_adapter_free(u);
    /* continue: the contribution is against the start */
    fp_adapter_t *s = random_at(4, 16, 0, 6), *c = random_at(4, 16, 0, 7);
    double moved = sqrt(dense_norm2(c, s));
    assert_int_equal(fp_strategy_update_norm(c, s, NULL, &norm, &err), 0);
    assert_true(fabs(norm - moved) < 1e-6 * moved);
    assert_int_equal(fp_strategy_bound(c, s, NULL, moved / 4, 1, &norm, &clipped, &err), 0);
    assert_true(clipped);
    after = sqrt(dense_norm2(c, s));
    if (after > moved / 4 * (1 + 1e-6) || after < moved / 4 * (1 - 1e-3))
        fail_msg("continue clip: norm %.9g, bound %.9g", after, moved / 4);
    fp_adapter_free(s);
    fp_adapter_free(c);
}

/* Update checks: the layout, ranks, and ffa's frozen A. */
static void test_check_update(void **state)
{
    (void)state;
    fp_err_t err = {0};
    fp_adapter_t *start = random_at(4, 16, 0, 8), *u = NULL;
    assert_int_equal(fp_adapter_clone(start, &u, &err), 0);
    u->mods[0].B[3] += 1.0f;
    assert_int_equal(fp_strategy_check_update(FP_STRAT_FFA, layout, NL, 4, u, start, &err), 0);
    u->mods[1].A[5] += 1e-3f;
    assert_int_equal(fp_strategy_check_update(FP_STRAT_FFA, layout, NL, 4, u, start, &err),
                     -EINVAL);
    assert_err_contains(&err, "lora_A frozen");
    assert_int_equal(fp_strategy_check_update(FP_STRAT_FEDAVG, layout, NL, 4, u, start, &err), 0);
    /* continue: exactly the assigned rank; restart: at most it */
    assert_int_equal(fp_strategy_check_update(FP_STRAT_FLEXLORA, layout, NL, 6, u, start, &err),
                     -EINVAL);
    assert_err_contains(&err, "assigned rank 6");
    assert_int_equal(fp_strategy_check_update(FP_STRAT_FLORA, layout, NL, 6, u, NULL, &err), 0);
    assert_true(fp_strategy_check_update(FP_STRAT_FLORA, layout, NL, 3, u, NULL, &err) < 0);
    u->mods[0].B[0] = NAN;
    assert_true(fp_strategy_check_update(FP_STRAT_FLORA, layout, NL, 6, u, NULL, &err) < 0);
    fp_adapter_free(u);
    fp_adapter_free(start);
}

/* The initial adapter and a site's local start. */
static void test_starts(void **state)
{
    (void)state;
    fp_err_t err = {0};
    fp_adapter_t *a = NULL, *b = NULL;
    assert_int_equal(fp_strategy_initial(FP_STRAT_FLEXLORA, layout, NL, 9, &a, &err), 0);
    for (int i = 0; i < a->n; i++) {
        const fp_lora_module_t *m = &a->mods[i];
        double lim = 1.0 / sqrt((double)m->d_in), amax = 0;
        assert_int_equal(m->rank, 8);
        for (size_t j = 0; j < (size_t)m->d_out * (size_t)m->rank; j++)
            assert_true(m->B[j] == 0.0f);
        for (size_t j = 0; j < (size_t)m->rank * (size_t)m->d_in; j++)
            amax = fabs(m->A[j]) > amax ? fabs(m->A[j]) : amax;
        assert_true(amax <= lim && amax > 0.5 * lim);
    }
    /* ffa: A from the federation's seed, what every site keeps */
    assert_int_equal(fp_strategy_initial(FP_STRAT_FFA, layout, NL, 9, &b, &err), 0);
    fp_adapter_t *ref = NULL;
    assert_int_equal(fp_adapter_new(&ref, layout, NL, &err), 0);
    fp_adapter_randomize(ref, 12345, 9, 0.0);
    for (int i = 0; i < NL; i++)
        assert_memory_equal(b->mods[i].A, ref->mods[i].A,
                            (size_t)b->mods[i].rank * (size_t)b->mods[i].d_in * sizeof(float));
    fp_adapter_free(ref);
    fp_adapter_free(b);
    /* restart: ΔW = 0 */
    assert_int_equal(fp_strategy_initial(FP_STRAT_FLORA, layout, NL, 9, &b, &err), 0);
    assert_int_equal(b->mods[0].rank, 1);
    assert_true(dense_norm2(b, NULL) == 0);
    fp_adapter_free(b);
    /* a site's start: continue trains a copy; restart a fresh adapter from the task seed */
    assert_int_equal(fp_strategy_local_start(0, a, 3, 1, &b, &err), 0);
    assert_int_equal(b->mods[0].rank, 8);
    assert_true(dense_norm2(b, a) == 0);
    fp_adapter_free(b);
    fp_adapter_t *c = NULL;
    assert_int_equal(fp_strategy_local_start(1, a, 3, 77, &b, &err), 0);
    assert_int_equal(fp_strategy_local_start(1, a, 3, 77, &c, &err), 0);
    assert_int_equal(b->mods[1].rank, 3);
    assert_true(dense_norm2(b, NULL) == 0); /* B = 0 */
    assert_memory_equal(b->mods[1].A, c->mods[1].A, 3 * 16 * sizeof(float));
    fp_adapter_free(c);
    assert_int_equal(fp_strategy_local_start(1, a, 3, 78, &c, &err), 0);
    assert_memory_not_equal(b->mods[1].A, c->mods[1].A, 3 * 16 * sizeof(float));
    fp_adapter_free(c);
    fp_adapter_free(b);
    fp_adapter_free(a);
}

static void test_site_rank(void **state)
{
    (void)state;
    assert_int_equal(fp_strategy_site_rank(FP_STRAT_FEDAVG, 8, 16, 2), 8);
    assert_int_equal(fp_strategy_site_rank(FP_STRAT_FFA, 8, 8, 0), 8);
    assert_int_equal(fp_strategy_site_rank(FP_STRAT_ZEROPAD, 8, 4, 0), 4);
    assert_int_equal(fp_strategy_site_rank(FP_STRAT_FLEXLORA, 8, 16, 0), 8);
    assert_int_equal(fp_strategy_site_rank(FP_STRAT_FLORA, 8, 16, 2), 2);
    assert_int_equal(fp_strategy_site_rank(FP_STRAT_FLORIST, 8, 0, 0), 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accumulate_exact),
        cmocka_unit_test(test_accumulate_cap),
        cmocka_unit_test(test_bound),
        cmocka_unit_test(test_check_update),
        cmocka_unit_test(test_starts),
        cmocka_unit_test(test_site_rank),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
