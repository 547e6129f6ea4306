/* tests/test_lowp.c — the frozen base in bf16 and NF4 (peft/train/fp_lowp.c): the codecs
 * against their definitions, oneDNN's products against float64 on the same rounded operands,
 * and the transformer on a low-precision base against the float one and the float64
 * reference's LoRA gradients. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_dtype.h"
#include "fp_fs.h"
#include "fp_lowp.h"
#include "fp_model.h"
#include "fp_par.h"
#include "fp_rng.h"
#include "fp_test.h"
#include "fp_trainer.h"
#include "fp_transformer.h"
#include "fp_transformer64.h"

/* Every vector level this CPU runs (fpt_simd_use) converts alike, tails included. */
static void test_bf16_codec(void **state)
{
    (void)state;
    fp_rng_t g;
    fp_rng_seed(&g, 1);
    enum { n = 4096 + 7 };
    float x[n];
    fp_rng_fill_normal(&g, x, n, 3.0);
    x[0] = INFINITY;
    x[1] = -INFINITY;
    x[2] = NAN;
    x[3] = 0.0f;
    x[4] = -0.0f;
    x[5] = 1.00390625f;  /* a tie: 1 + 2^-8 rounds to even, 1 */
    x[6] = 1.01171875f;  /* a tie: 1 + 3·2^-8 rounds to even, 1 + 2^-6 */
    x[7] = 3.4e38f;      /* rounds up past the largest bf16: infinity */
    x[n - 1] = -NAN;     /* in the tail */
    x[n - 2] = 1e-40f;   /* a subnormal, kept */
    for (int v = fpt_simd_top(); v >= 0; v--) {
        fpt_simd_use(v);
        uint16_t h[n];
        float back[n];
        fp_bf16_pack(h, x, n);
        fp_bf16_unpack(back, h, n);
        for (int i = 0; i < n; i++) {
            assert_int_equal(h[i], fp_f32_to_bf16(x[i])); /* the loader's rounding */
            uint32_t bits;
            memcpy(&bits, &back[i], sizeof bits);
            assert_int_equal(bits, (uint32_t)h[i] << 16);
            if (isnan(x[i]))
                assert_true(isnan(back[i]));
            else if (isfinite(back[i])) /* half an ulp; subnormal: half of 2^-133 */
                assert_true(fabsf(back[i] - x[i]) <= fmaxf(ldexpf(fabsf(x[i]), -8), 0x1p-134f));
        }
        assert_true(back[5] == 1.0f);
        assert_true(back[6] == 1.015625f);
        assert_true(isinf(back[7]));
        assert_true(back[n - 2] != 0.0f);
    }
}

