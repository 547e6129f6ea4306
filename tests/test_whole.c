/* Tensors trained in full beside the LoRA factors (PEFT's modules_to_save: a classifier
 * head) through everything an adapter goes through: every merge strategy (their weighted
 * average against float64, and the factors' merge unchanged by them), the tensor stream, PEFT
 * directories and the coordinator's factor files, differential privacy's update vector,
 * secure aggregation's linear vector and exact merges' two sums, a restart strategy's
 * accumulation and a site's start; and the readers that cannot take them refuse them by name. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_adapter_stream.h"
#include "fp_dp.h"
#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_merge.h"
#include "fp_model.h"
#include "fp_rng.h"
#include "fp_sa_merge.h"
#include "fp_safetensors.h"
#include "fp_strategy.h"
#include "fp_test.h"
#include "fp_transformer.h"

enum { K = 3 };
static const fp_whole_desc_t head[2] = {{"classifier.weight", 4, 6}, {"classifier.bias", 4, 1}};

/* Site k's adapter: two modules at rank r, random factors and head (values from seed). */
static fp_adapter_t *site(int r, uint64_t seed, uint64_t a_seed)
{
    fp_module_desc_t d[2] = {{"enc.0.query", 6, 6, r, 8, 0}, {"enc.0.value", 6, 6, r, 8, 0}};
    fp_adapter_t *ad = fpt_random_adapter(d, 2, seed, a_seed);
    fp_err_t err = {0};
    assert_int_equal(fp_adapter_set_whole(ad, head, 2, &err), 0);
    fp_rng_t rng;
    fp_rng_seed(&rng, seed * 31 + 7);
    for (int i = 0; i < ad->nwhole; i++)
        fp_rng_fill_normal(&rng, ad->whole[i].v, (size_t)ad->whole[i].rows * ad->whole[i].cols,
                           0.5);
    return ad;
}

/* A copy without its tensors trained in full. */
static fp_adapter_t *factors_only(const fp_adapter_t *ad)
{
    fp_adapter_t *c = NULL;
    assert_int_equal(fp_adapter_clone(ad, &c, NULL), 0);
    assert_int_equal(fp_adapter_set_whole(c, NULL, 0, NULL), 0);
    return c;
}

/* The largest |got − Σ w_k v_k / Σ w| over every value of the tensors trained in full,
 * relative to the largest reference value (float64). */
static double whole_err(const fp_adapter_t *got, fp_adapter_t *const *src, const double *w,
                        int k)
{
    double worst = 0, big = 0, ws = 0;
    for (int j = 0; j < k; j++)
        ws += w[j];
    assert_int_equal(got->nwhole, 2);
    for (int i = 0; i < got->nwhole; i++) {
        const fp_whole_t *g = &got->whole[i];
        for (size_t e = 0; e < (size_t)g->rows * g->cols; e++) {
            double ref = 0;
            for (int j = 0; j < k; j++)
                ref += w[j] * src[j]->whole[fp_adapter_whole_find(src[j], g->name)].v[e];
            ref /= ws;
            worst = fmax(worst, fabs(g->v[e] - ref));
            big = fmax(big, fabs(ref));
        }
    }
    return worst / big;
}

