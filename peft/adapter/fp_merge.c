#include "fp_merge.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "fp_adapter_priv.h"
#include "fp_lowrank.h"
#include "fp_merge_kernel.h"
#include "fp_safetensors.h"

/* Per-module state. Streaming strategies accumulate into acc_a (r × d_in) and acc_b
 * (d_out × r), with row_w[i] the total weight that reached component i. */
typedef struct mstate {
    fp_module_desc_t desc; /* output name, shape, rank (r or r_max), alpha, rslora */
    float *acc_a;
    float *acc_b;
    double *row_w; /* r entries */
    int have_ref_a; /* ffa: acc_a holds the shared frozen A */
} mstate_t;

typedef struct src_copy {
    fp_adapter_t *ad; /* owned copy of a source (SVD strategies) */
    double w;
} src_copy_t;

struct fp_merger {
    fp_merge_opts_t opts;
    int n;           /* modules */
    mstate_t *mods;  /* n, sorted by name */
    char *names;
    float *acc_mem;  /* one allocation: every acc_a, acc_b */
    double *w_mem;   /* one allocation: every row_w */
    size_t acc_bytes;
    int count;       /* sources added */
    double total_w;  /* Σ w_k */
    src_copy_t *copies;
    int ncopies, cap_copies;
    size_t copy_bytes;
    int spent;       /* an add failed */
    /* tensors trained in full: the first source's set, and Σ w_k·v_k over their values */
    fp_adapter_t *wref;  /* no modules; its tensors trained in full give names and shapes */
    double *wacc;
};

/* Large accumulators are written once, front to back: transparent huge pages save most of the
 * page faults. Advice only; harmless where THP is off. */
static void advise_huge(void *p, size_t bytes)
{
    const uintptr_t huge = 2u << 20;
    uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t hi = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (p && hi > lo)
        madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
}

static int cmp_mstate(const void *a, const void *b)
{
    return strcmp(((const mstate_t *)a)->desc.name, ((const mstate_t *)b)->desc.name);
}

void fp_merger_free(fp_merger_t *m)
{
    if (!m)
        return;
    for (int i = 0; i < m->ncopies; i++)
        fp_adapter_free(m->copies[i].ad);
    free(m->copies);
    fp_adapter_free(m->wref);
    free(m->wacc);
    free(m->acc_mem);
    free(m->w_mem);
    free(m->mods);
    free(m->names);
    free(m);
}

size_t fp_merger_bytes(const fp_merger_t *m)
{
    return m->acc_bytes + m->copy_bytes;
}

