#include "fp_strategy.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fp_lowrank.h"

static const char *const strategy_names[FP_STRAT_COUNT] = {
    "fedavg", "ffa", "zeropad", "flexlora", "flora", "florist",
};

const char *fp_strategy_name(fp_strategy_t s)
{
    return s < FP_STRAT_COUNT ? strategy_names[s] : "?";
}

int fp_strategy_parse(const char *name, fp_strategy_t *out, fp_err_t *err)
{
    for (int i = 0; i < FP_STRAT_COUNT; i++) {
        if (!strcmp(name, strategy_names[i])) {
            *out = (fp_strategy_t)i;
            return 0;
        }
    }
    return fp_err_set(err, -EINVAL, "unknown strategy '%s' (choose fedavg, ffa, zeropad, "
                      "flexlora, flora or florist)", name);
}

int fp_strategy_streams(fp_strategy_t s)
{
    return s == FP_STRAT_FEDAVG || s == FP_STRAT_FFA || s == FP_STRAT_ZEROPAD;
}

int fp_strategy_restarts(fp_strategy_t s)
{
    return s == FP_STRAT_FLORA || s == FP_STRAT_FLORIST;
}

int fp_strategy_exact(fp_strategy_t s)
{
    return s == FP_STRAT_FFA || s == FP_STRAT_FLORA;
}

int fp_strategy_merges_products(fp_strategy_t s)
{
    return s == FP_STRAT_FLEXLORA || s == FP_STRAT_FLORA || s == FP_STRAT_FLORIST;
}

int fp_strategy_equal_ranks(fp_strategy_t s)
{
    return s == FP_STRAT_FEDAVG || s == FP_STRAT_FFA;
}

int fp_strategy_site_rank(fp_strategy_t s, int r_max, int budget, int cap)
{
    if (fp_strategy_equal_ranks(s))
        return r_max; /* sites below r_max are refused at Hello */
    int r = r_max;
    if (budget < r)
        r = budget;
    if (cap && cap < r)
        r = cap;
    return r < 1 ? 1 : r;
}

/* A copy of layout[0..n) with every rank set to `rank`. */
static fp_module_desc_t *at_rank(const fp_module_desc_t *layout, int n, int rank, fp_err_t *err)
{
    fp_module_desc_t *d = malloc((size_t)(n ? n : 1) * sizeof *d);
    if (!d) {
        fp_err_set(err, -ENOMEM, "out of memory");
        return NULL;
    }
    memcpy(d, layout, (size_t)n * sizeof *d);
    for (int i = 0; i < n; i++)
        d[i].rank = rank;
    return d;
}

int fp_strategy_initial(fp_strategy_t s, const fp_module_desc_t *layout, int n, uint64_t seed,
                        fp_adapter_t **out, fp_err_t *err)
{
    *out = NULL;
    int restart = fp_strategy_restarts(s);
    fp_module_desc_t *d = restart ? at_rank(layout, n, 1, err) : NULL;
    if (restart && !d)
        return -ENOMEM;
    int rc = fp_adapter_new(out, restart ? d : layout, n, err);
    free(d);
    if (rc || restart) /* restart: ΔW = 0, A and B zero */
        return rc;
    fp_adapter_randomize(*out, seed, s == FP_STRAT_FFA ? seed : 0, 0.0);
    return 0;
}

int fp_strategy_local_start(int restart, const fp_adapter_t *received, int rank, uint64_t seed,
                            fp_adapter_t **out, fp_err_t *err)
{
    *out = NULL;
    if (!restart)
        return fp_adapter_clone(received, out, err);
    fp_module_desc_t *d = calloc((size_t)(received->n ? received->n : 1), sizeof *d);
    if (!d)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < received->n; i++) {
        d[i] = fp_module_desc(&received->mods[i]);
        d[i].rank = rank;
    }
    int rc = fp_adapter_new(out, d, received->n, err);
    free(d);
    if (rc == 0)
        fp_adapter_randomize(*out, seed, 0, 0.0); /* B ~ N(0, 0) = 0 */
    /* tensors trained in full (a head) are no update to restart: they go on from the global */
    if (rc == 0 && (rc = fp_adapter_copy_whole(*out, received, err)) != 0) {
        fp_adapter_free(*out);
        *out = NULL;
    }
    return rc;
}

