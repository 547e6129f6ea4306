/* The server optimizer's round (fp_fed_opt.h). */
#include "fp_fed_opt.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fp_fs.h"
#include "fp_lowrank.h"
#include "fp_safetensors.h"

#define META_KEY "fedpeft.server_optimizer"

/* Linear: m and v over the factors, flat (module by module, A then B), then the tensors trained
 * in full (a head). Exact: each module's momentum MB·MA, and the head's, flat (hm). One
 * allocation each. */
struct fp_opt_state {
    fp_sopt_kind_t kind;
    size_t n;                 /* linear: parameters */
    float *m, *v;
    int nmod;                 /* exact: modules, in the global's order */
    char **names;
    int *d_out, *d_in, *rank;
    float **mb, **ma;
    size_t nh;                /* exact: the head's values, its momentum */
    float *hm;
};

#define HEAD_KEY "modules_to_save.momentum"

void fp_fed_opt_free(fp_opt_state_t *s)
{
    if (!s)
        return;
    free(s->m);
    for (int i = 0; s->names && s->mb && i < s->nmod; i++) {
        free(s->names[i]);
        free(s->mb[i]);
        free(s->ma[i]);
    }
    free(s->names);
    free(s->d_out);
    free(s->mb);
    free(s->hm);
    free(s);
}

static char *state_path(const char *opt_dir, const char *sha)
{
    char name[96];
    snprintf(name, sizeof name, "%s.safetensors", sha);
    return fp_path_join(opt_dir, name);
}

/* The kept state of start_sha's global into *out, if it is this optimizer's (NULL: none — the
 * first round — or another kind's, after the configuration changed). A state file that is
 * there but cannot be read is an error: starting afresh would change the federation silently. */
static int open_state(const fp_sopt_cfg_t *c, const char *opt_dir, const char *sha,
                      fp_st_file_t **out, fp_err_t *err)
{
    *out = NULL;
    char *p = state_path(opt_dir, sha);
    if (!p)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int rc = 0;
    if (fp_fs_exists(p)) {
        fp_st_file_t *st = NULL;
        fp_err_t e = {0};
        if (fp_st_open(&st, p, &e) != 0) { /* −EIO: not an update's verdict (fp_fed.h) */
            rc = fp_err_set(err, -EIO, "the server optimizer's state: %s", fp_err_msg(&e));
        } else {
            const char *kind = fp_st_meta(st, META_KEY);
            if (kind && strcmp(kind, fp_sopt_name(c->kind)) == 0)
                *out = st;
            else
                fp_st_close(st);
        }
    }
    free(p);
    return rc;
}

/* Every value of the state finite (an overflowed v would freeze its parameter for good). */
static int state_finite(const fp_opt_state_t *s, fp_err_t *err)
{
    size_t bad = 0;
    /* m and v only where the kind keeps them: sgd's m and avgm's v are never written */
    size_t nm = s->m && fp_sopt_has_m(s->kind) ? (fp_sopt_has_v(s->kind) ? 2 * s->n : s->n)
                                               : 0;
    for (size_t i = 0; i < nm; i++)
        bad += !isfinite(s->m[i]);
    for (size_t i = 0; s->hm && i < s->nh; i++)
        bad += !isfinite(s->hm[i]);
    for (int i = 0; s->mb && i < s->nmod; i++) {
        for (size_t j = 0; s->mb[i] && j < (size_t)s->d_out[i] * (size_t)s->rank[i]; j++)
            bad += !isfinite(s->mb[i][j]);
        for (size_t j = 0; s->ma[i] && j < (size_t)s->rank[i] * (size_t)s->d_in[i]; j++)
            bad += !isfinite(s->ma[i][j]);
    }
    return bad ? fp_err_set(err, -EDOM, "server optimizer: %zu values of its state are not "
                            "finite (an update too large for it)", bad) : 0;
}