static void test_every_strategy(void **state)
{
    (void)state;
    const double w[K] = {3, 1, 2};
    for (int s = 0; s < FP_STRAT_COUNT; s++) {
        int equal = fp_strategy_equal_ranks((fp_strategy_t)s);
        fp_adapter_t *src[K], *bare[K], *got = NULL, *ref = NULL;
        for (int k = 0; k < K; k++) {
            src[k] = site(equal ? 4 : 2 + 2 * k, 10 + k, s == FP_STRAT_FFA ? 99 : 0);
            bare[k] = factors_only(src[k]);
        }
        fp_merge_opts_t o = {(fp_strategy_t)s, 0, 0, 0};
        fp_err_t err = {0};
        if (fp_merge(&o, (const fp_adapter_t *const *)src, w, K, NULL, &got, &err) != 0)
            fail_msg("%s: %s", fp_strategy_name((fp_strategy_t)s), fp_err_msg(&err));
        assert_int_equal(fp_merge(&o, (const fp_adapter_t *const *)bare, w, K, NULL, &ref, &err),
                         0);
        double e = whole_err(got, src, w, K);
        if (!(e < 1e-6))
            fail_msg("%s: the head is not the weighted average (%g)",
                     fp_strategy_name((fp_strategy_t)s), e);
        /* the factors merge exactly as they do without a head */
        assert_int_equal(got->n, ref->n);
        for (int i = 0; i < got->n; i++) {
            assert_int_equal(got->mods[i].rank, ref->mods[i].rank);
            assert_memory_equal(got->mods[i].A, ref->mods[i].A,
                                (size_t)got->mods[i].rank * got->mods[i].d_in * sizeof(float));
            assert_memory_equal(got->mods[i].B, ref->mods[i].B,
                                (size_t)got->mods[i].rank * got->mods[i].d_out * sizeof(float));
        }
        /* a source without the head, or with another shape, is refused by name */
        fp_adapter_t *mixed[2] = {src[0], bare[1]};
        fp_adapter_free(got);
        double w2[2] = {1, 1};
        assert_int_equal(fp_merge(&o, (const fp_adapter_t *const *)mixed, w2, 2, NULL, &got,
                                  &err), -EINVAL);
        assert_err_contains(&err, "classifier.bias' is missing");
        for (int k = 0; k < K; k++) {
            fp_adapter_free(src[k]);
            fp_adapter_free(bare[k]);
        }
        fp_adapter_free(ref);
    }
    /* a non-finite head value is refused, naming the tensor */
    fp_adapter_t *a = site(4, 1, 0), *b = site(4, 2, 0), *out = NULL;
    b->whole[1].v[5] = NAN; /* whole[] is sorted: 1 is classifier.weight */
    fp_adapter_t *ab[2] = {a, b};
    double w2[2] = {1, 1};
    fp_merge_opts_t o = {FP_STRAT_FEDAVG, 0, 0, 0};
    fp_err_t err = {0};
    assert_int_equal(fp_merge(&o, (const fp_adapter_t *const *)ab, w2, 2, NULL, &out, &err),
                     -EDOM);
    assert_err_contains(&err, "classifier.weight");
    fp_adapter_free(a);
    fp_adapter_free(b);
}

static void same_adapter(const fp_adapter_t *a, const fp_adapter_t *b)
{
    assert_int_equal(a->n, b->n);
    for (int i = 0; i < a->n; i++) {
        assert_string_equal(a->mods[i].name, b->mods[i].name);
        assert_memory_equal(a->mods[i].A, b->mods[i].A,
                            (size_t)a->mods[i].rank * a->mods[i].d_in * sizeof(float));
        assert_memory_equal(a->mods[i].B, b->mods[i].B,
                            (size_t)a->mods[i].rank * a->mods[i].d_out * sizeof(float));
    }
    assert_int_equal(a->nwhole, b->nwhole);
    for (int i = 0; i < a->nwhole; i++) {
        assert_string_equal(a->whole[i].name, b->whole[i].name);
        assert_int_equal(a->whole[i].rows, b->whole[i].rows);
        assert_int_equal(a->whole[i].cols, b->whole[i].cols);
        assert_memory_equal(a->whole[i].v, b->whole[i].v,
                            (size_t)a->whole[i].rows * a->whole[i].cols * sizeof(float));
    }
}