/* The module of start matching u's module m. */
static const fp_lora_module_t *start_of(const fp_adapter_t *start, const fp_lora_module_t *m)
{
    int i = fp_adapter_find(start, m->name);
    return i < 0 ? NULL : &start->mods[i];
}

int fp_strategy_check_update(fp_strategy_t s, const fp_module_desc_t *layout, int n, int rank,
                             const fp_adapter_t *u, const fp_adapter_t *start, fp_err_t *err)
{
    fp_module_desc_t *spec = at_rank(layout, n, rank, err);
    if (!spec)
        return -ENOMEM;
    int rc = fp_adapter_validate(u, spec, n, err);
    free(spec);
    if (rc || fp_strategy_restarts(s))
        return rc;
    for (int i = 0; i < u->n; i++) {
        const fp_lora_module_t *m = &u->mods[i], *sm = start ? start_of(start, m) : NULL;
        if (m->rank != rank)
            return fp_err_set(err, -EINVAL, "module '%s' has rank %d; this strategy needs the "
                              "assigned rank %d", m->name, m->rank, rank);
        if (!sm || sm->rank != m->rank)
            return fp_err_set(err, -EINVAL, "module '%s' does not match what the site started "
                              "from", m->name);
        if (s == FP_STRAT_FFA &&
            memcmp(m->A, sm->A, (size_t)m->rank * (size_t)m->d_in * sizeof(float)) != 0)
            return fp_err_set(err, -EINVAL, "module '%s': ffa keeps lora_A frozen, but it "
                              "changed", m->name);
    }
    return 0;
}

/* ‖contribution‖² of module m after moving a fraction c of the way from its start sm (NULL:
 * restart, the contribution is c·s·B·A itself). */
static int module_norm2(const fp_lora_module_t *m, const fp_lora_module_t *sm, double c,
                        double *out, fp_err_t *err)
{
    double nm = 0;
    int rc;
    if (!sm) {
        fp_lr_term_t t = {m->B, m->A, m->rank, c * fp_module_scale(m)};
        rc = fp_lowrank_norm(m->d_out, m->d_in, &t, 1, &nm, err);
    } else {
        /* ΔW' − ΔW_s = s·(B'A' − B_sA_s), with B', A' interpolated */
        size_t na = (size_t)m->rank * (size_t)m->d_in, nb = (size_t)m->d_out * (size_t)m->rank;
        float *a = malloc((na + nb) * sizeof *a), *b = a ? a + na : NULL;
        if (!a)
            return fp_err_set(err, -ENOMEM, "out of memory");
        for (size_t j = 0; j < na; j++)
            a[j] = (float)(sm->A[j] + c * ((double)m->A[j] - sm->A[j]));
        for (size_t j = 0; j < nb; j++)
            b[j] = (float)(sm->B[j] + c * ((double)m->B[j] - sm->B[j]));
        double sc = fp_module_scale(m);
        fp_lr_term_t t[2] = {{b, a, m->rank, sc}, {sm->B, sm->A, sm->rank, -sc}};
        rc = fp_lowrank_norm(m->d_out, m->d_in, t, 2, &nm, err);
        free(a);
    }
    *out = nm * nm;
    return rc;
}

/* The head u's is measured against: the start's (continue), else the round's global's. */
static const fp_adapter_t *head_from(const fp_adapter_t *u, const fp_adapter_t *start,
                                     const fp_adapter_t *head, fp_err_t *err, int *rc)
{
    *rc = 0;
    const fp_adapter_t *h = start ? start : head;
    if (u->nwhole && !h)
        *rc = fp_err_set(err, -EINVAL, "a restart update's head is measured against the "
                         "round's global head: none given");
    return h;
}