/* Reads tensor name of exactly n floats into dst; 0, or -ENOENT (absent or another shape). */
static int read_exact(const fp_st_file_t *st, const char *name, float *dst, uint64_t n)
{
    const fp_st_tensor_t *t = st ? fp_st_find(st, name) : NULL;
    if (!t || t->nelem != n || fp_st_read_f32(st, t, dst, NULL) != 0)
        return -ENOENT;
    return 0;
}

/* ---- linear strategies: the factors, element-wise ---- */

static float *factor(const fp_lora_module_t *m, int b)
{
    return b ? m->B : m->A;
}

/* The start's tensor trained in full matching w (same name and shape), or NULL. */
static const fp_whole_t *start_whole(const fp_adapter_t *start, const fp_whole_t *w)
{
    int k = fp_adapter_whole_find(start, w->name);
    const fp_whole_t *o = k < 0 ? NULL : &start->whole[k];
    return o && o->rows == w->rows && o->cols == w->cols ? o : NULL;
}

/* Values of g's tensors trained in full, each checked against the start's. */
static int whole_count(const fp_adapter_t *start, const fp_adapter_t *g, size_t *n,
                       fp_err_t *err)
{
    *n = 0;
    if (g->nwhole != start->nwhole)
        return fp_err_set(err, -EINVAL, "server optimizer: the merge holds %d tensors trained "
                          "in full, the round's start %d", g->nwhole, start->nwhole);
    for (int i = 0; i < g->nwhole; i++) {
        if (!start_whole(start, &g->whole[i]))
            return fp_err_set(err, -EINVAL, "server optimizer: '%s' changed shape between the "
                              "round's start and its merge", g->whole[i].name);
        *n += (size_t)g->whole[i].rows * (size_t)g->whole[i].cols;
    }
    return 0;
}

/* A head's values into x and their change into d (gather), or x back into the head. */
static void head_move(const fp_adapter_t *start, fp_adapter_t *g, float *x, float *d,
                      int scatter)
{
    size_t off = 0;
    for (int i = 0; i < g->nwhole; i++) {
        fp_whole_t *w = &g->whole[i];
        const fp_whole_t *o = start_whole(start, w);
        size_t len = (size_t)w->rows * (size_t)w->cols;
        for (size_t j = 0; j < len; j++) {
            if (scatter) {
                w->v[j] = x[off + j];
            } else {
                x[off + j] = o->v[j];
                d[off + j] = w->v[j] - o->v[j];
            }
        }
        off += len;
    }
}

