/* test_vit.c — the ViT with LoRA and a trained head (fp_vit.h): its float64 gradient against
 * central finite differences at every parameter; float32 against float64 (loss, every
 * gradient); its logits against an independent PyTorch ViT on the same checkpoint and adapter
 * (tests/vision/torch_vit.py, the adapter merged there); config.json read or refused by name;
 * a checkpoint written and read back; the frozen linears in bf16 and NF4 against float32 over
 * the same weights (where oneDNN multiplies bf16; refused by name elsewhere).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_rng.h"
#include "fp_safetensors.h"
#include "fp_test.h"
#include "fp_vit.h"
#include "fp_vit_train.h"

enum { NB = 3 };

static void fill(fp_rng_t *rng, float *x, size_t n, double mean, double sd)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(mean + sd * fp_rng_normal(rng));
}

static fp_vit_t *make_vit(fp_rng_t *rng, int qkv_bias)
{
    fp_vit_config_t c = {.D = 16, .L = 2, .H = 4, .F = 24, .S = 8, .P = 4, .C = 3, .K = 5,
                         .eps = 1e-6, .qkv_bias = qkv_bias};
    fp_vit_t *m = NULL;
    assert_int_equal(fp_vit_alloc(&c, &m, NULL), 0);
    size_t D = 16, T = 5;
    fill(rng, m->patch_w, D * 48, 0, 0.15);
    fill(rng, m->patch_b, D, 0, 0.1);
    fill(rng, m->cls, D, 0, 0.5);
    fill(rng, m->pos, T * D, 0, 0.3);
    fill(rng, m->lnf_w, D, 1, 0.2);
    fill(rng, m->lnf_b, D, 0, 0.1);
    fill(rng, m->head_w, 5 * D, 0, 0.3);
    fill(rng, m->head_b, 5, 0, 0.1);
    for (int l = 0; l < c.L; l++) {
        fp_vit_layer_t *y = &m->layers[l];
        fill(rng, y->ln1_w, D, 1, 0.2);
        fill(rng, y->ln1_b, D, 0, 0.1);
        fill(rng, y->ln2_w, D, 1, 0.2);
        fill(rng, y->ln2_b, D, 0, 0.1);
        for (int t = 0; t < FP_VT_COUNT; t++) {
            int o, in;
            fp_vit_target_shape(&c, t, &o, &in);
            fill(rng, y->w[t], (size_t)o * in, 0, 1 / sqrt(in));
            if (y->b[t])
                fill(rng, y->b[t], (size_t)o, 0, 0.1);
        }
    }
    return m;
}

/* LoRA on every linear of layer 0 (rank 2) and on query, value and output.dense of layer 1
 * (rank 3), A and B both non-zero so every factor has a gradient. */
static fp_adapter_t *make_lora(fp_rng_t *rng, const fp_vit_config_t *c)
{
    char names[9][128];
    fp_module_desc_t d[9];
    int n = 0;
    for (int t = 0; t < FP_VT_COUNT; t++, n++) {
        fp_vit_module_name(0, t, names[n], sizeof names[n]);
        d[n] = (fp_module_desc_t){names[n], 0, 0, 2, 4, 0};
        fp_vit_target_shape(c, t, &d[n].d_out, &d[n].d_in);
    }
    const int l1[] = {FP_VT_QUERY, FP_VT_VALUE, FP_VT_FC2};
    for (int k = 0; k < 3; k++, n++) {
        fp_vit_module_name(1, l1[k], names[n], sizeof names[n]);
        d[n] = (fp_module_desc_t){names[n], 0, 0, 3, 6, 0};
        fp_vit_target_shape(c, l1[k], &d[n].d_out, &d[n].d_in);
    }
    fp_adapter_t *ad = NULL;
    assert_int_equal(fp_adapter_new(&ad, d, n, NULL), 0);
    for (int i = 0; i < ad->n; i++) {
        fp_lora_module_t *m = &ad->mods[i];
        fill(rng, m->A, (size_t)m->rank * m->d_in, 0, 0.4);
        fill(rng, m->B, (size_t)m->d_out * m->rank, 0, 0.2);
    }
    return ad;
}

typedef struct world {
    fp_vit_t *m;
    fp_adapter_t *lora;
    float px[NB * 3 * 8 * 8];
    double pxd[NB * 3 * 8 * 8];
    int labels[NB];
} world_t;

static world_t *make_world(int qkv_bias)
{
    world_t *w = calloc(1, sizeof *w);
    fp_rng_t rng;
    fp_rng_seed(&rng, 2026120629);
    w->m = make_vit(&rng, qkv_bias);
    w->lora = make_lora(&rng, &w->m->c);
    fill(&rng, w->px, sizeof w->px / sizeof *w->px, 0, 1);
    for (size_t i = 0; i < sizeof w->px / sizeof *w->px; i++)
        w->pxd[i] = w->px[i];
    for (int i = 0; i < NB; i++)
        w->labels[i] = (i * 2 + 1) % 5;
    return w;
}

static void free_world(world_t *w)
{
    fp_adapter_free(w->lora);
    fp_vit_free(w->m);
    free(w);
}

/* float64: the analytic gradient is the central difference at every parameter (LoRA factors
 * of every adapted linear, the head's weight and bias), with and without qkv biases. */
