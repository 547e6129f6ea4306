#include "fp_transformer64.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_tf_lora.h"

#define REAL double
#define TF(name) tf64_##name
#define GEMM cblas_dgemm
#define EXP exp
#define SQRT sqrt
#define COS cos
#define SIN sin
#define POW pow
#include "fp_tf_impl.h"

struct fp_tf64 {
    tf64_net_t net;
    tf64_lg_t *grads;
    const fp_model_t *model; /* for offsets only */
    fp_model_tensor_t *tensors;
    int ntensors;
    double *w, *gw;          /* model weights and gradients, the model's layout */
    double *lw, *glw;        /* adapter factors and gradients, module by module */
    size_t *loff;            /* per module: offset of A (B follows) */
    size_t nlora;
    int nmods;
    int *lmod;
    const fp_adapter_t *lora;
};

void fp_tf64_free(fp_tf64_t *tf)
{
    if (!tf)
        return;
    tf64_release(&tf->net);
    free(tf->net.L);
    free(tf->grads);
    free(tf->tensors);
    free(tf->w);
    free(tf->gw);
    free(tf->lw);
    free(tf->glw);
    free(tf->loff);
    free(tf->lmod);
    free(tf);
}

static double *at(fp_tf64_t *tf, double *base, const float *p)
{
    return p ? base + (p - tf->model->mem) : NULL;
}

int fp_tf64_new(fp_tf64_t **out, const fp_model_t *m, const fp_adapter_t *lora, int B, int T,
                unsigned flags, fp_err_t *err)
{
    *out = NULL;
    fp_tf64_t *tf = calloc(1, sizeof *tf);
    if (!tf)
        return fp_err_set(err, -ENOMEM, "out of memory");
    tf->model = m;
    tf->lora = lora;
    const fp_model_config_t *c = &m->cfg;
    int Lc = c->n_layers, rc;
    int *ranks = NULL;
    if ((rc = fp__lora_map(c, lora, &tf->lmod, err)) != 0 ||
        (rc = fp_model_tensors(m, &tf->tensors, &tf->ntensors, err)) != 0)
        goto fail;
    rc = -ENOMEM;
    tf->w = malloc(m->n_params * sizeof(double));
    tf->gw = calloc(m->n_params, sizeof(double));
    tf->nmods = lora ? lora->n : 0;
    tf->loff = calloc((size_t)tf->nmods + 1, sizeof *tf->loff);
    ranks = calloc((size_t)Lc * FP_T_COUNT, sizeof *ranks);
    tf->grads = calloc((size_t)Lc, sizeof *tf->grads);
    if (!tf->w || !tf->gw || !tf->loff || !ranks || !tf->grads)
        goto fail;
    for (size_t i = 0; i < m->n_params; i++)
        tf->w[i] = m->mem[i];
    for (int j = 0; j < tf->nmods; j++) {
        const fp_lora_module_t *mod = &lora->mods[j];
        tf->loff[j + 1] = tf->loff[j] + (size_t)mod->rank * ((size_t)mod->d_in + mod->d_out);
    }
    tf->nlora = tf->loff[tf->nmods];
    tf->lw = malloc((tf->nlora ? tf->nlora : 1) * sizeof(double));
    tf->glw = calloc(tf->nlora ? tf->nlora : 1, sizeof(double));
    if (!tf->lw || !tf->glw)
        goto fail;
    for (int j = 0; j < tf->nmods; j++) {
        const fp_lora_module_t *mod = &lora->mods[j];
        size_t na = (size_t)mod->rank * mod->d_in, nb = (size_t)mod->d_out * mod->rank;
        for (size_t e = 0; e < na; e++)
            tf->lw[tf->loff[j] + e] = mod->A[e];
        for (size_t e = 0; e < nb; e++)
            tf->lw[tf->loff[j] + na + e] = mod->B[e];
    }
    for (int i = 0; i < Lc * FP_T_COUNT; i++)
        ranks[i] = tf->lmod[i] >= 0 ? lora->mods[tf->lmod[i]].rank : 0;
    if (tf64_alloc(&tf->net, c, B, T, flags, ranks) != 0)
        goto fail;
    tf64_net_t *n = &tf->net;
    n->L = calloc((size_t)Lc, sizeof *n->L);
    if (!n->L)
        goto fail;
    n->embed = at(tf, tf->w, m->embed);
    n->norm = at(tf, tf->w, m->norm);
    n->lm_head = at(tf, tf->w, m->lm_head);
    int full = (flags & FP_TF_FULL) != 0;
    if (full) {
        n->g_embed = at(tf, tf->gw, m->embed);
        n->g_norm = at(tf, tf->gw, m->norm);
        n->g_lm_head = at(tf, tf->gw, m->lm_head);
    }
    for (int l = 0; l < Lc; l++) {
        tf64_lw_t *lw = &n->L[l];
        tf64_lg_t *lg = &tf->grads[l];
        const fp_layer_w_t *w = &m->layers[l];
        lw->attn_norm = at(tf, tf->w, w->attn_norm);
        lw->mlp_norm = at(tf, tf->w, w->mlp_norm);
        if (full) {
            lg->attn_norm = at(tf, tf->gw, w->attn_norm);
            lg->mlp_norm = at(tf, tf->gw, w->mlp_norm);
        }
        for (int t = 0; t < FP_T_COUNT; t++) {
            lw->w[t] = at(tf, tf->w, w->w[t]);
            lw->b[t] = at(tf, tf->w, w->b[t]);
            if (full) {
                lg->w[t] = at(tf, tf->gw, w->w[t]);
                lg->b[t] = at(tf, tf->gw, w->b[t]);
            }
            int j = tf->lmod[l * FP_T_COUNT + t];
            if (j < 0)
                continue;
            const fp_lora_module_t *mod = &lora->mods[j];
            size_t na = (size_t)mod->rank * mod->d_in;
            lw->la[t] = tf->lw + tf->loff[j];
            lw->lb[t] = tf->lw + tf->loff[j] + na;
            lw->lr[t] = mod->rank;
            lw->ls[t] = fp_module_scale(mod);
            lg->la[t] = tf->glw + tf->loff[j];
            lg->lb[t] = tf->glw + tf->loff[j] + na;
        }
    }
    n->G = tf->grads;
    free(ranks);
    *out = tf;
    return 0;
fail:
    free(ranks);
    fp_tf64_free(tf);
    return rc == -ENOMEM ? fp_err_set(err, rc, "out of memory") : rc;
}