int fp_merger_new(fp_merger_t **out, const fp_merge_opts_t *opts, const fp_module_desc_t *layout,
                  int n, fp_err_t *err)
{
    *out = NULL;
    if (opts->strategy >= FP_STRAT_COUNT)
        return fp_err_set(err, -EINVAL, "bad merge strategy");
    if (opts->strategy == FP_STRAT_FLORIST && opts->energy != 0 &&
        !(opts->energy > 0 && opts->energy <= 1))
        return fp_err_set(err, -EINVAL, "florist energy τ must be in (0, 1], not %g",
                          opts->energy);
    if (opts->rank < 0)
        return fp_err_set(err, -EINVAL, "output rank must be positive");
    if (n <= 0)
        return fp_err_set(err, -EINVAL, "nothing to merge: the layout has no modules");
    fp_merger_t *m = calloc(1, sizeof *m);
    if (!m)
        return fp_err_set(err, -ENOMEM, "out of memory");
    m->opts = *opts;
    if (m->opts.strategy == FP_STRAT_FLORIST && m->opts.energy == 0)
        m->opts.energy = FP_FLORIST_DEFAULT_ENERGY;
    m->n = n;
    int rc = 0;
    size_t names_len = 0, floats = 0, rows = 0;
    for (int i = 0; i < n; i++) {
        const fp_module_desc_t *d = &layout[i];
        if (!d->name || d->d_out <= 0 || d->d_in <= 0 || d->rank <= 0 || !isfinite(d->alpha) ||
            d->alpha == 0) {
            fp_merger_free(m);
            return fp_err_set(err, -EINVAL, "bad layout entry for module '%s'",
                              d->name ? d->name : "?");
        }
        names_len += strlen(d->name) + 1;
        floats += (size_t)d->rank * ((size_t)d->d_in + (size_t)d->d_out);
        rows += (size_t)d->rank;
    }
    m->mods = calloc((size_t)n, sizeof *m->mods);
    m->names = malloc(names_len);
    if (!m->mods || !m->names) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    char *np = m->names;
    for (int i = 0; i < n; i++) {
        m->mods[i].desc = layout[i];
        size_t l = strlen(layout[i].name) + 1;
        memcpy(np, layout[i].name, l);
        m->mods[i].desc.name = np;
        np += l;
    }
    qsort(m->mods, (size_t)n, sizeof *m->mods, cmp_mstate);
    for (int i = 1; i < n; i++) {
        if (!strcmp(m->mods[i].desc.name, m->mods[i - 1].desc.name)) {
            rc = fp_err_set(err, -EINVAL, "module '%s' appears twice in the layout",
                            m->mods[i].desc.name);
            goto fail;
        }
    }
    if (fp_strategy_streams(opts->strategy)) {
        m->acc_mem = calloc(floats, sizeof(float));
        advise_huge(m->acc_mem, floats * sizeof(float));
        m->w_mem = calloc(rows, sizeof(double));
        if (!m->acc_mem || !m->w_mem) {
            rc = fp_err_set(err, -ENOMEM, "out of memory for merge accumulators (%zu MB)",
                            floats * sizeof(float) >> 20);
            goto fail;
        }
        m->acc_bytes = floats * sizeof(float) + rows * sizeof(double);
        float *fp = m->acc_mem;
        double *wp = m->w_mem;
        for (int i = 0; i < n; i++) {
            mstate_t *s = &m->mods[i];
            s->acc_a = fp;
            fp += (size_t)s->desc.rank * (size_t)s->desc.d_in;
            s->acc_b = fp;
            fp += (size_t)s->desc.d_out * (size_t)s->desc.rank;
            s->row_w = wp;
            wp += s->desc.rank;
        }
    }
    *out = m;
    return 0;
fail:
    fp_merger_free(m);
    return rc;
}

static const char *label_of(const char *const *labels, int i, char *buf, size_t n)
{
    if (labels && labels[i])
        return labels[i];
    snprintf(buf, n, "adapter %d", i + 1);
    return buf;
}

/* Checks one source against the layout and the strategy's rank rule. */
static int check_source(const fp_merger_t *m, const fp_adapter_t *ad, const char *what,
                        int check_values, fp_err_t *err)
{
    int i = 0, j = 0;
    while (i < m->n || j < ad->n) {
        int c = i >= m->n ? 1 : j >= ad->n ? -1 : strcmp(m->mods[i].desc.name, ad->mods[j].name);
        if (c < 0)
            return fp_err_set(err, -EINVAL, "%s: module '%s' is missing", what,
                              m->mods[i].desc.name);
        if (c > 0)
            return fp_err_set(err, -EINVAL, "%s: unexpected module '%s'", what,
                              ad->mods[j].name);
        const fp_module_desc_t *d = &m->mods[i].desc;
        const fp_lora_module_t *s = &ad->mods[j];
        if (s->d_out != d->d_out || s->d_in != d->d_in)
            return fp_err_set(err, -EINVAL, "%s: module '%s' adapts a %d×%d weight, expected "
                              "%d×%d", what, s->name, s->d_out, s->d_in, d->d_out, d->d_in);
        fp_strategy_t st = m->opts.strategy;
        if ((st == FP_STRAT_FEDAVG || st == FP_STRAT_FFA) && s->rank != d->rank)
            return fp_err_set(err, -EINVAL, "%s: module '%s' has rank %d but %s needs every "
                              "site at rank %d (use zeropad, flexlora, flora or florist for "
                              "mixed ranks)", what, s->name, s->rank, fp_strategy_name(st),
                              d->rank);
        if (st == FP_STRAT_ZEROPAD && s->rank > d->rank)
            return fp_err_set(err, -EINVAL, "%s: module '%s' has rank %d, above the merge's "
                              "r_max %d", what, s->name, s->rank, d->rank);
        i++;
        j++;
    }
    if (!check_values)
        return 0; /* the streaming kernel detects non-finite values as it goes */
    return fp_adapter_check_finite(ad, err) ? fp_err_prefix(err, -EDOM, "%s: ", what) : 0;
}

