#include "fp_adapter.h"
#include "fp_adapter_priv.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fp_merge_kernel.h"
#include "fp_rng.h"
#include "fp_safetensors.h"

double fp_lora_scale(double alpha, int rank, int rslora)
{
    return rslora ? alpha / sqrt((double)rank) : alpha / (double)rank;
}

double fp_module_scale(const fp_lora_module_t *m)
{
    return fp_lora_scale(m->alpha, m->rank, m->rslora);
}

fp_module_desc_t fp_module_desc(const fp_lora_module_t *m)
{
    fp_module_desc_t d = {m->name, m->d_out, m->d_in, m->rank, m->alpha, m->rslora};
    return d;
}

void fp_adapter_free(fp_adapter_t *ad)
{
    if (!ad)
        return;
    fp_st_close(ad->st);
    free(ad->mods);
    free(ad->data);
    free(ad->names);
    free(ad->base_model);
    free(ad->task_type);
    free(ad->whole);
    free(ad->wmem);
    free(ad);
}

static int cmp_whole_desc(const void *a, const void *b)
{
    return strcmp(((const fp_whole_desc_t *)a)->name, ((const fp_whole_desc_t *)b)->name);
}

int fp_adapter_set_whole(fp_adapter_t *ad, const fp_whole_desc_t *d, int n, fp_err_t *err)
{
    if (n < 0 || n > 1 << 16)
        return fp_err_set(err, -EINVAL, "%d tensors trained in full", n);
    fp_whole_desc_t *s = malloc((size_t)(n ? n : 1) * sizeof *s);
    if (!s)
        return fp_err_set(err, -ENOMEM, "out of memory");
    if (n > 0) {
        memcpy(s, d, (size_t)n * sizeof *s);
        qsort(s, (size_t)n, sizeof *s, cmp_whole_desc);
    }
    uint64_t floats = 0;
    size_t names = 0;
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        if (!s[i].name || !s[i].name[0])
            rc = fp_err_set(err, -EINVAL, "a tensor trained in full has no name");
        else if (s[i].rows <= 0 || s[i].cols <= 0)
            rc = fp_err_set(err, -EINVAL, "tensor '%s': sizes must be positive (%d × %d)",
                            s[i].name, s[i].rows, s[i].cols);
        else if (i > 0 && !strcmp(s[i].name, s[i - 1].name))
            rc = fp_err_set(err, -EINVAL, "tensor '%s' appears twice", s[i].name);
        else {
            floats += (uint64_t)s[i].rows * (uint64_t)s[i].cols;
            names += strlen(s[i].name) + 1;
        }
    }
    if (rc == 0 && floats > (1ull << 34))
        rc = fp_err_set(err, -EFBIG, "tensors trained in full too large (%llu values)",
                        (unsigned long long)floats);
    fp_whole_t *w = NULL;
    void *mem = NULL;
    if (rc == 0 && (!(w = calloc((size_t)(n ? n : 1), sizeof *w)) ||
                    !(mem = calloc(1, (size_t)floats * sizeof(float) + names + 1))))
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    if (rc) {
        free(s);
        free(w);
        free(mem);
        return rc;
    }
    float *v = mem;
    char *np = (char *)(v + floats);
    for (int i = 0; i < n; i++) {
        size_t l = strlen(s[i].name) + 1;
        memcpy(np, s[i].name, l);
        w[i] = (fp_whole_t){np, s[i].rows, s[i].cols, v};
        np += l;
        v += (size_t)s[i].rows * (size_t)s[i].cols;
    }
    free(s);
    free(ad->whole);
    free(ad->wmem);
    ad->whole = w;
    ad->wmem = mem;
    ad->nwhole = n;
    return 0;
}

int fp_adapter_whole_descs(const fp_adapter_t *ad, fp_whole_desc_t **out, fp_err_t *err)
{
    *out = malloc((size_t)(ad->nwhole ? ad->nwhole : 1) * sizeof **out);
    if (!*out)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < ad->nwhole; i++)
        (*out)[i] = (fp_whole_desc_t){ad->whole[i].name, ad->whole[i].rows, ad->whole[i].cols};
    return 0;
}