static int norm_at(const fp_adapter_t *u, const fp_adapter_t *start, const fp_adapter_t *head,
                   double c, double *out, fp_err_t *err)
{
    double sum = 0;
    for (int i = 0; i < u->n; i++) {
        const fp_lora_module_t *sm = start ? start_of(start, &u->mods[i]) : NULL;
        if (start && !sm)
            return fp_err_set(err, -EINVAL, "module '%s' is not in the start adapter",
                              u->mods[i].name);
        double n2 = 0;
        int rc = module_norm2(&u->mods[i], sm, c, &n2, err);
        if (rc)
            return rc;
        sum += n2;
    }
    /* a head trained in full: its change, c of the way from the start's (restart: the
     * round's global head, which the site went on from) */
    int rc = 0;
    const fp_adapter_t *hs = head_from(u, start, head, err, &rc);
    for (int i = 0; rc == 0 && i < u->nwhole; i++) {
        int k = fp_adapter_whole_find(hs, u->whole[i].name);
        const fp_whole_t *w = &u->whole[i], *sw = k < 0 ? NULL : &hs->whole[k];
        if (!sw || sw->rows != w->rows || sw->cols != w->cols)
            return fp_err_set(err, -EINVAL, "tensor '%s' does not match the %s adapter's",
                              w->name, start ? "start" : "round's global");
        for (size_t j = 0; j < (size_t)w->rows * (size_t)w->cols; j++) {
            double d = c * ((double)w->v[j] - sw->v[j]);
            sum += d * d;
        }
    }
    *out = sqrt(sum);
    return rc;
}

int fp_strategy_update_norm(const fp_adapter_t *u, const fp_adapter_t *start,
                            const fp_adapter_t *head, double *norm, fp_err_t *err)
{
    return norm_at(u, start, head, 1.0, norm, err);
}

/* u's head moved back a fraction c of its change toward hs's (c = 0: hs's). */
static void head_toward(fp_adapter_t *u, const fp_adapter_t *hs, double c)
{
    for (int i = 0; i < u->nwhole; i++) { /* norm_at checked them against hs */
        fp_whole_t *w = &u->whole[i];
        const fp_whole_t *sw = &hs->whole[fp_adapter_whole_find(hs, w->name)];
        for (size_t j = 0; j < (size_t)w->rows * (size_t)w->cols; j++)
            w->v[j] = (float)(sw->v[j] + c * ((double)w->v[j] - sw->v[j]));
    }
}

int fp_strategy_bound(fp_adapter_t *u, const fp_adapter_t *start, const fp_adapter_t *head,
                      double bound, int clip, double *norm, int *clipped, fp_err_t *err)
{
    *clipped = 0;
    int rc = norm_at(u, start, head, 1.0, norm, err);
    if (rc || bound <= 0 || *norm <= bound)
        return rc;
    if (!clip)
        return fp_err_set(err, -EDOM, "the update's contribution has norm %.6g, above the "
                          "bound %.6g", *norm, bound);
    if (!start) { /* restart: s·B·A and the head's change scale exactly, together */
        double c = bound / *norm;
        for (int i = 0; i < u->n; i++) {
            fp_lora_module_t *m = &u->mods[i];
            for (size_t j = 0; j < (size_t)m->d_out * (size_t)m->rank; j++)
                m->B[j] = (float)(m->B[j] * c);
        }
        if (u->nwhole)
            head_toward(u, head, c);
    } else { /* continue: bisect the interpolation toward the start */
        double lo = 0, hi = 1;
        for (int it = 0; it < 40; it++) {
            double mid = 0.5 * (lo + hi), nm;
            if ((rc = norm_at(u, start, NULL, mid, &nm, err)) != 0)
                return rc;
            if (nm <= bound)
                lo = mid;
            else
                hi = mid;
        }
        for (int i = 0; i < u->n; i++) {
            fp_lora_module_t *m = &u->mods[i];
            const fp_lora_module_t *s = start_of(start, m);
            size_t na = (size_t)m->rank * (size_t)m->d_in, nb = (size_t)m->d_out * (size_t)m->rank;
            for (size_t j = 0; j < na; j++)
                m->A[j] = (float)(s->A[j] + lo * ((double)m->A[j] - s->A[j]));
            for (size_t j = 0; j < nb; j++)
                m->B[j] = (float)(s->B[j] + lo * ((double)m->B[j] - s->B[j]));
        }
        head_toward(u, start, lo);
    }
    *clipped = 1;
    return 0;
}