static void test_gradient_against_finite_differences(void **state)
{
    (void)state;
    for (int qb = 0; qb < 2; qb++) {
        world_t *w = make_world(qb);
        size_t n = fp_vit64_nparams(&w->m->c, w->lora);
        double *th = malloc(n * sizeof *th), *g = malloc(n * sizeof *g);
        fp_vit64_pack(&w->m->c, w->lora, w->m->head_w, w->m->head_b, th);
        fp_vit64_loss(w->m, w->lora, th, w->pxd, NB, w->labels, g);
        double worst = 0, gmax = 0;
        size_t at = 0;
        const double h = 1e-6;
        for (size_t i = 0; i < n; i++) {
            double keep = th[i];
            th[i] = keep + h;
            double up = fp_vit64_loss(w->m, w->lora, th, w->pxd, NB, w->labels, NULL);
            th[i] = keep - h;
            double down = fp_vit64_loss(w->m, w->lora, th, w->pxd, NB, w->labels, NULL);
            th[i] = keep;
            double fd = (up - down) / (2 * h), e = fabs(fd - g[i]);
            gmax = fabs(g[i]) > gmax ? fabs(g[i]) : gmax;
            if (e > worst) {
                worst = e;
                at = i;
            }
        }
        print_message("qkv_bias %d: %zu parameters, largest |fd − analytic| %.3g (at %zu), "
                      "largest gradient %.3g\n", qb, n, worst, at, gmax);
        if (!(worst < 1e-8 + 1e-7 * gmax))
            fail_msg("parameter %zu: finite difference and gradient differ by %g", at, worst);
        assert_true(gmax > 1e-3); /* something is learnt */
        free(th);
        free(g);
        free_world(w);
    }
}

/* float32 against float64: the loss, and every gradient, to float32's precision; an
 * evaluation workspace gives the training one's logits. */
static void test_f32_against_f64(void **state)
{
    (void)state;
    world_t *w = make_world(1);
    size_t n = fp_vit64_nparams(&w->m->c, w->lora);
    double *th = malloc(n * sizeof *th), *g = malloc(n * sizeof *g), *g32 = malloc(n * sizeof *g32);
    fp_vit64_pack(&w->m->c, w->lora, w->m->head_w, w->m->head_b, th);
    double l64 = fp_vit64_loss(w->m, w->lora, th, w->pxd, NB, w->labels, g);
    fp_vit_ws_t *ws = NULL, *ev = NULL;
    fp_err_t err = {0};
    assert_int_equal(fp_vit_new(&ws, w->m, w->lora, w->m->head_w, w->m->head_b, NB, 1, &err), 0);
    assert_int_equal(fp_vit_new(&ev, w->m, w->lora, w->m->head_w, w->m->head_b, NB, 0, &err), 0);
    double sum, sum2;
    int right;
    fp_vit_forward(ws, w->px, NB, w->labels, &sum, &right);
    if (!(fabs(sum / NB - l64) <= 1e-5 * l64))
        fail_msg("loss %.9g in float32, %.9g in float64", sum / NB, l64);
    fp_vit_forward(ev, w->px, NB, w->labels, &sum2, NULL);
    assert_memory_equal(fp_vit_logits(ws), fp_vit_logits(ev), NB * 5 * sizeof(float));
    fp_adapter_t *lg = NULL;
    assert_int_equal(fp_adapter_clone(w->lora, &lg, &err), 0);
    for (int i = 0; i < lg->n; i++) {
        memset(lg->mods[i].A, 0, (size_t)lg->mods[i].rank * lg->mods[i].d_in * sizeof(float));
        memset(lg->mods[i].B, 0, (size_t)lg->mods[i].d_out * lg->mods[i].rank * sizeof(float));
    }
    float hw[5 * 16] = {0}, hb[5] = {0};
    fp_vit_backward(ws, 1.0 / NB, lg, hw, hb, NULL);
    fp_vit64_pack(&w->m->c, lg, hw, hb, g32);
    double gmax = 0, worst = 0;
    for (size_t i = 0; i < n; i++) {
        gmax = fabs(g[i]) > gmax ? fabs(g[i]) : gmax;
        worst = fabs(g[i] - g32[i]) > worst ? fabs(g[i] - g32[i]) : worst;
    }
    print_message("float32: loss %.9g (float64 %.9g), gradients within %.3g of %.3g\n", sum / NB,
                  l64, worst, gmax);
    if (!(worst <= 1e-4 * gmax))
        fail_msg("float32 gradients differ from float64 by %g (largest %g)", worst, gmax);
    fp_adapter_free(lg);
    fp_vit_free_ws(ws);
    fp_vit_free_ws(ev);
    free(th);
    free(g);
    free(g32);
    free_world(w);
}

/* A float32 copy of m (a float32 model). */
static fp_vit_t *copy_vit(const fp_vit_t *m)
{
    fp_vit_t *c = NULL;
    assert_int_equal(fp_vit_alloc(&m->c, &c, NULL), 0);
    memcpy(c->mem, m->mem, m->nparams * sizeof *m->mem);
    return c;
}

/* m's linears rounded as a dt base stores them and its products read them (NF4: dequantised
 * to bf16). */
static void round_linears(fp_vit_t *m, fp_base_dtype_t dt)
{
    for (int l = 0; l < m->c.L; l++)
        for (int t = 0; t < FP_VT_COUNT; t++) {
            int o, in;
            fp_vit_target_shape(&m->c, t, &o, &in);
            size_t n = (size_t)o * in;
            uint16_t *h = malloc(n * sizeof *h);
            uint8_t *q = malloc(n / 2);
            float *am = malloc(n / FP_NF4_BLOCK * sizeof *am);
            if (dt == FP_BASE_BF16) {
                fp_bf16_pack(h, m->layers[l].w[t], n);
            } else {
                fp_nf4_quantize(m->layers[l].w[t], n, q, am);
                fp_nf4_dequantize_bf16(q, am, n, h);
            }
            fp_bf16_unpack(m->layers[l].w[t], h, n);
            free(h);
            free(q);
            free(am);
        }
}

