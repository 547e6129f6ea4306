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

/* The vector's order: the modules by name (a coordinator's layout and a site's, read from its
 * task stream, may list them differently). *idx: malloc'd permutation of 0..n-1. */
static int order_by_name(const fp_module_desc_t *layout, int n, int **idx, fp_err_t *err)
{
    int *p = malloc((size_t)(n > 0 ? n : 1) * sizeof *p);
    if (!p)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < n; i++)
        p[i] = i;
    /* insertion sort: no global state, layouts hold at most a few hundred modules */
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && strcmp(layout[p[j - 1]].name, layout[p[j]].name) > 0; j--) {
            int t = p[j];
            p[j] = p[j - 1];
            p[j - 1] = t;
        }
    *idx = p;
    return 0;
}

/* Floats of module m's part of a linear vector. */
static size_t part(fp_strategy_t st, const fp_module_desc_t *m)
{
    size_t R = (size_t)m->rank, a = R * (size_t)m->d_in, b = (size_t)m->d_out * R;
    return st == FP_STRAT_FFA ? b : st == FP_STRAT_ZEROPAD ? a + b + R : a + b;
}

static size_t whole_floats(const fp_whole_desc_t *whole, int nw)
{
    size_t d = 0;
    for (int i = 0; i < nw; i++)
        d += (size_t)whole[i].rows * (size_t)whole[i].cols;
    return d;
}

