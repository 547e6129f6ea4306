/* Server optimizers (peft/adapter/fp_server_opt.c): each one's two rounds on a hand example
 * against its formula written out; the factored momentum of exact strategies against a dense
 * float64 one (its truncation is the best of its rank: the residual is the tail of the dense
 * singular values). */
#include "fp_test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_fed_opt.h"
#include "fp_fs.h"
#include "fp_rng.h"
#include "fp_safetensors.h"
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
            fp_lr_term_t t[2] = {{MB, MA, r, beta}, {DB, DA, RD, 1.0}};
            assert_int_equal(fp_sopt_lowrank_sum(DO, DI, t, 2, r, 1.0, MB, MA, &trunc, &err), 0);
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
            if (r == 4 && round == 1 && trunc != 0)
                fail_msg("rank 2 momentum cut at rank 4");
        }
    }
}

/* One module's ΔW = s·B·A, dense (float64). */
static void dense_of(const fp_adapter_t *ad, double *M)
{
    const fp_lora_module_t *m = &ad->mods[0];
    memset(M, 0, (size_t)m->d_out * (size_t)m->d_in * sizeof *M);
    fpt_dense_add(M, m->B, m->A, m->d_out, m->d_in, m->rank, fp_module_scale(m));
}

static fp_adapter_t *random_adapter(fp_rng_t *rng, int d_out, int d_in, int r)
{
    fp_module_desc_t d = {"layers.0.q_proj", d_out, d_in, r, 8, 0};
    fp_adapter_t *ad = NULL;
    assert_int_equal(fp_adapter_new(&ad, &d, 1, NULL), 0);
    for (int i = 0; i < r * d_in; i++)
        ad->mods[0].A[i] = (float)fp_rng_normal(rng);
    for (int i = 0; i < d_out * r; i++)
        ad->mods[0].B[i] = (float)(0.1 * fp_rng_normal(rng));
    return ad;
}

/* got (rank r) against the dense target: its residual is exactly the target's tail of
 * singular values past r (Eckart–Young: the best of its rank), and what was reported cut. */
static void best_of_rank(const char *what, const double *target, const double *got, int d_out,
                         int d_in, int r, double trunc)
{
    double s[64], all = 0, tail = 0, res = 0;
    fpt_singular_values(target, d_out, d_in, s);
    for (int i = 0; i < (d_in < d_out ? d_in : d_out); i++) {
        all += s[i] * s[i];
        tail += i >= r ? s[i] * s[i] : 0;
    }
    for (int i = 0; i < d_out * d_in; i++)
        res += (target[i] - got[i]) * (target[i] - got[i]);
    if (fabs(sqrt(res) - sqrt(tail)) > 1e-5 * sqrt(all))
        fail_msg("%s: residual %.8g, the dense tail %.8g (of %.8g)", what, sqrt(res), sqrt(tail),
                 sqrt(all));
    if (trunc >= 0 && fabs(trunc - sqrt(tail / all)) > 1e-4)
        fail_msg("%s: truncation %.6g reported, dense %.6g", what, trunc, sqrt(tail / all));
}

/* The coordinator's step for a strategy that merges products (fp_fed_opt_step, as the
 * aggregation runs it) against dense float64: sgd W + η·(W̄ − W) and two rounds of avgm
 * M ← β·M + (W̄ − W), W + η·M, each the best of the merge's rank, across a change of rank
 * (and so of LoRA scale) between the start and the merge, as flora's rounds have. */