double fp_tf64_loss(fp_tf64_t *tf, const int *tokens, const double *embeds, const int *labels)
{
    double sum;
    long count;
    if (embeds) {
        memcpy(tf->net.R[0], embeds, (size_t)tf->net.N * tf->net.c.dim * sizeof(double));
        tf->net.tokens = NULL;
        tf64_forward_from_embeds(&tf->net, labels, &sum, &count);
    } else {
        tf64_forward(&tf->net, tokens, labels, &sum, &count);
    }
    return count ? sum / (double)count : 0.0;
}

void fp_tf64_backward(fp_tf64_t *tf)
{
    memset(tf->gw, 0, tf->model->n_params * sizeof(double));
    memset(tf->glw, 0, (tf->nlora ? tf->nlora : 1) * sizeof(double));
    tf64_backward(&tf->net, tf->net.count ? 1.0 / (double)tf->net.count : 0.0);
}

static double *lora_part(fp_tf64_t *tf, double *base, int j, char f, size_t *n)
{
    const fp_lora_module_t *mod = &tf->lora->mods[j];
    size_t na = (size_t)mod->rank * mod->d_in, nb = (size_t)mod->d_out * mod->rank;
    *n = f == 'A' ? na : nb;
    return base + tf->loff[j] + (f == 'A' ? 0 : na);
}

double *fp_tf64_lora(fp_tf64_t *tf, int j, char f, size_t *n)
{
    return lora_part(tf, tf->lw, j, f, n);
}

double *fp_tf64_lora_grad(fp_tf64_t *tf, int j, char f, size_t *n)
{
    return lora_part(tf, tf->glw, j, f, n);
}

double *fp_tf64_weight(fp_tf64_t *tf, int i, size_t *n)
{
    const fp_model_tensor_t *t = &tf->tensors[i];
    *n = (size_t)t->shape[0] * (size_t)(t->ndim == 2 ? t->shape[1] : 1);
    return at(tf, tf->w, t->data);
}

double *fp_tf64_weight_grad(fp_tf64_t *tf, int i, size_t *n)
{
    const fp_model_tensor_t *t = &tf->tensors[i];
    *n = (size_t)t->shape[0] * (size_t)(t->ndim == 2 ? t->shape[1] : 1);
    return at(tf, tf->gw, t->data);
}

const double *fp_tf64_input_grad(const fp_tf64_t *tf)
{
    return tf->net.dx0;
}
