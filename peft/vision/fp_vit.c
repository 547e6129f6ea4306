/* The ViT in float32 (fp_vit.h): fp_vit_impl.h instantiated, bound to a model, an adapter and
 * a head. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_vit.h"

#define REAL float
#define VT(name) name##_f32
#define GEMM cblas_sgemm
#define EXP expf
#define SQRT sqrtf
#define ERF erff
#define VT_LOWP
#include "fp_vit_impl.h"

struct fp_vit_ws {
    net_t_f32 n;
    fp_base_dtype_t base;
};

/* Points layer l's LoRA of linear t at module i of ad (-1: none). */
static int find_module(const fp_adapter_t *ad, int l, int t)
{
    char name[128];
    fp_vit_module_name(l, t, name, sizeof name);
    return ad ? fp_adapter_find(ad, name) : -1;
}

int fp_vit_new(fp_vit_ws_t **out, const fp_vit_t *m, const fp_adapter_t *lora,
               const float *head_w, const float *head_b, int B, int train, fp_err_t *err)
{
    *out = NULL;
    int rc = fp_vit_lora_check(&m->c, lora, err);
    if (rc)
        return rc;
    long long T = (long long)(m->c.S / m->c.P) * (m->c.S / m->c.P) + 1;
    if (B < 1 || B > 1 << 16 || (long long)B * T > (1LL << 30))
        return fp_err_set(err, -EINVAL, "a batch of %d images of %lld tokens", B, T);
    fp_vit_ws_t *ws = calloc(1, sizeof *ws);
    net_t_f32 *n = ws ? &ws->n : NULL;
    if (!ws || !(n->L = calloc((size_t)m->c.L, sizeof *n->L))) {
        free(ws);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    n->c = m->c;
    ws->base = m->base;
    n->patch_w = m->patch_w;
    n->patch_b = m->patch_b;
    n->cls = m->cls;
    n->pos = m->pos;
    n->lnf_w = m->lnf_w;
    n->lnf_b = m->lnf_b;
    n->head_w = head_w;
    n->head_b = head_b;
    for (int l = 0; l < m->c.L; l++) {
        lw_t_f32 *lw = &n->L[l];
        const fp_vit_layer_t *y = &m->layers[l];
        lw->ln1_w = y->ln1_w;
        lw->ln1_b = y->ln1_b;
        lw->ln2_w = y->ln2_w;
        lw->ln2_b = y->ln2_b;
        for (int t = 0; t < FP_VT_COUNT; t++) {
            lw->w[t] = y->w[t];
            lw->lp[t] = m->base != FP_BASE_F32 ? &y->lp[t] : NULL;
            lw->b[t] = y->b[t];
            int i = find_module(lora, l, t);
            if (i >= 0) {
                const fp_lora_module_t *md = &lora->mods[i];
                lw->la[t] = md->A;
                lw->lb[t] = md->B;
                lw->lr[t] = md->rank;
                lw->ls[t] = (float)fp_module_scale(md);
            }
        }
    }
    if (alloc_f32(n, B, train) != 0) {
        fp_vit_free_ws(ws);
        return fp_err_set(err, -ENOMEM, "out of memory for a batch of %d images", B);
    }
    *out = ws;
    return 0;
}

void fp_vit_free_ws(fp_vit_ws_t *ws)
{
    if (!ws)
        return;
    release_f32(&ws->n);
    free(ws->n.L);
    free(ws);
}

void fp_vit_forward(fp_vit_ws_t *ws, const float *pixels, int b, const int *labels,
                    double *loss_sum, int *correct)
{
    FP_ASSERT(b >= 1 && b <= ws->n.B);
    forward_f32(&ws->n, pixels, b, labels, loss_sum, correct);
}

const float *fp_vit_logits(const fp_vit_ws_t *ws)
{
    return ws->n.logits;
}

int fp_vit_status(const fp_vit_ws_t *ws)
{
    return ws->n.err;
}

int fp_vit_status_error(int rc, fp_err_t *err)
{
    return fp_err_set(err, rc, "a bf16 product through oneDNN %d.%d failed (%s): run with "
                      "base dtype f32", fp_lowp_version() / 100, fp_lowp_version() % 100,
                      strerror(-rc));
}

void fp_vit_backward(fp_vit_ws_t *ws, double loss_scale, fp_adapter_t *lora_grad,
                     float *head_wg, float *head_bg, fp_vit_t *full_grad)
{
    net_t_f32 *n = &ws->n;
    FP_ASSERT(n->train && n->labels);
    FP_ASSERT(!full_grad || ws->base == FP_BASE_F32); /* fp_vit_train refuses it */
    const fp_vit_t *g = full_grad;
    n->g_patch_w = g ? g->patch_w : NULL;
    n->g_patch_b = g ? g->patch_b : NULL;
    n->g_cls = g ? g->cls : NULL;
    n->g_pos = g ? g->pos : NULL;
    n->g_lnf_w = g ? g->lnf_w : NULL;
    n->g_lnf_b = g ? g->lnf_b : NULL;
    for (int l = 0; l < n->c.L; l++) {
        const fp_vit_layer_t *y = g ? &g->layers[l] : NULL;
        lw_t_f32 *lw = &n->L[l];
        lw->gln1_w = y ? y->ln1_w : NULL;
        lw->gln1_b = y ? y->ln1_b : NULL;
        lw->gln2_w = y ? y->ln2_w : NULL;
        lw->gln2_b = y ? y->ln2_b : NULL;
        for (int t = 0; t < FP_VT_COUNT; t++) {
            lw->gw[t] = y ? y->w[t] : NULL;
            lw->gb[t] = y ? y->b[t] : NULL;
        }
    }
    for (int l = 0; l < n->c.L; l++)
        for (int t = 0; t < FP_VT_COUNT; t++) {
            int i = n->L[l].la[t] ? find_module(lora_grad, l, t) : -1;
            n->L[l].gla[t] = i >= 0 ? lora_grad->mods[i].A : NULL;
            n->L[l].glb[t] = i >= 0 ? lora_grad->mods[i].B : NULL;
        }
    n->g_head_w = head_wg;
    n->g_head_b = head_bg;
    backward_f32(n, (float)loss_scale);
}