static void test_nf4_codec(void **state)
{
    (void)state;
    for (int i = 1; i < 16; i++) /* the code ascends from -1 to 1 through an exact 0 */
        assert_true(fp_nf4_code[i] > fp_nf4_code[i - 1]);
    assert_true(fp_nf4_code[0] == -1.0f && fp_nf4_code[7] == 0.0f && fp_nf4_code[15] == 1.0f);
    double widest = 0;
    for (int i = 1; i < 16; i++)
        widest = fmax(widest, (double)fp_nf4_code[i] - fp_nf4_code[i - 1]);
    assert_true(fabs(widest / 2 - FP_NF4_MAX_ERR) < 1e-7);
    enum { n = 64 * 200 };
    float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y);
    uint8_t *q = malloc(n / 2);
    float am[n / 64];
    fp_rng_t g;
    fp_rng_seed(&g, 2);
    fp_rng_fill_normal(&g, x, n, 0.02);
    for (int i = 0; i < 64; i++) /* a block of zeros, and one of a single spike */
        x[i] = 0;
    for (int i = 64; i < 128; i++)
        x[i] = i == 100 ? 5.0f : 0.0f;
    fp_nf4_quantize(x, n, q, am);
    fp_nf4_dequantize(q, am, n, y);
    double sum_err = 0, sum_abs = 0;
    for (int b = 0; b < n / 64; b++) {
        float m = 0;
        for (int i = 0; i < 64; i++)
            m = fmaxf(m, fabsf(x[b * 64 + i]));
        assert_true(am[b] == m);
        for (int i = 0; i < 64; i++) {
            double e = fabs((double)y[b * 64 + i] - x[b * 64 + i]);
            if (!(e <= FP_NF4_MAX_ERR * m * (1 + 1e-6)))
                fail_msg("block %d, weight %d: error %g above the NF4 bound %g", b, i, e,
                         FP_NF4_MAX_ERR * m);
            sum_err += e;
            sum_abs += fabs(x[b * 64 + i]);
        }
    }
    for (int i = 0; i < 128; i++) /* zeros and the spike come back exactly */
        assert_true(y[i] == x[i]);
    print_message("NF4 round trip: mean |error| %.3f of mean |weight|\n", sum_err / sum_abs);
    assert_true(sum_err / sum_abs < 0.12); /* normal weights: far inside the worst case */
    /* straight to bf16, as the products take it, at every vector level: the float weights
     * rounded, nibble order included; nothing past n written */
    uint16_t *h = malloc((n + 8) * sizeof *h);
    for (int v = fpt_simd_top(); v >= 0; v--) {
        fpt_simd_use(v);
        for (size_t m = 64; m <= n; m += m < 64 * 4 ? 64 : n - 64 * 4) {
            memset(h, 0xab, (n + 8) * sizeof *h);
            fp_nf4_dequantize_bf16(q, am, m, h);
            for (size_t i = 0; i < m; i++)
                if (h[i] != fp_f32_to_bf16(y[i]))
                    fail_msg("level %d, n %zu, weight %zu: %#x, not %#x", v, m, i, h[i],
                             fp_f32_to_bf16(y[i]));
            assert_int_equal(h[m], 0xabab);
        }
    }
    free(h);
    free(x);
    free(y);
    free(q);
}

/* y = x·Wᵀ and dx = dy·W through oneDNN against float64 on the same bf16 operands, with
 * strided rows and accumulation; NF4 over several tiles. */
static void test_products(void **state)
{
    (void)state;
    fpt_need_lowp();
    const int N = 33, R = 1100, C = 1024; /* NF4: 512 rows a tile, three tiles */
    int ld = C + 24, ldo = R + 8;
    fp_rng_t g;
    fp_rng_seed(&g, 3);
    float *w = malloc((size_t)R * C * sizeof *w), *wd = malloc((size_t)R * C * sizeof *wd);
    float *x = malloc((size_t)N * ld * sizeof *x), *dy = malloc((size_t)N * ldo * sizeof *dy);
    float *y = malloc((size_t)N * ldo * sizeof *y), *dx = malloc((size_t)N * ld * sizeof *dx);
    uint16_t *h = malloc((size_t)R * C * sizeof *h);
    uint8_t *q = malloc((size_t)R * C / 2);
    float *am = malloc((size_t)R * C / 64 * sizeof *am);
    fp_rng_fill_normal(&g, w, (size_t)R * C, 0.05);
    fp_rng_fill_normal(&g, x, (size_t)N * ld, 1.0);
    fp_rng_fill_normal(&g, dy, (size_t)N * ldo, 1.0);
    fp_bf16_pack(h, w, (size_t)R * C);
    fp_nf4_quantize(w, (size_t)R * C, q, am);
    for (int dt = 0; dt < 2; dt++) {
        fp_lowp_mat_t W = dt == 0 ? (fp_lowp_mat_t){FP_BASE_BF16, R, C, h, NULL, NULL}
                                  : (fp_lowp_mat_t){FP_BASE_NF4, R, C, NULL, q, am};
        /* the weights the product sees: bf16, or NF4 dequantised and rounded to bf16 */
        if (dt == 0)
            fp_bf16_unpack(wd, h, (size_t)R * C);
        else
            fp_nf4_dequantize(q, am, (size_t)R * C, wd);
        for (size_t i = 0; dt == 1 && i < (size_t)R * C; i++)
            wd[i] = fp_bf16_to_f32(fp_f32_to_bf16(wd[i]));
        for (int beta = 0; beta < 2; beta++) {
            for (size_t i = 0; i < (size_t)N * ldo; i++)
                y[i] = 0.5f;
            for (size_t i = 0; i < (size_t)N * ld; i++)
                dx[i] = 0.25f;
            assert_int_equal(fp_lowp_mm_wt(N, x, ld, &W, y, ldo, (float)beta), 0);
            assert_int_equal(fp_lowp_mm(N, dy, ldo, &W, dx, ld, (float)beta), 0);
            double worst = 0;
            for (int i = 0; i < N; i++) {
                for (int r = 0; r < R; r++) {
                    double ref = beta * 0.5, mag = 0;
                    for (int c = 0; c < C; c++) {
                        double xv = fp_bf16_to_f32(fp_f32_to_bf16(x[(size_t)i * ld + c]));
                        ref += xv * wd[(size_t)r * C + c];
                        mag += fabs(xv * wd[(size_t)r * C + c]);
                    }
                    worst = fmax(worst, fabs(y[(size_t)i * ldo + r] - ref) / mag);
                }
                assert_true(y[(size_t)i * ldo + R] == 0.5f); /* past the row: untouched */
                for (int c = 0; c < C; c += 7) {
                    double ref = beta * 0.25, mag = 0;
                    for (int r = 0; r < R; r++) {
                        double dv = fp_bf16_to_f32(fp_f32_to_bf16(dy[(size_t)i * ldo + r]));
                        ref += dv * wd[(size_t)r * C + c];
                        mag += fabs(dv * wd[(size_t)r * C + c]);
                    }
                    worst = fmax(worst, fabs(dx[(size_t)i * ld + c] - ref) / mag);
                }
            }
            if (!(worst < 1e-5)) /* fp32 accumulation of bf16 products */
                fail_msg("%s products (beta %d): error %g of the terms' magnitude",
                         dt ? "nf4" : "bf16", beta, worst);
        }
    }
    free(w);
    free(wd);
    free(x);
    free(dy);
    free(y);
    free(dx);
    free(h);
    free(q);
    free(am);
}

