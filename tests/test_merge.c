/* Every merge strategy against a dense float64 reference on random shapes: d_in ≠ d_out,
 * ranks 1–64, 1–16 sites, unequal weights, mixed alpha and rsLoRA. Exact strategies must match
 * ΔW* = Σ p_k s_k B_k A_k to 1e-5 relative; truncations must reach the dense SVD's optimal
 * error; fedavg must equal the factor-wise average. */
#include "fp_test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_lowrank.h"
#include "fp_merge.h"
#include "fp_rng.h"

#define TRIALS 40
#define EXACT_TOL 1e-5

typedef struct trial {
    int k;                 /* sites */
    int d_out, d_in;
    fp_adapter_t *src[16];
    double w[16];
    double p[16];
    double *dw_star;       /* dense ΔW* of the one module, d_out × d_in */
    double norm_star;
} trial_t;

/* One module per adapter keeps the reference simple; multi-module adapters are covered by
 * test_multi_module_and_batches. */
static void make_trial(trial_t *t, fp_rng_t *rng, int equal_ranks, uint64_t shared_a_seed)
{
    memset(t, 0, sizeof *t);
    t->k = 1 + (int)fp_rng_below(rng, 16);
    do {
        t->d_out = 6 + (int)fp_rng_below(rng, 70);
        t->d_in = 6 + (int)fp_rng_below(rng, 70);
    } while (t->d_in == t->d_out);
    int r0 = 1 + (int)fp_rng_below(rng, 64);
    double alpha0 = 1 + (double)fp_rng_below(rng, 32);
    int rs0 = (int)fp_rng_below(rng, 2);
    double wsum = 0;
    for (int s = 0; s < t->k; s++) {
        fp_module_desc_t d = {"model.layers.3.mlp.up_proj", t->d_out, t->d_in, r0, alpha0, rs0};
        if (!equal_ranks) {
            d.rank = 1 + (int)fp_rng_below(rng, 64);
            d.alpha = 1 + (double)fp_rng_below(rng, 32);
            d.rslora = (int)fp_rng_below(rng, 2);
        }
        t->src[s] = fpt_random_adapter(&d, 1, fp_rng_u64(rng), shared_a_seed);
        t->w[s] = 0.1 + 10.0 * fp_rng_uniform(rng);
        wsum += t->w[s];
    }
    size_t n = (size_t)t->d_out * (size_t)t->d_in;
    t->dw_star = calloc(n, sizeof(double));
    assert_non_null(t->dw_star);
    for (int s = 0; s < t->k; s++) {
        const fp_lora_module_t *m = &t->src[s]->mods[0];
        t->p[s] = t->w[s] / wsum;
        fpt_dense_add(t->dw_star, m->B, m->A, m->d_out, m->d_in, m->rank,
                      t->p[s] * fp_module_scale(m));
    }
    t->norm_star = fpt_norm(t->dw_star, n);
}

static void free_trial(trial_t *t)
{
    for (int s = 0; s < t->k; s++)
        fp_adapter_free(t->src[s]);
    free(t->dw_star);
}

static fp_adapter_t *merge_trial(const trial_t *t, const fp_merge_opts_t *o)
{
    fp_adapter_t *out = NULL;
    fp_err_t err = {0};
    int rc = fp_merge(o, (const fp_adapter_t *const *)t->src, t->w, t->k, NULL, &out, &err);
    if (rc)
        print_error("merge (%s): %s\n", fp_strategy_name(o->strategy), err.msg);
    assert_int_equal(rc, 0);
    return out;
}

/* Dense ΔW of a merged module. */
static double *dense_of(const fp_adapter_t *ad)
{
    const fp_lora_module_t *m = &ad->mods[0];
    double *dw = calloc((size_t)m->d_out * (size_t)m->d_in, sizeof(double));
    assert_non_null(dw);
    fpt_dense_add(dw, m->B, m->A, m->d_out, m->d_in, m->rank, fp_module_scale(m));
    return dw;
}

static double rel_error_to_star(const trial_t *t, const fp_adapter_t *out)
{
    double *dw = dense_of(out);
    double e = fpt_diff_norm(dw, t->dw_star, (size_t)t->d_out * (size_t)t->d_in) / t->norm_star;
    free(dw);
    return e;
}

