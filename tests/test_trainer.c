/* The optimizer against a float64 transcription of PyTorch's AdamW, the learning-rate schedule,
 * and training that really learns: full training on a synthetic task, then LoRA on the frozen
 * result for a different task — deterministically, leaving the base untouched. */
#include "fp_test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fp_optim.h"
#include "fp_par.h"
#include "fp_rng.h"
#include "fp_trainer.h"
#include "fp_transformer.h"

static void test_adamw_matches_reference(void **state)
{
    (void)state;
    enum { NP = 5, STEPS = 4 };
    float p[NP] = {0.5f, -1.0f, 2.0f, 0.0f, 3.0f}, g[NP];
    float q[2] = {1.0f, -2.0f}, gq[2];
    fp_pgroup_t groups[2] = {{p, g, NP, 1}, {q, gq, 2, 0}};
    fp_optim_cfg_t c = fp_optim_defaults();
    c.lr = 0.1;
    c.weight_decay = 0.2;
    c.clip = 0.5;
    c.warmup = 1;
    c.total = STEPS;
    c.min_lr_frac = 0.1;
    fp_adamw_t *o;
    fp_err_t err = {0};
    assert_int_equal(fp_adamw_new(&o, groups, 2, &c, &err), 0);
    /* reference: torch.optim.AdamW after clip_grad_norm_ */
    double rp[NP + 2], m[NP + 2] = {0}, v[NP + 2] = {0};
    for (int i = 0; i < NP; i++)
        rp[i] = p[i];
    rp[NP] = q[0];
    rp[NP + 1] = q[1];
    for (int t = 1; t <= STEPS; t++) {
        double rg[NP + 2], norm = 0;
        for (int i = 0; i < NP; i++)
            rg[i] = g[i] = (float)(0.3 * (i + 1) * (t % 2 ? 1 : -1) + 0.05 * t);
        gq[0] = (float)(rg[NP] = 0.7 * t);
        gq[1] = (float)(rg[NP + 1] = -0.1);
        for (int i = 0; i < NP + 2; i++)
            norm += rg[i] * rg[i];
        norm = sqrt(norm);
        double scale = norm > c.clip ? c.clip / (norm + 1e-6) : 1.0;
        double lr = fp_lr_at(&c, t - 1);
        double bc1 = 1 - pow(c.beta1, t), bc2 = 1 - pow(c.beta2, t);
        for (int i = 0; i < NP + 2; i++) {
            double gi = rg[i] * scale;
            if (i < NP)
                rp[i] *= 1 - lr * c.weight_decay;
            m[i] = c.beta1 * m[i] + (1 - c.beta1) * gi;
            v[i] = c.beta2 * v[i] + (1 - c.beta2) * gi * gi;
            rp[i] -= lr / bc1 * m[i] / (sqrt(v[i]) / sqrt(bc2) + c.eps);
        }
        double got_norm;
        double used = fp_adamw_step(o, &got_norm);
        assert_true(fabs(used - lr) < 1e-15);
        assert_true(fabs(got_norm - norm) < 1e-5 * norm);
        for (int i = 0; i < NP; i++)
            assert_true(fabs(p[i] - rp[i]) < 1e-5);
        assert_true(fabs(q[0] - rp[NP]) < 1e-5 && fabs(q[1] - rp[NP + 1]) < 1e-5);
    }
    fp_adamw_free(o);
}

static void test_schedule(void **state)
{
    (void)state;
    fp_optim_cfg_t c = fp_optim_defaults();
    c.lr = 1.0;
    c.warmup = 10;
    c.total = 110;
    c.min_lr_frac = 0.2;
    assert_true(fabs(fp_lr_at(&c, 0) - 0.1) < 1e-12);  /* warm-up from lr/warmup */
    assert_true(fabs(fp_lr_at(&c, 9) - 1.0) < 1e-12);
    assert_true(fabs(fp_lr_at(&c, 10) - 1.0) < 1e-12); /* cosine starts at the peak */
    assert_true(fabs(fp_lr_at(&c, 60) - 0.6) < 1e-12); /* halfway: the middle of [0.2, 1] */
    assert_true(fabs(fp_lr_at(&c, 110) - 0.2) < 1e-12);
    assert_true(fabs(fp_lr_at(&c, 500) - 0.2) < 1e-12);
}