int fp_adapter_copy_whole(fp_adapter_t *dst, const fp_adapter_t *src, fp_err_t *err)
{
    if (dst == src)
        return 0;
    fp_whole_desc_t *d;
    int rc = fp_adapter_whole_descs(src, &d, err);
    if (rc)
        return rc;
    rc = fp_adapter_set_whole(dst, d, src->nwhole, err);
    free(d);
    for (int i = 0; rc == 0 && i < src->nwhole; i++)
        memcpy(dst->whole[i].v, src->whole[i].v,
               (size_t)src->whole[i].rows * (size_t)src->whole[i].cols * sizeof(float));
    return rc;
}

int fp_adapter_whole_find(const fp_adapter_t *ad, const char *name)
{
    for (int i = 0; i < ad->nwhole; i++)
        if (!strcmp(ad->whole[i].name, name))
            return i;
    return -1;
}

int fp_adapter_validate_whole(const fp_adapter_t *ad, const fp_whole_desc_t *spec, int n,
                              const char *what, fp_err_t *err)
{
    for (int i = 0; i < n; i++) {
        int j = fp_adapter_whole_find(ad, spec[i].name);
        if (j < 0)
            return fp_err_set(err, -EINVAL, "%s: the tensor trained in full '%s' is missing",
                              what, spec[i].name);
        if (ad->whole[j].rows != spec[i].rows || ad->whole[j].cols != spec[i].cols)
            return fp_err_set(err, -EINVAL, "%s: tensor '%s' is %d × %d, expected %d × %d",
                              what, spec[i].name, ad->whole[j].rows, ad->whole[j].cols,
                              spec[i].rows, spec[i].cols);
    }
    for (int j = 0; j < ad->nwhole; j++) {
        int found = 0;
        for (int i = 0; i < n && !found; i++)
            found = !strcmp(spec[i].name, ad->whole[j].name);
        if (!found)
            return fp_err_set(err, -EINVAL, "%s: unexpected tensor trained in full '%s'", what,
                              ad->whole[j].name);
    }
    return 0;
}

typedef struct desc_ref {
    const fp_module_desc_t *d;
    unsigned char owned; /* FP__OWN_A | FP__OWN_B */
} desc_ref_t;

static int cmp_desc_ref(const void *a, const void *b)
{
    return strcmp(((const desc_ref_t *)a)->d->name, ((const desc_ref_t *)b)->d->name);
}