/* Dense optimal error of a rank-r approximation of ΔW*, and the spectrum. */
static double optimal_error(const trial_t *t, int r, double *sv, int *kout)
{
    int k = t->d_out < t->d_in ? t->d_out : t->d_in;
    fpt_singular_values(t->dw_star, t->d_out, t->d_in, sv);
    double e = 0;
    for (int i = r; i < k; i++)
        e += sv[i] * sv[i];
    *kout = k;
    return sqrt(e);
}

/* The factored error measure agrees with the dense one. */
static void check_merge_error_measure(const trial_t *t, const fp_adapter_t *out)
{
    double rel, ref;
    fp_err_t err = {0};
    assert_int_equal(fp_merge_error(out, (const fp_adapter_t *const *)t->src, t->w, t->k, &rel,
                                    &ref, &err), 0);
    double dense = rel_error_to_star(t, out);
    assert_true(fabs(ref - t->norm_star) <= 1e-9 * t->norm_star);
    assert_true(fabs(rel - dense) <= 1e-6 + 1e-6 * dense);
}

static void test_flora_is_exact(void **state)
{
    (void)state;
    fp_rng_t rng;
    fp_rng_seed(&rng, 101);
    for (int i = 0; i < TRIALS; i++) {
        trial_t t;
        make_trial(&t, &rng, 0, 0);
        fp_merge_opts_t o = {.strategy = FP_STRAT_FLORA};
        fp_adapter_t *out = merge_trial(&t, &o);
        int R = 0;
        for (int s = 0; s < t.k; s++)
            R += t.src[s]->mods[0].rank;
        assert_int_equal(out->mods[0].rank, R);
        double e = rel_error_to_star(&t, out);
        if (e > EXACT_TOL)
            print_error("flora trial %d: rel error %g\n", i, e);
        assert_true(e <= EXACT_TOL);
        check_merge_error_measure(&t, out);
        fp_adapter_free(out);
        free_trial(&t);
    }
}

static void test_ffa_is_exact_with_shared_a(void **state)
{
    (void)state;
    fp_rng_t rng;
    fp_rng_seed(&rng, 202);
    for (int i = 0; i < TRIALS; i++) {
        trial_t t;
        make_trial(&t, &rng, 1, 777 + (uint64_t)i);
        fp_merge_opts_t o = {.strategy = FP_STRAT_FFA};
        fp_adapter_t *out = merge_trial(&t, &o);
        assert_memory_equal(out->mods[0].A, t.src[0]->mods[0].A,
                            (size_t)out->mods[0].rank * (size_t)t.d_in * sizeof(float));
        double e = rel_error_to_star(&t, out);
        assert_true(e <= EXACT_TOL);
        fp_adapter_free(out);
        free_trial(&t);
    }
}

static void test_ffa_refuses_different_a(void **state)
{
    (void)state;
    fp_rng_t rng;
    fp_rng_seed(&rng, 203);
    trial_t t = {0};
    do {
        if (t.k)
            free_trial(&t);
        make_trial(&t, &rng, 1, 0); /* independent A per site */
    } while (t.k < 2);
    fp_merge_opts_t o = {.strategy = FP_STRAT_FFA};
    fp_adapter_t *out = NULL;
    fp_err_t err = {0};
    assert_int_equal(fp_merge(&o, (const fp_adapter_t *const *)t.src, t.w, t.k, NULL, &out,
                              &err), -EINVAL);
    assert_null(out);
    assert_err_contains(&err, "differs from the shared frozen A");
    free_trial(&t);
}