/* Documents where each token follows from the previous one: x' = (x + step) mod V. */
static fp_dataset_t *pattern(int step, int ndocs, int len, uint64_t seed)
{
    fp_dataset_t *d = calloc(1, sizeof *d);
    d->n = (size_t)ndocs * len;
    d->tok = malloc(d->n * sizeof *d->tok);
    d->tgt = malloc(d->n);
    d->docs = malloc((size_t)ndocs * sizeof *d->docs);
    d->ndocs = (size_t)ndocs;
    fp_rng_t rng;
    fp_rng_seed(&rng, seed);
    for (int k = 0; k < ndocs; k++) {
        int x = (int)fp_rng_below(&rng, 16);
        for (int i = 0; i < len; i++) {
            d->tok[k * len + i] = x;
            d->tgt[k * len + i] = i > 0;
            x = (x + step) % 16;
        }
        d->docs[k] = (fp_doc_t){(size_t)k * len, (size_t)len};
    }
    return d;
}

static fp_model_t *tiny(void)
{
    fp_model_config_t c = {.dim = 32, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2,
                           .head_dim = 8, .ff = 64, .vocab = 16, .max_seq = 64, .rms_eps = 1e-5,
                           .rope_theta = 10000, .bos_id = -1, .eos_id = -1};
    fp_model_t *m;
    fp_err_t err = {0};
    assert_int_equal(fp_model_new(&m, &c, &err), 0);
    fp_model_init(m, 3);
    return m;
}

static double eval(const fp_model_t *m, const fp_adapter_t *ad, const fp_dataset_t *d)
{
    double loss;
    long tokens;
    fp_err_t err = {0};
    assert_int_equal(fp_evaluate(m, ad, d, 4, 32, &loss, &tokens, &err), 0);
    assert_int_equal(tokens, (long)fp_dataset_targets(d));
    return loss;
}

static int stop_at_3(void *ctx, const fp_train_stats_t *s)
{
    (void)ctx;
    return s->step == 3;
}

static void test_learning_full_then_lora(void **state)
{
    (void)state;
    fp_model_t *m = tiny();
    fp_dataset_t *a = pattern(3, 64, 32, 1), *a_eval = pattern(3, 8, 32, 2);
    fp_dataset_t *b = pattern(5, 64, 32, 3), *b_eval = pattern(5, 8, 32, 4);
    fp_err_t err = {0};
    /* full training learns task A */
    double before = eval(m, NULL, a_eval);
    assert_true(fabs(before - log(16.0)) < 0.3); /* a fresh model guesses uniformly */
    fp_train_cfg_t tc = {.batch = 8, .seq = 32, .steps = 150, .accum = 1, .seed = 5,
                         .opt = fp_optim_defaults()};
    tc.opt.lr = 1e-2;
    fp_train_result_t res;
    assert_int_equal(fp_train(m, NULL, a, &tc, NULL, NULL, &res, &err), 0);
    double after = eval(m, NULL, a_eval);
    assert_int_equal(res.steps, 150);
    assert_true(after < 0.25 * before);
    /* task B is another rule: the trained model does badly there */
    double base_b = eval(m, NULL, b_eval);
    assert_true(base_b > 2 * after);
    /* a fresh adapter (B = 0) changes nothing, to the last bit */
    fp_adapter_t *ad;
    assert_int_equal(fp_lora_init(m, (1u << FP_T_COUNT) - 1, 4, 8, 0, 11, &ad, &err), 0);
    assert_true(eval(m, ad, b_eval) == base_b);
    /* LoRA on the frozen base learns task B; the base stays bit for bit as it was */
    float *frozen = malloc(m->n_params * sizeof(float));
    memcpy(frozen, m->mem, m->n_params * sizeof(float));
    tc.steps = 120;
    tc.opt.lr = 3e-3;
    assert_int_equal(fp_train(m, ad, b, &tc, NULL, NULL, &res, &err), 0);
    assert_memory_equal(m->mem, frozen, m->n_params * sizeof(float));
    double lora_b = eval(m, ad, b_eval);
    assert_true(lora_b < 0.5 * base_b);
    /* the same seed gives the same adapter, bit for bit */
    fp_adapter_t *ad2;
    assert_int_equal(fp_lora_init(m, (1u << FP_T_COUNT) - 1, 4, 8, 0, 11, &ad2, &err), 0);
    assert_int_equal(fp_train(m, ad2, b, &tc, NULL, NULL, &res, &err), 0);
    assert_memory_equal(ad->data, ad2->data, fp_adapter_params(ad) * sizeof(float));
    fp_adapter_free(ad2);
    /* a callback can stop training at a step boundary */
    assert_int_equal(fp_lora_init(m, 1u << FP_T_Q, 2, 4, 0, 12, &ad2, &err), 0);
    assert_int_equal(fp_train(m, ad2, b, &tc, stop_at_3, NULL, &res, &err), 0);
    assert_int_equal(res.steps, 3);
    assert_true(res.stopped);
    fp_adapter_free(ad2);
    free(frozen);
    fp_adapter_free(ad);
    fp_dataset_free(a);
    fp_dataset_free(a_eval);
    fp_dataset_free(b);
    fp_dataset_free(b_eval);
    fp_model_free(m);
}