/* ‖s·B·A‖_F via ‖BA‖² = ⟨BᵀB, AAᵀ⟩, in double. */
static double module_norm(const fp_lora_module_t *s)
{
    int r = s->rank;
    double *g = calloc((size_t)r * (size_t)r * 2, sizeof(double));
    if (!g)
        return 0;
    double *gb = g, *ga = g + (size_t)r * (size_t)r;
    for (int row = 0; row < s->d_out; row++) {
        const float *b = s->B + (size_t)row * (size_t)r;
        for (int i = 0; i < r; i++)
            for (int j = 0; j < r; j++)
                gb[i * r + j] += (double)b[i] * b[j];
    }
    for (int i = 0; i < r; i++)
        for (int j = i; j < r; j++) {
            const float *x = s->A + (size_t)i * (size_t)s->d_in;
            const float *y = s->A + (size_t)j * (size_t)s->d_in;
            double acc = 0;
            for (int c = 0; c < s->d_in; c++)
                acc += (double)x[c] * y[c];
            ga[i * r + j] = ga[j * r + i] = acc;
        }
    double n2 = 0;
    for (int i = 0; i < r * r; i++)
        n2 += gb[i] * ga[i];
    free(g);
    double sc = fp_module_scale(s);
    return n2 > 0 ? fabs(sc) * sqrt(n2) : 0;
}

/* Floats per source folded in before its consumed pages are released. */
#define RELEASE_CHUNK ((size_t)16384)

/* Gives back the pages of a consumed range of a mapped source (no-op for owned memory). */
static void release_range(const fp_adapter_t *ad, const float *p, size_t n)
{
    if (ad->st)
        fp_st_release_range(ad->st, p, n * sizeof(float));
}

/* release_range for a pointer into one of srcs[0..k), whichever holds it. */
static void release_range_any(const fp_adapter_t *const *srcs, int k, const float *p, size_t n)
{
    for (int s = 0; s < k; s++)
        release_range(srcs[s], p, n); /* a no-op for the sources that do not map p */
}

static void release_module(const fp_adapter_t *ad, int j)
{
    const fp_lora_module_t *s = &ad->mods[j];
    if (!ad->st)
        return;
    if (s->src_a >= 0)
        fp_st_release(ad->st, fp_st_get(ad->st, (size_t)s->src_a));
    if (s->src_b >= 0)
        fp_st_release(ad->st, fp_st_get(ad->st, (size_t)s->src_b));
}

/* Names the source of a non-finite sum found in module i: a source holding NaN or inf, or,
 * when every source is finite, an overflow of the weighted sum. */
static int explain_nonfinite(const fp_merger_t *m, int i, const fp_adapter_t *const *srcs, int k,
                             const char *const *labels, int label_base, fp_err_t *err)
{
    char buf[32];
    for (int s = 0; s < k; s++) {
        if (fp_adapter_check_finite(srcs[s], err) != 0)
            return fp_err_prefix(err, -EDOM, "%s: ",
                                 label_of(labels, label_base + s, buf, sizeof buf));
    }
    return fp_err_set(err, -EDOM, "module '%s': the weighted sum of the adapters overflows "
                      "float32 (weights or values far too large)", m->mods[i].desc.name);
}

/* Folds a batch (k ≤ FP_MERGE_BATCH) into the streaming accumulators, module by module.
 * assign: this is the first batch, so fedavg/ffa overwrite instead of adding. */