static void test_florist_exact_at_tau_one_and_optimal_below(void **state)
{
    (void)state;
    fp_rng_t rng;
    fp_rng_seed(&rng, 303);
    for (int i = 0; i < TRIALS; i++) {
        trial_t t;
        make_trial(&t, &rng, 0, 0);
        fp_merge_opts_t o = {.strategy = FP_STRAT_FLORIST, .energy = 1.0};
        fp_adapter_t *out = merge_trial(&t, &o);
        assert_true(rel_error_to_star(&t, out) <= EXACT_TOL);
        fp_adapter_free(out);

        double tau = 0.5 + 0.45 * fp_rng_uniform(&rng);
        o.energy = tau;
        out = merge_trial(&t, &o);
        int r = out->mods[0].rank, k;
        double sv[80];
        double opt = optimal_error(&t, r, sv, &k);
        double total = 0, kept = 0, kept_less = 0;
        for (int j = 0; j < k; j++) {
            total += sv[j] * sv[j];
            if (j < r)
                kept += sv[j] * sv[j];
            if (j < r - 1)
                kept_less += sv[j] * sv[j];
        }
        /* the smallest rank holding τ of the energy */
        assert_true(kept >= tau * total * (1 - 1e-9));
        assert_true(kept_less < tau * total * (1 + 1e-9));
        double got = rel_error_to_star(&t, out) * t.norm_star;
        assert_true(fabs(got - opt) <= EXACT_TOL * t.norm_star);
        check_merge_error_measure(&t, out);
        fp_adapter_free(out);
        free_trial(&t);
    }
}

static void test_flexlora_reaches_the_optimal_truncation(void **state)
{
    (void)state;
    fp_rng_t rng;
    fp_rng_seed(&rng, 404);
    for (int i = 0; i < TRIALS; i++) {
        trial_t t;
        make_trial(&t, &rng, 0, 0);
        int rmax = 0;
        for (int s = 0; s < t.k; s++)
            rmax = t.src[s]->mods[0].rank > rmax ? t.src[s]->mods[0].rank : rmax;
        int ranks[2] = {0, 1 + (int)fp_rng_below(&rng, 80)};
        for (int v = 0; v < 2; v++) {
            fp_merge_opts_t o = {.strategy = FP_STRAT_FLEXLORA, .rank = ranks[v]};
            fp_adapter_t *out = merge_trial(&t, &o);
            int r = ranks[v] ? ranks[v] : rmax;
            assert_int_equal(out->mods[0].rank, r); /* padded when fewer components exist */
            int k;
            double sv[80];
            double opt = optimal_error(&t, r, sv, &k);
            double got = rel_error_to_star(&t, out) * t.norm_star;
            if (fabs(got - opt) > EXACT_TOL * t.norm_star)
                print_error("flexlora trial %d rank %d: error %g, optimum %g\n", i, r, got, opt);
            assert_true(fabs(got - opt) <= EXACT_TOL * t.norm_star);

            /* Redistribution: a site of rank r_k gets the best rank-r_k approximation. */
            int rk = t.src[0]->mods[0].rank;
            fp_adapter_t *site;
            fp_err_t err = {0};
            assert_int_equal(fp_adapter_at_ranks_of(out, t.src[0], &site, &err), 0);
            assert_int_equal(site->mods[0].rank, rk);
            assert_true(site->mods[0].alpha == out->mods[0].alpha);
            double site_err = rel_error_to_star(&t, site) * t.norm_star;
            double site_opt = optimal_error(&t, rk < r ? rk : r, sv, &k);
            assert_true(fabs(site_err - site_opt) <= EXACT_TOL * t.norm_star);
            fp_adapter_free(site);
            fp_adapter_free(out);
        }
        free_trial(&t);
    }
}