/* accum micro-batches of B/accum sequences draw the same windows as one batch of B, and every
 * window here has the same number of targets: the same update, to rounding. */
static void test_accumulation_equals_a_bigger_batch(void **state)
{
    (void)state;
    fp_model_t *m = tiny();
    fp_dataset_t *d = pattern(7, 32, 64, 9);
    memset(d->tgt, 1, d->n); /* every window then holds the same number of targets */
    fp_err_t err = {0};
    fp_adapter_t *big, *acc;
    assert_int_equal(fp_lora_init(m, (1u << FP_T_COUNT) - 1, 4, 8, 0, 1, &big, &err), 0);
    assert_int_equal(fp_lora_init(m, (1u << FP_T_COUNT) - 1, 4, 8, 0, 1, &acc, &err), 0);
    fp_train_cfg_t tc = {.batch = 8, .seq = 16, .steps = 3, .accum = 1, .seed = 2,
                         .opt = fp_optim_defaults()};
    fp_train_result_t r1, r2;
    assert_int_equal(fp_train(m, big, d, &tc, NULL, NULL, &r1, &err), 0);
    tc.batch = 4;
    tc.accum = 2;
    assert_int_equal(fp_train(m, acc, d, &tc, NULL, NULL, &r2, &err), 0);
    assert_true(fabs(r1.final_loss - r2.final_loss) < 1e-5);
    size_t n = fp_adapter_params(big);
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += ((double)big->data[i] - acc->data[i]) * ((double)big->data[i] - acc->data[i]);
        den += (double)big->data[i] * big->data[i];
    }
    assert_true(sqrt(num) <= 1e-4 * sqrt(den));
    fp_adapter_free(big);
    fp_adapter_free(acc);
    fp_dataset_free(d);
    fp_model_free(m);
}

/* FedProx: μ/2·‖θ − θ₀‖² holds the factors near where they started — the further the larger μ
 * (a wrong sign would push them away) — and μ = 0 is plain training, bit for bit. */