/* Attention's batched products (fp_lowp_bmm) against float64 on the same bf16 operands:
 * either operand read transposed through its strides, with and without a scale, padded batch
 * and row strides (the padding untouched); bad shapes refused. */
static void test_batched(void **state)
{
    (void)state;
    fpt_need_lowp();
    enum { NB = 3, M = 40, K = 70, N = 24, PAD = 5 };
    fp_rng_t g;
    fp_rng_seed(&g, 4);
    size_t as = (size_t)M * K + PAD, bs = (size_t)K * N + PAD, ldc = N + 3,
           cs = (size_t)M * ldc + PAD;
    float *af = malloc(NB * as * sizeof *af), *bf = malloc(NB * bs * sizeof *bf);
    uint16_t *a = malloc(NB * as * sizeof *a), *b = malloc(NB * bs * sizeof *b);
    float *c = malloc(NB * cs * sizeof *c);
    fp_rng_fill_normal(&g, af, NB * as, 1.0);
    fp_rng_fill_normal(&g, bf, NB * bs, 1.0);
    fp_bf16_pack(a, af, NB * as);
    fp_bf16_pack(b, bf, NB * bs);
    for (int v = 0; v < 8; v++) {
        int ta = v & 1, tb = (v >> 1) & 1;
        float alpha = v & 4 ? 1.0f : 0.125f;
        /* A_b (M × K) stored as M × K, or K × M read transposed; B_b likewise */
        const int64_t sa[3] = {(int64_t)as, ta ? 1 : K, ta ? M : 1};
        const int64_t sb[3] = {(int64_t)bs, tb ? 1 : N, tb ? K : 1};
        const int64_t sc[2] = {(int64_t)cs, (int64_t)ldc};
        for (size_t i = 0; i < NB * cs; i++)
            c[i] = 7.0f;
        assert_int_equal(fp_lowp_bmm(NB, M, N, K, alpha, a, sa, b, sb, c, sc), 0);
        double worst = 0;
        for (int n = 0; n < NB; n++)
            for (int i = 0; i < M; i++) {
                for (int j = 0; j < N; j++) {
                    double ref = 0, mag = 0;
                    for (int k = 0; k < K; k++) {
                        double x = fp_bf16_to_f32(a[n * as + i * sa[1] + k * sa[2]]);
                        double y = fp_bf16_to_f32(b[n * bs + k * sb[1] + j * sb[2]]);
                        ref += alpha * x * y;
                        mag += fabs(alpha * x * y);
                    }
                    worst = fmax(worst, fabs(c[n * cs + i * ldc + j] - ref) / mag);
                }
                for (size_t j = N; j < ldc; j++) /* past the row: untouched */
                    assert_true(c[n * cs + i * ldc + j] == 7.0f);
            }
        for (int n = 0; n < NB; n++) /* past the batch's rows: untouched */
            for (size_t j = (size_t)M * ldc; j < cs; j++)
                assert_true(c[n * cs + j] == 7.0f);
        if (!(worst < 1e-5))
            fail_msg("batched product (A%s, B%s, alpha %g): error %g of the terms' "
                     "magnitude", ta ? "ᵀ" : "", tb ? "ᵀ" : "", alpha, worst);
    }
    const int64_t s3[3] = {1, 1, 1}, s2[2] = {1, 1};
    assert_int_equal(fp_lowp_bmm(-1, M, N, K, 1, a, s3, b, s3, c, s2), -EINVAL);
    assert_int_equal(fp_lowp_bmm(1, 0, N, K, 1, a, s3, b, s3, c, s2), -EINVAL);
    assert_int_equal(fp_lowp_bmm(1, M, N, K, 1, a, s3, b, s3, c, s2), -EINVAL); /* ldc < N */
    free(af);
    free(bf);
    free(a);
    free(b);
    free(c);
}

