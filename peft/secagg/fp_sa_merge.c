/* fp_sa_merge.c — see fp_sa_merge.h. */
#include "fp_sa_merge.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fp_sketch.h"

static int linear(fp_strategy_t st)
{
    return st == FP_STRAT_FEDAVG || st == FP_STRAT_FFA || st == FP_STRAT_ZEROPAD;
}

/* Floats of module m's part of a linear vector. */
static size_t part(fp_strategy_t st, const fp_module_desc_t *m)
{
    size_t R = (size_t)m->rank, a = R * (size_t)m->d_in, b = (size_t)m->d_out * R;
    return st == FP_STRAT_FFA ? b : st == FP_STRAT_ZEROPAD ? a + b + R : a + b;
}

size_t fp_sa_linear_dim(fp_strategy_t st, const fp_module_desc_t *layout, int n)
{
    if (!linear(st))
        return 0;
    size_t d = 0;
    for (int i = 0; i < n; i++)
        d += part(st, &layout[i]);
    return st == FP_STRAT_ZEROPAD ? d : d + 1; /* the weight, once */
}

/* The site's module matching layout entry m, checked. */
static const fp_lora_module_t *site_module(const fp_adapter_t *u, const fp_module_desc_t *m,
                                           fp_strategy_t st, fp_err_t *err, int *rc)
{
    int k = fp_adapter_find(u, m->name);
    const fp_lora_module_t *s = k < 0 ? NULL : &u->mods[k];
    *rc = 0;
    if (!s || s->d_out != m->d_out || s->d_in != m->d_in || s->rank > m->rank ||
        (st != FP_STRAT_ZEROPAD && s->rank != m->rank))
        *rc = fp_err_set(err, -EINVAL, "secure aggregation: module %s does not fit the "
                         "federation's layout", m->name);
    return s;
}

int fp_sa_linear_encode(fp_strategy_t st, const fp_module_desc_t *layout, int n,
                        const fp_adapter_t *u, double w, float *x, fp_err_t *err)
{
    if (!linear(st))
        return fp_err_set(err, -ENOTSUP, "secure aggregation: %s is not a linear merge",
                          fp_strategy_name(st));
    if (!(w >= 0) || !isfinite(w))
        return fp_err_set(err, -EINVAL, "secure aggregation: weight %g", w);
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        const fp_module_desc_t *m = &layout[i];
        int rc;
        const fp_lora_module_t *s = site_module(u, m, st, err, &rc);
        if (rc)
            return rc;
        int R = m->rank, r = s->rank;
        double bs = w * fp_module_scale(s) / fp_lora_scale(m->alpha, R, m->rslora);
        if (st != FP_STRAT_FFA) { /* w·A padded to R rows */
            for (int row = 0; row < R; row++)
                for (int c = 0; c < m->d_in; c++)
                    x[at++] = row < r ? (float)(w * s->A[(size_t)row * m->d_in + c]) : 0.0f;
        }
        for (int row = 0; row < m->d_out; row++) /* w·(s_u/s_g)·B padded to R columns */
            for (int c = 0; c < R; c++)
                x[at++] = c < r ? (float)(bs * s->B[(size_t)row * r + c]) : 0.0f;
        if (st == FP_STRAT_ZEROPAD)
            for (int c = 0; c < R; c++)
                x[at++] = c < r ? (float)w : 0.0f;
    }
    if (st != FP_STRAT_ZEROPAD)
        x[at++] = (float)w;
    return 0;
}