static void test_stream_and_files(void **state)
{
    (void)state;
    fp_adapter_t *a = site(4, 3, 0), *back = NULL;
    fp_err_t err = {0};
    /* the stream: factors, then the head under base_model.model. */
    fp_stream_tensor_t *t = NULL;
    int n = 0;
    uint64_t len = 0;
    assert_int_equal(fp_adapter_stream_layout(a, &t, &n, &len, &err), 0);
    assert_int_equal(n, 6);
    assert_string_equal(t[4].name, "base_model.model.classifier.bias");
    assert_string_equal(t[5].name, "base_model.model.classifier.weight");
    assert_int_equal(len, 4 * (2 * (4 * 6 + 6 * 4) + 4 + 24));
    char *buf = malloc(len);
    fp_adapter_stream_write(a, buf);
    assert_int_equal(fp_adapter_stream_read(buf, len, t, n, 8, 0, &back, &err), 0);
    same_adapter(a, back);
    fp_adapter_free(back);
    /* a trailing tensor outside the model's namespace is neither */
    t[5].name = "classifier.weight";
    assert_int_equal(fp_adapter_stream_read(buf, len, t, n, 8, 0, &back, &err), -EBADMSG);
    assert_err_contains(&err, "neither a LoRA factor nor a tensor trained in full");
    free(buf);
    free(t);
    /* a PEFT directory: modules_to_save, the bias one-dimensional as PyTorch has it */
    char *dir = fpt_mkdtemp(), path[4096];
    snprintf(path, sizeof path, "%s/ad", dir);
    assert_int_equal(fp_hfpeft_save(a, path, &err), 0);
    char *cfg = NULL;
    size_t cl;
    snprintf(path, sizeof path, "%s/ad/adapter_config.json", dir);
    assert_int_equal(fp_fs_read_file(path, 1 << 20, &cfg, &cl, NULL), 0);
    assert_contains(cfg, "\"modules_to_save\": [\n    \"classifier\"\n  ]");
    free(cfg);
    fp_st_file_t *st = NULL;
    snprintf(path, sizeof path, "%s/ad/adapter_model.safetensors", dir);
    assert_int_equal(fp_st_open(&st, path, &err), 0);
    int seen = 0;
    for (size_t i = 0; i < fp_st_count(st); i++) {
        const fp_st_tensor_t *x = fp_st_get(st, i);
        if (!strcmp(x->name, "base_model.model.classifier.bias")) {
            assert_int_equal(x->ndim, 1);
            assert_int_equal(x->shape[0], 4);
            seen++;
        }
    }
    assert_int_equal(seen, 1);
    fp_st_close(st);
    snprintf(path, sizeof path, "%s/ad", dir);
    assert_int_equal(fp_hfpeft_load(path, FP_LOAD_MAP, &back, &err), 0);
    same_adapter(a, back);
    fp_adapter_free(back);
    /* the coordinator's factor file */
    snprintf(path, sizeof path, "%s/g.safetensors", dir);
    assert_int_equal(fp_hfpeft_write_factors(a, path, NULL, &err), 0);
    assert_int_equal(fp_hfpeft_load_factors(path, 8, 0, FP_LOAD_MAP, &back, &err), 0);
    same_adapter(a, back);
    fp_adapter_free(back);
    fpt_rmtree(dir);
    free(dir);
    fp_adapter_free(a);
}

/* The update vector of DP holds the head's change; secure aggregation's linear vector its
 * weighted sum. */
static void test_privacy_and_secure(void **state)
{
    (void)state;
    fp_adapter_t *s = site(4, 5, 0), *u = site(4, 6, 0);
    double lora2 = 0, head2 = 0;
    for (int i = 0; i < u->n; i++) {
        for (size_t e = 0; e < (size_t)4 * 6; e++) {
            double da = (double)u->mods[i].A[e] - s->mods[i].A[e];
            double db = (double)u->mods[i].B[e] - s->mods[i].B[e];
            lora2 += da * da + db * db;
        }
    }
    for (int i = 0; i < u->nwhole; i++)
        for (size_t e = 0; e < (size_t)u->whole[i].rows * u->whole[i].cols; e++) {
            double d = (double)u->whole[i].v[e] - s->whole[i].v[e];
            head2 += d * d;
        }
    double norm = fp_dp_norm(u, s, 4, 0);
    assert_true(fabs(norm - sqrt(lora2 + head2)) < 1e-9 * norm);
    assert_int_equal(fp_dp_dims(u, 0), 2 * 48 + 28);
    double before;
    int clipped;
    fp_dp_clip(u, s, 4, 0, 0.5 * norm, &before, &clipped);
    assert_true(clipped);
    assert_true(fabs(fp_dp_norm(u, s, 4, 0) - 0.5 * norm) < 1e-5 * norm);
    fp_adapter_free(s);
    fp_adapter_free(u);

    const fp_strategy_t lin[3] = {FP_STRAT_FEDAVG, FP_STRAT_FFA, FP_STRAT_ZEROPAD};
    const double w[K] = {5, 2, 1};
    for (int j = 0; j < 3; j++) {
        fp_adapter_t *src[K], *clear = NULL, *got = NULL;
        for (int k = 0; k < K; k++)
            src[k] = site(4, 20 + k, lin[j] == FP_STRAT_FFA ? 7 : 0);
        fp_merge_opts_t o = {lin[j], 0, 0, 0};
        fp_err_t err = {0};
        assert_int_equal(fp_merge(&o, (const fp_adapter_t *const *)src, w, K, NULL, &clear, &err),
                         0);
        fp_module_desc_t layout[2] = {fp_module_desc(&src[0]->mods[0]),
                                      fp_module_desc(&src[0]->mods[1])};
        size_t dim = fp_sa_linear_dim(lin[j], layout, 2, head, 2);
        assert_int_equal(dim, fp_sa_linear_dim(lin[j], layout, 2, NULL, 0) + 28 +
                                  (lin[j] == FP_STRAT_ZEROPAD));
        float *x = malloc(dim * sizeof *x);
        double *sum = calloc(dim, sizeof *sum);
        for (int k = 0; k < K; k++) {
            assert_int_equal(fp_sa_linear_encode(lin[j], layout, 2, head, 2, src[k], w[k], x,
                                                 &err), 0);
            for (size_t d = 0; d < dim; d++)
                sum[d] += x[d];
        }
        assert_int_equal(fp_sa_linear_decode(lin[j], layout, 2, head, 2, src[0], sum, &got,
                                             &err), 0);
        double e = whole_err(got, src, w, K);
        if (!(e < 1e-6))
            fail_msg("%s secure: the head is not the weighted average (%g)",
                     fp_strategy_name(lin[j]), e);
        assert_true(fpt_product_rel(got, clear) < 1e-5);
        /* a site whose head does not fit the federation's is refused */
        fp_whole_desc_t other[2] = {{"classifier.weight", 4, 6}, {"classifier.bias", 5, 1}};
        assert_int_equal(fp_sa_linear_encode(lin[j], layout, 2, other, 2, src[0], 1, x, &err),
                         -EINVAL);
        assert_err_contains(&err, "classifier.bias' is 4 × 1, expected 5 × 1");
        free(x);
        free(sum);
        fp_adapter_free(got);
        fp_adapter_free(clear);
        for (int k = 0; k < K; k++)
            fp_adapter_free(src[k]);
    }
}