int fp__adapter_alloc(fp_adapter_t **out, const fp_module_desc_t *descs, int n,
                      const unsigned char *owned, fp_err_t *err)
{
    *out = NULL;
    if (n < 0)
        return fp_err_set(err, -EINVAL, "negative module count");
    int rc = 0;
    desc_ref_t *sorted = malloc((size_t)(n ? n : 1) * sizeof *sorted);
    fp_adapter_t *ad = calloc(1, sizeof *ad);
    if (!sorted || !ad) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    size_t names_len = 0;
    uint64_t floats = 0;
    for (int i = 0; i < n; i++) {
        const fp_module_desc_t *d = &descs[i];
        sorted[i].d = d;
        sorted[i].owned = owned ? owned[i] : (FP__OWN_A | FP__OWN_B);
        if (!d->name || !d->name[0]) {
            rc = fp_err_set(err, -EINVAL, "module %d has no name", i);
            goto fail;
        }
        if (d->d_out <= 0 || d->d_in <= 0 || d->rank <= 0) {
            rc = fp_err_set(err, -EINVAL, "module '%s': sizes must be positive (d_out %d, "
                            "d_in %d, rank %d)", d->name, d->d_out, d->d_in, d->rank);
            goto fail;
        }
        if (!isfinite(d->alpha) || d->alpha == 0) {
            rc = fp_err_set(err, -EINVAL, "module '%s': alpha must be finite and non-zero",
                            d->name);
            goto fail;
        }
        names_len += strlen(d->name) + 1;
        if (sorted[i].owned & FP__OWN_A)
            floats += (uint64_t)d->rank * (uint64_t)d->d_in;
        if (sorted[i].owned & FP__OWN_B)
            floats += (uint64_t)d->rank * (uint64_t)d->d_out;
    }
    if (floats > (SIZE_MAX / sizeof(float)) / 2) {
        rc = fp_err_set(err, -EFBIG, "adapter too large (%llu parameters)",
                        (unsigned long long)floats);
        goto fail;
    }
    qsort(sorted, (size_t)n, sizeof *sorted, cmp_desc_ref);
    for (int i = 1; i < n; i++) {
        if (!strcmp(sorted[i].d->name, sorted[i - 1].d->name)) {
            rc = fp_err_set(err, -EINVAL, "module '%s' appears twice", sorted[i].d->name);
            goto fail;
        }
    }
    ad->n = n;
    ad->mods = calloc((size_t)(n ? n : 1), sizeof *ad->mods);
    ad->names = malloc(names_len ? names_len : 1);
    ad->data = calloc(floats ? (size_t)floats : 1, sizeof(float));
    if (!ad->mods || !ad->names || !ad->data) {
        rc = fp_err_set(err, -ENOMEM, "out of memory for an adapter of %llu parameters",
                        (unsigned long long)floats);
        goto fail;
    }
    char *np = ad->names;
    float *fp = ad->data;
    for (int i = 0; i < n; i++) {
        const fp_module_desc_t *d = sorted[i].d;
        fp_lora_module_t *m = &ad->mods[i];
        size_t l = strlen(d->name) + 1;
        memcpy(np, d->name, l);
        m->name = np;
        np += l;
        m->d_out = d->d_out;
        m->d_in = d->d_in;
        m->rank = d->rank;
        m->alpha = d->alpha;
        m->rslora = d->rslora ? 1 : 0;
        if (sorted[i].owned & FP__OWN_A) {
            m->A = fp;
            fp += (size_t)d->rank * (size_t)d->d_in;
        }
        if (sorted[i].owned & FP__OWN_B) {
            m->B = fp;
            fp += (size_t)d->d_out * (size_t)d->rank;
        }
        m->src_a = m->src_b = -1;
    }
    free(sorted);
    *out = ad;
    return 0;
fail:
    free(sorted);
    fp_adapter_free(ad);
    return rc;
}

int fp_adapter_new(fp_adapter_t **out, const fp_module_desc_t *descs, int n, fp_err_t *err)
{
    return fp__adapter_alloc(out, descs, n, NULL, err);
}

static int copy_strings(fp_adapter_t *dst, const fp_adapter_t *src)
{
    if (src->base_model && !(dst->base_model = strdup(src->base_model)))
        return -ENOMEM;
    if (src->task_type && !(dst->task_type = strdup(src->task_type)))
        return -ENOMEM;
    return 0;
}

int fp_adapter_find(const fp_adapter_t *ad, const char *name)
{
    int lo = 0, hi = ad->n;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(ad->mods[mid].name, name);
        if (c == 0)
            return mid;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return -1;
}

uint64_t fp_adapter_params(const fp_adapter_t *ad)
{
    uint64_t p = 0;
    for (int i = 0; i < ad->n; i++) {
        const fp_lora_module_t *m = &ad->mods[i];
        p += (uint64_t)m->rank * ((uint64_t)m->d_in + (uint64_t)m->d_out);
    }
    for (int i = 0; i < ad->nwhole; i++)
        p += (uint64_t)ad->whole[i].rows * (uint64_t)ad->whole[i].cols;
    return p;
}

/* Index of the first non-finite value, or -1. The fast vectorised check clears blocks; only a
 * block that holds a bad value is scanned element by element. */
static long first_non_finite(const float *x, size_t n)
{
    const size_t block = 1 << 14;
    for (size_t b = 0; b < n; b += block) {
        size_t e = b + block < n ? b + block : n;
        if (!fp_merge_nonfinite(x + b, e - b))
            continue;
        for (size_t i = b; i < e; i++)
            if (!isfinite(x[i]))
                return (long)i;
    }
    return -1;
}