/* The LoRA and head gradients of one batch at (m, lora), flattened (fp_vit64_pack's order);
 * the loss and the logits too. */
static double grads(const fp_vit_t *m, const world_t *w, double *g, float *logits)
{
    fp_vit_ws_t *ws = NULL;
    fp_adapter_t *lg = NULL;
    fp_err_t err = {0};
    assert_int_equal(fp_vit_new(&ws, m, w->lora, w->m->head_w, w->m->head_b, NB, 1, &err), 0);
    assert_int_equal(fp_adapter_clone(w->lora, &lg, &err), 0);
    for (int i = 0; i < lg->n; i++) {
        memset(lg->mods[i].A, 0, (size_t)lg->mods[i].rank * lg->mods[i].d_in * sizeof(float));
        memset(lg->mods[i].B, 0, (size_t)lg->mods[i].d_out * lg->mods[i].rank * sizeof(float));
    }
    float hw[5 * 16] = {0}, hb[5] = {0};
    double sum;
    fp_vit_forward(ws, w->px, NB, w->labels, &sum, NULL);
    memcpy(logits, fp_vit_logits(ws), NB * 5 * sizeof *logits);
    fp_vit_backward(ws, 1.0 / NB, lg, hw, hb, NULL);
    assert_int_equal(fp_vit_status(ws), 0);
    fp_vit64_pack(&m->c, lg, hw, hb, g);
    fp_adapter_free(lg);
    fp_vit_free_ws(ws);
    return sum / NB;
}

/* The frozen linears in bf16 and in NF4 (fp_vit_lowp): loss, logits and every LoRA and head
 * gradient against float32 over the very weights the base holds (what remains is the
 * activations' rounding to bf16 before those products); a restart's fold in the base's
 * precision; snapshot and restore; the refusals, on any CPU. */
static void test_low_precision_base(void **state)
{
    (void)state;
    world_t *w = make_world(1);
    fp_err_t err = {0}, probe = {0};
    /* NF4 needs whole blocks of 64 weights: 12 × 12 is none (refused before the CPU is asked) */
    fp_vit_config_t oc = w->m->c;
    oc.D = 12;
    oc.H = 3;
    fp_vit_t *odd = NULL;
    assert_int_equal(fp_vit_alloc(&oc, &odd, NULL), 0);
    assert_int_equal(fp_vit_lowp(odd, FP_BASE_NF4, &err), -EINVAL);
    assert_contains(fp_err_msg(&err), "query's 12 × 12 are not a whole number of them");
    assert_int_equal(fp_vit_lowp(odd, FP_BASE_F32, &err), 0);
    assert_true(odd->base == FP_BASE_F32 && odd->layers[0].w[0] && !odd->lowp_mem);
    fp_vit_free(odd);
    if (fp_lowp_probe(&probe) != 0) { /* this CPU: refused, saying why, the model unchanged */
        fp_vit_t *m = copy_vit(w->m);
        assert_true(fp_vit_lowp(m, FP_BASE_BF16, &err) < 0);
        assert_contains(fp_err_msg(&err), "cannot multiply bf16 on this CPU");
        assert_true(m->base == FP_BASE_F32 && m->layers[1].w[FP_VT_FC2] != NULL);
        assert_memory_equal(m->mem, w->m->mem, m->nparams * sizeof *m->mem);
        fp_vit_free(m);
        free_world(w);
        skip();
    }
    size_t n = fp_vit64_nparams(&w->m->c, w->lora);
    double *g = malloc(n * sizeof *g), *gr = malloc(n * sizeof *gr);
    float z[NB * 5], zr[NB * 5];
    for (int pass = 0; pass < 2; pass++) {
        fp_base_dtype_t dt = pass ? FP_BASE_NF4 : FP_BASE_BF16;
        fp_vit_t *lp = copy_vit(w->m), *ref = copy_vit(w->m);
        assert_int_equal(fp_vit_lowp(lp, dt, &err), 0);
        round_linears(ref, dt);
        assert_true(lp->base == dt && !lp->layers[1].w[FP_VT_FC1] && lp->layers[1].b[FP_VT_FC1]);
        assert_true(fp_vit_weight_bytes(lp) < fp_vit_weight_bytes(w->m));
        assert_memory_equal(lp->layers[1].b[FP_VT_FC1], w->m->layers[1].b[FP_VT_FC1],
                            24 * sizeof(float));
        double l = grads(lp, w, g, z), lr = grads(ref, w, gr, zr);
        double dg = 0, ng = 0, dz = 0, nz = 0;
        for (size_t i = 0; i < n; i++) {
            dg += (g[i] - gr[i]) * (g[i] - gr[i]);
            ng += gr[i] * gr[i];
        }
        for (int i = 0; i < NB * 5; i++) {
            dz = fabs(z[i] - zr[i]) > dz ? fabs(z[i] - zr[i]) : dz;
            nz = fabs(zr[i]) > nz ? fabs(zr[i]) : nz;
        }
        print_message("%s base: loss %.6f (float32 over its weights %.6f), logits within %.2g "
                      "of %.2g, gradients within %.2g relative\n", fp_base_dtype_name(dt), l, lr,
                      dz, nz, sqrt(dg / ng));
        if (!(fabs(l - lr) <= 1e-2 * lr && dz <= 2e-2 * nz && sqrt(dg / ng) <= 3e-2))
            fail_msg("%s base differs from float32 over the same weights beyond bf16's "
                     "rounding of activations", fp_base_dtype_name(dt));
        /* a restart's fold, in the base's precision; the snapshot puts the base back */
        void *snap = fp_vit_snapshot(lp), *again = NULL;
        assert_non_null(snap);
        assert_int_equal(fp_vit_fold(lp, w->lora, &err), 0);
        assert_int_equal(fp_vit_fold(ref, w->lora, &err), 0);
        int o, in;
        fp_vit_target_shape(&lp->c, FP_VT_FC2, &o, &in);
        const fp_lowp_mat_t *W = &lp->layers[1].lp[FP_VT_FC2];
        const float *R = ref->layers[1].w[FP_VT_FC2];
        size_t cnt = (size_t)o * in;
        float *got = malloc(cnt * sizeof *got);
        if (dt == FP_BASE_BF16)
            fp_bf16_unpack(got, W->h, cnt);
        else
            fp_nf4_dequantize(W->q, W->absmax, cnt, got);
        for (size_t b = 0; b < cnt; b += FP_NF4_BLOCK) {
            double amax = 0;
            for (size_t i = b; i < b + FP_NF4_BLOCK; i++)
                amax = fabs(R[i]) > amax ? fabs(R[i]) : amax;
            for (size_t i = b; i < b + FP_NF4_BLOCK; i++) {
                double tol = dt == FP_BASE_BF16 ? fabs(R[i]) / 256 + 1e-7
                                                : FP_NF4_MAX_ERR * amax * 1.01 + 1e-6;
                if (!(fabs(got[i] - R[i]) <= tol))
                    fail_msg("%s fold: weight %zu is %.6g, float32's %.6g", fp_base_dtype_name(dt),
                             i, got[i], R[i]);
            }
        }
        free(got);
        fp_vit_restore(lp, snap);
        assert_non_null(again = fp_vit_snapshot(lp));
        assert_memory_equal(again, snap, lp->nparams * sizeof(float) + lp->lowp_bytes);
        free(again);
        free(snap);
        /* what needs float32 weights says so */
        assert_int_equal(fp_vit_save(lp, fpt_dir, &err), -EINVAL);
        assert_contains(fp_err_msg(&err), "base cannot be saved in float32");
        assert_true(fp_vit_lowp(lp, FP_BASE_BF16, &err) < 0);
        fp_image_set_t d = {1, 3, 8, w->px, w->labels, "toy"};
        fp_vit_train_cfg_t tc = {.opt = fp_optim_defaults(), .steps = 1, .batch = 1, .full = 1};
        assert_int_equal(fp_vit_train(lp, NULL, NULL, NULL, &d, &tc, NULL, NULL, &err), -EINVAL);
        assert_contains(fp_err_msg(&err), "needs a float32 base");
        fp_vit_free(lp);
        fp_vit_free(ref);
    }
    free(g);
    free(gr);
    free_world(w);
}

