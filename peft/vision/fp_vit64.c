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

static double *widen(const float *x, size_t n, double **mem)
{
    if (!x)
        return NULL;
    double *d = *mem;
    for (size_t i = 0; i < n; i++)
        d[i] = x[i];
    *mem += n;
    return d;
}

double fp_vit64_loss(const fp_vit_t *m, const fp_adapter_t *lora, const double *theta,
                     const double *pixels, int b, const int *labels, double *grad)
{
    const fp_vit_config_t *c = &m->c;
    net_t_f64 n = {.c = *c};
    double *wmem = malloc(m->nparams * sizeof *wmem), *w = wmem;
    n.L = calloc((size_t)c->L, sizeof *n.L);
    FP_ASSERT(wmem && n.L);
    size_t D = (size_t)c->D, T = (size_t)(c->S / c->P) * (c->S / c->P) + 1;
    size_t cpp = (size_t)c->C * c->P * c->P;
    n.patch_w = widen(m->patch_w, D * cpp, &w);
    n.patch_b = widen(m->patch_b, D, &w);
    n.cls = widen(m->cls, D, &w);
    n.pos = widen(m->pos, T * D, &w);
    n.lnf_w = widen(m->lnf_w, D, &w);
    n.lnf_b = widen(m->lnf_b, D, &w);
    for (int l = 0; l < c->L; l++) {
        const fp_vit_layer_t *y = &m->layers[l];
        lw_t_f64 *lw = &n.L[l];
        lw->ln1_w = widen(y->ln1_w, D, &w);
        lw->ln1_b = widen(y->ln1_b, D, &w);
        lw->ln2_w = widen(y->ln2_w, D, &w);
        lw->ln2_b = widen(y->ln2_b, D, &w);
        for (int t = 0; t < FP_VT_COUNT; t++) {
            int o, in;
            fp_vit_target_shape(c, t, &o, &in);
            lw->w[t] = widen(y->w[t], (size_t)o * in, &w);
            lw->b[t] = widen(y->b[t], (size_t)o, &w);
        }
    }
    size_t off = 0;
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
    FP_ASSERT(alloc_f64(&n, b, grad != NULL) == 0);
    double loss;
    forward_f64(&n, pixels, b, labels, &loss, NULL);
    if (grad)
        backward_f64(&n, 1.0 / b);
    release_f64(&n);
    free(n.L);
    free(wmem);
    return loss / b;
}