int fp_sa_linear_decode(fp_strategy_t st, const fp_module_desc_t *layout, int n,
                        const fp_adapter_t *start, const double *sum, fp_adapter_t **out,
                        fp_err_t *err)
{
    if (!linear(st))
        return fp_err_set(err, -ENOTSUP, "secure aggregation: %s is not a linear merge",
                          fp_strategy_name(st));
    size_t dim = fp_sa_linear_dim(st, layout, n);
    double wsum = st == FP_STRAT_ZEROPAD ? 1 : sum[dim - 1];
    if (!(wsum > 0))
        return fp_err_set(err, -EDOM, "secure aggregation: the weights sum to %g", wsum);
    fp_adapter_t *ad = NULL;
    int rc = fp_adapter_new(&ad, layout, n, err);
    if (rc)
        return rc;
    size_t at = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const fp_module_desc_t *m = &layout[i];
        fp_lora_module_t *o = &ad->mods[fp_adapter_find(ad, m->name)];
        int R = m->rank;
        size_t a_at = at, b_at = at + (st == FP_STRAT_FFA ? 0 : (size_t)R * (size_t)m->d_in);
        size_t w_at = b_at + (size_t)m->d_out * (size_t)R;
        at = st == FP_STRAT_ZEROPAD ? w_at + (size_t)R : w_at;
        for (int c = 0; c < R; c++) {
            double rw = st == FP_STRAT_ZEROPAD ? sum[w_at + (size_t)c] : wsum;
            double inv = rw > 1e-12 ? 1.0 / rw : 0.0; /* a row nobody covered stays zero */
            if (st != FP_STRAT_FFA)
                for (int col = 0; col < m->d_in; col++)
                    o->A[(size_t)c * m->d_in + col] =
                        (float)(inv * sum[a_at + (size_t)c * m->d_in + col]);
            for (int row = 0; row < m->d_out; row++)
                o->B[(size_t)row * R + c] = (float)(inv * sum[b_at + (size_t)row * R + c]);
        }
        if (st == FP_STRAT_FFA) {
            int k = start ? fp_adapter_find(start, m->name) : -1;
            if (k < 0 || start->mods[k].rank != R || start->mods[k].d_in != m->d_in)
                rc = fp_err_set(err, -EINVAL, "secure aggregation: ffa needs the round's start "
                                "adapter for module %s's frozen A", m->name);
            else
                memcpy(o->A, start->mods[k].A, (size_t)R * m->d_in * sizeof *o->A);
        }
    }
    if (rc == 0)
        rc = fp_adapter_check_finite(ad, err);
    if (rc) {
        fp_adapter_free(ad);
        return rc;
    }
    *out = ad;
    return 0;
}

/* ---- the double sketch ---- */

struct fp_sa_sketch {
    fp_module_desc_t *layout;
    int n, k;
    double **omega;        /* per module: d_in × k */
    int *q;                /* per module: min(k, d_out) */
    size_t *y_at, *z_at;   /* per module: offsets in the Y and Z vectors */
    size_t dim_y, dim_z;
    double *Q;             /* concatenated bases, Σ d_out·q (after fp_sa_sketch_basis) */
    size_t *q_at;
};

void fp_sa_sketch_free(fp_sa_sketch_t *s)
{
    if (!s)
        return;
    for (int i = 0; s->omega && i < s->n; i++)
        free(s->omega[i]);
    free(s->omega);
    free(s->q);
    free(s->y_at);
    free(s->z_at);
    free(s->q_at);
    free(s->Q);
    free(s->layout);
    free(s);
}