static int accumulate_batch(fp_merger_t *m, const fp_adapter_t *const *srcs, const double *w,
                            int k, int assign, const char *const *labels, int label_base,
                            fp_err_t *err)
{
    const float *xs[FP_MERGE_BATCH];
    float ws[FP_MERGE_BATCH];
    for (int i = 0; i < m->n; i++) {
        mstate_t *ms = &m->mods[i];
        const fp_module_desc_t *d = &ms->desc;
        const fp_lora_module_t *sm[FP_MERGE_BATCH];
        double wk[FP_MERGE_BATCH];
        int bad = 0;
        for (int s = 0; s < k; s++) {
            sm[s] = &srcs[s]->mods[i]; /* same sorted order as the layout: checked */
            wk[s] = w[s];
            if (m->opts.strategy == FP_STRAT_ZEROPAD && m->opts.norm_weighted)
                wk[s] *= module_norm(sm[s]);
        }
        size_t na = (size_t)d->rank * (size_t)d->d_in;
        size_t nb = (size_t)d->d_out * (size_t)d->rank;
        switch (m->opts.strategy) {
        case FP_STRAT_FEDAVG:
        case FP_STRAT_FFA:
            for (int f = m->opts.strategy == FP_STRAT_FEDAVG ? 0 : 1; f < 2; f++) {
                size_t n = f ? nb : na;
                float *acc = f ? ms->acc_b : ms->acc_a;
                for (int s = 0; s < k; s++)
                    ws[s] = (float)(f ? wk[s] * fp_module_scale(sm[s]) : wk[s]);
                /* Chunk by chunk, so that mapped sources give their pages back as they go:
                 * resident memory stays k × CHUNK, not k × module. */
                for (size_t c0 = 0; c0 < n; c0 += RELEASE_CHUNK) {
                    size_t cn = n - c0 < RELEASE_CHUNK ? n - c0 : RELEASE_CHUNK;
                    for (int s = 0; s < k; s++)
                        xs[s] = (f ? sm[s]->B : sm[s]->A) + c0;
                    bad |= fp_merge_axpy(acc + c0, assign, xs, ws, k, cn);
                    for (int s = 0; s < k; s++)
                        release_range(srcs[s], xs[s], cn);
                }
            }
            for (int s = 0; s < k; s++)
                ms->row_w[0] += wk[s];
            break;
        case FP_STRAT_ZEROPAD: {
            /* Row c of A gets the sites whose rank exceeds c. */
            for (int c = 0; c < d->rank; c++) {
                int kk = 0;
                for (int s = 0; s < k; s++) {
                    if (sm[s]->rank > c) {
                        xs[kk] = sm[s]->A + (size_t)c * (size_t)d->d_in;
                        ws[kk] = (float)wk[s];
                        ms->row_w[c] += wk[s];
                        kk++;
                    }
                }
                if (kk)
                    bad |= fp_merge_axpy(ms->acc_a + (size_t)c * (size_t)d->d_in, 0, xs, ws,
                                         kk, (size_t)d->d_in);
                for (int s = 0; s < kk; s++)
                    release_range_any(srcs, k, xs[s], (size_t)d->d_in);
            }
            int ranks[FP_MERGE_BATCH];
            for (int s = 0; s < k; s++) {
                ws[s] = (float)(wk[s] * fp_module_scale(sm[s]));
                ranks[s] = sm[s]->rank;
            }
            size_t rows_per = RELEASE_CHUNK / (size_t)d->rank + 1;
            for (size_t j0 = 0; j0 < (size_t)d->d_out; j0 += rows_per) {
                size_t rn = (size_t)d->d_out - j0 < rows_per ? (size_t)d->d_out - j0 : rows_per;
                for (int s = 0; s < k; s++)
                    xs[s] = sm[s]->B + j0 * (size_t)ranks[s];
                bad |= fp_merge_axpy_rows(ms->acc_b + j0 * (size_t)d->rank, d->rank, xs, ranks,
                                          ws, k, rn);
                for (int s = 0; s < k; s++)
                    release_range(srcs[s], xs[s], rn * (size_t)ranks[s]);
            }
            /* a NaN norm weight (from a NaN factor) poisons nothing above; catch it here */
            for (int s = 0; s < k; s++)
                bad |= !isfinite(wk[s]);
            break;
        }
        default:
            break;
        }
        if (bad)
            return explain_nonfinite(m, i, srcs, k, labels, label_base, err);
        for (int s = 0; s < k; s++)
            release_module(srcs[s], i);
    }
    return 0;
}

