/* The decoder's gradients against central finite differences, in float64: every LoRA factor
 * of every target, the input embeddings, and (full training) every weight; GQA and MQA, tied
 * and untied heads, attention biases, masked labels. Then the float32 build against the
 * float64 one, and the guarantee that frozen weights get no gradient. */
#include "fp_test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_model.h"
#include "fp_par.h"
#include "fp_rng.h"
#include "fp_transformer.h"
#include "fp_transformer64.h"

typedef struct variant {
    const char *name;
    int heads, kv, tied;
    unsigned bias;
    const char *targets;
    int window;   /* sliding window (Mistral), 0 none */
    int llama3;   /* Llama 3.x RoPE scaling */
} variant_t;

static const variant_t variants[] = {
    {"untied, GQA 4/2, all targets", 4, 2, 0, 0, "all", 0, 0},
    {"tied, MQA 4/1, biases, all targets", 4, 1, 1, FP_BIAS_QKVO, "all", 0, 0},
    {"untied, MHA 2/2, biases, q/v/down", 2, 2, 0, FP_BIAS_QKVO, "q_proj,v_proj,down_proj", 0, 0},
    {"Mistral: sliding window 2, GQA 4/2, all targets", 4, 2, 0, 0, "all", 2, 0},
    {"Qwen2: q/k/v biases, tied, llama3 RoPE, all targets", 4, 2, 1, FP_BIAS_QKV, "all", 0, 1},
};

enum { B = 2, T = 5, N = B * T };

static fp_model_t *tiny_model(const variant_t *v, uint64_t seed)
{
    fp_model_config_t c = {.dim = 16, .n_layers = 2, .n_heads = v->heads, .n_kv_heads = v->kv,
                           .head_dim = 6, .ff = 20, .vocab = 13, .max_seq = 16,
                           .rms_eps = 1e-5, .rope_theta = 10000, .tied = v->tied,
                           .bias = v->bias, .bos_id = -1, .eos_id = -1, .window = v->window};
    if (v->bias == FP_BIAS_QKV)
        c.family = FP_FAMILY_QWEN2;
    if (v->window)
        c.family = FP_FAMILY_MISTRAL;
    /* wavelengths 6.3, 135 and 2,900 against an original context of 200: one kept (< 50),
     * one blended, one divided by the factor (> 200) */
    if (v->llama3)
        c.rope = (fp_rope_scaling_t){.type = FP_ROPE_LLAMA3, .factor = 8,
                                       .low_freq_factor = 1, .high_freq_factor = 4,
                                       .original_max = 200};
    fp_model_t *m;
    fp_err_t err = {0};
    assert_int_equal(fp_model_new(&m, &c, &err), 0);
    /* larger than HF's 0.02 so that every path carries signal, small enough that attention does
     * not saturate (which would make finite differences themselves unreliable) */
    fp_rng_t rng;
    fp_rng_seed(&rng, seed);
    fp_rng_fill_normal(&rng, m->mem, m->n_params, 0.15);
    for (int l = 0; l < c.n_layers; l++)
        for (int j = 0; j < c.dim; j++) {
            m->layers[l].attn_norm[j] = (float)(1 + 0.2 * fp_rng_normal(&rng));
            m->layers[l].mlp_norm[j] = (float)(1 + 0.2 * fp_rng_normal(&rng));
        }
    return m;
}

static fp_adapter_t *tiny_lora(const fp_model_t *m, const char *targets, uint64_t seed)
{
    unsigned mask;
    fp_err_t err = {0};
    assert_int_equal(fp_targets_parse(targets, &mask, &err), 0);
    fp_module_desc_t d[64];
    char names[64][64];
    int n = 0;
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int t = 0; t < FP_T_COUNT; t++) {
            if (!(mask & (1u << t)))
                continue;
            fp_lora_module_name(names[n], sizeof names[n], l, (fp_target_t)t);
            int o, i;
            fp_target_shape(&m->cfg, (fp_target_t)t, &o, &i);
            d[n] = (fp_module_desc_t){names[n], o, i, 2 + (n % 3), 1.0 + 0.25 * n, n % 2};
            n++;
        }
    fp_adapter_t *ad;
    assert_int_equal(fp_adapter_new(&ad, d, n, &err), 0);
    fp_rng_t rng;
    fp_rng_seed(&rng, seed);
    fp_rng_fill_normal(&rng, ad->data, fp_adapter_params(ad), 0.3);
    return ad;
}