int fp_adapter_check_finite(const fp_adapter_t *ad, fp_err_t *err)
{
    for (int i = 0; i < ad->n; i++) {
        const fp_lora_module_t *m = &ad->mods[i];
        long bad = first_non_finite(m->A, (size_t)m->rank * (size_t)m->d_in);
        if (bad >= 0)
            return fp_err_set(err, -EDOM, "module '%s': lora_A holds a non-finite value (%g at "
                              "row %ld, column %ld)", m->name, (double)m->A[bad],
                              bad / m->d_in, bad % m->d_in);
        bad = first_non_finite(m->B, (size_t)m->d_out * (size_t)m->rank);
        if (bad >= 0)
            return fp_err_set(err, -EDOM, "module '%s': lora_B holds a non-finite value (%g at "
                              "row %ld, column %ld)", m->name, (double)m->B[bad],
                              bad / m->rank, bad % m->rank);
    }
    for (int i = 0; i < ad->nwhole; i++) {
        const fp_whole_t *w = &ad->whole[i];
        long bad = first_non_finite(w->v, (size_t)w->rows * (size_t)w->cols);
        if (bad >= 0)
            return fp_err_set(err, -EDOM, "tensor '%s' holds a non-finite value (%g at row %ld, "
                              "column %ld)", w->name, (double)w->v[bad], bad / w->cols,
                              bad % w->cols);
    }
    return 0;
}

int fp_adapter_validate(const fp_adapter_t *ad, const fp_module_desc_t *spec, int n,
                        fp_err_t *err)
{
    for (int i = 0; i < n; i++) {
        int j = fp_adapter_find(ad, spec[i].name);
        if (j < 0)
            return fp_err_set(err, -EINVAL, "module '%s' is missing", spec[i].name);
        const fp_lora_module_t *m = &ad->mods[j];
        if (m->d_out != spec[i].d_out || m->d_in != spec[i].d_in)
            return fp_err_set(err, -EINVAL, "module '%s': adapts a %d×%d weight, expected "
                              "%d×%d", m->name, m->d_out, m->d_in, spec[i].d_out,
                              spec[i].d_in);
        if (m->rank > spec[i].rank)
            return fp_err_set(err, -EINVAL, "module '%s': rank %d is above the allowed %d",
                              m->name, m->rank, spec[i].rank);
    }
    if (ad->n != n) {
        for (int j = 0; j < ad->n; j++) {
            int found = 0;
            for (int i = 0; i < n && !found; i++)
                found = !strcmp(spec[i].name, ad->mods[j].name);
            if (!found)
                return fp_err_set(err, -EINVAL, "unexpected module '%s'", ad->mods[j].name);
        }
        return fp_err_set(err, -EINVAL, "the specification lists a module twice");
    }
    return fp_adapter_check_finite(ad, err);
}

int fp_adapter_check_compatible(const fp_adapter_t *ref, const fp_adapter_t *ad,
                                const char *what, fp_err_t *err)
{
    /* Both are sorted by name: walk them together. */
    int i = 0, j = 0;
    while (i < ref->n || j < ad->n) {
        int c = i >= ref->n ? 1 : j >= ad->n ? -1 : strcmp(ref->mods[i].name, ad->mods[j].name);
        if (c < 0)
            return fp_err_set(err, -EINVAL, "%s: module '%s' is missing", what,
                              ref->mods[i].name);
        if (c > 0)
            return fp_err_set(err, -EINVAL, "%s: unexpected module '%s' (not in the first "
                              "adapter)", what, ad->mods[j].name);
        const fp_lora_module_t *a = &ref->mods[i], *b = &ad->mods[j];
        if (a->d_out != b->d_out || a->d_in != b->d_in)
            return fp_err_set(err, -EINVAL, "%s: module '%s' adapts a %d×%d weight, but the "
                              "first adapter's is %d×%d", what, b->name, b->d_out, b->d_in,
                              a->d_out, a->d_in);
        i++;
        j++;
    }
    fp_whole_desc_t *d;
    int rc = fp_adapter_whole_descs(ref, &d, err);
    if (rc == 0) {
        rc = fp_adapter_validate_whole(ad, d, ref->nwhole, what, err);
        free(d);
    }
    return rc;
}

