#include "fp_transformer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_tf_lora.h"

#define REAL float
#define TF(name) tf32_##name
#define GEMM cblas_sgemm
#define EXP expf
#define SQRT sqrtf
#define COS cosf
#define SIN sinf
#define POW powf
#define TF_LOWP 1
#define TF_VMATH 1
#include "fp_tf_impl.h"

struct fp_tf {
    tf32_net_t net;
    const fp_model_t *model;
    const fp_adapter_t *lora;
    int *lmod;           /* L × FP_T_COUNT: module index in lora, or -1 */
    tf32_lg_t *grads;    /* L, filled per backward */
};

int fp_lora_check(const fp_model_t *m, const fp_adapter_t *lora, fp_err_t *err)
{
    int *idx = NULL;
    int rc = fp__lora_map(&m->cfg, lora, &idx, err);
    free(idx);
    return rc;
}

int fp__lora_map(const fp_model_config_t *c, const fp_adapter_t *lora, int **out, fp_err_t *err)
{
    *out = NULL;
    if (lora && lora->nwhole > 0) /* a decoder has no module PEFT would save whole */
        return fp_err_set(err, -ENOTSUP, "the adapter saves '%s' whole (modules_to_save), "
                          "which this %s model does not have", lora->whole[0].name,
                          fp_model_family_names[c->family]);
    int n = c->n_layers * FP_T_COUNT;
    int *idx = malloc((size_t)n * sizeof *idx);
    if (!idx)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < n; i++)
        idx[i] = -1;
    int found = 0;
    char name[96];
    for (int l = 0; lora && l < c->n_layers; l++) {
        for (int t = 0; t < FP_T_COUNT; t++) {
            fp_lora_module_name(name, sizeof name, l, (fp_target_t)t);
            int j = fp_adapter_find(lora, name);
            if (j < 0)
                continue;
            const fp_lora_module_t *mod = &lora->mods[j];
            int o, i;
            fp_target_shape(c, (fp_target_t)t, &o, &i);
            if (mod->d_out != o || mod->d_in != i) {
                free(idx);
                return fp_err_set(err, -EINVAL, "adapter module '%s' adapts a %d×%d weight but "
                                  "the model's is %d×%d", name, mod->d_out, mod->d_in, o, i);
            }
            idx[l * FP_T_COUNT + t] = j;
            found++;
        }
    }
    if (lora && found != lora->n) {
        for (int j = 0; j < lora->n; j++) {
            int used = 0;
            for (int i = 0; i < n && !used; i++)
                used = idx[i] == j;
            if (!used) {
                int rc = fp_err_set(err, -EINVAL, "adapter module '%s' is not a q/k/v/o/gate/"
                                    "up/down projection of this %d-layer model",
                                    lora->mods[j].name, c->n_layers);
                free(idx);
                return rc;
            }
        }
    }
    *out = idx;
    return 0;
}

void fp_tf_free(fp_tf_t *tf)
{
    if (!tf)
        return;
    tf32_release(&tf->net);
    free(tf->net.L);
    free(tf->lmod);
    free(tf->grads);
    free(tf);
}

size_t fp_tf_bytes(const fp_tf_t *tf)
{
    return tf->net.bytes;
}

/* Points the layer parameters at the model's weights and the adapter's factors. */
static void bind_params(fp_tf_t *tf)
{
    tf32_net_t *n = &tf->net;
    const fp_model_t *m = tf->model;
    n->embed = m->embed;
    n->norm = m->norm;
    n->lm_head = m->lm_head;
    n->embed_h = m->base != FP_BASE_F32 ? m->embed_h : NULL;
    n->head_lp = (fp_lowp_mat_t){m->base != FP_BASE_F32 ? FP_BASE_BF16 : FP_BASE_F32,
                                 m->cfg.vocab, m->cfg.dim, m->lm_head_h, NULL, NULL};
    for (int l = 0; l < m->cfg.n_layers; l++) {
        tf32_lw_t *lw = &n->L[l];
        const fp_layer_w_t *w = &m->layers[l];
        lw->attn_norm = w->attn_norm;
        lw->mlp_norm = w->mlp_norm;
        for (int t = 0; t < FP_T_COUNT; t++) {
            lw->w[t] = w->w[t];
            lw->lp[t] = m->base != FP_BASE_F32 ? &w->lp[t] : NULL;
            lw->b[t] = w->b[t];
            int j = tf->lmod[l * FP_T_COUNT + t];
            if (j >= 0) {
                const fp_lora_module_t *mod = &tf->lora->mods[j];
                lw->la[t] = mod->A;
                lw->lb[t] = mod->B;
                lw->lr[t] = mod->rank;
                lw->ls[t] = (float)fp_module_scale(mod);
            } else {
                lw->la[t] = lw->lb[t] = NULL;
                lw->lr[t] = 0;
            }
        }
    }
}