static void make_batch(int *tokens, int *labels, int vocab, uint64_t seed)
{
    fp_rng_t rng;
    fp_rng_seed(&rng, seed);
    for (int i = 0; i < N; i++)
        tokens[i] = (int)fp_rng_below(&rng, (uint64_t)vocab);
    for (int i = 0; i < N; i++) {
        int last = i % T == T - 1;
        labels[i] = last || i % 4 == 1 ? -1 : tokens[i + 1]; /* masked positions too */
    }
}

/* Five-point central difference of the mean loss along p[k] (error O(h⁴)), against grad. */
static void check_entry(fp_tf64_t *tf, const int *tokens, const double *embeds,
                        const int *labels, double *p, size_t k, double grad, const char *what)
{
    const double h = 1e-4;
    double keep = p[k], f[4];
    static const double at[4] = {2, 1, -1, -2};
    for (int i = 0; i < 4; i++) {
        p[k] = keep + at[i] * h;
        f[i] = fp_tf64_loss(tf, tokens, embeds, labels);
    }
    p[k] = keep;
    double fd = (-f[0] + 8 * f[1] - 8 * f[2] + f[3]) / (12 * h);
    double tol = 1e-9 + 1e-7 * fabs(fd);
    if (fabs(fd - grad) > tol) {
        print_error("%s[%zu]: finite difference %.12g, analytic %.12g\n", what, k, fd, grad);
        fail();
    }
}

/* Up to `most` entries of an array, spread over it. */
static void check_array(fp_tf64_t *tf, const int *tokens, const double *embeds, const int *labels,
                        double *p, const double *g, size_t n, int most, const char *what)
{
    size_t step = n / (size_t)most + 1;
    for (size_t k = 0; k < n; k += step)
        check_entry(tf, tokens, embeds, labels, p, k, g[k], what);
    check_entry(tf, tokens, embeds, labels, p, n - 1, g[n - 1], what);
}

static void test_lora_and_input_gradients(void **state)
{
    (void)state;
    for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
        fp_model_t *m = tiny_model(&variants[v], 10 + v);
        fp_adapter_t *ad = tiny_lora(m, variants[v].targets, 20 + v);
        int tokens[N], labels[N];
        make_batch(tokens, labels, m->cfg.vocab, 30 + v);
        fp_tf64_t *tf;
        fp_err_t err = {0};
        assert_int_equal(fp_tf64_new(&tf, m, ad, B, T, FP_TF_LORA | FP_TF_INPUT_GRAD, &err), 0);
        /* gradients w.r.t. every factor, from token ids */
        fp_tf64_loss(tf, tokens, NULL, labels);
        fp_tf64_backward(tf);
        for (int j = 0; j < ad->n; j++) {
            for (int f = 0; f < 2; f++) {
                size_t n, ng;
                char fac = f ? 'B' : 'A';
                double *p = fp_tf64_lora(tf, j, fac, &n);
                double *g = fp_tf64_lora_grad(tf, j, fac, &ng);
                char what[128];
                snprintf(what, sizeof what, "%s: %s lora_%c", variants[v].name, ad->mods[j].name,
                         fac);
                double gnorm = 0;
                for (size_t k = 0; k < ng; k++)
                    gnorm += g[k] * g[k];
                assert_true(gnorm > 0); /* every factor receives gradient */
                double *gcopy = malloc(ng * sizeof *gcopy);
                memcpy(gcopy, g, ng * sizeof *gcopy);
                check_array(tf, tokens, NULL, labels, p, gcopy, n, 12, what);
                free(gcopy);
            }
        }
        /* gradient w.r.t. the input embeddings (HF inputs_embeds) */
        double *x0 = malloc((size_t)N * m->cfg.dim * sizeof *x0);
        for (int i = 0; i < N; i++)
            for (int d = 0; d < m->cfg.dim; d++)
                x0[i * m->cfg.dim + d] = m->embed[tokens[i] * m->cfg.dim + d];
        double l0 = fp_tf64_loss(tf, NULL, x0, labels);
        assert_true(fabs(l0 - fp_tf64_loss(tf, tokens, NULL, labels)) < 1e-12);
        fp_tf64_loss(tf, NULL, x0, labels);
        fp_tf64_backward(tf);
        size_t nx = (size_t)N * m->cfg.dim;
        double *gx = malloc(nx * sizeof *gx);
        memcpy(gx, fp_tf64_input_grad(tf), nx * sizeof *gx);
        check_array(tf, NULL, x0, labels, x0, gx, nx, 40, "input embeddings");
        free(gx);
        free(x0);
        fp_tf64_free(tf);
        fp_adapter_free(ad);
        fp_model_free(m);
    }
}