/* Module i of src at ranks[i] (ranks NULL: the same ranks, a plain copy): first components
 * kept, or zero-padded, and re-scaled to the new rank's scale. */
static int resize(const fp_adapter_t *src, const int *ranks, fp_adapter_t **out, fp_err_t *err)
{
    *out = NULL;
    fp_module_desc_t *descs = malloc((size_t)(src->n ? src->n : 1) * sizeof *descs);
    if (!descs)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < src->n; i++) {
        descs[i] = fp_module_desc(&src->mods[i]);
        if (ranks)
            descs[i].rank = ranks[i];
    }
    fp_adapter_t *ad;
    int rc = fp_adapter_new(&ad, descs, src->n, err);
    free(descs);
    if (rc)
        return rc;
    for (int i = 0; i < src->n; i++) {
        const fp_lora_module_t *s = &src->mods[i];
        fp_lora_module_t *d = &ad->mods[i];
        int rank = d->rank;
        int keep = s->rank < rank ? s->rank : rank;
        memcpy(d->A, s->A, (size_t)keep * (size_t)s->d_in * sizeof(float));
        if (rank == s->rank) {
            memcpy(d->B, s->B, (size_t)s->d_out * (size_t)rank * sizeof(float));
            continue;
        }
        /* B_new = B_old[:, :keep] · s_old / s_new; zeros beyond keep (from calloc). */
        double ratio = fp_module_scale(s) / fp_module_scale(d);
        for (int row = 0; row < s->d_out; row++)
            for (int c = 0; c < keep; c++)
                d->B[(size_t)row * (size_t)rank + (size_t)c] =
                    (float)(s->B[(size_t)row * (size_t)s->rank + (size_t)c] * ratio);
    }
    if ((rc = fp_adapter_copy_whole(ad, src, err)) != 0) {
        fp_adapter_free(ad);
        return rc;
    }
    if (copy_strings(ad, src) != 0) {
        fp_adapter_free(ad);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    *out = ad;
    return 0;
}

int fp_adapter_clone(const fp_adapter_t *src, fp_adapter_t **out, fp_err_t *err)
{
    return resize(src, NULL, out, err);
}

int fp_adapter_at_rank(const fp_adapter_t *src, int rank, fp_adapter_t **out, fp_err_t *err)
{
    *out = NULL;
    if (rank <= 0)
        return fp_err_set(err, -EINVAL, "rank must be positive, not %d", rank);
    int *ranks = malloc((size_t)(src->n ? src->n : 1) * sizeof *ranks);
    if (!ranks)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < src->n; i++)
        ranks[i] = rank;
    int rc = resize(src, ranks, out, err);
    free(ranks);
    return rc;
}

int fp_adapter_at_ranks_of(const fp_adapter_t *src, const fp_adapter_t *like, fp_adapter_t **out,
                           fp_err_t *err)
{
    *out = NULL;
    int rc = fp_adapter_check_compatible(src, like, "target adapter", err);
    if (rc)
        return rc;
    int *ranks = malloc((size_t)(src->n ? src->n : 1) * sizeof *ranks);
    if (!ranks)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < src->n; i++)
        ranks[i] = like->mods[i].rank; /* same sorted module order: checked above */
    rc = resize(src, ranks, out, err);
    free(ranks);
    return rc;
}

void fp_adapter_randomize(fp_adapter_t *ad, uint64_t seed, uint64_t a_seed, double b_std)
{
    fp_rng_t rng, arng;
    fp_rng_seed(&rng, seed);
    fp_rng_seed(&arng, a_seed);
    for (int i = 0; i < ad->n; i++) {
        fp_lora_module_t *m = &ad->mods[i];
        fp_rng_fill_uniform(a_seed ? &arng : &rng, m->A, (size_t)m->rank * (size_t)m->d_in,
                            1.0 / sqrt((double)m->d_in));
        fp_rng_fill_normal(&rng, m->B, (size_t)m->d_out * (size_t)m->rank, b_std);
    }
}
