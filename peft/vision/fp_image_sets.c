/* fp_image_sets.c — a model's image sets as a user names them: its preprocessing, an IDX pair
 * or an ImageFolder tree mapped to its labels, a held-out split (fp_vit_train.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"
#include "fp_rng.h"
#include "fp_vit_train.h"

int fp_vit_preprocessing(const char *dir, const fp_vit_config_t *c, fp_imgproc_t *pp,
                         fp_err_t *err)
{
    char *p = fp_path_join(dir, "preprocessor_config.json");
    int rc = 0;
    if (!p)
        return fp_err_set(err, -ENOMEM, "out of memory");
    if (fp_fs_exists(p)) {
        rc = fp_imgproc_load(p, c->S, pp, err);
    } else {
        fp_imgproc_defaults(pp, c->S);
        pp->nmean = c->C == 1 ? 1 : 3;
    }
    free(p);
    return rc;
}

int fp_image_set_labelled(const char *dir, const fp_vit_config_t *c, const fp_imgproc_t *pp,
                          fp_image_set_t *d, fp_err_t *err)
{
    char **cls = NULL;
    int ncls = 0, rc = fp_image_set_folder(dir, pp, c->C, c->S, d, &cls, &ncls, err);
    for (int k = 0; rc == 0 && k < ncls; k++) {
        int at = -1;
        for (int j = 0; c->labels && j < c->K; j++)
            at = at < 0 && !strcmp(c->labels[j], cls[k]) ? j : at;
        if (at < 0)
            rc = fp_err_set(err, -EINVAL, "%s: class folder '%s' is none of the model's labels",
                            dir, cls[k]);
        for (int i = 0; rc == 0 && i < d->n; i++)
            if (d->labels[i] == k)
                d->labels[i] = -1 - at; /* mapped; marked so that no later k matches */
    }
    for (int i = 0; rc == 0 && i < d->n; i++)
        d->labels[i] = -1 - d->labels[i];
    for (int k = 0; k < ncls; k++)
        free(cls[k]);
    free(cls);
    if (rc)
        fp_image_set_free(d);
    return rc;
}

int fp_image_set_named(const char *spec, const fp_vit_config_t *c, const fp_imgproc_t *pp,
                       fp_image_set_t *d, fp_err_t *err)
{
    *d = (fp_image_set_t){0};
    const char *comma = strchr(spec, ',');
    if (!comma)
        return fp_image_set_labelled(spec, c, pp, d, err);
    char *images = strndup(spec, (size_t)(comma - spec));
    int rc = !images ? fp_err_set(err, -ENOMEM, "out of memory")
             : strchr(comma + 1, ',') ? fp_err_set(err, -EINVAL, "'%s': an image set is a "
                                                   "folder or IMAGES,LABELS (IDX files)", spec)
             : fp_image_set_idx(images, comma + 1, 0, 0, pp, c->S, d, err);
    free(images);
    for (int i = 0; rc == 0 && i < d->n; i++)
        if (d->labels[i] < 0 || d->labels[i] >= c->K)
            rc = fp_err_set(err, -EINVAL, "%s: label %d of image %d is not one of the model's "
                            "%d", comma + 1, d->labels[i], i, c->K);
    if (rc)
        fp_image_set_free(d);
    return rc;
}

int fp_image_set_split(fp_image_set_t *all, double fraction, uint64_t seed, fp_image_set_t *held,
                       fp_err_t *err)
{
    *held = (fp_image_set_t){0};
    size_t per = (size_t)all->C * (size_t)all->S * (size_t)all->S;
    int nh = (int)(fraction * all->n + 0.5);
    if (!(fraction > 0 && fraction < 1) || nh < 1 || nh >= all->n)
        return fp_err_set(err, -EINVAL, "%s: holding out %g of %d images leaves none on one "
                          "side", all->source, fraction, all->n);
    /* a seeded Fisher–Yates shuffle; the last nh images are held out */
    fp_rng_t rng;
    fp_rng_seed(&rng, seed);
    float *tmp = malloc(per * sizeof *tmp);
    held->px = malloc((size_t)nh * per * sizeof *held->px);
    held->labels = malloc((size_t)nh * sizeof *held->labels);
    if (!tmp || !held->px || !held->labels) {
        free(tmp);
        fp_image_set_free(held);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    for (int i = all->n - 1; i > 0; i--) {
        int j = (int)fp_rng_below(&rng, (uint64_t)(i + 1));
        if (j == i)
            continue;
        memcpy(tmp, all->px + (size_t)i * per, per * sizeof *tmp);
        memcpy(all->px + (size_t)i * per, all->px + (size_t)j * per, per * sizeof *tmp);
        memcpy(all->px + (size_t)j * per, tmp, per * sizeof *tmp);
        int l = all->labels[i];
        all->labels[i] = all->labels[j];
        all->labels[j] = l;
    }
    free(tmp);
    int nt = all->n - nh;
    memcpy(held->px, all->px + (size_t)nt * per, (size_t)nh * per * sizeof *held->px);
    memcpy(held->labels, all->labels + nt, (size_t)nh * sizeof *held->labels);
    held->n = nh;
    held->C = all->C;
    held->S = all->S;
    snprintf(held->source, sizeof held->source, "%.490s (held out)", all->source);
    all->n = nt; /* the training part keeps its allocation */
    return 0;
}

int fp_image_set_classes(fp_image_set_t *d, const char *list, int K, fp_err_t *err)
{
    unsigned char *keep = calloc((size_t)K, 1);
    char *copy = strdup(list), *save = NULL;
    int rc = keep && copy ? 0 : fp_err_set(err, -ENOMEM, "out of memory");
    for (char *tok = copy ? strtok_r(copy, ",", &save) : NULL; tok && rc == 0;
         tok = strtok_r(NULL, ",", &save)) {
        char *end;
        long a = strtol(tok, &end, 10), b = a;
        if (*end == '-')
            b = strtol(end + 1, &end, 10);
        if (*end || end == tok || a < 0 || b < a || b >= K)
            rc = fp_err_set(err, -EINVAL, "classes: '%s' is not a label number or range "
                            "within 0..%d", tok, K - 1);
        for (long k = a; rc == 0 && k <= b; k++)
            keep[k] = 1;
    }
    size_t per = (size_t)d->C * (size_t)d->S * (size_t)d->S;
    int n = 0;
    for (int i = 0; rc == 0 && i < d->n; i++) {
        if (!keep[d->labels[i]])
            continue;
        if (n != i) {
            memmove(d->px + (size_t)n * per, d->px + (size_t)i * per, per * sizeof *d->px);
            d->labels[n] = d->labels[i];
        }
        n++;
    }
    if (rc == 0 && n == 0)
        rc = fp_err_set(err, -EINVAL, "%s: no image of classes %s", d->source, list);
    if (rc == 0)
        d->n = n;
    free(keep);
    free(copy);
    return rc;
}