static void fedavg_is_the_factorwise_average(void)
{
    fp_rng_t rng;
    fp_rng_seed(&rng, 505);
    int inexact_seen = 0;
    for (int i = 0; i < TRIALS; i++) {
        trial_t t;
        make_trial(&t, &rng, 1, 0);
        fp_merge_opts_t o = {.strategy = FP_STRAT_FEDAVG};
        fp_adapter_t *out = merge_trial(&t, &o);
        const fp_lora_module_t *m = &out->mods[0];
        double s_out = fp_module_scale(m);
        size_t na = (size_t)m->rank * (size_t)t.d_in, nb = (size_t)t.d_out * (size_t)m->rank;
        double *ref_a = calloc(na, sizeof(double)), *ref_b = calloc(nb, sizeof(double));
        double *got_a = malloc(na * sizeof(double)), *got_b = malloc(nb * sizeof(double));
        for (int s = 0; s < t.k; s++) {
            const fp_lora_module_t *x = &t.src[s]->mods[0];
            for (size_t e = 0; e < na; e++)
                ref_a[e] += t.p[s] * x->A[e];
            for (size_t e = 0; e < nb; e++)
                ref_b[e] += t.p[s] * fp_module_scale(x) * x->B[e];
        }
        for (size_t e = 0; e < na; e++)
            got_a[e] = m->A[e];
        for (size_t e = 0; e < nb; e++)
            got_b[e] = s_out * m->B[e];
        assert_true(fpt_diff_norm(got_a, ref_a, na) <= 1e-6 * fpt_norm(ref_a, na));
        assert_true(fpt_diff_norm(got_b, ref_b, nb) <= 1e-6 * fpt_norm(ref_b, nb));
        /* ...which is not ΔW* once two sites differ: the cross terms B_i A_j. */
        if (t.k >= 2) {
            assert_true(rel_error_to_star(&t, out) > 1e-3);
            inexact_seen++;
        }
        free(ref_a);
        free(ref_b);
        free(got_a);
        free(got_b);
        fp_adapter_free(out);
        free_trial(&t);
    }
    assert_true(inexact_seen > 0);
}

/* Dense reference of zero-padding: component c averaged over the sites whose rank exceeds c,
 * with weights w_k (or w_k‖s_kB_kA_k‖_F) renormalised per component. */
static double *zeropad_reference(const trial_t *t, int norm_weighted, int *rmax_out)
{
    int rmax = 0;
    for (int s = 0; s < t->k; s++)
        rmax = t->src[s]->mods[0].rank > rmax ? t->src[s]->mods[0].rank : rmax;
    double wk[16];
    for (int s = 0; s < t->k; s++) {
        const fp_lora_module_t *m = &t->src[s]->mods[0];
        wk[s] = t->w[s];
        if (norm_weighted) {
            double *d = calloc((size_t)t->d_out * (size_t)t->d_in, sizeof(double));
            fpt_dense_add(d, m->B, m->A, m->d_out, m->d_in, m->rank, fp_module_scale(m));
            wk[s] *= fpt_norm(d, (size_t)t->d_out * (size_t)t->d_in);
            free(d);
        }
    }
    double *A = calloc((size_t)rmax * (size_t)t->d_in, sizeof(double));
    double *B = calloc((size_t)t->d_out * (size_t)rmax, sizeof(double));
    for (int c = 0; c < rmax; c++) {
        double wsum = 0;
        for (int s = 0; s < t->k; s++)
            if (t->src[s]->mods[0].rank > c)
                wsum += wk[s];
        for (int s = 0; s < t->k; s++) {
            const fp_lora_module_t *m = &t->src[s]->mods[0];
            if (m->rank <= c)
                continue;
            double p = wk[s] / wsum;
            for (int j = 0; j < t->d_in; j++)
                A[(size_t)c * (size_t)t->d_in + (size_t)j] += p * m->A[(size_t)c * m->d_in + j];
            for (int i = 0; i < t->d_out; i++)
                B[(size_t)i * (size_t)rmax + (size_t)c] +=
                    p * fp_module_scale(m) * m->B[(size_t)i * (size_t)m->rank + (size_t)c];
        }
    }
    double *dw = calloc((size_t)t->d_out * (size_t)t->d_in, sizeof(double));
    for (int i = 0; i < t->d_out; i++)
        for (int c = 0; c < rmax; c++)
            for (int j = 0; j < t->d_in; j++)
                dw[(size_t)i * (size_t)t->d_in + (size_t)j] +=
                    B[(size_t)i * (size_t)rmax + (size_t)c] * A[(size_t)c * (size_t)t->d_in + (size_t)j];
    free(A);
    free(B);
    *rmax_out = rmax;
    return dw;
}