/* A small model whose matrices are whole NF4 blocks; the float model's linear weights,
 * embedding and head rounded to bf16 so that a bf16 base holds exactly them. */
static fp_model_t *model_b(int tied, int round_bf16, int bias)
{
    fp_model_config_t c = {.dim = 64, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2,
                           .head_dim = 16, .ff = 128, .vocab = 96, .max_seq = 64,
                           .rms_eps = 1e-5, .rope_theta = 10000, .tied = tied,
                           .bias = bias ? FP_BIAS_QKVO : 0u, .bos_id = -1, .eos_id = -1};
    fp_model_t *m;
    assert_int_equal(fp_model_new(&m, &c, NULL), 0);
    fp_model_init(m, 7 + (uint64_t)tied);
    fp_rng_t g;
    fp_rng_seed(&g, 9);
    for (size_t i = 0; i < m->n_params; i++) /* larger weights: a less trivial function */
        m->mem[i] += 0.05f * (float)fp_rng_normal(&g);
    fp_model_tensor_t *t;
    int n;
    assert_int_equal(fp_model_tensors(m, &t, &n, NULL), 0);
    for (int k = 0; round_bf16 && k < n; k++)
        if (t[k].ndim == 2)
            for (int64_t e = 0; e < t[k].shape[0] * t[k].shape[1]; e++)
                t[k].data[e] = fp_bf16_to_f32(fp_f32_to_bf16(t[k].data[e]));
    free(t);
    return m;
}

static fp_model_t *model(int tied, int round_bf16)
{
    return model_b(tied, round_bf16, 0);
}

static fp_model_t *clone(const fp_model_t *m)
{
    fp_model_t *c;
    assert_int_equal(fp_model_new(&c, &m->cfg, NULL), 0);
    memcpy(c->mem, m->mem, m->n_params * sizeof(float));
    return c;
}

enum { B = 2, T = 24, NT = B * T };

static void batch(int *tokens, int *labels, int vocab)
{
    fp_rng_t g;
    fp_rng_seed(&g, 11);
    for (int i = 0; i < NT; i++) {
        tokens[i] = (int)fp_rng_below(&g, (uint64_t)vocab);
        labels[i] = i % T == T - 1 ? -1 : (int)fp_rng_below(&g, (uint64_t)vocab);
    }
}