/* ffa: every site's A must be the shared frozen A, bit for bit. */
static int ffa_check_a(fp_merger_t *m, const fp_adapter_t *ad, const char *what, fp_err_t *err)
{
    for (int i = 0; i < m->n; i++) {
        mstate_t *ms = &m->mods[i];
        const fp_lora_module_t *s = &ad->mods[i];
        size_t na = (size_t)s->rank * (size_t)s->d_in;
        if (!ms->have_ref_a) {
            if (fp_merge_nonfinite(s->A, na))
                return fp_adapter_check_finite(ad, err) ? fp_err_prefix(err, -EDOM, "%s: ", what)
                                                        : -EDOM;
            memcpy(ms->acc_a, s->A, na * sizeof(float));
            ms->have_ref_a = 1;
            continue;
        }
        if (memcmp(ms->acc_a, s->A, na * sizeof(float)) != 0) {
            double worst = 0;
            for (size_t e = 0; e < na; e++)
                worst = fmax(worst, fabs((double)ms->acc_a[e] - s->A[e]));
            return fp_err_set(err, -EINVAL, "%s: module '%s': lora_A differs from the shared "
                              "frozen A of the first site (max |ΔA| = %.3g); ffa needs every "
                              "site to keep A at the shared seed", what, s->name, worst);
        }
    }
    return 0;
}

/* The tensors trained in full (a classifier head) merge the same way under every strategy:
 * their weighted average Σ p_k·v_k, accumulated in double. The first source sets which there
 * are; every other must hold the same, each non-finite value refused. */
static int add_whole(fp_merger_t *m, const fp_adapter_t *ad, double w, const char *what,
                     fp_err_t *err)
{
    int rc;
    if (!m->wref) {
        size_t n = 0;
        if ((rc = fp_adapter_new(&m->wref, NULL, 0, err)) != 0 ||
            (rc = fp_adapter_copy_whole(m->wref, ad, err)) != 0)
            return rc;
        for (int i = 0; i < ad->nwhole; i++)
            n += (size_t)ad->whole[i].rows * (size_t)ad->whole[i].cols;
        if (!(m->wacc = calloc(n ? n : 1, sizeof *m->wacc)))
            return fp_err_set(err, -ENOMEM, "out of memory");
        m->acc_bytes += n * sizeof *m->wacc;
    } else {
        fp_whole_desc_t *d;
        if ((rc = fp_adapter_whole_descs(m->wref, &d, err)) != 0)
            return rc;
        rc = fp_adapter_validate_whole(ad, d, m->wref->nwhole, what, err);
        free(d);
        if (rc)
            return rc;
    }
    double *acc = m->wacc;
    for (int i = 0; i < ad->nwhole; i++) { /* both sorted by name: the same order */
        const fp_whole_t *x = &ad->whole[i];
        size_t n = (size_t)x->rows * (size_t)x->cols;
        for (size_t e = 0; e < n; e++) {
            if (!isfinite(x->v[e]))
                return fp_err_set(err, -EDOM, "%s: tensor '%s' holds a non-finite value (%g "
                                  "at %zu)", what, x->name, (double)x->v[e], e);
            acc[e] += w * (double)x->v[e];
        }
        acc += n;
    }
    return 0;
}

int fp_merger_add(fp_merger_t *m, const fp_adapter_t *const *srcs, const double *w, int k,
                  const char *const *labels, fp_err_t *err)
{
    if (m->spent)
        return fp_err_set(err, -EINVAL, "merger used after a failed add");
    char buf[32];
    int rc = 0;
    for (int i = 0; i < k; i++) {
        const char *what = label_of(labels, i, buf, sizeof buf);
        if (!(w[i] >= 0) || !isfinite(w[i])) {
            rc = fp_err_set(err, -EINVAL, "%s: weight %g must be finite and non-negative",
                            what, w[i]);
            goto fail;
        }
        if ((rc = check_source(m, srcs[i], what, !fp_strategy_streams(m->opts.strategy),
                               err)) != 0)
            goto fail;
        if (m->opts.strategy == FP_STRAT_FFA && (rc = ffa_check_a(m, srcs[i], what, err)) != 0)
            goto fail;
        if ((rc = add_whole(m, srcs[i], w[i], what, err)) != 0)
            goto fail;
    }
    if (fp_strategy_streams(m->opts.strategy)) {
        for (int b = 0; b < k; b += FP_MERGE_BATCH) {
            int nb = k - b < FP_MERGE_BATCH ? k - b : FP_MERGE_BATCH;
            int assign = m->count == 0 && b == 0;
            if ((rc = accumulate_batch(m, srcs + b, w + b, nb, assign, labels, b, err)) != 0)
                goto fail;
        }
    } else {
        if (m->ncopies + k > m->cap_copies) {
            int cap = m->cap_copies ? m->cap_copies * 2 : 8;
            while (cap < m->ncopies + k)
                cap *= 2;
            src_copy_t *c = realloc(m->copies, (size_t)cap * sizeof *c);
            if (!c) {
                rc = fp_err_set(err, -ENOMEM, "out of memory");
                goto fail;
            }
            m->copies = c;
            m->cap_copies = cap;
        }
        for (int i = 0; i < k; i++) {
            fp_adapter_t *copy;
            if ((rc = fp_adapter_clone(srcs[i], &copy, err)) != 0)
                goto fail;
            m->copies[m->ncopies].ad = copy;
            m->copies[m->ncopies].w = w[i];
            m->ncopies++;
            m->copy_bytes += fp_adapter_params(copy) * sizeof(float);
            for (int j = 0; j < srcs[i]->n; j++)
                release_module(srcs[i], j);
        }
    }
    for (int i = 0; i < k; i++)
        m->total_w += w[i];
    m->count += k;
    return 0;
fail:
    m->spent = 1;
    return rc;
}