static void test_zeropad_matches_its_definition(void **state)
{
    (void)state;
    fp_rng_t rng;
    fp_rng_seed(&rng, 606);
    for (int i = 0; i < TRIALS; i++) {
        trial_t t;
        make_trial(&t, &rng, 0, 0);
        for (int nw = 0; nw < 2; nw++) {
            fp_merge_opts_t o = {.strategy = FP_STRAT_ZEROPAD, .norm_weighted = nw};
            fp_adapter_t *out = merge_trial(&t, &o);
            int rmax;
            double *ref = zeropad_reference(&t, nw, &rmax);
            assert_int_equal(out->mods[0].rank, rmax);
            double *got = dense_of(out);
            size_t n = (size_t)t.d_out * (size_t)t.d_in;
            double e = fpt_diff_norm(got, ref, n) / fpt_norm(ref, n);
            if (e > EXACT_TOL)
                print_error("zeropad trial %d nw %d: rel error %g\n", i, nw, e);
            assert_true(e <= EXACT_TOL);
            free(ref);
            free(got);
            fp_adapter_free(out);
        }
        free_trial(&t);
    }
}

static void test_zeropad_equals_fedavg_at_equal_ranks(void **state)
{
    (void)state;
    fp_rng_t rng;
    fp_rng_seed(&rng, 607);
    trial_t t;
    make_trial(&t, &rng, 1, 0);
    fp_merge_opts_t oz = {.strategy = FP_STRAT_ZEROPAD}, of = {.strategy = FP_STRAT_FEDAVG};
    fp_adapter_t *z = merge_trial(&t, &oz), *f = merge_trial(&t, &of);
    double *dz = dense_of(z), *df = dense_of(f);
    size_t n = (size_t)t.d_out * (size_t)t.d_in;
    assert_true(fpt_diff_norm(dz, df, n) <= 1e-6 * fpt_norm(df, n));
    free(dz);
    free(df);
    fp_adapter_free(z);
    fp_adapter_free(f);
    free_trial(&t);
}

/* Multi-module adapters fed one at a time, or in one call, give the same result; streaming
 * strategies hold the same memory for 4 sites as for 64. */
static void test_multi_module_and_batches(void **state)
{
    (void)state;
    static const fp_module_desc_t mods[] = {
        {"model.layers.0.self_attn.q_proj", 48, 32, 8, 16, 0},
        {"model.layers.0.self_attn.k_proj", 16, 32, 8, 16, 0},
        {"model.layers.0.mlp.down_proj", 32, 88, 8, 16, 0},
    };
    enum { K = 64 };
    fp_adapter_t *src[K];
    double w[K];
    fp_rng_t rng;
    fp_rng_seed(&rng, 808);
    for (int s = 0; s < K; s++) {
        src[s] = fpt_random_adapter(mods, 3, 9000 + (uint64_t)s, 5);
        w[s] = 1 + (double)fp_rng_below(&rng, 100);
    }
    fp_err_t err = {0};
    for (int st = 0; st < FP_STRAT_COUNT; st++) {
        fp_merge_opts_t o = {.strategy = (fp_strategy_t)st};
        int k = st == FP_STRAT_FLORA || st == FP_STRAT_FLORIST || st == FP_STRAT_FLEXLORA ? 6 : K;
        fp_adapter_t *all = NULL, *one = NULL;
        assert_int_equal(fp_merge(&o, (const fp_adapter_t *const *)src, w, k, NULL, &all, &err),
                         0);
        fp_module_desc_t *layout;
        assert_int_equal(fp_merge_layout((const fp_adapter_t *const *)src, k, o.strategy, NULL,
                                         &layout, &err), 0);
        fp_merger_t *m;
        assert_int_equal(fp_merger_new(&m, &o, layout, 3, &err), 0);
        size_t bytes_start = fp_merger_bytes(m);
        for (int s = 0; s < k; s++) {
            assert_int_equal(fp_merger_add(m, (const fp_adapter_t *const *)&src[s], &w[s], 1,
                                           NULL, &err), 0);
            if (s == 3 && fp_strategy_streams(o.strategy))
                assert_int_equal(fp_merger_bytes(m), bytes_start);
        }
        if (fp_strategy_streams(o.strategy))
            assert_int_equal(fp_merger_bytes(m), bytes_start); /* 64 sites: no growth */
        assert_int_equal(fp_merger_finish(m, &one, &err), 0);
        assert_int_equal(all->n, 3);
        for (int i = 0; i < 3; i++) {
            const fp_lora_module_t *a = &all->mods[i], *b = &one->mods[i];
            assert_int_equal(a->rank, b->rank);
            double *da = calloc((size_t)a->d_out * (size_t)a->d_in, sizeof(double));
            double *db = calloc((size_t)a->d_out * (size_t)a->d_in, sizeof(double));
            fpt_dense_add(da, a->B, a->A, a->d_out, a->d_in, a->rank, fp_module_scale(a));
            fpt_dense_add(db, b->B, b->A, b->d_out, b->d_in, b->rank, fp_module_scale(b));
            size_t n = (size_t)a->d_out * (size_t)a->d_in;
            assert_true(fpt_diff_norm(da, db, n) <= 1e-5 * fpt_norm(da, n));
            free(da);
            free(db);
        }
        fp_merger_free(m);
        free(layout);
        fp_adapter_free(all);
        fp_adapter_free(one);
    }
    for (int s = 0; s < K; s++)
        fp_adapter_free(src[s]);
}