/* Full training (the demo's pretraining): every frozen weight's float64 gradient against
 * central differences too — patch embedding, CLS, positions, LayerNorms, every linear and
 * bias — and the float32 one against it. */
static void test_full_gradient(void **state)
{
    (void)state;
    world_t *w = make_world(1);
    size_t nw = w->m->nparams, n = fp_vit64_nparams(&w->m->c, w->lora);
    double *wd = malloc(nw * sizeof *wd), *gw = malloc(nw * sizeof *gw);
    double *th = malloc(n * sizeof *th), *g = malloc(n * sizeof *g);
    for (size_t i = 0; i < nw; i++)
        wd[i] = w->m->mem[i];
    fp_vit64_pack(&w->m->c, w->lora, w->m->head_w, w->m->head_b, th);
    fp_vit64_loss_full(w->m, w->lora, wd, th, w->pxd, NB, w->labels, gw, g);
    const double h = 1e-6;
    double worst = 0, gmax = 0;
    size_t worst_at = 0, head0 = (size_t)(w->m->head_w - w->m->mem);
    for (size_t i = 0; i < nw; i++) {
        double keep = wd[i];
        wd[i] = keep + h;
        double up = fp_vit64_loss_full(w->m, w->lora, wd, th, w->pxd, NB, w->labels, NULL, NULL);
        wd[i] = keep - h;
        double down = fp_vit64_loss_full(w->m, w->lora, wd, th, w->pxd, NB, w->labels, NULL,
                                         NULL);
        wd[i] = keep;
        double fd = (up - down) / (2 * h), e = fabs(fd - gw[i]);
        if (i >= head0 && i < head0 + 5 * 17)
            assert_true(gw[i] == 0 && fd == 0); /* the checkpoint's own head: unused */
        gmax = fabs(gw[i]) > gmax ? fabs(gw[i]) : gmax;
        if (e > worst) {
            worst = e;
            worst_at = i;
        }
    }
    print_message("full: %zu weights, largest |fd − analytic| %.3g (at %zu), largest gradient "
                  "%.3g\n", nw, worst, worst_at, gmax);
    if (!(worst < 1e-8 + 1e-7 * gmax))
        fail_msg("weight %zu: finite difference and gradient differ by %g", worst_at, worst);
    /* float32 */
    fp_vit_t *gm = NULL;
    fp_err_t err = {0};
    assert_int_equal(fp_vit_alloc(&w->m->c, &gm, &err), 0);
    fp_vit_ws_t *ws = NULL;
    assert_int_equal(fp_vit_new(&ws, w->m, w->lora, w->m->head_w, w->m->head_b, NB, 1, &err), 0);
    double sum;
    fp_vit_forward(ws, w->px, NB, w->labels, &sum, NULL);
    fp_vit_backward(ws, 1.0 / NB, NULL, NULL, NULL, gm);
    double d32 = 0;
    for (size_t i = 0; i < nw; i++)
        d32 = fabs(gm->mem[i] - gw[i]) > d32 ? fabs(gm->mem[i] - gw[i]) : d32;
    print_message("full, float32: within %.3g of %.3g\n", d32, gmax);
    if (!(d32 <= 1e-4 * gmax))
        fail_msg("float32 full gradients differ from float64 by %g (largest %g)", d32, gmax);
    fp_vit_free_ws(ws);
    fp_vit_free(gm);
    free(wd);
    free(gw);
    free(th);
    free(g);
    free_world(w);
}