static int linear_step(const fp_sopt_cfg_t *c, const fp_st_file_t *st,
                       const fp_adapter_t *start, fp_adapter_t *g, fp_opt_state_t *s,
                       fp_err_t *err)
{
    size_t n = 0, nh = 0;
    for (int i = 0; i < g->n; i++) {
        const fp_lora_module_t *m = &g->mods[i];
        int k = fp_adapter_find(start, m->name);
        if (k < 0 || start->mods[k].rank != m->rank)
            return fp_err_set(err, -EINVAL, "server optimizer: module '%s' changed shape "
                              "between the round's start and its merge", m->name);
        n += (size_t)m->rank * (size_t)(m->d_in + m->d_out);
    }
    int rc = whole_count(start, g, &nh, err);
    if (rc)
        return rc;
    n += nh; /* the head's values follow the factors */
    /* x, Δ (scratch), then m and v (the state, kept) */
    float *x = malloc(2 * (n ? n : 1) * sizeof *x);
    s->m = malloc(2 * (n ? n : 1) * sizeof *s->m);
    if (!x || !s->m) {
        free(x);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    float *d = x + n;
    s->v = s->m + n;
    s->n = n;
    fp_sopt_init(c, s->m, s->v, n);
    if (read_exact(st, "m", s->m, n) != 0 ||
        (fp_sopt_has_v(s->kind) && read_exact(st, "v", s->v, n) != 0))
        fp_sopt_init(c, s->m, s->v, n); /* none kept (the first round), or not these */
    size_t off = 0;
    for (int pass = 0; pass < 2; pass++) { /* gather x and Δ; then scatter x into g */
        off = 0;
        for (int i = 0; i < g->n; i++) {
            fp_lora_module_t *m = &g->mods[i];
            const fp_lora_module_t *o = &start->mods[fp_adapter_find(start, m->name)];
            for (int b = 0; b < 2; b++) {
                size_t len = (size_t)m->rank * (size_t)(b ? m->d_out : m->d_in);
                float *gx = factor(m, b);
                const float *ox = factor(o, b);
                for (size_t j = 0; j < len; j++) {
                    if (pass == 0) {
                        x[off + j] = ox[j];
                        d[off + j] = gx[j] - ox[j];
                    } else {
                        gx[j] = x[off + j];
                    }
                }
                off += len;
            }
        }
        head_move(start, g, x + off, d + off, pass); /* a head: a value, moved as a factor */
        if (pass == 0)
            fp_sopt_step(c, x, d, s->m, s->v, n);
    }
    free(x);
    return 0;
}

/* ---- exact strategies: ΔW in factored form ---- */

/* The rank-r truncation of the terms into B (d_out × r) and A (r × d_in) at scale; its
 * relative error in *cut. */

static int exact_module(const fp_sopt_cfg_t *c, const fp_st_file_t *st,
                        const fp_lora_module_t *o, fp_lora_module_t *m, fp_opt_state_t *s, int i,
                        double *trunc, fp_err_t *err)
{
    const double lr = c->lr, so = fp_module_scale(o), sg = fp_module_scale(m);
    int r = m->rank, rc = 0;
    double cut = 0;
    float *nb = malloc((size_t)m->d_out * (size_t)r * sizeof *nb);
    float *na = malloc((size_t)r * (size_t)m->d_in * sizeof *na);
    if (!nb || !na) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    if (c->kind == FP_SOPT_SGD) { /* W + η·(W̄ − W) */
        fp_lr_term_t t[2] = {{o->B, o->A, o->rank, (1 - lr) * so}, {m->B, m->A, r, lr * sg}};
        rc = fp_sopt_lowrank_sum(m->d_out, m->d_in, t, 2, r, sg, nb, na, &cut, err);
    } else { /* avgm: M ← β·M + (W̄ − W), then W + η·M */
        char key[600];
        s->names[i] = strdup(m->name);
        s->d_out[i] = m->d_out;
        s->d_in[i] = m->d_in;
        s->rank[i] = r;
        s->mb[i] = calloc((size_t)m->d_out * (size_t)r, sizeof **s->mb);
        s->ma[i] = calloc((size_t)r * (size_t)m->d_in, sizeof **s->ma);
        if (!s->names[i] || !s->mb[i] || !s->ma[i]) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        /* the kept momentum, at the rank it was kept (its shape says which) */
        snprintf(key, sizeof key, "%s.momentum_B", m->name);
        const fp_st_tensor_t *kb = st ? fp_st_find(st, key) : NULL;
        snprintf(key, sizeof key, "%s.momentum_A", m->name);
        const fp_st_tensor_t *ka = st ? fp_st_find(st, key) : NULL;
        int kr = kb && ka && kb->ndim == 2 && ka->ndim == 2 && kb->shape[0] == (uint64_t)m->d_out &&
                         ka->shape[1] == (uint64_t)m->d_in && kb->shape[1] == ka->shape[0]
                     ? (int)kb->shape[1] : 0;
        float *ob = kr ? malloc(kb->nelem * sizeof *ob) : NULL;
        float *oa = kr ? malloc(ka->nelem * sizeof *oa) : NULL;
        if (kr && (!ob || !oa || fp_st_read_f32(st, kb, ob, NULL) || fp_st_read_f32(st, ka, oa, NULL)))
            kr = 0;
        fp_lr_term_t t[3] = {{ob, oa, kr, c->beta1}, {m->B, m->A, r, sg},
                             {o->B, o->A, o->rank, -so}};
        double mcut = 0;
        rc = fp_sopt_lowrank_sum(m->d_out, m->d_in, t, 3, r, 1.0, s->mb[i], s->ma[i], &mcut, err);
        free(ob);
        free(oa);
        if (rc == 0) {
            fp_lr_term_t w[2] = {{o->B, o->A, o->rank, so}, {s->mb[i], s->ma[i], r, lr}};
            rc = fp_sopt_lowrank_sum(m->d_out, m->d_in, w, 2, r, sg, nb, na, &cut, err);
        }
        cut = cut > mcut ? cut : mcut;
    }
    if (rc == 0) {
        memcpy(m->B, nb, (size_t)m->d_out * (size_t)r * sizeof *nb);
        memcpy(m->A, na, (size_t)r * (size_t)m->d_in * sizeof *na);
        *trunc = cut > *trunc ? cut : *trunc;
    }
out:
    free(nb);
    free(na);
    return rc;
}

/* A head (tensors trained in full) under an exact strategy: a value, stepped element-wise as
 * the linear strategies step it — sgd x + η·(x̄ − x); avgm's momentum kept flat (HEAD_KEY). */
static int exact_head(const fp_sopt_cfg_t *c, const fp_st_file_t *st, const fp_adapter_t *start,
                      fp_adapter_t *g, fp_opt_state_t *s, fp_err_t *err)
{
    size_t n = 0;
    int rc = whole_count(start, g, &n, err);
    if (rc || n == 0)
        return rc;
    float *x = malloc(2 * n * sizeof *x);
    if (!x)
        return fp_err_set(err, -ENOMEM, "out of memory");
    if (fp_sopt_has_m(c->kind)) {
        if (!(s->hm = malloc(n * sizeof *s->hm))) {
            free(x);
            return fp_err_set(err, -ENOMEM, "out of memory");
        }
        s->nh = n;
        if (read_exact(st, HEAD_KEY, s->hm, n) != 0)
            fp_sopt_init(c, s->hm, NULL, n); /* none kept (the first round), or not this head's */
    }
    head_move(start, g, x, x + n, 0);
    fp_sopt_step(c, x, x + n, s->hm, NULL, n);
    head_move(start, g, x, NULL, 1);
    free(x);
    return 0;
}

static int exact_step(const fp_sopt_cfg_t *c, const fp_st_file_t *st,
                      const fp_adapter_t *start, fp_adapter_t *g, fp_opt_state_t *s,
                      double *trunc, fp_err_t *err)
{
    if (c->kind == FP_SOPT_AVGM) {
        s->names = calloc((size_t)(g->n ? g->n : 1), sizeof *s->names);
        s->d_out = calloc(3 * (size_t)(g->n ? g->n : 1), sizeof *s->d_out);
        s->mb = calloc(2 * (size_t)(g->n ? g->n : 1), sizeof *s->mb);
        if (!s->names || !s->d_out || !s->mb)
            return fp_err_set(err, -ENOMEM, "out of memory");
        s->nmod = g->n;
        s->d_in = s->d_out + g->n;
        s->rank = s->d_in + g->n;
        s->ma = s->mb + g->n;
    }
    for (int i = 0; i < g->n; i++) {
        int k = fp_adapter_find(start, g->mods[i].name);
        if (k < 0)
            return fp_err_set(err, -EINVAL, "server optimizer: module '%s' is not in the "
                              "round's start", g->mods[i].name);
        int rc = exact_module(c, st, &start->mods[k], &g->mods[i], s, i, trunc, err);
        if (rc)
            return rc;
    }
    return exact_head(c, st, start, g, s, err);
}

int fp_fed_opt_active(const fp_sopt_cfg_t *c)
{
    return c->kind != FP_SOPT_SGD || c->lr != 1.0;
}

int fp_fed_opt_step(const fp_sopt_cfg_t *c, fp_strategy_t st, const char *opt_dir,
                    const char *start_sha, const fp_adapter_t *start, fp_adapter_t *global,
                    fp_opt_state_t **state, double *trunc, fp_err_t *err)
{
    *state = NULL;
    *trunc = 0;
    if (!fp_fed_opt_active(c))
        return 0;
    if (fp_strategy_merges_products(st) && c->kind != FP_SOPT_SGD && c->kind != FP_SOPT_AVGM)
        return fp_err_set(err, -ENOTSUP, "server optimizer %s: the strategies that merge "
                          "products take sgd or avgm", fp_sopt_name(c->kind));
    fp_st_file_t *kept = NULL;
    int rc = c->kind == FP_SOPT_SGD ? 0 : open_state(c, opt_dir, start_sha, &kept, err);
    if (rc)
        return rc;
    fp_opt_state_t *s = calloc(1, sizeof *s);
    rc = s ? 0 : fp_err_set(err, -ENOMEM, "out of memory");
    if (rc == 0) {
        s->kind = c->kind;
        rc = fp_strategy_merges_products(st) ? exact_step(c, kept, start, global, s, trunc, err)
                                             : linear_step(c, kept, start, global, s, err);
    }
    if (rc == 0)
        rc = state_finite(s, err);
    fp_st_close(kept);
    if (rc == 0 && c->kind != FP_SOPT_SGD)
        *state = s;
    else
        fp_fed_opt_free(s);
    return rc;
}

/* Removes opt_dir's states other than those of a and b (best effort: a file left is only
 * disk). */
static void prune(const char *opt_dir, const char *a, const char *b)
{
    DIR *d = opendir(opt_dir);
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        if (n < 12 || strcmp(e->d_name + n - 12, ".safetensors") != 0 ||
            (strncmp(e->d_name, a, n - 12) == 0 && a[n - 12] == 0) ||
            (b && strncmp(e->d_name, b, n - 12) == 0 && b[n - 12] == 0))
            continue;
        unlinkat(dirfd(d), e->d_name, 0);
    }
    if (d)
        closedir(d);
}