/* The exact merges' two sums (the double sketch) carry the head in the second after the
 * modules' Z: decoded, it is the weighted average, and the factors are what the same sums make
 * without a head. The sums are taken in the clear here (test_secagg masks them). */
static double *sketch_sum(fp_sa_sketch_t *site_sk, fp_adapter_t *const *src, const double *w,
                          int second, size_t dim)
{
    float *x = malloc(dim * sizeof *x);
    double *sum = calloc(dim, sizeof *sum);
    for (int k = 0; k < K; k++) {
        int rc = second ? fp_sa_sketch_encode_z(site_sk, src[k], w[k], x, NULL)
                        : fp_sa_sketch_encode_y(site_sk, src[k], w[k], x, NULL);
        assert_int_equal(rc, 0);
        for (size_t d = 0; d < dim; d++)
            sum[d] += x[d];
    }
    free(x);
    return sum;
}

static fp_adapter_t *two_sums(const fp_module_desc_t *layout, const fp_whole_desc_t *wh, int nw,
                              fp_adapter_t *const *src, const double *w,
                              const fp_sa_sketch_out_t *o)
{
    fp_sa_sketch_t *sk = NULL, *site_sk = NULL;
    const int k = 3 * 4 + 8;
    assert_int_equal(fp_sa_sketch_new_sums(&sk, layout, 2, wh, nw, k, NULL), 0);
    assert_int_equal(fp_sa_sketch_new(&site_sk, layout, 2, wh, nw, k, 99, NULL), 0);
    double *y = sketch_sum(site_sk, src, w, 0, fp_sa_sketch_dim_y(sk));
    assert_int_equal(fp_sa_sketch_basis(sk, y, NULL), 0);
    size_t nq;
    const double *Q = fp_sa_sketch_q(sk, &nq);
    assert_int_equal(fp_sa_sketch_set_q(site_sk, Q, nq, NULL), 0);
    double *z = sketch_sum(site_sk, src, w, 1, fp_sa_sketch_dim_z(sk));
    fp_adapter_t *got = NULL;
    fp_err_t err = {0};
    if (fp_sa_sketch_decode(sk, z, o, &got, &err) != 0)
        fail_msg("sketch decode: %s", fp_err_msg(&err));
    free(y);
    free(z);
    fp_sa_sketch_free(sk);
    fp_sa_sketch_free(site_sk);
    return got;
}