/* flexlora / flora / florist output for module i, with rank chosen here. */
static int finish_svd_module(fp_merger_t *m, int i, fp_lr_svd_t *svd, int *rank_out,
                             fp_err_t *err)
{
    const fp_module_desc_t *d = &m->mods[i].desc;
    fp_lr_term_t *terms = malloc((size_t)m->ncopies * sizeof *terms);
    if (!terms)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int k = 0; k < m->ncopies; k++) {
        const fp_lora_module_t *s = &m->copies[k].ad->mods[i];
        terms[k].B = s->B;
        terms[k].A = s->A;
        terms[k].r = s->rank;
        terms[k].c = m->copies[k].w / m->total_w * fp_module_scale(s);
    }
    int rc = 0;
    if (m->opts.strategy == FP_STRAT_FLORA) {
        int R = 0;
        for (int k = 0; k < m->ncopies; k++)
            R += terms[k].r;
        *rank_out = R;
    } else {
        rc = fp_lowrank_svd(d->d_out, d->d_in, terms, m->ncopies, svd, err);
        if (rc == 0) {
            if (m->opts.strategy == FP_STRAT_FLEXLORA)
                *rank_out = m->opts.rank ? m->opts.rank : d->rank;
            else
                *rank_out = fp_lr_svd_energy_rank(svd, m->opts.energy);
        } else {
            fp_err_prefix(err, rc, "module '%s': ", d->name);
        }
    }
    free(terms);
    return rc;
}

