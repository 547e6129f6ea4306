/* Training and evaluating a ViT on labelled images (fp_vit_train.h). */
#include "fp_vit_train.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fp_fs.h"
#include "fp_idx.h"
#include "fp_rng.h"

void fp_image_set_free(fp_image_set_t *s)
{
    if (!s)
        return;
    free(s->px);
    free(s->labels);
    *s = (fp_image_set_t){0};
}

int fp_image_set_idx(const char *images, const char *labels, size_t first, size_t count,
                     const fp_imgproc_t *pp, int S, fp_image_set_t *out, fp_err_t *err)
{
    *out = (fp_image_set_t){0};
    fp_idx_t im = {0}, lb = {0};
    int rc = fp_idx_load(images, &im, err);
    if (rc == 0)
        rc = fp_idx_load(labels, &lb, err);
    if (rc)
        goto out;
    if (im.ndim != 3 || lb.ndim != 1 || im.dims[0] != lb.dims[0]) {
        rc = fp_err_set(err, -EINVAL, "%s and %s: not a pair of images [n][rows][cols] and "
                        "labels [n] of the same n", images, labels);
        goto out;
    }
    size_t n = im.dims[0];
    if (im.dims[1] < 1 || im.dims[2] < 1 || im.dims[1] > FP_IMAGE_MAX_SIDE ||
        im.dims[2] > FP_IMAGE_MAX_SIDE) {
        rc = fp_err_set(err, -EINVAL, "%s: images of %u × %u pixels", images, im.dims[1],
                        im.dims[2]);
        goto out;
    }
    if (first >= n || (count && count > n - first)) {
        rc = fp_err_set(err, -EINVAL, "%s: images %zu to %zu of %zu", images, first,
                        first + count, n);
        goto out;
    }
    count = count ? count : n - first;
    size_t px = (size_t)S * S;
    out->n = (int)count;
    out->C = 1;
    out->S = S;
    snprintf(out->source, sizeof out->source, "%s", labels);
    out->px = malloc(count * px * sizeof *out->px);
    out->labels = malloc(count * sizeof *out->labels);
    if (!out->px || !out->labels) {
        rc = fp_err_set(err, -ENOMEM, "out of memory for %zu images", count);
        goto out;
    }
    for (size_t i = 0; i < count && rc == 0; i++) {
        size_t k = first + i;
        fp_image_t one = {.h = (int)im.dims[1], .w = (int)im.dims[2], .c = 1,
                          .px = im.data + k * im.dims[1] * im.dims[2]};
        out->labels[i] = lb.data[k];
        rc = fp_imgproc_apply(pp, &one, 1, S, images, out->px + i * px, err);
    }
out:
    fp_idx_free(&im);
    fp_idx_free(&lb);
    if (rc)
        fp_image_set_free(out);
    return rc;
}

/* ---- ImageFolder trees ---- */

typedef struct paths {
    char **p;
    size_t n, cap;
} paths_t;

static int push(paths_t *ps, char *path, fp_err_t *err)
{
    if (ps->n == ps->cap) {
        size_t cap = ps->cap ? 2 * ps->cap : 64;
        char **np = realloc(ps->p, cap * sizeof *np);
        if (!np) {
            free(path);
            return fp_err_set(err, -ENOMEM, "out of memory");
        }
        ps->p = np;
        ps->cap = cap;
    }
    ps->p[ps->n++] = path;
    return 0;
}

static void paths_free(paths_t *ps)
{
    for (size_t i = 0; i < ps->n; i++)
        free(ps->p[i]);
    free(ps->p);
    *ps = (paths_t){0};
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Entries of dir (not '.'-named): sub-directories into dirs, files into files (either may be
 * NULL: then such entries are skipped), recursing into sub-directories when files is given
 * and depth allows. */
static int list_dir(const char *dir, paths_t *dirs, paths_t *files, int depth, fp_err_t *err)
{
    DIR *d = opendir(dir);
    if (!d)
        return fp_err_set(err, -errno, "%s: %s", dir, strerror(errno));
    struct dirent *e;
    int rc = 0;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char *p = fp_path_join(dir, e->d_name);
        if (!p) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            break;
        }
        struct stat st;
        if (stat(p, &st) != 0) {
            rc = fp_err_set(err, -errno, "%s: %s", p, strerror(errno));
            free(p);
        } else if (S_ISDIR(st.st_mode) && files) {
            rc = depth < 16 ? list_dir(p, NULL, files, depth + 1, err)
                            : fp_err_set(err, -ELOOP, "%s: folders nested too deep", p);
            free(p);
        } else if (S_ISDIR(st.st_mode) && dirs) {
            rc = push(dirs, p, err);
        } else if (S_ISREG(st.st_mode) && files) {
            rc = push(files, p, err);
        } else {
            free(p);
        }
    }
    closedir(d);
    return rc;
}