static void test_prox_holds_near_the_start(void **state)
{
    (void)state;
    fp_model_t *m = tiny();
    fp_dataset_t *d = pattern(7, 64, 32, 5);
    fp_err_t err = {0};
    const double mus[] = {-1, 0, 3, 300}; /* -1: the field left out */
    double drift[4];
    fp_adapter_t *first = NULL;
    for (int k = 0; k < 4; k++) {
        fp_adapter_t *ad, *start;
        assert_int_equal(fp_lora_init(m, (1u << FP_T_COUNT) - 1, 4, 8, 0, 13, &ad, &err), 0);
        fp_adapter_randomize(ad, 13, 13, 0.05); /* a start away from zero, as a round's */
        assert_int_equal(fp_adapter_clone(ad, &start, &err), 0);
        fp_train_cfg_t tc = {.batch = 8, .seq = 16, .steps = 40, .accum = 1, .seed = 3,
                             .opt = fp_optim_defaults()};
        tc.opt.lr = 1e-2;
        if (mus[k] >= 0)
            tc.prox_mu = mus[k];
        fp_train_result_t r;
        assert_int_equal(fp_train(m, ad, d, &tc, NULL, NULL, &r, &err), 0);
        size_t n = fp_adapter_params(ad);
        double s2 = 0;
        for (size_t i = 0; i < n; i++)
            s2 += ((double)ad->data[i] - start->data[i]) * ((double)ad->data[i] - start->data[i]);
        drift[k] = sqrt(s2);
        if (k == 0)
            first = ad;
        else if (k == 1) {
            assert_memory_equal(ad->data, first->data, n * sizeof *ad->data);
            fp_adapter_free(ad);
        } else
            fp_adapter_free(ad);
        fp_adapter_free(start);
    }
    print_message("drift from the start: μ 0 %.4g, μ 3 %.4g, μ 300 %.4g\n", drift[1], drift[2],
                  drift[3]);
    assert_true(drift[2] < 0.9 * drift[1]);
    assert_true(drift[3] < 0.5 * drift[2]);
    fp_adapter_free(first);
    fp_dataset_free(d);
    fp_model_free(m);
}

/* freeze_a (FFA-LoRA): every lora_A stays bit for bit as it was, the B factors learn, and
 * the loss goes down all the same. */
static void test_freeze_a(void **state)
{
    (void)state;
    fp_model_t *m = tiny();
    fp_dataset_t *d = pattern(5, 64, 32, 3), *d_eval = pattern(5, 8, 32, 4);
    fp_err_t err = {0};
    fp_adapter_t *ad;
    assert_int_equal(fp_lora_init(m, (1u << FP_T_COUNT) - 1, 4, 8, 0, 11, &ad, &err), 0);
    fp_adapter_t *start;
    assert_int_equal(fp_adapter_clone(ad, &start, &err), 0);
    double before = eval(m, ad, d_eval);
    fp_train_cfg_t tc = {.batch = 8, .seq = 32, .steps = 60, .accum = 1, .seed = 5,
                         .opt = fp_optim_defaults(), .freeze_a = 1};
    tc.opt.lr = 3e-3;
    tc.opt.weight_decay = 0.1; /* decay must not touch A either */
    fp_train_result_t res;
    assert_int_equal(fp_train(m, ad, d, &tc, NULL, NULL, &res, &err), 0);
    int changed = 0;
    for (int i = 0; i < ad->n; i++) {
        const fp_lora_module_t *a = &ad->mods[i], *s = &start->mods[i];
        assert_memory_equal(a->A, s->A, (size_t)a->rank * (size_t)a->d_in * sizeof(float));
        changed += memcmp(a->B, s->B, (size_t)a->d_out * (size_t)a->rank * sizeof(float)) != 0;
    }
    assert_int_equal(changed, ad->n);
    assert_true(eval(m, ad, d_eval) < 0.9 * before);
    fp_adapter_free(ad);
    fp_adapter_free(start);
    fp_dataset_free(d);
    fp_dataset_free(d_eval);
    fp_model_free(m);
}

int main(void)
{
    fp_par_set_threads(2);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_adamw_matches_reference),
        cmocka_unit_test(test_schedule),
        cmocka_unit_test(test_learning_full_then_lora),
        cmocka_unit_test(test_accumulation_equals_a_bigger_batch),
        cmocka_unit_test(test_freeze_a),
        cmocka_unit_test(test_prox_holds_near_the_start),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