static void test_refusals(void **state)
{
    (void)state;
    fp_module_desc_t a = {"model.layers.0.self_attn.q_proj", 16, 12, 4, 8, 0};
    fp_module_desc_t b = a;
    b.rank = 8;
    fp_adapter_t *x = fpt_random_adapter(&a, 1, 1, 0), *y = fpt_random_adapter(&b, 1, 2, 0);
    const fp_adapter_t *srcs[2] = {x, y};
    double w[2] = {1, 2};
    const char *labels[2] = {"site-a", "site-b"};
    fp_err_t err = {0};
    fp_adapter_t *out = NULL;
    fp_merge_opts_t o = {.strategy = FP_STRAT_FEDAVG};
    assert_int_equal(fp_merge(&o, srcs, w, 2, labels, &out, &err), -EINVAL);
    assert_err_contains(&err, "site-b");
    assert_err_contains(&err, "equal ranks");

    /* a NaN anywhere is refused, naming the site, module and factor */
    o.strategy = FP_STRAT_FLEXLORA;
    y->mods[0].A[5] = INFINITY;
    assert_int_equal(fp_merge(&o, srcs, w, 2, labels, &out, &err), -EDOM);
    assert_err_contains(&err, "site-b: module 'model.layers.0.self_attn.q_proj': lora_A");
    y->mods[0].A[5] = 0;

    /* mismatched shapes */
    fp_module_desc_t c = a;
    c.d_in = 13;
    fp_adapter_t *z = fpt_random_adapter(&c, 1, 3, 0);
    srcs[1] = z;
    assert_int_equal(fp_merge(&o, srcs, w, 2, labels, &out, &err), -EINVAL);
    assert_err_contains(&err, "16×13");
    /* mismatched module sets */
    fp_module_desc_t dd = a;
    dd.name = "model.layers.0.self_attn.v_proj";
    fp_adapter_t *v = fpt_random_adapter(&dd, 1, 4, 0);
    srcs[1] = v;
    assert_int_equal(fp_merge(&o, srcs, w, 2, labels, &out, &err), -EINVAL);
    assert_err_contains(&err, "missing");

    /* weights */
    srcs[1] = y;
    double zero[2] = {0, 0}, neg[2] = {1, -1};
    assert_int_equal(fp_merge(&o, srcs, zero, 2, labels, &out, &err), -EINVAL);
    assert_err_contains(&err, "sum to zero");
    assert_int_equal(fp_merge(&o, srcs, neg, 2, labels, &out, &err), -EINVAL);
    assert_err_contains(&err, "non-negative");
    /* a zero weight simply drops that site */
    double one_zero[2] = {1, 0};
    assert_int_equal(fp_merge(&o, srcs, one_zero, 2, labels, &out, &err), 0);
    fp_adapter_free(out);

    /* florist energy bounds */
    fp_merge_opts_t of = {.strategy = FP_STRAT_FLORIST, .energy = 1.5};
    fp_merger_t *m = NULL;
    assert_int_equal(fp_merger_new(&m, &of, &a, 1, &err), -EINVAL);
    assert_null(m);
    /* a spent merger refuses further use */
    o.strategy = FP_STRAT_FEDAVG;
    assert_int_equal(fp_merger_new(&m, &o, &a, 1, &err), 0);
    assert_int_equal(fp_merger_add(m, (const fp_adapter_t *const *)&y, w, 1, NULL, &err),
                     -EINVAL);
    assert_int_equal(fp_merger_add(m, (const fp_adapter_t *const *)&x, w, 1, NULL, &err),
                     -EINVAL);
    assert_err_contains(&err, "failed add");
    fp_merger_free(m);
    assert_int_equal(fp_merger_new(&m, &o, &a, 1, &err), 0);
    assert_int_equal(fp_merger_finish(m, &out, &err), -EINVAL);
    assert_err_contains(&err, "no adapters");
    fp_merger_free(m);

    fp_adapter_free(x);
    fp_adapter_free(y);
    fp_adapter_free(z);
    fp_adapter_free(v);
}