static void test_fed_opt_exact_against_dense(void **state)
{
    (void)state;
    enum { DO = 10, DI = 8 };
    fp_rng_t rng;
    fp_rng_seed(&rng, 20261206);
    char *dir = fp_path_join(fpt_dir, "optimizer");
    assert_int_equal(fp_fs_mkdirs(dir, 0755, NULL), 0);
    double W[DO * DI], G[DO * DI], T[DO * DI], X[DO * DI], M1[DO * DI], M2[DO * DI];
    fp_err_t err = {0};
    /* sgd, η 1.7: start rank 2, merge rank 4 */
    fp_sopt_cfg_t sgd = {FP_SOPT_SGD, 1.7, 0.9, 0.99, 1e-3};
    fp_adapter_t *w0 = random_adapter(&rng, DO, DI, 2), *g = random_adapter(&rng, DO, DI, 4);
    dense_of(w0, W);
    dense_of(g, G);
    fp_opt_state_t *st = NULL;
    double trunc = -1;
    assert_int_equal(fp_fed_opt_step(&sgd, FP_STRAT_FLORA, dir, "s0", w0, g, &st, &trunc, &err), 0);
    assert_null(st); /* sgd keeps nothing */
    for (int i = 0; i < DO * DI; i++)
        T[i] = W[i] + 1.7 * (G[i] - W[i]);
    dense_of(g, X);
    best_of_rank("sgd", T, X, DO, DI, 4, trunc);
    fp_adapter_free(g);
    /* avgm, η 0.8, β 0.6: round 1 from w0 (no momentum kept), round 2 from its result */
    fp_sopt_cfg_t avgm = {FP_SOPT_AVGM, 0.8, 0.6, 0.99, 1e-3};
    g = random_adapter(&rng, DO, DI, 4);
    dense_of(g, G);
    assert_int_equal(fp_fed_opt_step(&avgm, FP_STRAT_FLORA, dir, "s0", w0, g, &st, &trunc, &err), 0);
    assert_int_equal(fp_fed_opt_store(dir, "s1", "s0", st, &err), 0);
    fp_fed_opt_free(st);
    /* the momentum kept: the best rank 4 of W̄ − W */
    char *sp = fp_path_join(dir, "s1.safetensors");
    fp_st_file_t *f = NULL;
    assert_int_equal(fp_st_open(&f, sp, &err), 0);
    const fp_st_tensor_t *mb = fp_st_find(f, "layers.0.q_proj.momentum_B");
    const fp_st_tensor_t *ma = fp_st_find(f, "layers.0.q_proj.momentum_A");
    assert_true(mb && ma && mb->shape[1] == 4);
    float MB[DO * 4], MA[4 * DI];
    assert_int_equal(fp_st_read_f32(f, mb, MB, &err), 0);
    assert_int_equal(fp_st_read_f32(f, ma, MA, &err), 0);
    fp_st_close(f);
    memset(M1, 0, sizeof M1);
    fpt_dense_add(M1, MB, MA, DO, DI, 4, 1.0);
    for (int i = 0; i < DO * DI; i++)
        T[i] = G[i] - W[i];
    best_of_rank("avgm round 1's momentum", T, M1, DO, DI, 4, -1);
    dense_of(g, X);
    for (int i = 0; i < DO * DI; i++)
        T[i] = W[i] + 0.8 * M1[i];
    best_of_rank("avgm round 1", T, X, DO, DI, 4, -1);
    /* round 2 starts from round 1's global (sha s1), with its momentum */
    fp_adapter_t *w1 = g;
    double W1[DO * DI];
    dense_of(w1, W1);
    g = random_adapter(&rng, DO, DI, 4);
    dense_of(g, G);
    assert_int_equal(fp_fed_opt_step(&avgm, FP_STRAT_FLORA, dir, "s1", w1, g, &st, &trunc, &err), 0);
    assert_int_equal(fp_fed_opt_store(dir, "s2", "s1", st, &err), 0);
    fp_fed_opt_free(st);
    free(sp);
    sp = fp_path_join(dir, "s2.safetensors");
    assert_int_equal(fp_st_open(&f, sp, &err), 0);
    assert_int_equal(fp_st_read_f32(f, fp_st_find(f, "layers.0.q_proj.momentum_B"), MB, &err), 0);
    assert_int_equal(fp_st_read_f32(f, fp_st_find(f, "layers.0.q_proj.momentum_A"), MA, &err), 0);
    fp_st_close(f);
    memset(M2, 0, sizeof M2);
    fpt_dense_add(M2, MB, MA, DO, DI, 4, 1.0);
    for (int i = 0; i < DO * DI; i++)
        T[i] = 0.6 * M1[i] + G[i] - W1[i];
    best_of_rank("avgm round 2's momentum", T, M2, DO, DI, 4, -1);
    dense_of(g, X);
    for (int i = 0; i < DO * DI; i++)
        T[i] = W1[i] + 0.8 * M2[i];
    best_of_rank("avgm round 2", T, X, DO, DI, 4, -1);
    /* only the states a redone round can read are kept: s1 (round 2's start) and s2 */
    char *s0p = fp_path_join(dir, "s0.safetensors");
    assert_false(fp_fs_exists(s0p));
    assert_true(fp_fs_exists(sp));
    free(s0p);
    /* an adaptive kind is refused for a strategy that merges products */
    fp_sopt_cfg_t adam = {FP_SOPT_ADAM, 0.01, 0.9, 0.99, 1e-3};
    assert_int_equal(fp_fed_opt_step(&adam, FP_STRAT_FLEXLORA, dir, "s2", w1, g, &st, &trunc,
                                     &err), -ENOTSUP);
    /* a state file that is there but unreadable fails the step (never a silent fresh start) */
    assert_int_equal(fp_fs_write_file(sp, "garbage", 7, 0644, NULL), 0);
    assert_int_equal(fp_fed_opt_step(&avgm, FP_STRAT_FLORA, dir, "s2", w1, g, &st, &trunc, &err),
                     -EIO);
    free(sp);
    fp_adapter_free(w0);
    fp_adapter_free(w1);
    fp_adapter_free(g);
    free(dir);
}