size_t fp_sa_linear_dim(fp_strategy_t st, const fp_module_desc_t *layout, int n,
                        const fp_whole_desc_t *whole, int nw)
{
    if (!linear(st))
        return 0;
    size_t d = 0;
    for (int i = 0; i < n; i++)
        d += part(st, &layout[i]);
    d += whole_floats(whole, nw);
    return st == FP_STRAT_ZEROPAD && nw == 0 ? d : d + 1; /* the weight, once */
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
                        const fp_whole_desc_t *whole, int nw, const fp_adapter_t *u, double w,
                        float *x, fp_err_t *err)
{
    if (!linear(st))
        return fp_err_set(err, -ENOTSUP, "secure aggregation: %s is not a linear merge",
                          fp_strategy_name(st));
    if (!(w >= 0) || !isfinite(w))
        return fp_err_set(err, -EINVAL, "secure aggregation: weight %g", w);
    int *idx = NULL, rc = order_by_name(layout, n, &idx, err);
    size_t at = 0;
    for (int j = 0; j < n && rc == 0; j++) {
        const fp_module_desc_t *m = &layout[idx[j]];
        const fp_lora_module_t *s = site_module(u, m, st, err, &rc);
        if (rc)
            break;
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
    free(idx);
    if (rc == 0)
        rc = fp_adapter_validate_whole(u, whole, nw, "secure aggregation", err);
    for (int i = 0; rc == 0 && i < u->nwhole; i++) /* sorted by name: the spec's order */
        for (size_t e = 0; e < (size_t)u->whole[i].rows * (size_t)u->whole[i].cols; e++)
            x[at++] = (float)(w * u->whole[i].v[e]);
    if (rc == 0 && (st != FP_STRAT_ZEROPAD || nw > 0))
        x[at++] = (float)w;
    return rc;
}

int fp_sa_linear_decode(fp_strategy_t st, const fp_module_desc_t *layout, int n,
                        const fp_whole_desc_t *whole, int nw, const fp_adapter_t *start,
                        const double *sum, fp_adapter_t **out, fp_err_t *err)
{
    if (!linear(st))
        return fp_err_set(err, -ENOTSUP, "secure aggregation: %s is not a linear merge",
                          fp_strategy_name(st));
    size_t dim = fp_sa_linear_dim(st, layout, n, whole, nw);
    double wtot = st == FP_STRAT_ZEROPAD && nw == 0 ? 1 : sum[dim - 1];
    double wsum = st == FP_STRAT_ZEROPAD ? 1 : wtot;
    if (!(wtot > 0))
        return fp_err_set(err, -EDOM, "secure aggregation: the weights sum to %g", wtot);
    fp_adapter_t *ad = NULL;
    int *idx = NULL, rc = fp_adapter_new(&ad, layout, n, err);
    if (rc == 0 && (rc = fp_adapter_set_whole(ad, whole, nw, err)) != 0)
        fp_adapter_free(ad);
    if (rc)
        return rc;
    if (rc == 0 && (rc = order_by_name(layout, n, &idx, err)) != 0)
        fp_adapter_free(ad);
    if (rc)
        return rc;
    size_t at = 0;
    for (int j = 0; j < n && rc == 0; j++) {
        const fp_module_desc_t *m = &layout[idx[j]];
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
    free(idx);
    for (int i = 0; rc == 0 && i < ad->nwhole; i++) /* Σ w·v / Σ w */
        for (size_t e = 0; e < (size_t)ad->whole[i].rows * (size_t)ad->whole[i].cols; e++)
            ad->whole[i].v[e] = (float)(sum[at++] / wtot);
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
    fp_whole_desc_t *whole; /* tensors trained in full: w·v in Z after the modules */
    int nw;
    size_t whole_at;
    double **omega;        /* per module: d_in × k */
    int *q;                /* per module: the basis' columns, k_m = min(k, d_in, d_out) */
    int *km;
    size_t *y_at, *z_at;   /* per module: offsets in the Y and Z vectors */
    size_t dim_y, dim_z;
    double *Q;             /* concatenated bases, Σ d_out·q (after fp_sa_sketch_basis) */
    size_t nq;
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
    free(s->km);
    free(s->y_at);
    free(s->z_at);
    free(s->q_at);
    free(s->Q);
    free(s->layout);
    free(s->whole);
    free(s);
}

static int sketch_new(fp_sa_sketch_t **out, const fp_module_desc_t *layout, int n,
                      const fp_whole_desc_t *whole, int nw, int k, uint64_t seed,
                      int with_omega, fp_err_t *err)
{
    if (n < 1 || k < 1 || nw < 0)
        return fp_err_set(err, -EINVAL, "sketch: %d modules, %d columns", n, k);
    fp_sa_sketch_t *s = calloc(1, sizeof *s);
    if (!s)
        return fp_err_set(err, -ENOMEM, "out of memory");
    s->n = n;
    s->k = k;
    s->layout = malloc((size_t)n * sizeof *s->layout);
    s->omega = calloc((size_t)n, sizeof *s->omega);
    s->q = calloc((size_t)n, sizeof *s->q);
    s->km = calloc((size_t)n, sizeof *s->km);
    s->y_at = calloc((size_t)n, sizeof *s->y_at);
    s->z_at = calloc((size_t)n, sizeof *s->z_at);
    s->q_at = calloc((size_t)n, sizeof *s->q_at);
    s->whole = calloc((size_t)nw + 1, sizeof *s->whole);
    int *idx = NULL, rc = !s->layout || !s->omega || !s->q || !s->km || !s->y_at || !s->z_at ||
                                   !s->q_at || !s->whole
                             ? fp_err_set(err, -ENOMEM, "out of memory") : 0;
    if (rc == 0 && nw > 0) {
        memcpy(s->whole, whole, (size_t)nw * sizeof *whole);
        s->nw = nw;
    }
    if (rc == 0)
        rc = order_by_name(layout, n, &idx, err);
    size_t qsz = 0;
    for (int j = 0; j < n && rc == 0; j++) { /* offsets in the order of the names */
        int i = idx[j];
        const fp_module_desc_t *m = &layout[i];
        s->layout[i] = *m;
        /* k_m = min(k, d_in, d_out) columns: past that Ω (d_in × k_m) is already onto, or
         * Q already all of R^d_out, and more would only cost */
        int km = k < m->d_in ? k : m->d_in;
        km = km < m->d_out ? km : m->d_out;
        s->km[i] = km;
        s->q[i] = km;
        s->y_at[i] = s->dim_y;
        s->dim_y += (size_t)m->d_out * (size_t)km;
        s->z_at[i] = s->dim_z;
        s->dim_z += (size_t)s->q[i] * (size_t)m->d_in;
        s->q_at[i] = qsz;
        qsz += (size_t)m->d_out * (size_t)s->q[i];
        if (with_omega)
            rc = fp_sketch_omega(seed * 0x9E3779B97F4A7C15ull + (uint64_t)j, m->d_in, km,
                                 &s->omega[i], err); /* Ω from the name's place: every site's */
    }
    free(idx);
    s->nq = qsz;
    s->whole_at = s->dim_z;
    s->dim_z += whole_floats(whole, nw);
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

int fp_sa_sketch_new(fp_sa_sketch_t **out, const fp_module_desc_t *layout, int n,
                     const fp_whole_desc_t *whole, int nw, int k, uint64_t seed, fp_err_t *err)
{
    return sketch_new(out, layout, n, whole, nw, k, seed, 1, err);
}

int fp_sa_sketch_new_sums(fp_sa_sketch_t **out, const fp_module_desc_t *layout, int n,
                          const fp_whole_desc_t *whole, int nw, int k, fp_err_t *err)
{
    return sketch_new(out, layout, n, whole, nw, k, 0, 0, err);
}

size_t fp_sa_sketch_dim_y(const fp_sa_sketch_t *s) { return s->dim_y; }
size_t fp_sa_sketch_dim_z(const fp_sa_sketch_t *s) { return s->dim_z; }

const double *fp_sa_sketch_q(const fp_sa_sketch_t *s, size_t *count)
{
    *count = s->nq;
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
        if (!second && !s->omega[i])
            return fp_err_set(err, -EINVAL, "sketch: no Ω on the coordinator's sketch");
        size_t len = second ? (size_t)s->q[i] * (size_t)m->d_in : (size_t)m->d_out * (size_t)s->km[i];
        size_t at = second ? s->z_at[i] : s->y_at[i];
        double *v = malloc(len * sizeof *v);
        if (!v)
            return fp_err_set(err, -ENOMEM, "out of memory");
        double ws = w * fp_module_scale(sm);
        rc = second ? fp_sketch_z(sm->B, sm->A, m->d_out, m->d_in, sm->rank, ws,
                                  s->Q + s->q_at[i], s->q[i], v, err)
                    : fp_sketch_y(sm->B, sm->A, m->d_out, m->d_in, sm->rank,
                                  ws / sqrt((double)m->d_in), s->omega[i], s->km[i], v, err);
        for (size_t e = 0; rc == 0 && e < len; e++)
            x[at + e] = (float)v[e];
        free(v);
    }
    if (rc == 0 && second) { /* the head as w·v (in name order, as an adapter keeps it), w */
        size_t at = s->whole_at;
        rc = fp_adapter_validate_whole(u, s->whole, s->nw, "secure aggregation", err);
        for (int i = 0; rc == 0 && i < u->nwhole; i++)
            for (size_t e = 0; e < (size_t)u->whole[i].rows * (size_t)u->whole[i].cols; e++)
                x[at++] = (float)(w * u->whole[i].v[e]);
        x[s->dim_z - 1] = (float)w;
    }
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
        size_t ny = (size_t)m->d_out * (size_t)s->km[i];
        double *Y = malloc(ny * sizeof *Y);
        if (!Y)
            return fp_err_set(err, -ENOMEM, "out of memory");
        memcpy(Y, ysum + s->y_at[i], ny * sizeof *Y);
        int q, rc = fp_sketch_orth(Y, m->d_out, s->km[i], &q, err);
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

/* The rank the strategy keeps of one module whose product has singular values sv[0..m). */
static int keep_rank(const fp_sa_sketch_out_t *o, const double *sv, int m, double floor)
{
    int r = o->rank;
    if (o->strategy == FP_STRAT_FLORIST) { /* fp_lr_svd_energy_rank's rule */
        double total = 0, acc = 0;
        int last = 0;
        for (int c = 0; c < m; c++) {
            total += sv[c] * sv[c];
            last = sv[c] > floor ? c + 1 : last;
        }
        r = last;
        for (int c = 0; total > 0 && o->energy < 1 && c < m; c++) {
            acc += sv[c] * sv[c];
            if (acc >= o->energy * total) {
                r = c + 1;
                break;
            }
        }
        r = r < last ? r : last; /* never a component counted as zero */
    }
    r = r < m ? r : m;
    return r > 0 ? r : 1;
}

/* Module i's Z (q × d_in) of the sum, over Σw. */
static void z_of(const fp_sa_sketch_t *s, const double *zsum, double wsum, int i, double *Z)
{
    for (size_t e = 0; e < (size_t)s->q[i] * (size_t)s->layout[i].d_in; e++)
        Z[e] = zsum[s->z_at[i] + e] / wsum;
}

int fp_sa_sketch_decode(const fp_sa_sketch_t *s, const double *zsum,
                        const fp_sa_sketch_out_t *o, fp_adapter_t **out, fp_err_t *err)
{
    double wsum = zsum[s->dim_z - 1];
    if (!(wsum > 0))
        return fp_err_set(err, -EDOM, "secure aggregation: the weights sum to %g", wsum);
    if (o->strategy == FP_STRAT_FLORIST && !(o->energy > 0 && o->energy <= 1))
        return fp_err_set(err, -EINVAL, "florist energy τ must be in (0, 1], not %g", o->energy);
    size_t zmax = 0;
    for (int i = 0; i < s->n; i++) {
        size_t nz = (size_t)s->q[i] * (size_t)s->layout[i].d_in;
        zmax = nz > zmax ? nz : zmax;
    }
    /* one module's Z at a time: ranks first (from Z's spectrum), then the factors */
    fp_module_desc_t *descs = malloc((size_t)s->n * sizeof *descs);
    double *Z = malloc(zmax * sizeof *Z), *sv = malloc((size_t)s->k * sizeof *sv);
    int rc = !descs || !Z || !sv ? fp_err_set(err, -ENOMEM, "out of memory") : 0;
    for (int i = 0; i < s->n && rc == 0; i++) { /* each module's Z = Qᵀ ΔW*, and its rank */
        descs[i] = s->layout[i];
        int m = s->q[i] < descs[i].d_in ? s->q[i] : descs[i].d_in;
        if (o->strategy == FP_STRAT_FLORIST) {
            z_of(s, zsum, wsum, i, Z);
            if ((rc = fp_sketch_values(Z, s->q[i], descs[i].d_in, sv, err)) != 0)
                break;
        }
        /* the sum's fixed point moves σ by at most ‖E‖₂ ≤ resolution·√(q·d_in): below
         * that a component cannot be told from zero */
        double floor = o->resolution / wsum * sqrt((double)s->q[i] * descs[i].d_in);
        descs[i].rank = keep_rank(o, sv, m, floor);
    }
    fp_adapter_t *ad = NULL;
    if (rc == 0)
        rc = fp_adapter_new(&ad, descs, s->n, err);
    if (rc == 0 && (rc = fp_adapter_set_whole(ad, s->whole, s->nw, err)) == 0) {
        size_t at = s->whole_at; /* Σ w·v / Σ w */
        for (int i = 0; i < ad->nwhole; i++)
            for (size_t e = 0; e < (size_t)ad->whole[i].rows * (size_t)ad->whole[i].cols; e++)
                ad->whole[i].v[e] = (float)(zsum[at++] / wsum);
    }
    for (int i = 0; i < s->n && rc == 0; i++) {
        const fp_module_desc_t *m = &descs[i];
        fp_lora_module_t *mo = &ad->mods[fp_adapter_find(ad, m->name)];
        z_of(s, zsum, wsum, i, Z);
        rc = fp_sketch_factor(s->Q + s->q_at[i], Z, m->d_out, m->d_in, s->q[i], mo->rank,
                              fp_module_scale(mo), mo->B, mo->A, NULL, err);
    }
    free(descs);
    free(Z);
    free(sv);
    if (rc) {
        fp_adapter_free(ad);
        return rc;
    }
    *out = ad;
    return 0;
}