int fp_fed_opt_store(const char *opt_dir, const char *sha, const char *start_sha,
                     const fp_opt_state_t *s, fp_err_t *err)
{
    if (!s)
        return 0;
    int n = s->m ? 2 : 2 * s->nmod + (s->hm != NULL), rc = 0;
    fp_st_entry_t *e = calloc((size_t)(n ? n : 1), sizeof *e);
    char (*keys)[600] = calloc((size_t)(n ? n : 1), sizeof *keys);
    char *p = state_path(opt_dir, sha);
    if (!e || !keys || !p) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    if (s->m) {
        e[0] = (fp_st_entry_t){.name = "m", .dtype = FP_DT_F32, .ndim = 1, .shape = {s->n},
                               .f32 = s->m};
        e[1] = (fp_st_entry_t){.name = "v", .dtype = FP_DT_F32, .ndim = 1, .shape = {s->n},
                               .f32 = s->v};
        if (!fp_sopt_has_v(s->kind))
            n = 1;
    } else {
        for (int i = 0; i < s->nmod; i++) {
            snprintf(keys[2 * i], sizeof keys[0], "%s.momentum_B", s->names[i]);
            snprintf(keys[2 * i + 1], sizeof keys[0], "%s.momentum_A", s->names[i]);
            e[2 * i] = (fp_st_entry_t){.name = keys[2 * i], .dtype = FP_DT_F32, .ndim = 2,
                                       .shape = {(uint64_t)s->d_out[i], (uint64_t)s->rank[i]},
                                       .f32 = s->mb[i]};
            e[2 * i + 1] = (fp_st_entry_t){.name = keys[2 * i + 1], .dtype = FP_DT_F32,
                                           .ndim = 2,
                                           .shape = {(uint64_t)s->rank[i], (uint64_t)s->d_in[i]},
                                           .f32 = s->ma[i]};
        }
        if (s->hm)
            e[2 * s->nmod] = (fp_st_entry_t){.name = HEAD_KEY, .dtype = FP_DT_F32, .ndim = 1,
                                             .shape = {s->nh}, .f32 = s->hm};
    }
    const char *meta[] = {META_KEY, fp_sopt_name(s->kind), NULL};
    rc = fp_st_write(p, e, (size_t)n, meta, err);
    if (rc == 0)
        prune(opt_dir, sha, start_sha);
out:
    free(e);
    free(keys);
    free(p);
    return rc;
}