static double loss_of(const fp_model_t *m, const fp_adapter_t *ad, const int *tok,
                      const int *lab)
{
    fp_tf_t *tf;
    assert_int_equal(fp_tf_new(&tf, m, ad, B, T, FP_TF_EVAL, NULL), 0);
    double s;
    long c;
    fp_tf_forward(tf, tok, lab, &s, &c);
    fp_tf_free(tf);
    return s / (double)c;
}

/* Forward loss within 1e-2 of the float base's (bf16 and nf4); LoRA gradients of the bf16
 * base against the float64 reference on the same (bf16-valued) weights: untied, tied, and
 * Mistral's sliding window with Llama 3's RoPE scaling (the bf16 attention masks as the float
 * one does). */
static void test_transformer(void **state)
{
    (void)state;
    fpt_need_lowp();
    int tok[NT], lab[NT];
    for (int v = 0; v < 3; v++) {
        int tied = v == 1;
        fp_model_t *m32 = model(tied, 1);
        if (v == 2) {
            m32->cfg.family = FP_FAMILY_MISTRAL;
            m32->cfg.window = 3;
            /* head_dim 16: wavelengths 6.3 to 19,900; kept below 50, blended to 200 */
            m32->cfg.rope = (fp_rope_scaling_t){.type = FP_ROPE_LLAMA3, .factor = 8,
                                           .low_freq_factor = 1, .high_freq_factor = 4,
                                           .original_max = 200};
        }
        fp_model_t *mb = clone(m32), *mq = clone(m32);
        batch(tok, lab, m32->cfg.vocab);
        fp_adapter_t *ad;
        assert_int_equal(fp_lora_init(m32, (1u << FP_T_COUNT) - 1, 4, 8, 0, 5, &ad, NULL), 0);
        fp_rng_t g;
        fp_rng_seed(&g, 13);
        for (int j = 0; j < ad->n; j++) /* B ≠ 0: the adapter matters */
            fp_rng_fill_normal(&g, ad->mods[j].B, (size_t)ad->mods[j].d_out * 4, 0.05);
        assert_int_equal(fp_model_lowp(mb, FP_BASE_BF16, NULL), 0);
        assert_int_equal(fp_model_lowp(mq, FP_BASE_NF4, NULL), 0);
        assert_null(mb->embed);
        assert_true(fp_model_weight_bytes(mb) < 0.55 * fp_model_weight_bytes(m32));
        assert_true(fp_model_weight_bytes(mq) < 0.55 * fp_model_weight_bytes(m32));
        double l32 = loss_of(m32, ad, tok, lab), lb = loss_of(mb, ad, tok, lab);
        double lq = loss_of(mq, ad, tok, lab);
        const char *what = v == 2 ? "window 3, llama3 RoPE" : tied ? "tied" : "untied";
        print_message("%s: loss f32 %.6f, bf16 %.6f, nf4 %.6f\n", what, l32, lb, lq);
        assert_true(fabs(lb - l32) < 1e-2 * l32);
        assert_true(fabs(lq - l32) < 1e-1 * l32); /* 4-bit weights: a nearby function */
        assert_true(lb != l32);                   /* the bf16 path ran */
        /* LoRA gradients: float64 on the same weights vs the bf16 base (activations rounded to
         * bf16 as they enter the base's products) */
        fp_tf64_t *r;
        assert_int_equal(fp_tf64_new(&r, m32, ad, B, T, FP_TF_LORA, NULL), 0);
        fp_tf64_loss(r, tok, NULL, lab);
        fp_tf64_backward(r);
        fp_adapter_t *grad;
        assert_int_equal(fp_adapter_clone(ad, &grad, NULL), 0);
        memset(grad->data, 0, fp_adapter_params(grad) * sizeof(float));
        fp_tf_t *tf;
        assert_int_equal(fp_tf_new(&tf, mb, ad, B, T, FP_TF_LORA, NULL), 0);
        double s;
        long c;
        fp_tf_forward(tf, tok, lab, &s, &c);
        fp_tf_backward(tf, 1.0 / (double)c, grad, NULL);
        double worst = fpt_lora_grad_rel(grad, r);
        print_message("%s: LoRA gradients of the bf16 base vs float64: worst %.3g relative\n",
                      what, worst);
        if (!(worst < 3e-2)) /* bf16 has 8 bits of mantissa: errors of 2^-9 per rounding */
            fail_msg("bf16 LoRA gradients: %g from float64", worst);
        fp_tf_free(tf);
        fp_tf64_free(r);
        fp_adapter_free(grad);
        fp_adapter_free(ad);
        fp_model_free(m32);
        fp_model_free(mb);
        fp_model_free(mq);
    }
}