/* The factored SVD's singular values equal a dense SVD's, including R > min(d). */
static void test_factored_svd_spectrum(void **state)
{
    (void)state;
    fp_rng_t rng;
    fp_rng_seed(&rng, 909);
    for (int i = 0; i < TRIALS; i++) {
        trial_t t;
        make_trial(&t, &rng, 0, 0);
        fp_lr_term_t terms[16];
        for (int s = 0; s < t.k; s++) {
            const fp_lora_module_t *m = &t.src[s]->mods[0];
            terms[s] = (fp_lr_term_t){m->B, m->A, m->rank, t.p[s] * fp_module_scale(m)};
        }
        fp_lr_svd_t svd;
        fp_err_t err = {0};
        assert_int_equal(fp_lowrank_svd(t.d_out, t.d_in, terms, t.k, &svd, &err), 0);
        double sv[80];
        int k;
        optimal_error(&t, 0, sv, &k);
        for (int j = 0; j < svd.k && j < k; j++)
            assert_true(fabs(svd.S[j] - sv[j]) <= 1e-10 * sv[0]);
        double norm;
        assert_int_equal(fp_lowrank_norm(t.d_out, t.d_in, terms, t.k, &norm, &err), 0);
        assert_true(fabs(norm - t.norm_star) <= 1e-10 * t.norm_star);
        fp_lr_svd_free(&svd);
        free_trial(&t);
    }
}

/* Streaming merges find NaN and inf inside the accumulation itself: in any batch, in A or B,
 * behind a zero weight, and overflow of finite values. */
static void streaming_refuses_non_finite(void)
{
    enum { K = 20 }; /* two batches */
    fp_module_desc_t mods[2] = {
        {"model.layers.0.self_attn.q_proj", 40, 24, 6, 12, 0},
        {"model.layers.0.self_attn.v_proj", 8, 24, 6, 12, 0},
    };
    fp_adapter_t *src[K];
    double w[K];
    for (int s = 0; s < K; s++) {
        src[s] = fpt_random_adapter(mods, 2, 50 + (uint64_t)s, 77);
        w[s] = 1 + s;
    }
    const fp_adapter_t *const *cs = (const fp_adapter_t *const *)src;
    fp_err_t err = {0};
    fp_adapter_t *out = NULL;
    static const fp_strategy_t kinds[3] = {FP_STRAT_FEDAVG, FP_STRAT_FFA, FP_STRAT_ZEROPAD};
    for (int kind = 0; kind < 3; kind++) {
        fp_merge_opts_t o = {.strategy = kinds[kind]};
        /* a NaN in B of site 18 (second batch) */
        src[17]->mods[1].B[13] = NAN;
        int rc_ = fp_merge(&o, cs, w, K, NULL, &out, &err);
        if (rc_ != -EDOM)
            print_error("kind %d: %s\n", kind, err.msg);
        assert_int_equal(rc_, -EDOM);
        assert_null(out);
        assert_err_contains(&err, "adapter 18: module 'model.layers.0.self_attn.v_proj': lora_B");
        /* ...even when that site's weight is zero */
        double w0 = w[17];
        w[17] = 0;
        assert_int_equal(fp_merge(&o, cs, w, K, NULL, &out, &err), -EDOM);
        w[17] = w0;
        src[17]->mods[1].B[13] = 0.5f;
        /* inf in A (for ffa: in the shared A every site holds) */
        float a7 = src[3]->mods[0].A[7];
        for (int s = 0; s < K; s++)
            if (kind == 1 || s == 3)
                src[s]->mods[0].A[7] = -INFINITY;
        assert_int_equal(fp_merge(&o, cs, w, K, NULL, &out, &err), -EDOM);
        assert_err_contains(&err, "lora_A holds a non-finite value");
        for (int s = 0; s < K; s++)
            if (kind == 1 || s == 3)
                src[s]->mods[0].A[7] = a7;
        assert_int_equal(fp_merge(&o, cs, w, K, NULL, &out, &err), 0);
        fp_adapter_free(out);
        out = NULL;
    }
    /* finite values whose weighted sum overflows float32 */
    for (int s = 0; s < K; s++)
        src[s]->mods[0].B[0] = 3e38f;
    fp_merge_opts_t o = {.strategy = FP_STRAT_FEDAVG};
    assert_int_equal(fp_merge(&o, cs, w, K, NULL, &out, &err), -EDOM);
    assert_err_contains(&err, "overflows float32");
    for (int s = 0; s < K; s++)
        fp_adapter_free(src[s]);
}