/* n images of 5 classes, each its class's fixed pattern plus noise (learnable, not trivially) */
static void toy_set(fp_rng_t *rng, const float *patterns, int n, fp_image_set_t *d)
{
    *d = (fp_image_set_t){.n = n, .C = 3, .S = 8, .px = malloc((size_t)n * 192 * sizeof(float)),
                          .labels = malloc((size_t)n * sizeof(int))};
    for (int i = 0; i < n; i++) {
        d->labels[i] = (int)fp_rng_below(rng, 5);
        for (int j = 0; j < 192; j++)
            d->px[i * 192 + j] = patterns[d->labels[i] * 192 + j] + (float)(0.8 * fp_rng_normal(rng));
    }
}

/* Training learns: LoRA and the head (a site's round) and every weight (pretraining) each take
 * a toy task from chance to ≥ 90 % on images they never saw; IDX files become image sets. */
static void test_training(void **state)
{
    (void)state;
    fp_rng_t rng;
    fp_rng_seed(&rng, 77);
    float patterns[5 * 192];
    fill(&rng, patterns, 5 * 192, 0, 1);
    fp_image_set_t tr, te;
    toy_set(&rng, patterns, 400, &tr);
    toy_set(&rng, patterns, 200, &te);
    for (int full = 0; full < 2; full++) {
        world_t *w = make_world(1);
        fp_vit_train_cfg_t c = {.opt = fp_optim_defaults(), .steps = 80, .batch = 16, .seed = 5,
                                .full = full};
        c.opt.lr = full ? 3e-3 : 1e-2;
        float hw[5 * 16], hb[5] = {0};
        fill(&rng, hw, 5 * 16, 0, 0.02); /* a fresh head */
        fp_err_t err = {0};
        double l0, a0, first, last, l1, a1;
        const float *ehw = full ? w->m->head_w : hw, *ehb = full ? w->m->head_b : hb;
        assert_int_equal(fp_vit_eval(w->m, full ? NULL : w->lora, ehw, ehb, &te, &l0, &a0, &err), 0);
        if (fp_vit_train(w->m, w->lora, hw, hb, &tr, &c, &first, &last, &err) != 0)
            fail_msg("%s", fp_err_msg(&err));
        assert_int_equal(fp_vit_eval(w->m, full ? NULL : w->lora, ehw, ehb, &te, &l1, &a1, &err), 0);
        print_message("%s: held-out loss %.3f → %.3f, accuracy %.1f %% → %.1f %% (training loss "
                      "%.3f → %.3f)\n", full ? "every weight" : "LoRA + head", l0, l1, 100 * a0,
                      100 * a1, first, last);
        assert_true(l1 < 0.5 * l0);
        assert_true(a1 >= 0.9);
        free_world(w);
    }
    fp_image_set_free(&tr);
    fp_image_set_free(&te);
    /* IDX: 3 images of 2 × 2 with labels, rescaled and normalised as the preprocessor says */
    char *ip = fp_path_join(fpt_dir, "img.idx"), *lp = fp_path_join(fpt_dir, "lab.idx");
    const uint8_t im[] = {0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 2,
                          0, 51, 102, 255, 1, 2, 3, 4, 200, 100, 50, 0};
    const uint8_t lb[] = {0, 0, 8, 1, 0, 0, 0, 3, 2, 0, 1};
    assert_int_equal(fp_fs_write_file(ip, im, sizeof im, 0644, NULL), 0);
    assert_int_equal(fp_fs_write_file(lp, lb, sizeof lb, 0644, NULL), 0);
    fp_imgproc_t pp;
    fp_imgproc_defaults(&pp, 2);
    pp.nmean = 1;
    fp_image_set_t s;
    fp_err_t err = {0};
    if (fp_image_set_idx(ip, lp, 1, 2, &pp, 2, &s, &err) != 0)
        fail_msg("%s", fp_err_msg(&err));
    assert_true(s.n == 2 && s.C == 1 && s.labels[0] == 0 && s.labels[1] == 1);
    assert_true(fabsf(s.px[0] - ((1.0f / 255) - 0.5f) / 0.5f) < 1e-6f);
    assert_true(fabsf(s.px[4] - ((200.0f / 255) - 0.5f) / 0.5f) < 1e-6f);
    fp_image_set_free(&s);
    assert_int_equal(fp_image_set_idx(ip, lp, 2, 5, &pp, 2, &s, &err), -EINVAL);
    assert_contains(fp_err_msg(&err), "img.idx: images 2 to 7 of 3");
    free(ip);
    free(lp);
}

/* Many labels on a small model (K far above T·max(D, F)): the head's gradient has room of its
 * own — float32 equals float64 there too (an overrun of a shared buffer would not). */