int fp_tf_new(fp_tf_t **out, const fp_model_t *m, const fp_adapter_t *lora, int B, int T,
              unsigned flags, fp_err_t *err)
{
    *out = NULL;
    if (B <= 0 || T <= 0)
        return fp_err_set(err, -EINVAL, "batch and sequence length must be positive");
    if (T > m->cfg.max_seq)
        return fp_err_set(err, -EINVAL, "sequence length %d is beyond the model's %d positions",
                          T, m->cfg.max_seq);
    if ((size_t)B * (size_t)T > (1u << 24))
        return fp_err_set(err, -EFBIG, "batch of %d × %d tokens is too large", B, T);
    fp_tf_t *tf = calloc(1, sizeof *tf);
    if (!tf)
        return fp_err_set(err, -ENOMEM, "out of memory");
    tf->model = m;
    tf->lora = lora;
    int rc = fp__lora_map(&m->cfg, lora, &tf->lmod, err);
    if (rc) {
        free(tf);
        return rc;
    }
    int Lc = m->cfg.n_layers;
    int *ranks = calloc((size_t)Lc * FP_T_COUNT, sizeof *ranks);
    tf->grads = calloc((size_t)Lc, sizeof *tf->grads);
    if (!ranks || !tf->grads) {
        free(ranks);
        fp_tf_free(tf);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    for (int i = 0; i < Lc * FP_T_COUNT; i++)
        ranks[i] = tf->lmod[i] >= 0 ? lora->mods[tf->lmod[i]].rank : 0;
    rc = tf32_alloc(&tf->net, &m->cfg, B, T, flags, ranks);
    free(ranks);
    if (rc == 0 && m->base != FP_BASE_F32) /* attention's products in bf16 too */
        rc = tf32_alloc16(&tf->net);
    tf->net.L = calloc((size_t)Lc, sizeof *tf->net.L);
    if (rc || !tf->net.L) {
        fp_tf_free(tf);
        return fp_err_set(err, -ENOMEM, "out of memory for activations of %d × %d tokens", B, T);
    }
    *out = tf;
    return 0;
}

void fp_tf_forward(fp_tf_t *tf, const int *tokens, const int *labels, double *loss_sum,
                   long *count)
{
    bind_params(tf); /* the adapter's factors may have been replaced since */
    tf32_forward(&tf->net, tokens, labels, loss_sum, count);
}

void fp_tf_backward(fp_tf_t *tf, double loss_scale, fp_adapter_t *lora_grad,
                    fp_model_t *full_grad)
{
    tf32_net_t *n = &tf->net;
    int Lc = tf->model->cfg.n_layers;
    memset(tf->grads, 0, (size_t)Lc * sizeof *tf->grads);
    n->G = tf->grads;
    n->g_embed = n->g_norm = n->g_lm_head = NULL;
    if (full_grad && (n->flags & FP_TF_FULL)) {
        n->g_embed = full_grad->embed;
        n->g_norm = full_grad->norm;
        n->g_lm_head = full_grad->lm_head;
    }
    for (int l = 0; l < Lc; l++) {
        tf32_lg_t *g = &tf->grads[l];
        if (full_grad && (n->flags & FP_TF_FULL)) {
            const fp_layer_w_t *w = &full_grad->layers[l];
            g->attn_norm = w->attn_norm;
            g->mlp_norm = w->mlp_norm;
            for (int t = 0; t < FP_T_COUNT; t++) {
                g->w[t] = w->w[t];
                g->b[t] = w->b[t];
            }
        }
        for (int t = 0; t < FP_T_COUNT; t++) {
            int j = tf->lmod[l * FP_T_COUNT + t];
            if (j >= 0 && lora_grad && (n->flags & (FP_TF_LORA | FP_TF_FULL))) {
                g->la[t] = lora_grad->mods[j].A;
                g->lb[t] = lora_grad->mods[j].B;
            }
        }
    }
    tf32_backward(n, loss_scale);
}

const float *fp_tf_logits(const fp_tf_t *tf)
{
    return tf->net.logits;
}

int fp_tf_status(const fp_tf_t *tf)
{
    return tf->net.err;
}

int fp_tf_status_error(int rc, fp_err_t *err)
{
    return fp_err_set(err, rc, "a bf16 product through oneDNN %d.%d failed (%s): run with "
                      "--base-dtype f32 (or [train] base_dtype = f32)", fp_lowp_version() / 100,
                      fp_lowp_version() % 100, strerror(-rc));
}

const float *fp_tf_input_grad(const fp_tf_t *tf)
{
    return tf->net.dx0;
}