/* Folding an update into a low-precision base (restart strategies) rounds as the base is held,
 * and a snapshot puts the base back bit for bit. */
static void test_fold_and_restore(void **state)
{
    (void)state;
    fpt_need_lowp();
    fp_model_t *m32 = model(0, 1), *mb = clone(m32);
    assert_int_equal(fp_model_lowp(mb, FP_BASE_BF16, NULL), 0);
    fp_adapter_t *ad;
    assert_int_equal(fp_lora_init(m32, 1u << FP_T_Q, 4, 8, 0, 5, &ad, NULL), 0);
    fp_rng_t g;
    fp_rng_seed(&g, 17);
    fp_rng_fill_normal(&g, ad->mods[0].B, (size_t)ad->mods[0].d_out * 4, 0.1);
    void *snap = fp_model_snapshot(mb);
    assert_non_null(snap);
    assert_int_equal(fp_lora_merge_into(m32, ad, NULL), 0);
    assert_int_equal(fp_lora_merge_into(mb, ad, NULL), 0);
    const fp_lowp_mat_t *w = &mb->layers[0].lp[FP_T_Q];
    for (int e = 0; e < w->rows * w->cols; e++) /* the float fold, rounded once */
        assert_int_equal(w->h[e], fp_f32_to_bf16(m32->layers[0].w[FP_T_Q][e]));
    fp_model_restore(mb, snap);
    fp_model_t *fresh = model(0, 1);
    assert_int_equal(fp_model_lowp(fresh, FP_BASE_BF16, NULL), 0);
    assert_memory_equal(mb->lowp_mem, fresh->lowp_mem, mb->lowp_bytes);
    free(snap);
    fp_adapter_free(ad);
    fp_model_free(m32);
    fp_model_free(mb);
    fp_model_free(fresh);
}


/* Loading straight into a low-precision base holds what loading in float and converting
 * holds, byte for byte: from F32 (converted from the mapping), BF16 (copied, or quantised a
 * chunk at a time) and F16 (through a float buffer) checkpoints, tied or not, with biases. */
static void test_load_base(void **state)
{
    (void)state;
    fpt_need_lowp();
    char *dir = fpt_mkdtemp();
    static const fp_dtype_t files[] = {FP_DT_F32, FP_DT_BF16, FP_DT_F16};
    for (int v = 0; v < 2; v++) {
        fp_model_t *m = model_b(v, 0, v);
        for (int f = 0; f < 3; f++) {
            char *d = fp_path_join(dir, fp_dtype_name(files[f]));
            assert_non_null(d);
            assert_int_equal(fp_model_save(m, d, files[f], NULL), 0);
            fp_model_t *f32;
            assert_int_equal(fp_model_load_base(d, FP_BASE_F32, &f32, NULL), 0);
            for (int dt = FP_BASE_BF16; dt <= FP_BASE_NF4; dt++) {
                fp_model_t *ref, *got;
                fp_err_t err = {0};
                assert_int_equal(fp_model_load(d, &ref, NULL), 0);
                assert_int_equal(fp_model_lowp(ref, (fp_base_dtype_t)dt, NULL), 0);
                assert_int_equal(fp_model_load_base(d, (fp_base_dtype_t)dt, &got, &err), 0);
                assert_int_equal(got->base, dt);
                assert_int_equal(got->n_params, f32->n_params);
                assert_int_equal(got->lowp_bytes, ref->lowp_bytes);
                assert_int_equal(got->n_floats, ref->n_floats);
                assert_memory_equal(got->lowp_mem, ref->lowp_mem, ref->lowp_bytes);
                assert_memory_equal(got->mem, ref->mem, ref->n_floats * sizeof(float));
                assert_int_equal(fp_model_weight_bytes(got), fp_model_weight_bytes(ref));
                fp_model_free(ref);
                fp_model_free(got);
            }
            fp_model_free(f32);
            free(d);
        }
        fp_model_free(m);
    }
    fpt_rmtree(dir);
    free(dir);
}