static void test_secure_sketch(void **state)
{
    (void)state;
    const double w[K] = {5, 2, 1};
    const fp_strategy_t ex[3] = {FP_STRAT_FLEXLORA, FP_STRAT_FLORA, FP_STRAT_FLORIST};
    fp_adapter_t *src[K], *bare[K];
    for (int k = 0; k < K; k++) {
        src[k] = site(4, 40 + k, 0);
        bare[k] = factors_only(src[k]);
    }
    fp_module_desc_t layout[2] = {fp_module_desc(&src[0]->mods[0]),
                                  fp_module_desc(&src[0]->mods[1])};
    fp_sa_sketch_t *sk = NULL, *nohead = NULL;
    assert_int_equal(fp_sa_sketch_new_sums(&sk, layout, 2, head, 2, 20, NULL), 0);
    assert_int_equal(fp_sa_sketch_new_sums(&nohead, layout, 2, NULL, 0, 20, NULL), 0);
    assert_int_equal(fp_sa_sketch_dim_z(sk), fp_sa_sketch_dim_z(nohead) + 28);
    assert_int_equal(fp_sa_sketch_dim_y(sk), fp_sa_sketch_dim_y(nohead));
    fp_sa_sketch_free(nohead);
    fp_sa_sketch_free(sk);
    for (int j = 0; j < 3; j++) {
        fp_sa_sketch_out_t o = {ex[j], ex[j] == FP_STRAT_FLORA ? 12 : 4, 0.9, 0};
        fp_adapter_t *got = two_sums(layout, head, 2, src, w, &o);
        fp_adapter_t *ref = two_sums(layout, NULL, 0, bare, w, &o);
        double e = whole_err(got, src, w, K);
        if (!(e < 1e-6))
            fail_msg("%s secure: the head is not the weighted average (%g)",
                     fp_strategy_name(ex[j]), e);
        assert_int_equal(ref->nwhole, 0);
        for (int i = 0; i < got->n; i++)
            assert_int_equal(got->mods[i].rank, ref->mods[fp_adapter_find(ref,
                                                                          got->mods[i].name)].rank);
        if (!(fpt_product_rel(got, ref) < 1e-6))
            fail_msg("%s secure: the head changes the factors (%g)", fp_strategy_name(ex[j]),
                     fpt_product_rel(got, ref));
        fp_adapter_free(got);
        fp_adapter_free(ref);
    }
    /* a site whose head does not fit the federation's is refused in the second sum */
    fp_whole_desc_t other[2] = {{"classifier.weight", 4, 6}, {"classifier.bias", 5, 1}};
    fp_sa_sketch_t *site_sk = NULL;
    assert_int_equal(fp_sa_sketch_new(&site_sk, layout, 2, other, 2, 20, 3, NULL), 0);
    float *x = malloc(fp_sa_sketch_dim_z(site_sk) * sizeof *x);
    fp_err_t err = {0};
    assert_int_equal(fp_sa_sketch_encode_z(site_sk, src[0], 1, x, &err), -EINVAL);
    assert_err_contains(&err, "classifier.bias' is 4 × 1, expected 5 × 1");
    free(x);
    fp_sa_sketch_free(site_sk);
    for (int k = 0; k < K; k++) {
        fp_adapter_free(src[k]);
        fp_adapter_free(bare[k]);
    }
}

/* Restart strategies: the head is a value, not a change — a site goes on from the global's,
 * the accumulated global takes the round's. A decoder refuses an adapter with a head. */