int fp_image_set_folder(const char *dir, const fp_imgproc_t *pp, int C, int S,
                        fp_image_set_t *out, char ***classes, int *nclasses, fp_err_t *err)
{
    *out = (fp_image_set_t){0};
    *classes = NULL;
    *nclasses = 0;
    paths_t cls = {0}, files = {0};
    size_t *first = NULL;
    int rc = list_dir(dir, &cls, NULL, 0, err);
    if (rc == 0 && cls.n == 0)
        rc = fp_err_set(err, -EINVAL, "%s: no class folders (an ImageFolder tree has a folder "
                        "of images per class)", dir);
    if (rc)
        goto out;
    qsort(cls.p, cls.n, sizeof *cls.p, cmp_str);
    first = calloc(cls.n + 1, sizeof *first);
    if (!first) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (size_t k = 0; k < cls.n && rc == 0; k++) {
        size_t before = files.n;
        rc = list_dir(cls.p[k], NULL, &files, 1, err);
        if (rc == 0 && files.n == before)
            rc = fp_err_set(err, -EINVAL, "%s: a class folder without images", cls.p[k]);
        if (rc == 0)
            qsort(files.p + before, files.n - before, sizeof *files.p, cmp_str);
        first[k + 1] = files.n;
    }
    size_t img = (size_t)C * S * S;
    if (rc == 0 && files.n > (size_t)1 << 24)
        rc = fp_err_set(err, -EFBIG, "%s: %zu images (at most 16 M)", dir, files.n);
    if (rc == 0) {
        out->px = malloc(files.n * img * sizeof *out->px);
        out->labels = malloc(files.n * sizeof *out->labels);
        if (!out->px || !out->labels)
            rc = fp_err_set(err, -ENOMEM, "out of memory for %zu images", files.n);
        out->n = (int)files.n;
        out->C = C;
        out->S = S;
        snprintf(out->source, sizeof out->source, "%s", dir);
    }
    for (size_t k = 0; k < cls.n && rc == 0; k++)
        for (size_t i = first[k]; i < first[k + 1] && rc == 0; i++) {
            fp_image_t im;
            out->labels[i] = (int)k;
            if ((rc = fp_image_load(files.p[i], &im, err)) == 0)
                rc = fp_imgproc_apply(pp, &im, C, S, files.p[i], out->px + i * img, err);
            fp_image_free(&im);
        }
    if (rc == 0) {
        *classes = calloc(cls.n, sizeof **classes);
        if (!*classes) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
        } else {
            for (size_t k = 0; k < cls.n; k++) { /* the folder's own name */
                const char *slash = strrchr(cls.p[k], '/');
                (*classes)[k] = strdup(slash ? slash + 1 : cls.p[k]);
                rc = (*classes)[k] ? rc : fp_err_set(err, -ENOMEM, "out of memory");
            }
            *nclasses = (int)cls.n;
        }
    }
out:
    if (rc) {
        fp_image_set_free(out);
        for (int k = 0; *classes && k < *nclasses; k++)
            free((*classes)[k]);
        free(*classes);
        *classes = NULL;
        *nclasses = 0;
    }
    free(first);
    paths_free(&cls);
    paths_free(&files);
    return rc;
}

static int check_set(const fp_vit_t *m, const fp_image_set_t *d, fp_err_t *err)
{
    if (d->n < 1 || d->C != m->c.C || d->S != m->c.S)
        return fp_err_set(err, -EINVAL, "%s: %d images of %d × %d × %d; the model takes %d × %d "
                          "× %d", d->source, d->n, d->C, d->S, d->S, m->c.C, m->c.S, m->c.S);
    for (int i = 0; i < d->n; i++)
        if (d->labels[i] < 0 || d->labels[i] >= m->c.K)
            return fp_err_set(err, -EINVAL, "%s: image %d has label %d; the model has %d labels",
                              d->source, i, d->labels[i], m->c.K);
    return 0;
}