static void test_full_gradients(void **state)
{
    (void)state;
    for (size_t v = 0; v < 2; v++) {
        fp_model_t *m = tiny_model(&variants[v], 40 + v);
        int tokens[N], labels[N];
        make_batch(tokens, labels, m->cfg.vocab, 50 + v);
        fp_tf64_t *tf;
        fp_err_t err = {0};
        assert_int_equal(fp_tf64_new(&tf, m, NULL, B, T, FP_TF_FULL, &err), 0);
        fp_tf64_loss(tf, tokens, NULL, labels);
        fp_tf64_backward(tf);
        fp_model_tensor_t *ts;
        int nt;
        assert_int_equal(fp_model_tensors(m, &ts, &nt, &err), 0);
        for (int i = 0; i < nt; i++) {
            size_t n;
            double *p = fp_tf64_weight(tf, i, &n);
            double *g = malloc(n * sizeof *g);
            memcpy(g, fp_tf64_weight_grad(tf, i, &n), n * sizeof *g);
            char what[160];
            snprintf(what, sizeof what, "%s: %s", variants[v].name, ts[i].name);
            check_array(tf, tokens, NULL, labels, p, g, n, 8, what);
            free(g);
        }
        free(ts);
        fp_tf64_free(tf);
        fp_model_free(m);
    }
}

/* The float32 build computes what the float64 build computes. */
static void test_float_matches_double(void **state)
{
    (void)state;
    for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
        fp_model_t *m = tiny_model(&variants[v], 60 + v);
        fp_adapter_t *ad = tiny_lora(m, variants[v].targets, 70 + v);
        int tokens[N], labels[N];
        make_batch(tokens, labels, m->cfg.vocab, 80 + v);
        fp_err_t err = {0};
        fp_tf64_t *t64;
        fp_tf_t *t32;
        assert_int_equal(fp_tf64_new(&t64, m, ad, B, T, FP_TF_LORA, &err), 0);
        assert_int_equal(fp_tf_new(&t32, m, ad, B, T, FP_TF_LORA, &err), 0);
        double l64 = fp_tf64_loss(t64, tokens, NULL, labels);
        fp_tf64_backward(t64);
        double sum;
        long count;
        fp_tf_forward(t32, tokens, labels, &sum, &count);
        assert_true(fabs(sum / count - l64) <= 1e-5 * fabs(l64));
        fp_adapter_t *g32;
        assert_int_equal(fp_adapter_clone(ad, &g32, &err), 0);
        memset(g32->data, 0, fp_adapter_params(g32) * sizeof(float));
        /* frozen weights: a full-gradient model passed in must stay untouched */
        fp_model_t *frozen;
        assert_int_equal(fp_model_new(&frozen, &m->cfg, &err), 0);
        fp_tf_backward(t32, 1.0 / count, g32, frozen);
        for (size_t i = 0; i < frozen->n_params; i++)
            assert_true(frozen->mem[i] == 0.0f);
        assert_true(fpt_lora_grad_rel(g32, t64) <= 1e-4); /* every module's A and B */
        fp_model_free(frozen);
        fp_adapter_free(g32);
        fp_tf_free(t32);
        fp_tf64_free(t64);
        fp_adapter_free(ad);
        fp_model_free(m);
    }
}

