#include "fp_optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct fp_adamw {
    fp_optim_cfg_t cfg;
    const fp_pgroup_t *groups;
    int n;
    float *m, *v; /* one allocation: first moments then second moments */
    long t;       /* updates done */
};

fp_optim_cfg_t fp_optim_defaults(void)
{
    fp_optim_cfg_t c = {.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8,
                        .weight_decay = 0.0, .clip = 1.0, .warmup = 0, .total = 1,
                        .min_lr_frac = 0.0};
    return c;
}

int fp_adamw_new(fp_adamw_t **out, const fp_pgroup_t *groups, int n, const fp_optim_cfg_t *cfg,
                 fp_err_t *err)
{
    *out = NULL;
    if (!(cfg->lr >= 0) || !(cfg->beta1 >= 0 && cfg->beta1 < 1) ||
        !(cfg->beta2 >= 0 && cfg->beta2 < 1) || !(cfg->eps > 0) || !(cfg->weight_decay >= 0))
        return fp_err_set(err, -EINVAL, "bad optimizer settings (lr %g, betas %g %g, eps %g, "
                          "weight decay %g)", cfg->lr, cfg->beta1, cfg->beta2, cfg->eps,
                          cfg->weight_decay);
    size_t total = 0;
    for (int i = 0; i < n; i++)
        total += groups[i].n;
    fp_adamw_t *o = calloc(1, sizeof *o);
    float *mem = calloc(2 * total + 1, sizeof(float));
    if (!o || !mem) {
        free(o);
        free(mem);
        return fp_err_set(err, -ENOMEM, "out of memory for optimizer state");
    }
    o->cfg = *cfg;
    o->groups = groups;
    o->n = n;
    o->m = mem;
    o->v = mem + total;
    *out = o;
    return 0;
}

void fp_adamw_free(fp_adamw_t *o)
{
    if (!o)
        return;
    free(o->m);
    free(o);
}

double fp_lr_at(const fp_optim_cfg_t *c, long s)
{
    if (c->warmup > 0 && s < c->warmup)
        return c->lr * (double)(s + 1) / (double)c->warmup;
    long span = c->total - c->warmup;
    if (span <= 0)
        return c->lr;
    double progress = (double)(s - c->warmup) / (double)span;
    if (progress > 1)
        progress = 1;
    double lo = c->lr * c->min_lr_frac;
    return lo + (c->lr - lo) * 0.5 * (1.0 + cos(M_PI * progress));
}

double fp_grad_norm(const fp_pgroup_t *g, int n)
{
    double s = 0;
    for (int i = 0; i < n; i++) {
        const float *x = g[i].g;
        double part = 0;
        for (size_t k = 0; k < g[i].n; k++)
            part += (double)x[k] * x[k];
        s += part;
    }
    return sqrt(s);
}

void fp_zero_grads(const fp_pgroup_t *g, int n)
{
    for (int i = 0; i < n; i++)
        memset(g[i].g, 0, g[i].n * sizeof(float));
}

double fp_adamw_step(fp_adamw_t *o, double *norm_out)
{
    const fp_optim_cfg_t *c = &o->cfg;
    double norm = fp_grad_norm(o->groups, o->n);
    if (norm_out)
        *norm_out = norm;
    double gs = (c->clip > 0 && norm > c->clip) ? c->clip / (norm + 1e-6) : 1.0;
    double lr = fp_lr_at(c, o->t);
    o->t++;
    double bc1 = 1.0 - pow(c->beta1, (double)o->t), bc2 = 1.0 - pow(c->beta2, (double)o->t);
    float b1 = (float)c->beta1, b2 = (float)c->beta2;
    float step = (float)(lr / bc1), rbc2 = (float)(1.0 / sqrt(bc2)), eps = (float)c->eps;
    float g_scale = (float)gs;
    size_t off = 0;
    for (int i = 0; i < o->n; i++) {
        const fp_pgroup_t *G = &o->groups[i];
        float decay = G->decay ? (float)(1.0 - lr * c->weight_decay) : 1.0f;
        float *m = o->m + off, *v = o->v + off, *p = G->p;
        const float *g = G->g;
        for (size_t k = 0; k < G->n; k++) {
            float gk = g[k] * g_scale;
            m[k] = b1 * m[k] + (1 - b1) * gk;
            v[k] = b2 * v[k] + (1 - b2) * gk * gk;
            p[k] = p[k] * decay - step * m[k] / (sqrtf(v[k]) * rbc2 + eps);
        }
        off += G->n;
    }
    return lr;
}