static void test_many_labels(void **state)
{
    (void)state;
    fp_vit_config_t c = {.D = 8, .L = 1, .H = 1, .F = 8, .S = 4, .P = 4, .C = 1, .K = 300,
                         .eps = 1e-6, .qkv_bias = 1};
    fp_vit_t *m = NULL;
    fp_err_t err = {0};
    assert_int_equal(fp_vit_alloc(&c, &m, &err), 0);
    fp_vit_init_random(m, 5);
    fp_rng_t rng;
    fp_rng_seed(&rng, 6);
    enum { B = 8 };
    float px[B * 16];
    double pxd[B * 16];
    int labels[B];
    fill(&rng, px, B * 16, 0, 1);
    for (int i = 0; i < B * 16; i++)
        pxd[i] = px[i];
    for (int i = 0; i < B; i++)
        labels[i] = (int)fp_rng_below(&rng, 300);
    size_t n = fp_vit64_nparams(&c, NULL);
    double *th = malloc(n * sizeof *th), *g = malloc(n * sizeof *g);
    fp_vit64_pack(&c, NULL, m->head_w, m->head_b, th);
    fp_vit64_loss(m, NULL, th, pxd, B, labels, g);
    fp_vit_ws_t *ws = NULL;
    assert_int_equal(fp_vit_new(&ws, m, NULL, m->head_w, m->head_b, B, 1, &err), 0);
    float *hw = calloc(300 * 8 + 300, sizeof *hw);
    double sum, worst = 0, gmax = 0;
    fp_vit_forward(ws, px, B, labels, &sum, NULL);
    fp_vit_backward(ws, 1.0 / B, NULL, hw, hw + 300 * 8, NULL);
    for (size_t i = 0; i < n; i++) {
        worst = fabs(hw[i] - g[i]) > worst ? fabs(hw[i] - g[i]) : worst;
        gmax = fabs(g[i]) > gmax ? fabs(g[i]) : gmax;
    }
    assert_true(worst <= 1e-4 * gmax && gmax > 0);
    fp_vit_free_ws(ws);
    free(hw);
    free(th);
    free(g);
    fp_vit_free(m);
}

/* The logits against an independent PyTorch ViT (float32) on the checkpoint and the PEFT
 * adapter fedpeft writes: ≤ 1e-5 relative. */
static void test_torch_parity(void **state)
{
    (void)state;
    if (system("/usr/bin/python3 -c 'import torch' 2>/dev/null") != 0)
        fail_msg("python3-torch is needed (deploy/setup.sh deps --test installs it)");
    world_t *w = make_world(1);
    fp_err_t err = {0};
    char *mdir = fp_path_join(fpt_dir, "vit"), *adir = fp_path_join(fpt_dir, "vit-lora");
    char *pxp = fp_path_join(fpt_dir, "pixels.raw");
    if (fp_vit_save(w->m, mdir, &err) != 0 || fp_hfpeft_save(w->lora, adir, &err) != 0)
        fail_msg("%s", fp_err_msg(&err));
    assert_int_equal(fp_fs_write_file(pxp, w->px, sizeof w->px, 0644, NULL), 0);
    const char *args[] = {FP_SOURCE_DIR "/tests/vision/torch_vit.py", mdir, adir, pxp, "3", NULL};
    char *out = NULL, *errs = NULL;
    int rc = fpt_runv("/usr/bin/python3", args, &out, &errs);
    if (rc)
        fail_msg("torch_vit.py: %s", errs);
    fp_vit_ws_t *ws = NULL;
    assert_int_equal(fp_vit_new(&ws, w->m, w->lora, w->m->head_w, w->m->head_b, NB, 0, &err), 0);
    fp_vit_forward(ws, w->px, NB, NULL, NULL, NULL);
    const float *z = fp_vit_logits(ws);
    double worst = 0, zmax = 0;
    const char *p = out;
    for (int i = 0; i < NB * 5; i++) {
        while (*p && !(*p == '-' || (*p >= '0' && *p <= '9')))
            p++;
        char *end;
        double t = strtod(p, &end);
        assert_true(end != p);
        p = end;
        worst = fabs(t - z[i]) > worst ? fabs(t - z[i]) : worst;
        zmax = fabs(t) > zmax ? fabs(t) : zmax;
    }
    print_message("logits within %.3g of PyTorch's (largest %.3g)\n", worst, zmax);
    if (!(worst <= 1e-5 * zmax))
        fail_msg("logits differ from PyTorch's by %g (largest %g)", worst, zmax);
    fp_vit_free_ws(ws);
    free(out);
    free(errs);
    free(mdir);
    free(adir);
    free(pxp);
    free_world(w);
}

/* torch_vit.py's logits (NB × 5) for the model and adapter directories; extra: its options */
static void torch_logits(const char *mdir, const char *adir, const char *pxp, const char *extra,
                         double *z)
{
    const char *args[] = {FP_SOURCE_DIR "/tests/vision/torch_vit.py", mdir, adir, pxp, "3", extra,
                          NULL};
    char *out = NULL, *errs = NULL;
    if (fpt_runv("/usr/bin/python3", args, &out, &errs) != 0)
        fail_msg("torch_vit.py: %s", errs);
    const char *p = out;
    for (int i = 0; i < NB * 5; i++) {
        while (*p && !(*p == '-' || (*p >= '0' && *p <= '9')))
            p++;
        char *end;
        z[i] = strtod(p, &end);
        assert_true(end != p);
        p = end;
    }
    free(out);
    free(errs);
}

static void same_logits(const char *what, const float *z, const double *t)
{
    double worst = 0, zmax = 0;
    for (int i = 0; i < NB * 5; i++) {
        worst = fabs(t[i] - z[i]) > worst ? fabs(t[i] - z[i]) : worst;
        zmax = fabs(t[i]) > zmax ? fabs(t[i]) : zmax;
    }
    print_message("%s: logits within %.3g of PyTorch's (largest %.3g)\n", what, worst, zmax);
    if (!(worst <= 1e-5 * zmax))
        fail_msg("%s: logits differ from PyTorch's by %g (largest %g)", what, worst, zmax);
}