/* out (rank r_t + r_d, its own scale s) = s_t·B_t·A_t + s_d·B_d·A_d, by stacking. */
static void stack(const fp_lora_module_t *t, const fp_lora_module_t *d, fp_lora_module_t *o)
{
    double s = fp_module_scale(o), ct = fp_module_scale(t) / s, cd = fp_module_scale(d) / s;
    size_t at = (size_t)t->rank * (size_t)t->d_in;
    memcpy(o->A, t->A, at * sizeof(float));
    memcpy(o->A + at, d->A, (size_t)d->rank * (size_t)d->d_in * sizeof(float));
    for (int r = 0; r < o->d_out; r++) {
        float *row = o->B + (size_t)r * (size_t)o->rank;
        for (int j = 0; j < t->rank; j++)
            row[j] = (float)(ct * t->B[(size_t)r * (size_t)t->rank + (size_t)j]);
        for (int j = 0; j < d->rank; j++)
            row[t->rank + j] = (float)(cd * d->B[(size_t)r * (size_t)d->rank + (size_t)j]);
    }
}

/* Cuts module m (in place of its factors in `o`, already at rank `cap`) to the best rank-cap
 * approximation of s_m·B_m·A_m. */
static int truncate_into(const fp_lora_module_t *m, fp_lora_module_t *o, fp_err_t *err)
{
    fp_lr_term_t t = {m->B, m->A, m->rank, fp_module_scale(m)};
    fp_lr_svd_t svd;
    int rc = fp_lowrank_svd(m->d_out, m->d_in, &t, 1, &svd, err);
    if (rc)
        return rc;
    fp_lr_svd_factors(&svd, o->rank, fp_module_scale(o), o->B, o->A);
    fp_lr_svd_free(&svd);
    return 0;
}

int fp_strategy_accumulate(const fp_adapter_t *total, const fp_adapter_t *delta, int rank_cap,
                           fp_adapter_t **out, fp_err_t *err)
{
    *out = NULL;
    int rc = fp_adapter_check_compatible(total, delta, "this round's update", err);
    if (rc)
        return rc;
    int n = total->n;
    fp_module_desc_t *d = calloc((size_t)(n ? n : 1), sizeof *d);
    if (!d)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < n; i++) {
        const fp_lora_module_t *dm = &delta->mods[fp_adapter_find(delta, total->mods[i].name)];
        d[i] = fp_module_desc(&total->mods[i]);
        d[i].rank = total->mods[i].rank + dm->rank;
    }
    fp_adapter_t *sum = NULL, *cut = NULL;
    if ((rc = fp_adapter_new(&sum, d, n, err)) != 0)
        goto out;
    for (int i = 0; i < n; i++)
        stack(&total->mods[i], &delta->mods[fp_adapter_find(delta, total->mods[i].name)],
              &sum->mods[fp_adapter_find(sum, total->mods[i].name)]);
    int over = 0;
    for (int i = 0; i < n; i++) {
        over |= rank_cap > 0 && d[i].rank > rank_cap;
        if (rank_cap > 0 && d[i].rank > rank_cap)
            d[i].rank = rank_cap;
    }
    if (!over) {
        *out = sum;
        sum = NULL;
        goto out;
    }
    if ((rc = fp_adapter_new(&cut, d, n, err)) != 0)
        goto out;
    for (int i = 0; i < n && rc == 0; i++) {
        fp_lora_module_t *o = &cut->mods[i];
        const fp_lora_module_t *m = &sum->mods[fp_adapter_find(sum, o->name)];
        if (m->rank == o->rank) {
            memcpy(o->A, m->A, (size_t)m->rank * (size_t)m->d_in * sizeof(float));
            memcpy(o->B, m->B, (size_t)m->d_out * (size_t)m->rank * sizeof(float));
        } else {
            rc = truncate_into(m, o, err);
        }
    }
    if (rc == 0) {
        *out = cut;
        cut = NULL;
    }
out:
    /* tensors trained in full are values, not changes: the round's replace the total's */
    if (rc == 0 && (rc = fp_adapter_copy_whole(*out, delta, err)) != 0) {
        fp_adapter_free(*out);
        *out = NULL;
    }
    fp_adapter_free(sum);
    fp_adapter_free(cut);
    free(d);
    return rc;
}