int fp_vit_train(fp_vit_t *m, fp_adapter_t *lora, float *head_w, float *head_b,
                 const fp_image_set_t *d, const fp_vit_train_cfg_t *c, double *first_loss,
                 double *last_loss, fp_err_t *err)
{
    int rc = check_set(m, d, err);
    if (rc)
        return rc;
    if (c->steps < 1 || c->batch < 1)
        return fp_err_set(err, -EINVAL, "%d steps of %d images", c->steps, c->batch);
    if (c->full && m->base != FP_BASE_F32)
        return fp_err_set(err, -EINVAL, "training every weight needs a float32 base, not %s",
                          fp_base_dtype_name(m->base));
    const fp_adapter_t *use = c->full ? NULL : lora;
    float *hw = c->full ? m->head_w : head_w, *hb = c->full ? m->head_b : head_b;
    size_t img = (size_t)d->C * d->S * d->S, K = (size_t)m->c.K, D = (size_t)m->c.D;
    fp_vit_t *gm = NULL;
    fp_adapter_t *lg = NULL;
    fp_vit_ws_t *ws = NULL;
    fp_adamw_t *opt = NULL;
    fp_pgroup_t *groups = NULL;
    float *batch = malloc((size_t)c->batch * img * sizeof *batch), *hg = NULL, *prox = NULL;
    int *labels = malloc((size_t)c->batch * sizeof *labels), ng = 0;
    if (!batch || !labels) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    if ((rc = fp_vit_new(&ws, m, use, hw, hb, c->batch, 1, err)) != 0)
        goto out;
    if (c->full) {
        if ((rc = fp_vit_alloc(&m->c, &gm, err)) != 0)
            goto out;
        groups = calloc(1, sizeof *groups);
        if (!groups) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        groups[ng++] = (fp_pgroup_t){m->mem, gm->mem, m->nparams, 1};
    } else {
        if ((rc = fp_adapter_clone(lora, &lg, err)) != 0)
            goto out;
        groups = calloc(2 * (size_t)lora->n + 2, sizeof *groups);
        hg = calloc(K * D + K, sizeof *hg);
        if (!groups || !hg) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        for (int i = 0; i < lora->n; i++) {
            fp_lora_module_t *p = &lora->mods[i], *g = &lg->mods[i];
            if (!c->freeze_a)
                groups[ng++] = (fp_pgroup_t){p->A, g->A, (size_t)p->rank * p->d_in, 1};
            groups[ng++] = (fp_pgroup_t){p->B, g->B, (size_t)p->d_out * p->rank, 1};
        }
        groups[ng++] = (fp_pgroup_t){head_w, hg, K * D, 1};
        groups[ng++] = (fp_pgroup_t){head_b, hg + K * D, K, 0};
    }
    fp_optim_cfg_t oc = c->opt;
    oc.total = c->steps;
    if ((rc = fp_adamw_new(&opt, groups, ng, &oc, err)) != 0)
        goto out;
    size_t np = 0;
    for (int i = 0; i < ng; i++)
        np += groups[i].n;
    if (c->prox_mu > 0 && !(prox = malloc(np * sizeof *prox))) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0, at = 0; prox && i < (size_t)ng; at += groups[i].n, i++)
        memcpy(prox + at, groups[i].p, groups[i].n * sizeof *prox); /* θ_start */
    fp_rng_t rng;
    fp_rng_seed(&rng, c->seed);
    for (int s = 0; s < c->steps; s++) {
        for (int i = 0; i < c->batch; i++) {
            size_t k = fp_rng_below(&rng, (uint64_t)d->n);
            memcpy(batch + i * img, d->px + k * img, img * sizeof *batch);
            labels[i] = d->labels[k];
        }
        double sum;
        fp_zero_grads(groups, ng);
        fp_vit_forward(ws, batch, c->batch, labels, &sum, NULL);
        if (fp_vit_status(ws)) {
            rc = fp_vit_status_error(fp_vit_status(ws), err);
            goto out;
        }
        if (!isfinite(sum)) {
            rc = fp_err_set(err, -EDOM, "step %d: the loss is not finite (training diverged)",
                            s + 1);
            goto out;
        }
        if (s == 0 && first_loss)
            *first_loss = sum / c->batch;
        if (last_loss)
            *last_loss = sum / c->batch;
        fp_vit_backward(ws, 1.0 / c->batch, lg, c->full ? gm->head_w : hg,
                        c->full ? gm->head_b : hg + K * D, gm);
        if (fp_vit_status(ws)) {
            rc = fp_vit_status_error(fp_vit_status(ws), err);
            goto out;
        }
        for (size_t i = 0, at = 0; prox && i < (size_t)ng; at += groups[i].n, i++)
            for (size_t e = 0; e < groups[i].n; e++) /* ∇ μ/2·‖θ − θ_start‖² */
                groups[i].g[e] += (float)(c->prox_mu * (groups[i].p[e] - prox[at + e]));
        fp_adamw_step(opt, NULL);
        if (c->progress && c->progress(c->ctx, s + 1, c->steps, sum / c->batch)) {
            rc = 1;
            break;
        }
    }
out:
    free(prox);
    fp_adamw_free(opt);
    fp_vit_free_ws(ws);
    fp_vit_free(gm);
    fp_adapter_free(lg);
    free(groups);
    free(hg);
    free(batch);
    free(labels);
    return rc;
}

int fp_vit_eval(const fp_vit_t *m, const fp_adapter_t *lora, const float *head_w,
                const float *head_b, const fp_image_set_t *d, double *loss, double *accuracy,
                fp_err_t *err)
{
    int rc = check_set(m, d, err);
    if (rc)
        return rc;
    enum { EB = 64 };
    fp_vit_ws_t *ws = NULL;
    int bsz = d->n < EB ? d->n : EB;
    if ((rc = fp_vit_new(&ws, m, lora, head_w, head_b, bsz, 0, err)) != 0)
        return rc;
    size_t img = (size_t)d->C * d->S * d->S;
    double total = 0;
    long right = 0;
    for (int i = 0; i < d->n; i += bsz) {
        int b = d->n - i < bsz ? d->n - i : bsz, ok;
        double sum;
        fp_vit_forward(ws, d->px + (size_t)i * img, b, d->labels + i, &sum, &ok);
        total += sum;
        right += ok;
    }
    if (fp_vit_status(ws))
        rc = fp_vit_status_error(fp_vit_status(ws), err);
    fp_vit_free_ws(ws);
    if (rc)
        return rc;
    *loss = total / d->n;
    *accuracy = (double)right / d->n;
    return 0;
}