/* The head as PEFT's modules_to_save, both ways: an adapter and head fedpeft writes give
 * PyTorch (the head replacing the checkpoint's, as PEFT's wrapper does) fedpeft's logits; one
 * written the PEFT way (LoRA on query and value, modules_to_save=["classifier"]) loads in
 * fedpeft and gives PyTorch's. A LoRA-only reader refuses such an adapter rather than drop
 * its head. */
static void test_head_as_peft_saves_it(void **state)
{
    (void)state;
    world_t *w = make_world(1);
    fp_err_t err = {0};
    char *mdir = fp_path_join(fpt_dir, "vit-h"), *adir = fp_path_join(fpt_dir, "vit-h-lora");
    char *pdir = fp_path_join(fpt_dir, "vit-h-peft"), *pxp = fp_path_join(fpt_dir, "px-h.raw");
    assert_int_equal(fp_vit_save(w->m, mdir, &err), 0);
    assert_int_equal(fp_fs_write_file(pxp, w->px, sizeof w->px, 0644, NULL), 0);
    fp_rng_t rng;
    fp_rng_seed(&rng, 99);
    float head[5 * 16 + 5];
    fill(&rng, head, 5 * 16 + 5, 0, 0.4); /* a head of its own, not the checkpoint's */
    if (fp_vit_adapter_save(w->lora, &w->m->c, head, head + 80, adir, &err) != 0)
        fail_msg("%s", fp_err_msg(&err));
    double t[NB * 5];
    torch_logits(mdir, adir, pxp, NULL, t);
    fp_vit_ws_t *ws = NULL;
    assert_int_equal(fp_vit_new(&ws, w->m, w->lora, head, head + 80, NB, 0, &err), 0);
    fp_vit_forward(ws, w->px, NB, NULL, NULL, NULL);
    same_logits("fedpeft's adapter and head in PyTorch", fp_vit_logits(ws), t);
    fp_vit_free_ws(ws);
    /* read back by fedpeft: the same factors and head */
    fp_adapter_t *back = NULL;
    float *hb = NULL;
    if (fp_vit_adapter_load(adir, &w->m->c, &back, &hb, &err) != 0)
        fail_msg("%s", fp_err_msg(&err));
    assert_memory_equal(hb, head, sizeof head);
    assert_int_equal(back->n, w->lora->n);
    fp_adapter_free(back);
    free(hb);
    /* any reader of adapters takes the head as the adapter's tensors trained in full */
    assert_int_equal(fp_hfpeft_load(adir, 0, &back, &err), 0);
    assert_int_equal(back->nwhole, 2);
    assert_string_equal(back->whole[1].name, "classifier.weight");
    assert_memory_equal(back->whole[1].v, head, 80 * sizeof *head);
    assert_memory_equal(back->whole[0].v, head + 80, 5 * sizeof *head);
    fp_adapter_free(back);
    /* written the PEFT way, by PyTorch */
    torch_logits(mdir, pdir, pxp, "--write-peft", t);
    if (fp_vit_adapter_load(pdir, &w->m->c, &back, &hb, &err) != 0)
        fail_msg("%s", fp_err_msg(&err));
    assert_int_equal(back->n, 2 * 2); /* query and value of both layers */
    assert_int_equal(fp_vit_new(&ws, w->m, back, hb, hb + 80, NB, 0, &err), 0);
    fp_vit_forward(ws, w->px, NB, NULL, NULL, NULL);
    same_logits("PEFT's adapter and head in fedpeft", fp_vit_logits(ws), t);
    fp_vit_free_ws(ws);
    fp_adapter_free(back);
    free(hb);
    /* a head of the wrong shape is refused by name */
    fp_vit_config_t other = w->m->c;
    other.K = 4;
    assert_int_equal(fp_vit_adapter_load(pdir, &other, &back, &hb, &err), -EBADMSG);
    assert_contains(fp_err_msg(&err), "not this ViT's classifier (classifier.weight 4 × 16 and classifier.bias 4)");
    free(mdir);
    free(adir);
    free(pdir);
    free(pxp);
    free_world(w);
}

static char *write_json(const char *name, const char *text)
{
    char *p = fp_path_join(fpt_dir, name);
    assert_int_equal(fp_fs_write_file(p, text, strlen(text), 0644, NULL), 0);
    return p;
}