int fp_merger_finish(fp_merger_t *m, fp_adapter_t **out, fp_err_t *err)
{
    *out = NULL;
    if (m->spent)
        return fp_err_set(err, -EINVAL, "merger used after a failed add");
    if (m->count == 0)
        return fp_err_set(err, -EINVAL, "no adapters were added to the merge");
    if (!(m->total_w > 0))
        return fp_err_set(err, -EINVAL, "the weights of the merged adapters sum to zero");
    int rc = 0;
    fp_lr_svd_t *svds = NULL;
    fp_module_desc_t *descs = malloc((size_t)m->n * sizeof *descs);
    if (!descs)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int svd_kind = m->opts.strategy == FP_STRAT_FLEXLORA || m->opts.strategy == FP_STRAT_FLORIST;
    if (svd_kind && !(svds = calloc((size_t)m->n, sizeof *svds))) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < m->n; i++) {
        descs[i] = m->mods[i].desc;
        if (!fp_strategy_streams(m->opts.strategy)) {
            if ((rc = finish_svd_module(m, i, svd_kind ? &svds[i] : NULL, &descs[i].rank,
                                        err)) != 0)
                goto out;
        }
    }
    fp_adapter_t *ad;
    int streams = fp_strategy_streams(m->opts.strategy);
    if (streams) {
        /* The output takes over the accumulators: same modules, same order, A then B. */
        unsigned char *none = calloc((size_t)m->n, 1);
        rc = none ? fp__adapter_alloc(&ad, descs, m->n, none, err)
                  : fp_err_set(err, -ENOMEM, "out of memory");
        free(none);
        if (rc)
            goto out;
        free(ad->data);
        ad->data = m->acc_mem;
        m->acc_mem = NULL;
        m->spent = 1; /* its accumulators now belong to the output */
        for (int i = 0; i < m->n; i++) {
            ad->mods[i].A = m->mods[i].acc_a;
            ad->mods[i].B = m->mods[i].acc_b;
        }
    } else if ((rc = fp_adapter_new(&ad, descs, m->n, err)) != 0) {
        goto out;
    }
    int bad = 0;
    for (int i = 0; i < m->n; i++) {
        mstate_t *ms = &m->mods[i];
        fp_lora_module_t *o = &ad->mods[i];
        double s_out = fp_module_scale(o);
        size_t na = (size_t)o->rank * (size_t)o->d_in;
        size_t nb = (size_t)o->d_out * (size_t)o->rank;
        switch (m->opts.strategy) {
        case FP_STRAT_FEDAVG:
        case FP_STRAT_FFA: {
            double inv = 1.0 / ms->row_w[0];
            if (m->opts.strategy == FP_STRAT_FEDAVG)
                bad |= fp_merge_scale(o->A, na, (float)inv);
            bad |= fp_merge_scale(o->B, nb, (float)(inv / s_out));
            break;
        }
        case FP_STRAT_ZEROPAD: {
            float *colscale = malloc((size_t)o->rank * sizeof(float));
            if (!colscale) {
                bad = 1;
                break;
            }
            for (int c = 0; c < o->rank; c++) {
                double inv = ms->row_w[c] > 0 ? 1.0 / ms->row_w[c] : 0.0;
                bad |= fp_merge_scale(o->A + (size_t)c * (size_t)o->d_in, (size_t)o->d_in,
                                      (float)inv);
                colscale[c] = (float)(inv / s_out);
            }
            for (int row = 0; row < o->d_out; row++) {
                float *b = o->B + (size_t)row * (size_t)o->rank;
                for (int c = 0; c < o->rank; c++)
                    b[c] *= colscale[c];
            }
            free(colscale);
            bad |= fp_merge_nonfinite(o->B, nb);
            break;
        }
        case FP_STRAT_FLORA: {
            int col = 0;
            for (int k = 0; k < m->ncopies; k++) {
                const fp_lora_module_t *s = &m->copies[k].ad->mods[i];
                double p = m->copies[k].w / m->total_w;
                double bs = fp_module_scale(s) / s_out;
                for (int c = 0; c < s->rank; c++, col++) {
                    float *arow = o->A + (size_t)col * (size_t)o->d_in;
                    const float *srow = s->A + (size_t)c * (size_t)s->d_in;
                    for (int e = 0; e < o->d_in; e++)
                        arow[e] = (float)(srow[e] * p);
                    for (int row = 0; row < o->d_out; row++)
                        o->B[(size_t)row * (size_t)o->rank + (size_t)col] =
                            (float)(s->B[(size_t)row * (size_t)s->rank + (size_t)c] * bs);
                }
            }
            break;
        }
        case FP_STRAT_FLEXLORA:
        case FP_STRAT_FLORIST:
            fp_lr_svd_factors(&svds[i], o->rank, s_out, o->B, o->A);
            break;
        default:
            break;
        }
    }
    if (m->wref && m->wref->nwhole) { /* the average of the tensors trained in full */
        if ((rc = fp_adapter_copy_whole(ad, m->wref, err)) != 0) {
            fp_adapter_free(ad);
            goto out;
        }
        const double *acc = m->wacc;
        for (int i = 0; i < ad->nwhole; i++) {
            size_t n = (size_t)ad->whole[i].rows * (size_t)ad->whole[i].cols;
            for (size_t e = 0; e < n; e++) {
                ad->whole[i].v[e] = (float)(acc[e] / m->total_w);
                bad |= !isfinite(ad->whole[i].v[e]);
            }
            acc += n;
        }
    }
    rc = streams ? (bad ? -EDOM : 0) : fp_adapter_check_finite(ad, err);
    if (rc) {
        if (streams)
            fp_err_set(err, rc, "merged adapter overflowed float32");
        else
            fp_err_prefix(err, rc, "merged adapter overflowed: ");
        fp_adapter_free(ad);
        goto out;
    }
    if (m->ncopies > 0 && m->copies[0].ad->base_model)
        ad->base_model = strdup(m->copies[0].ad->base_model);
    *out = ad;
out:
    if (svds)
        for (int i = 0; i < m->n; i++)
            fp_lr_svd_free(&svds[i]);
    free(svds);
    free(descs);
    return rc;
}