static void test_restart_and_refusals(void **state)
{
    (void)state;
    fp_adapter_t *g = site(4, 8, 0), *r = site(2, 9, 0), *start = NULL, *acc = NULL;
    fp_err_t err = {0};
    assert_int_equal(fp_strategy_local_start(1, g, 2, 5, &start, &err), 0);
    assert_int_equal(start->nwhole, 2);
    assert_memory_equal(start->whole[1].v, g->whole[1].v, 24 * sizeof(float));
    assert_int_equal(fp_strategy_accumulate(g, r, 0, &acc, &err), 0);
    assert_int_equal(acc->mods[0].rank, 6);
    assert_memory_equal(acc->whole[1].v, r->whole[1].v, 24 * sizeof(float));
    assert_memory_equal(acc->whole[0].v, r->whole[0].v, 4 * sizeof(float));
    /* the norm bound of a continue strategy counts the head's change and clips it too */
    fp_adapter_t *u = NULL;
    assert_int_equal(fp_adapter_clone(g, &u, &err), 0);
    u->whole[1].v[3] += 100.0f; /* only the head moved */
    double norm;
    int clipped;
    assert_int_equal(fp_strategy_bound(u, g, NULL, 1.0, 0, &norm, &clipped, &err), -EDOM);
    assert_true(fabs(norm - 100.0) < 1e-3);
    assert_int_equal(fp_strategy_bound(u, g, NULL, 1.0, 1, &norm, &clipped, &err), 0);
    assert_true(clipped);
    assert_true(fabs(u->whole[1].v[3] - g->whole[1].v[3] - 1.0f) < 1e-3);
    fp_adapter_free(u);
    /* a restart strategy's: ‖s·B·A‖ of the upload and the head's change from the round's
     * global head, scaled together onto the bound */
    fp_adapter_t *ru = NULL, *bare = factors_only(r);
    assert_int_equal(fp_adapter_clone(r, &ru, &err), 0);
    double nf, nh2 = 0, full;
    assert_int_equal(fp_strategy_update_norm(bare, NULL, NULL, &nf, &err), 0);
    for (int i = 0; i < ru->nwhole; i++) {
        const fp_whole_t *gw = &g->whole[fp_adapter_whole_find(g, ru->whole[i].name)];
        for (int e = 0; e < ru->whole[i].rows * ru->whole[i].cols; e++)
            nh2 += pow((double)ru->whole[i].v[e] - gw->v[e], 2);
    }
    full = sqrt(nf * nf + nh2);
    assert_int_equal(fp_strategy_update_norm(ru, NULL, g, &norm, &err), 0);
    if (!(fabs(norm - full) < 1e-5 * full))
        fail_msg("restart norm with a head %.8g, factors and head apart %.8g", norm, full);
    assert_int_equal(fp_strategy_bound(ru, NULL, g, full / 2, 1, &norm, &clipped, &err), 0);
    assert_true(clipped);
    assert_int_equal(fp_strategy_update_norm(ru, NULL, g, &norm, &err), 0);
    assert_true(fabs(norm - full / 2) < 1e-5 * full);
    for (int e = 0; e < 24; e++) { /* the head's change halved, from the global's */
        double was = (double)r->whole[1].v[e] - g->whole[1].v[e];
        assert_true(fabs((ru->whole[1].v[e] - g->whole[1].v[e]) - 0.5 * was) < 1e-5);
    }
    /* without the round's global its head cannot be measured: refused, never skipped */
    assert_int_equal(fp_strategy_bound(ru, NULL, NULL, 1.0, 1, &norm, &clipped, &err), -EINVAL);
    assert_err_contains(&err, "the round's global head: none given");
    fp_adapter_free(ru);
    fp_adapter_free(bare);
    /* validation names what is wrong */
    fp_whole_desc_t want[1] = {{"classifier.weight", 4, 6}};
    assert_int_equal(fp_adapter_validate_whole(g, want, 1, "update", &err), -EINVAL);
    assert_err_contains(&err, "update: unexpected tensor trained in full 'classifier.bias'");
    assert_int_equal(fp_adapter_validate_whole(g, NULL, 0, "update", &err), -EINVAL);
    fp_whole_desc_t dup[2] = {{"x.weight", 1, 1}, {"x.weight", 1, 1}};
    assert_int_equal(fp_adapter_set_whole(start, dup, 2, &err), -EINVAL);
    assert_err_contains(&err, "appears twice");
    /* a decoder has nothing to take a head */
    fp_model_config_t mc = {0};
    mc.dim = 16;
    mc.n_layers = 1;
    mc.n_heads = 2;
    mc.n_kv_heads = 2;
    mc.head_dim = 8;
    mc.ff = 32;
    mc.vocab = 260;
    mc.max_seq = 16;
    mc.rms_eps = 1e-5;
    mc.rope_theta = 10000;
    mc.bos_id = -1;
    mc.eos_id = 256;
    fp_model_t *m = NULL;
    assert_int_equal(fp_model_new(&m, &mc, &err), 0);
    assert_int_equal(fp_lora_check(m, g, &err), -ENOTSUP);
    assert_err_contains(&err, "saves 'classifier.bias' whole (modules_to_save)");
    fp_model_free(m);
    fp_adapter_free(g);
    fp_adapter_free(r);
    fp_adapter_free(start);
    fp_adapter_free(acc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_strategy),
        cmocka_unit_test(test_stream_and_files),
        cmocka_unit_test(test_privacy_and_secure),
        cmocka_unit_test(test_secure_sketch),
        cmocka_unit_test(test_restart_and_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