/* The streaming kernel (fp_merge_kernel.c) at every vector level this CPU runs. */
static void test_fedavg_is_the_factorwise_average(void **state)
{
    (void)state;
    for (int v = fpt_simd_top(); v >= 0; v--) {
        fpt_simd_use(v);
        fedavg_is_the_factorwise_average();
    }
}

static void test_streaming_refuses_non_finite(void **state)
{
    (void)state;
    for (int v = fpt_simd_top(); v >= 0; v--) {
        fpt_simd_use(v);
        streaming_refuses_non_finite();
    }
}

static void test_at_rank_pads_exactly(void **state)
{
    (void)state;
    fp_module_desc_t a = {"model.layers.0.self_attn.o_proj", 20, 14, 6, 12, 1};
    fp_adapter_t *x = fpt_random_adapter(&a, 1, 42, 0), *big, *small;
    fp_err_t err = {0};
    assert_int_equal(fp_adapter_at_rank(x, 10, &big, &err), 0);
    assert_int_equal(big->mods[0].rank, 10);
    double *d0 = calloc(20 * 14, sizeof(double)), *d1 = calloc(20 * 14, sizeof(double));
    fpt_dense_add(d0, x->mods[0].B, x->mods[0].A, 20, 14, 6, fp_module_scale(&x->mods[0]));
    fpt_dense_add(d1, big->mods[0].B, big->mods[0].A, 20, 14, 10,
                  fp_module_scale(&big->mods[0]));
    assert_true(fpt_diff_norm(d0, d1, 280) <= 1e-6 * fpt_norm(d0, 280));
    assert_int_equal(fp_adapter_at_rank(x, 0, &small, &err), -EINVAL);
    free(d0);
    free(d1);
    fp_adapter_free(big);
    fp_adapter_free(x);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_flora_is_exact),
        cmocka_unit_test(test_ffa_is_exact_with_shared_a),
        cmocka_unit_test(test_ffa_refuses_different_a),
        cmocka_unit_test(test_florist_exact_at_tau_one_and_optimal_below),
        cmocka_unit_test(test_flexlora_reaches_the_optimal_truncation),
        cmocka_unit_test_teardown(test_fedavg_is_the_factorwise_average, fpt_simd_restore),
        cmocka_unit_test(test_zeropad_matches_its_definition),
        cmocka_unit_test(test_zeropad_equals_fedavg_at_equal_ranks),
        cmocka_unit_test(test_multi_module_and_batches),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_factored_svd_spectrum),
        cmocka_unit_test_teardown(test_streaming_refuses_non_finite, fpt_simd_restore),
        cmocka_unit_test(test_at_rank_pads_exactly),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