int fp_merge_layout(const fp_adapter_t *const *srcs, int k, fp_strategy_t s,
                    const char *const *labels, fp_module_desc_t **out, fp_err_t *err)
{
    *out = NULL;
    if (k <= 0)
        return fp_err_set(err, -EINVAL, "no adapters to merge");
    const fp_adapter_t *ref = srcs[0];
    if (ref->n == 0)
        return fp_err_set(err, -EINVAL, "%s holds no modules", labels ? labels[0] : "adapter 1");
    fp_module_desc_t *l = malloc((size_t)ref->n * sizeof *l);
    if (!l)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < ref->n; i++)
        l[i] = fp_module_desc(&ref->mods[i]);
    char buf[32];
    for (int j = 1; j < k; j++) {
        const char *what = label_of(labels, j, buf, sizeof buf);
        int rc = fp_adapter_check_compatible(ref, srcs[j], what, err);
        if (rc) {
            free(l);
            return rc;
        }
        for (int i = 0; i < ref->n; i++) {
            const fp_lora_module_t *sm = &srcs[j]->mods[i];
            if ((s == FP_STRAT_FEDAVG || s == FP_STRAT_FFA) && sm->rank != l[i].rank) {
                free(l);
                return fp_err_set(err, -EINVAL, "%s: module '%s' has rank %d but the first "
                                  "adapter's is %d; %s needs equal ranks (zeropad, flexlora, "
                                  "flora and florist merge mixed ranks)", what, sm->name,
                                  sm->rank, ref->mods[i].rank, fp_strategy_name(s));
            }
            if (sm->rank > l[i].rank)
                l[i].rank = sm->rank;
        }
    }
    *out = l;
    return 0;
}

int fp_merge(const fp_merge_opts_t *opts, const fp_adapter_t *const *srcs, const double *w,
             int k, const char *const *labels, fp_adapter_t **out, fp_err_t *err)
{
    *out = NULL;
    fp_module_desc_t *layout = NULL;
    fp_merger_t *m = NULL;
    int rc = fp_merge_layout(srcs, k, opts->strategy, labels, &layout, err);
    if (rc == 0)
        rc = fp_merger_new(&m, opts, layout, srcs[0]->n, err);
    if (rc == 0)
        rc = fp_merger_add(m, srcs, w, k, labels, err);
    if (rc == 0)
        rc = fp_merger_finish(m, out, err);
    fp_merger_free(m);
    free(layout);
    return rc;
}

int fp_merge_error(const fp_adapter_t *merged, const fp_adapter_t *const *srcs, const double *w,
                   int k, double *rel_err, double *ref_norm, fp_err_t *err)
{
    double W = 0;
    for (int j = 0; j < k; j++)
        W += w[j];
    if (!(W > 0))
        return fp_err_set(err, -EINVAL, "weights sum to zero");
    fp_lr_term_t *terms = malloc((size_t)(k + 1) * sizeof *terms);
    if (!terms)
        return fp_err_set(err, -ENOMEM, "out of memory");
    double num = 0, den = 0;
    int rc = 0;
    for (int i = 0; i < merged->n && rc == 0; i++) {
        const fp_lora_module_t *o = &merged->mods[i];
        for (int j = 0; j < k; j++) {
            int idx = fp_adapter_find(srcs[j], o->name);
            if (idx < 0) {
                rc = fp_err_set(err, -EINVAL, "adapter %d lacks module '%s'", j + 1, o->name);
                break;
            }
            const fp_lora_module_t *s = &srcs[j]->mods[idx];
            terms[j] = (fp_lr_term_t){s->B, s->A, s->rank, w[j] / W * fp_module_scale(s)};
        }
        if (rc)
            break;
        double ref, diff;
        if ((rc = fp_lowrank_norm(o->d_out, o->d_in, terms, k, &ref, err)) != 0)
            break;
        terms[k] = (fp_lr_term_t){o->B, o->A, o->rank, -fp_module_scale(o)};
        if ((rc = fp_lowrank_norm(o->d_out, o->d_in, terms, k + 1, &diff, err)) != 0)
            break;
        num += diff * diff;
        den += ref * ref;
    }
    free(terms);
    if (rc)
        return rc;
    *rel_err = den > 0 ? sqrt(num / den) : sqrt(num);
    if (ref_norm)
        *ref_norm = sqrt(den);
    return 0;
}