/* A head (tensors trained in full: values, not factors) under the server optimizer, two rounds
 * as the coordinator runs them (state stored and read back): adam beside a linear strategy's
 * factors (the factors moved as without a head), avgm beside an exact strategy's; each head
 * value against the formula written out in float64. */
static const fp_whole_desc_t head[2] = {{"classifier.bias", 3, 1}, {"classifier.weight", 3, 4}};

static fp_adapter_t *with_head(fp_rng_t *rng, int r)
{
    fp_adapter_t *ad = random_adapter(rng, 6, 5, r);
    assert_int_equal(fp_adapter_set_whole(ad, head, 2, NULL), 0);
    for (int i = 0; i < 2; i++)
        for (int e = 0; e < head[i].rows * head[i].cols; e++)
            ad->whole[i].v[e] = (float)fp_rng_normal(rng);
    return ad;
}

static void test_fed_opt_head(void **state)
{
    (void)state;
    enum { NH = 15 };
    fp_rng_t rng;
    fp_rng_seed(&rng, 77);
    char *dir = fp_path_join(fpt_dir, "optimizer-head");
    assert_int_equal(fp_fs_mkdirs(dir, 0755, NULL), 0);
    const fp_sopt_cfg_t cfg[2] = {{FP_SOPT_ADAM, 0.05, 0.9, 0.99, 1e-3},
                                  {FP_SOPT_AVGM, 0.8, 0.6, 0.99, 1e-3}};
    const fp_strategy_t strat[2] = {FP_STRAT_FEDAVG, FP_STRAT_FLORA};
    fp_err_t err = {0};
    for (int k = 0; k < 2; k++) {
        const fp_sopt_cfg_t *c = &cfg[k];
        fp_adapter_t *w = with_head(&rng, 2);
        double x[NH], m[NH] = {0}, v[NH];
        for (int e = 0; e < NH; e++) {
            x[e] = e < 3 ? w->whole[0].v[e] : w->whole[1].v[e - 3];
            v[e] = c->tau * c->tau;
        }
        char prev[8] = "h0", cur[8];
        for (int round = 1; round <= 2; round++) {
            fp_adapter_t *g = with_head(&rng, 2), *bare = NULL, *wbare = NULL;
            assert_int_equal(fp_adapter_clone(g, &bare, NULL), 0);
            assert_int_equal(fp_adapter_set_whole(bare, NULL, 0, NULL), 0);
            assert_int_equal(fp_adapter_clone(w, &wbare, NULL), 0);
            assert_int_equal(fp_adapter_set_whole(wbare, NULL, 0, NULL), 0);
            fp_opt_state_t *st = NULL, *st2 = NULL;
            double trunc;
            snprintf(cur, sizeof cur, "h%d", round);
            for (int e = 0; e < NH; e++) { /* the formula, float64 */
                double d = (e < 3 ? g->whole[0].v[e] : g->whole[1].v[e - 3]) - x[e], step;
                if (c->kind == FP_SOPT_AVGM) {
                    step = m[e] = c->beta1 * m[e] + d;
                } else {
                    m[e] = c->beta1 * m[e] + (1 - c->beta1) * d;
                    v[e] = c->beta2 * v[e] + (1 - c->beta2) * d * d;
                    step = m[e] / (sqrt(v[e]) + c->tau);
                }
                x[e] += c->lr * step;
            }
            if (fp_fed_opt_step(c, strat[k], dir, prev, w, g, &st, &trunc, &err) != 0)
                fail_msg("%s: %s", fp_sopt_name(c->kind), fp_err_msg(&err));
            assert_int_equal(fp_fed_opt_store(dir, cur, prev, st, &err), 0);
            for (int e = 0; e < NH; e++) {
                double got = e < 3 ? g->whole[0].v[e] : g->whole[1].v[e - 3];
                if (fabs(got - x[e]) > 2e-6 * (1 + fabs(x[e])))
                    fail_msg("%s round %d: head value %d is %.9g, the formula %.9g",
                             fp_sopt_name(c->kind), round, e, got, x[e]);
            }
            /* the factors move as they do without a head (a linear kind's state has its own
             * directory: it is read by the start's sha) */
            char *bdir = fp_path_join(dir, "bare");
            assert_int_equal(fp_fs_mkdirs(bdir, 0755, NULL), 0);
            assert_int_equal(fp_fed_opt_step(c, strat[k], bdir, prev, wbare, bare, &st2, &trunc,
                                             &err), 0);
            assert_int_equal(fp_fed_opt_store(bdir, cur, prev, st2, &err), 0);
            const fp_lora_module_t *a = &g->mods[0], *b = &bare->mods[0];
            assert_int_equal(a->rank, b->rank);
            assert_memory_equal(a->A, b->A, (size_t)a->rank * a->d_in * sizeof *a->A);
            assert_memory_equal(a->B, b->B, (size_t)a->d_out * a->rank * sizeof *a->B);
            free(bdir);
            fp_fed_opt_free(st);
            fp_fed_opt_free(st2);
            fp_adapter_free(bare);
            fp_adapter_free(wbare);
            fp_adapter_free(w);
            w = g;
            memcpy(prev, cur, sizeof prev);
        }
        /* a merge whose head is not the start's shape is refused by name */
        fp_adapter_t *g = with_head(&rng, 2);
        fp_whole_desc_t other[2] = {{"classifier.bias", 4, 1}, {"classifier.weight", 4, 4}};
        assert_int_equal(fp_adapter_set_whole(g, other, 2, NULL), 0);
        fp_opt_state_t *st = NULL;
        double trunc;
        assert_int_equal(fp_fed_opt_step(c, strat[k], dir, prev, w, g, &st, &trunc, &err),
                         -EINVAL);
        assert_err_contains(&err, "'classifier.bias' changed shape");
        fp_adapter_free(g);
        fp_adapter_free(w);
    }
    /* avgm over a linear strategy keeps m only, sgd neither: whatever memory their state
     * lands in (freed NaNs here, as a coordinator's heap holds after many rounds), a finite
     * step passes */
    fp_adapter_t *w = with_head(&rng, 2), *g = with_head(&rng, 2);
    size_t bytes = 2 * (2 * (6 + 5) + NH) * sizeof(float);
    float *poison[2];
    for (int i = 0; i < 2; i++) {
        poison[i] = malloc(bytes);
        for (size_t e = 0; e < bytes / sizeof(float); e++)
            poison[i][e] = NAN;
    }
    free(poison[1]);
    free(poison[0]);
    fp_opt_state_t *st = NULL;
    double trunc;
    if (fp_fed_opt_step(&cfg[1], FP_STRAT_FEDAVG, dir, "none", w, g, &st, &trunc, &err) != 0)
        fail_msg("avgm on fedavg: %s", fp_err_msg(&err));
    fp_fed_opt_free(st);
    for (int i = 0; i < 2; i++) { /* sgd at lr ≠ 1 keeps neither m nor v */
        poison[i] = malloc(bytes);
        for (size_t e = 0; e < bytes / sizeof(float); e++)
            poison[i][e] = NAN;
    }
    free(poison[1]);
    free(poison[0]);
    const fp_sopt_cfg_t sgd = {FP_SOPT_SGD, 0.5, 0.9, 0.99, 1e-3};
    if (fp_fed_opt_step(&sgd, FP_STRAT_FEDAVG, dir, "none", w, g, &st, &trunc, &err) != 0)
        fail_msg("sgd at lr 0.5 on fedavg: %s", fp_err_msg(&err));
    fp_fed_opt_free(st);
    fp_adapter_free(w);
    fp_adapter_free(g);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_each_optimizer_two_rounds),
        cmocka_unit_test(test_names_and_bounds),
        cmocka_unit_test(test_lowrank_momentum_against_dense),
        cmocka_unit_test(test_fed_opt_exact_against_dense),
        cmocka_unit_test(test_fed_opt_head),
    };
    return cmocka_run_group_tests(tests, fpt_setup_dir, fpt_teardown_dir);
}