/* config.json: understood or refused by name; a checkpoint reads back as written. */
static void test_config_and_checkpoint(void **state)
{
    (void)state;
    const char *ok = "\"model_type\": \"vit\", \"hidden_size\": 16, \"num_hidden_layers\": 2, "
                     "\"num_attention_heads\": 4, \"intermediate_size\": 24, \"image_size\": 8, "
                     "\"patch_size\": 4, \"num_channels\": 3, \"layer_norm_eps\": 1e-6";
    struct {
        const char *extra, *said;
    } bad[] = {
        {", \"use_mask_token\": true", "key \"use_mask_token\" is not understood"},
        {", \"hidden_act\": \"gelu_new\"", "hidden_act \"gelu_new\""},
        {", \"hidden_dropout_prob\": 0.1", "fedpeft trains without dropout"},
        {", \"problem_type\": \"multi_label_classification\"", "single-label"},
        {", \"num_labels\": 3, \"id2label\": {\"0\": \"a\", \"1\": \"b\"}", "num_labels 3"},
    };
    fp_vit_config_t c;
    fp_err_t err = {0};
    char text[1024];
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        snprintf(text, sizeof text, "{%s%s}", ok, bad[i].extra);
        char *p = write_json("config.json", text);
        if (fp_vit_config_load(p, &c, &err) == 0)
            fail_msg("accepted: %s", text);
        assert_contains(fp_err_msg(&err), bad[i].said);
        free(p);
    }
    char *p = write_json("deit.json", "{\"model_type\": \"deit\"}");
    assert_int_equal(fp_vit_config_load(p, &c, &err), -ENOTSUP);
    assert_contains(fp_err_msg(&err), "model_type \"deit\"");
    free(p);
    snprintf(text, sizeof text, "{%s}", ok);
    memcpy(strstr(text, "\"hidden_size\": 16"), "\"hidden_size\": 18", 17); /* heads of 4.5 */
    p = write_json("odd.json", text);
    assert_int_equal(fp_vit_config_load(p, &c, &err), -EINVAL);
    assert_contains(fp_err_msg(&err), "not a multiple of num_attention_heads");
    free(p);
    /* written and read back: every weight, the labels; without a classifier, a fresh head */
    world_t *w = make_world(0);
    char *dir = fp_path_join(fpt_dir, "ckpt");
    assert_int_equal(fp_vit_save(w->m, dir, &err), 0);
    fp_vit_t *back = NULL;
    if (fp_vit_load(dir, &back, &err) != 0)
        fail_msg("%s", fp_err_msg(&err));
    assert_int_equal(back->c.qkv_bias, 0);
    assert_int_equal(back->c.K, 5);
    assert_string_equal(back->c.labels[4], "LABEL_4");
    assert_int_equal(back->nparams, w->m->nparams);
    assert_memory_equal(back->mem, w->m->mem, w->m->nparams * sizeof(float));
    assert_int_equal(back->head_fresh, 0);
    fp_vit_free(back);
    /* a tensor the model would not compute is refused; without a classifier, a fresh head */
    char *sp = fp_path_join(dir, "model.safetensors");
    fp_st_file_t *st = NULL;
    assert_int_equal(fp_st_open(&st, sp, &err), 0);
    size_t nt = fp_st_count(st);
    fp_st_entry_t *e = calloc(nt + 1, sizeof *e);
    float **vals = calloc(nt, sizeof *vals), extra[3] = {1, 2, 3};
    for (size_t i = 0; i < nt; i++) {
        const fp_st_tensor_t *x = fp_st_get(st, i);
        vals[i] = malloc(x->nelem * sizeof(float));
        assert_int_equal(fp_st_read_f32(st, x, vals[i], &err), 0);
        e[i] = (fp_st_entry_t){.name = x->name, .dtype = FP_DT_F32, .ndim = x->ndim,
                               .f32 = vals[i]};
        memcpy(e[i].shape, x->shape, sizeof x->shape);
    }
    e[nt] = (fp_st_entry_t){.name = "vit.encoder.layer.0.attention.attention.rel_pos",
                            .dtype = FP_DT_F32, .ndim = 1, .shape = {3}, .f32 = extra};
    assert_int_equal(fp_st_write(sp, e, nt + 1, NULL, &err), 0);
    assert_int_equal(fp_vit_load(dir, &back, &err), -ENOTSUP);
    assert_contains(fp_err_msg(&err), "tensor vit.encoder.layer.0.attention.attention.rel_pos is "
                                      "not part of");
    size_t kept = 0;
    for (size_t i = 0; i < nt; i++)
        if (strncmp(e[i].name, "classifier.", 11) != 0)
            e[kept++] = e[i];
    assert_int_equal(fp_st_write(sp, e, kept, NULL, &err), 0);
    if (fp_vit_load(dir, &back, &err) != 0)
        fail_msg("%s", fp_err_msg(&err));
    assert_int_equal(back->head_fresh, 1);
    fp_vit_free(back);
    fp_st_close(st);
    for (size_t i = 0; i < nt; i++)
        free(vals[i]);
    free(vals);
    free(e);
    free(sp);
    snprintf(text, sizeof text, "{%s, \"num_labels\": 1}", ok);
    p = write_json("one.json", text);
    assert_int_equal(fp_vit_config_load(p, &c, &err), -ENOTSUP);
    assert_contains(fp_err_msg(&err), "regresses");
    free(p);
    /* the LoRA check: a module the model does not have, or of the wrong shape */
    fp_module_desc_t d1 = {"vit.encoder.layer.0.attention.attention.query_proj", 16, 16, 2, 4, 0};
    fp_module_desc_t d2 = {"vit.encoder.layer.1.intermediate.dense", 16, 16, 2, 4, 0};
    fp_adapter_t *ad = NULL;
    assert_int_equal(fp_adapter_new(&ad, &d1, 1, NULL), 0);
    assert_int_equal(fp_vit_lora_check(&w->m->c, ad, &err), -EINVAL);
    assert_contains(fp_err_msg(&err), "is not one of the ViT's linears");
    fp_adapter_free(ad);
    assert_int_equal(fp_adapter_new(&ad, &d2, 1, NULL), 0);
    assert_int_equal(fp_vit_lora_check(&w->m->c, ad, &err), -EINVAL);
    assert_contains(fp_err_msg(&err), "the model's weight is 24 × 16");
    fp_adapter_free(ad);
    free(dir);
    free_world(w);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gradient_against_finite_differences),
        cmocka_unit_test(test_f32_against_f64),
        cmocka_unit_test(test_low_precision_base),
        cmocka_unit_test(test_full_gradient),
        cmocka_unit_test(test_training),
        cmocka_unit_test(test_many_labels),
        cmocka_unit_test(test_torch_parity),
        cmocka_unit_test(test_head_as_peft_saves_it),
        cmocka_unit_test(test_config_and_checkpoint),
    };
    return cmocka_run_group_tests(tests, fpt_setup_dir, fpt_teardown_dir);
}