int fp_sa_sketch_new(fp_sa_sketch_t **out, const fp_module_desc_t *layout, int n, int k,
                     uint64_t seed, fp_err_t *err)
{
    if (n < 1 || k < 1)
        return fp_err_set(err, -EINVAL, "sketch: %d modules, %d columns", n, k);
    fp_sa_sketch_t *s = calloc(1, sizeof *s);
    if (!s)
        return fp_err_set(err, -ENOMEM, "out of memory");
    s->n = n;
    s->k = k;
    s->layout = malloc((size_t)n * sizeof *s->layout);
    s->omega = calloc((size_t)n, sizeof *s->omega);
    s->q = calloc((size_t)n, sizeof *s->q);
    s->y_at = calloc((size_t)n, sizeof *s->y_at);
    s->z_at = calloc((size_t)n, sizeof *s->z_at);
    s->q_at = calloc((size_t)n, sizeof *s->q_at);
    int rc = !s->layout || !s->omega || !s->q || !s->y_at || !s->z_at || !s->q_at
                 ? fp_err_set(err, -ENOMEM, "out of memory") : 0;
    size_t qsz = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const fp_module_desc_t *m = &layout[i];
        s->layout[i] = *m;
        s->q[i] = k < m->d_out ? k : m->d_out;
        s->y_at[i] = s->dim_y;
        s->dim_y += (size_t)m->d_out * (size_t)k;
        s->z_at[i] = s->dim_z;
        s->dim_z += (size_t)s->q[i] * (size_t)m->d_in;
        s->q_at[i] = qsz;
        qsz += (size_t)m->d_out * (size_t)s->q[i];
        rc = fp_sketch_omega(seed * 0x9E3779B97F4A7C15ull + (uint64_t)i, m->d_in, k,
                             &s->omega[i], err);
    }
    s->dim_z += 1; /* the weight */
    if (rc == 0 && !(s->Q = calloc(qsz ? qsz : 1, sizeof *s->Q)))
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    if (rc) {
        fp_sa_sketch_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

size_t fp_sa_sketch_dim_y(const fp_sa_sketch_t *s) { return s->dim_y; }
size_t fp_sa_sketch_dim_z(const fp_sa_sketch_t *s) { return s->dim_z; }

const double *fp_sa_sketch_q(const fp_sa_sketch_t *s, size_t *count)
{
    *count = s->q_at[s->n - 1] + (size_t)s->layout[s->n - 1].d_out * (size_t)s->q[s->n - 1];
    return s->Q;
}

int fp_sa_sketch_set_q(fp_sa_sketch_t *s, const double *q, size_t count, fp_err_t *err)
{
    size_t want;
    fp_sa_sketch_q(s, &want);
    if (count != want)
        return fp_err_set(err, -EINVAL, "sketch: %zu basis values, %zu expected", count, want);
    memcpy(s->Q, q, count * sizeof *q);
    return 0;
}

/* A site's sketch, module by module: Y (first) or Z (second, then w). */
static int encode(const fp_sa_sketch_t *s, const fp_adapter_t *u, double w, int second,
                  float *x, fp_err_t *err)
{
    int rc = 0;
    for (int i = 0; i < s->n && rc == 0; i++) {
        const fp_module_desc_t *m = &s->layout[i];
        const fp_lora_module_t *sm = site_module(u, m, FP_STRAT_ZEROPAD, err, &rc);
        if (rc)
            break;
        size_t len = second ? (size_t)s->q[i] * (size_t)m->d_in : (size_t)m->d_out * (size_t)s->k;
        size_t at = second ? s->z_at[i] : s->y_at[i];
        double *v = malloc(len * sizeof *v);
        if (!v)
            return fp_err_set(err, -ENOMEM, "out of memory");
        double ws = w * fp_module_scale(sm);
        rc = second ? fp_sketch_z(sm->B, sm->A, m->d_out, m->d_in, sm->rank, ws,
                                  s->Q + s->q_at[i], s->q[i], v, err)
                    : fp_sketch_y(sm->B, sm->A, m->d_out, m->d_in, sm->rank,
                                  ws / sqrt((double)m->d_in), s->omega[i], s->k, v, err);
        for (size_t e = 0; rc == 0 && e < len; e++)
            x[at + e] = (float)v[e];
        free(v);
    }
    if (rc == 0 && second)
        x[s->dim_z - 1] = (float)w;
    return rc;
}

int fp_sa_sketch_encode_y(const fp_sa_sketch_t *s, const fp_adapter_t *u, double w, float *x,
                          fp_err_t *err)
{
    return encode(s, u, w, 0, x, err);
}

int fp_sa_sketch_basis(fp_sa_sketch_t *s, const double *ysum, fp_err_t *err)
{
    for (int i = 0; i < s->n; i++) {
        const fp_module_desc_t *m = &s->layout[i];
        size_t ny = (size_t)m->d_out * (size_t)s->k;
        double *Y = malloc(ny * sizeof *Y);
        if (!Y)
            return fp_err_set(err, -ENOMEM, "out of memory");
        memcpy(Y, ysum + s->y_at[i], ny * sizeof *Y);
        int q, rc = fp_sketch_orth(Y, m->d_out, s->k, &q, err);
        if (rc == 0)
            memcpy(s->Q + s->q_at[i], Y, (size_t)m->d_out * (size_t)q * sizeof *Y);
        free(Y);
        if (rc)
            return rc;
    }
    return 0;
}

int fp_sa_sketch_encode_z(const fp_sa_sketch_t *s, const fp_adapter_t *u, double w, float *x,
                          fp_err_t *err)
{
    return encode(s, u, w, 1, x, err);
}

int fp_sa_sketch_decode(const fp_sa_sketch_t *s, const double *zsum, int r_out,
                        fp_adapter_t **out, fp_err_t *err)
{
    double wsum = zsum[s->dim_z - 1];
    if (!(wsum > 0))
        return fp_err_set(err, -EDOM, "secure aggregation: the weights sum to %g", wsum);
    fp_module_desc_t *descs = malloc((size_t)s->n * sizeof *descs);
    if (!descs)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < s->n; i++) {
        descs[i] = s->layout[i];
        int m = s->q[i] < descs[i].d_in ? s->q[i] : descs[i].d_in;
        descs[i].rank = r_out < m ? r_out : m;
    }
    fp_adapter_t *ad = NULL;
    int rc = fp_adapter_new(&ad, descs, s->n, err);
    for (int i = 0; i < s->n && rc == 0; i++) {
        const fp_module_desc_t *m = &descs[i];
        fp_lora_module_t *o = &ad->mods[fp_adapter_find(ad, m->name)];
        size_t nz = (size_t)s->q[i] * (size_t)m->d_in;
        double *Z = malloc(nz * sizeof *Z);
        if (!Z) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            break;
        }
        for (size_t e = 0; e < nz; e++)
            Z[e] = zsum[s->z_at[i] + e] / wsum;
        rc = fp_sketch_factor(s->Q + s->q_at[i], Z, m->d_out, m->d_in, s->q[i], o->rank,
                              fp_module_scale(o), o->B, o->A, NULL, err);
        free(Z);
    }
    free(descs);
    if (rc) {
        fp_adapter_free(ad);
        return rc;
    }
    *out = ad;
    return 0;
}