/* kB of a /proc/self/status field */
static long status_kb(const char *field)
{
    FILE *f = fopen("/proc/self/status", "r");
    assert_non_null(f);
    char line[256];
    long kb = -1;
    size_t n = strlen(field);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, field, n) && line[n] == ':')
            kb = atol(line + n + 1);
    fclose(f);
    assert_true(kb >= 0);
    return kb;
}

/* The float weights are never held: the resident peak while loading a bf16 base from an
 * F32 checkpoint grows by less than 3/4 of the float weights (converting after a float load
 * grows by at least the whole float weights, plus the bf16 copy). */
static void test_load_peak(void **state)
{
    (void)state;
    fpt_need_lowp();
    fp_model_config_t c = {.dim = 512, .n_layers = 4, .n_heads = 8, .n_kv_heads = 8,
                           .head_dim = 64, .ff = 1536, .vocab = 4096, .max_seq = 64,
                           .rms_eps = 1e-5, .rope_theta = 10000, .bos_id = -1, .eos_id = -1};
    fp_model_t *m;
    assert_int_equal(fp_model_new(&m, &c, NULL), 0);
    fp_model_init(m, 5);
    char *dir = fpt_mkdtemp();
    assert_int_equal(fp_model_save(m, dir, FP_DT_F32, NULL), 0);
    double f32_kb = (double)fp_model_weight_bytes(m) / 1024;
    fp_model_free(m);
    m = NULL;
    assert_int_equal(fp_lowp_probe(NULL), 0); /* oneDNN's one-time set-up is not the load's */
    /* "5" resets the peak to now (Linux ≥ 4.0 with CONFIG_PROC_PAGE_MONITOR; some sandboxes
     * have no clear_refs): where it cannot be reset, the peak cannot be measured */
    FILE *cr = fopen("/proc/self/clear_refs", "w");
    int reset = cr && fputs("5", cr) >= 0;
    reset = cr && fclose(cr) == 0 && reset;
    long before = status_kb("VmRSS");
    if (!reset || status_kb("VmHWM") - before >= 1024) {
        print_message("skipped: this kernel does not reset the resident peak (clear_refs)\n");
        fpt_rmtree(dir);
        free(dir);
        skip();
    }
    assert_int_equal(fp_model_load_base(dir, FP_BASE_BF16, &m, NULL), 0);
    double grew = (double)(status_kb("VmHWM") - before);
    print_message("bf16 load: peak +%.1f MB for %.1f MB of float weights (%.2f×), %.1f MB "
                  "held\n", grew / 1024, f32_kb / 1024, grew / f32_kb,
                  (double)fp_model_weight_bytes(m) / 1048576);
    assert_true(grew < 0.75 * f32_kb);
    assert_true(grew >= 0.45 * f32_kb); /* the bf16 base itself was measured */
    fp_model_free(m);
    fpt_rmtree(dir);
    free(dir);
}

int main(void)
{
    fp_set_threads(2);
    if (!fp_lowp_cpu_bf16())
        print_message("(this CPU has no bf16 instructions: oneDNN emulates them; the results "
                      "must hold all the same)\n");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_bf16_codec, fpt_simd_restore),
        cmocka_unit_test_teardown(test_nf4_codec, fpt_simd_restore),
        cmocka_unit_test(test_products),
        cmocka_unit_test(test_batched),
        cmocka_unit_test(test_transformer),
        cmocka_unit_test(test_fold_and_restore),
        cmocka_unit_test(test_load_base),
        cmocka_unit_test(test_load_peak),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