static void test_adapter_must_fit_the_model(void **state)
{
    (void)state;
    fp_model_t *m = tiny_model(&variants[0], 1);
    fp_module_desc_t bad[2] = {
        {"model.layers.0.self_attn.q_proj", 24, 16, 2, 4, 0}, /* q is 4·6 × 16: fine */
        {"model.layers.5.self_attn.q_proj", 24, 16, 2, 4, 0}, /* no layer 5 */
    };
    fp_adapter_t *ad;
    fp_err_t err = {0};
    assert_int_equal(fp_adapter_new(&ad, bad, 2, &err), 0);
    fp_tf_t *tf;
    assert_int_equal(fp_tf_new(&tf, m, ad, 1, 4, FP_TF_LORA, &err), -EINVAL);
    assert_err_contains(&err, "model.layers.5.self_attn.q_proj");
    fp_adapter_free(ad);
    bad[0].d_in = 17;
    assert_int_equal(fp_adapter_new(&ad, bad, 1, &err), 0);
    assert_int_equal(fp_tf_new(&tf, m, ad, 1, 4, FP_TF_LORA, &err), -EINVAL);
    assert_err_contains(&err, "24×17");
    fp_adapter_free(ad);
    assert_int_equal(fp_tf_new(&tf, m, NULL, 1, 17, FP_TF_EVAL, &err), -EINVAL);
    assert_err_contains(&err, "16 positions");
    fp_model_free(m);
}

/* An evaluation workspace (activations shared by the layers, each target's lu sized by its
 * largest rank over the layers) gives the training workspace's loss, with mixed ranks and a
 * partial q|k|v run (q/v/down): a run's x·Aᵀ fits where the layout says. */
static void test_eval_matches_training(void **state)
{
    (void)state;
    for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
        fp_model_t *m = tiny_model(&variants[v], 90 + v);
        fp_adapter_t *ad = tiny_lora(m, variants[v].targets, 91 + v);
        int tokens[N], labels[N];
        make_batch(tokens, labels, m->cfg.vocab, 92 + v);
        fp_tf_t *ev, *tr;
        assert_int_equal(fp_tf_new(&ev, m, ad, B, T, FP_TF_EVAL, NULL), 0);
        assert_int_equal(fp_tf_new(&tr, m, ad, B, T, FP_TF_LORA, NULL), 0);
        double se, st;
        long ce, ct;
        fp_tf_forward(ev, tokens, labels, &se, &ce);
        fp_tf_forward(tr, tokens, labels, &st, &ct);
        assert_int_equal(ce, ct);
        if (!(fabs(se - st) <= 1e-6 * fabs(st)))
            fail_msg("%s: eval loss %.9g, training loss %.9g", variants[v].name, se, st);
        fp_tf_free(ev);
        fp_tf_free(tr);
        fp_adapter_free(ad);
        fp_model_free(m);
    }
}

int main(void)
{
    /* an odd thread count: the parallel element-wise paths split unevenly */
    fp_par_set_threads(3);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lora_and_input_gradients),
        cmocka_unit_test(test_full_gradients),
        cmocka_unit_test(test_float_matches_double),
        cmocka_unit_test(test_eval_matches_training),
        cmocka_unit_test(test_adapter_must_fit_the_model),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
