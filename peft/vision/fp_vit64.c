/* The ViT in float64 (fp_vit.h's reference): fp_vit_impl.h instantiated over a flat θ. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fp_vit.h"

#define REAL double
#define VT(name) name##_f64
#define GEMM cblas_dgemm
#define EXP exp
#define SQRT sqrt
#define ERF erf
#include "fp_vit_impl.h"

size_t fp_vit64_nparams(const fp_vit_config_t *c, const fp_adapter_t *lora)
{
    size_t n = (size_t)c->K * ((size_t)c->D + 1);
    for (int i = 0; lora && i < lora->n; i++)
        n += (size_t)lora->mods[i].rank * (size_t)(lora->mods[i].d_in + lora->mods[i].d_out);
    return n;
}

void fp_vit64_pack(const fp_vit_config_t *c, const fp_adapter_t *lora, const float *head_w,
                   const float *head_b, double *theta)
{
    size_t o = 0;
    for (int i = 0; lora && i < lora->n; i++) {
        const fp_lora_module_t *m = &lora->mods[i];
        for (size_t j = 0; j < (size_t)m->rank * m->d_in; j++)
            theta[o++] = m->A[j];
        for (size_t j = 0; j < (size_t)m->d_out * m->rank; j++)
            theta[o++] = m->B[j];
    }
    for (size_t j = 0; j < (size_t)c->K * c->D; j++)
        theta[o++] = head_w[j];
    for (int j = 0; j < c->K; j++)
        theta[o++] = head_b[j];
}

/* Where x lies in m's allocation (the offsets of full training's θ). */
static size_t at(const fp_vit_t *m, const float *x)
{
    return (size_t)(x - m->mem);
}

/* The loss at θ (lora and the head), the frozen weights w (m's layout; NULL: m's own, widened)
 * and their gradient gw when not NULL (the same layout), θ's in grad when not NULL. */
static double run(const fp_vit_t *m, const fp_adapter_t *lora, const double *w,
                  const double *theta, const double *pixels, int b, const int *labels,
                  double *gw, double *grad)
{
    const fp_vit_config_t *c = &m->c;
    net_t_f64 n = {.c = *c};
    double *own = NULL;
    FP_ASSERT(m->base == FP_BASE_F32); /* the reference of a float32 model */
    if (!w) {
        own = malloc(m->nparams * sizeof *own);
        FP_ASSERT(own);
        for (size_t i = 0; i < m->nparams; i++)
            own[i] = m->mem[i];
        w = own;
    }
    n.L = calloc((size_t)c->L, sizeof *n.L);
    FP_ASSERT(n.L);
    if (gw)
        memset(gw, 0, m->nparams * sizeof *gw);
#define W(x) ((x) ? w + at(m, (x)) : NULL)
#define G(x) (gw && (x) ? gw + at(m, (x)) : NULL)
    n.patch_w = W(m->patch_w);
    n.patch_b = W(m->patch_b);
    n.cls = W(m->cls);
    n.pos = W(m->pos);
    n.lnf_w = W(m->lnf_w);
    n.lnf_b = W(m->lnf_b);
    n.g_patch_w = G(m->patch_w);
    n.g_patch_b = G(m->patch_b);
    n.g_cls = G(m->cls);
    n.g_pos = G(m->pos);
    n.g_lnf_w = G(m->lnf_w);
    n.g_lnf_b = G(m->lnf_b);
    for (int l = 0; l < c->L; l++) {
        const fp_vit_layer_t *y = &m->layers[l];
        lw_t_f64 *lw = &n.L[l];
        lw->ln1_w = W(y->ln1_w);
        lw->ln1_b = W(y->ln1_b);
        lw->ln2_w = W(y->ln2_w);
        lw->ln2_b = W(y->ln2_b);
        lw->gln1_w = G(y->ln1_w);
        lw->gln1_b = G(y->ln1_b);
        lw->gln2_w = G(y->ln2_w);
        lw->gln2_b = G(y->ln2_b);
        for (int t = 0; t < FP_VT_COUNT; t++) {
            lw->w[t] = W(y->w[t]);
            lw->b[t] = W(y->b[t]);
            lw->gw[t] = G(y->w[t]);
            lw->gb[t] = G(y->b[t]);
        }
    }
#undef W
#undef G
    size_t D = (size_t)c->D, off = 0;
    for (int i = 0; lora && i < lora->n; i++) {
        const fp_lora_module_t *md = &lora->mods[i];
        for (int l = 0; l < c->L; l++)
            for (int t = 0; t < FP_VT_COUNT; t++) {
                char name[128];
                fp_vit_module_name(l, t, name, sizeof name);
                if (strcmp(name, md->name) != 0)
                    continue;
                lw_t_f64 *lw = &n.L[l];
                lw->la[t] = theta + off;
                lw->lb[t] = theta + off + (size_t)md->rank * md->d_in;
                lw->gla[t] = grad ? grad + off : NULL;
                lw->glb[t] = grad ? grad + off + (size_t)md->rank * md->d_in : NULL;
                lw->lr[t] = md->rank;
                lw->ls[t] = fp_module_scale(md);
            }
        off += (size_t)md->rank * (size_t)(md->d_in + md->d_out);
    }
    n.head_w = theta + off;
    n.head_b = theta + off + (size_t)c->K * D;
    if (grad) {
        memset(grad, 0, fp_vit64_nparams(c, lora) * sizeof *grad);
        n.g_head_w = grad + off;
        n.g_head_b = grad + off + (size_t)c->K * D;
    }
    int train = grad || gw;
    FP_ASSERT(alloc_f64(&n, b, train) == 0);
    double loss;
    forward_f64(&n, pixels, b, labels, &loss, NULL);
    if (train)
        backward_f64(&n, 1.0 / b);
    release_f64(&n);
    free(n.L);
    free(own);
    return loss / b;
}

double fp_vit64_loss(const fp_vit_t *m, const fp_adapter_t *lora, const double *theta,
                     const double *pixels, int b, const int *labels, double *grad)
{
    return run(m, lora, NULL, theta, pixels, b, labels, NULL, grad);
}

double fp_vit64_loss_full(const fp_vit_t *m, const fp_adapter_t *lora, const double *w,
                          const double *theta, const double *pixels, int b, const int *labels,
                          double *gw, double *grad)
{
    return run(m, lora, w, theta, pixels, b, labels, gw, grad);
}
