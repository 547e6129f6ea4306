/* sim_image.c — `fedpeft sim --task image`: imaging sites on Debian's Fashion-MNIST.
 *
 * The demo's base (models/vit-demo, deploy/make-vit-demo-model.sh) was pretrained on the first
 * 30 000 training images of classes 0-4 only. The sites hold images of classes 5-9 (Sandal,
 * Shirt, Sneaker, Bag, Ankle boot) from the other 30 000, with label skew: site i holds two
 * classes, 5 + i mod 5 and 5 + (i + 1) mod 5, so that each class is at two sites and no site
 * can tell all five apart. Each site's images of a class are its own (no image is at two
 * sites); a fifth of them is held out. Written as IDX pairs, which a site daemon reads as
 * data.files = IMAGES,LABELS. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"
#include "fp_idx.h"
#include "fp_rng.h"
#include "sim.h"

#define FMNIST "/usr/share/datasets/fashion-mnist"
#define FIRST_CLASS 5
#define NCLASSES 5
#define SKIP 30000 /* the base's pretraining took the images before this one */

static const char *const fm_labels[10] = {"T-shirt/top", "Trouser", "Pullover", "Dress",
                                          "Coat",        "Sandal",  "Shirt",    "Sneaker",
                                          "Bag",         "Ankle boot"};

/* An IDX file of n items of `item` bytes each (images 28 × 28, or labels). */
static int write_idx(const char *path, const uint8_t *data, uint32_t n, int image, fp_err_t *err)
{
    uint8_t head[16] = {0, 0, 8, (uint8_t)(image ? 3 : 1), (uint8_t)(n >> 24),
                        (uint8_t)(n >> 16), (uint8_t)(n >> 8), (uint8_t)n, 0, 0, 0, 28, 0, 0,
                        0, 28};
    size_t hl = image ? 16 : 8, dl = (size_t)n * (image ? 784 : 1);
    uint8_t *buf = malloc(hl + dl);
    if (!buf)
        return fp_err_set(err, -ENOMEM, "out of memory");
    memcpy(buf, head, hl);
    memcpy(buf + hl, data, dl);
    int rc = fp_fs_write_file(path, buf, hl + dl, 0644, err);
    free(buf);
    return rc;
}

/* Images idx[0..n) of the dataset as an IDX pair at dir/<what>-{images,labels}.idx; *spec
 * receives "IMAGES,LABELS". */
static int write_pair(const char *dir, const char *what, const fp_idx_t *im, const fp_idx_t *lb,
                      const uint32_t *idx, uint32_t n, char **spec, fp_err_t *err)
{
    uint8_t *px = malloc((size_t)n * 784 + 1), *l = malloc((size_t)n + 1);
    char ip[SIM_PATH_MAX], lp[SIM_PATH_MAX];
    int rc = px && l ? 0 : fp_err_set(err, -ENOMEM, "out of memory");
    for (uint32_t i = 0; rc == 0 && i < n; i++) {
        memcpy(px + (size_t)i * 784, im->data + (size_t)idx[i] * 784, 784);
        l[i] = lb->data[idx[i]];
    }
    sim_path(ip, "%s/%s-images.idx", dir, what);
    sim_path(lp, "%s/%s-labels.idx", dir, what);
    if (rc == 0 && (rc = write_idx(ip, px, n, 1, err)) == 0)
        rc = write_idx(lp, l, n, 0, err);
    if (rc == 0 && asprintf(spec, "%s,%s", ip, lp) < 0)
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    free(px);
    free(l);
    return rc;
}

int sim_make_images(sim_t *sim, fp_err_t *err)
{
    fp_idx_t im = {0}, lb = {0};
    int N = sim->nsites, per = sim->max_docs; /* images of a class at a site */
    uint32_t *pool[NCLASSES] = {0}, npool[NCLASSES] = {0}, used[NCLASSES] = {0};
    uint32_t *all = NULL, nall = 0;
    int rc = fp_idx_load(FMNIST "/train-images-idx3-ubyte.gz", &im, err);
    if (rc == 0)
        rc = fp_idx_load(FMNIST "/train-labels-idx1-ubyte.gz", &lb, err);
    if (rc)
        return fp_err_prefix(err, rc, "the imaging demo's data (install Debian's "
                             "dataset-fashion-mnist: deploy/setup.sh deps): ");
    if (im.ndim != 3 || im.dims[1] != 28 || im.dims[2] != 28 || lb.dims[0] != im.dims[0] ||
        im.dims[0] <= SKIP) {
        rc = fp_err_set(err, -EINVAL, FMNIST ": not Fashion-MNIST's training images");
        goto out;
    }
    uint32_t n = im.dims[0];
    if (per < 5) {
        rc = fp_err_set(err, -EINVAL, "--task image takes --max-docs of 5 or more images of a "
                        "class at a site (a fifth held out)");
        goto out;
    }
    for (int c = 0; c < NCLASSES; c++)
        if (!(pool[c] = malloc((size_t)n * sizeof *pool[c]))) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto out;
        }
    for (uint32_t i = SKIP; i < n; i++) {
        int c = lb.data[i] - FIRST_CLASS;
        if (c >= 0 && c < NCLASSES)
            pool[c][npool[c]++] = i;
    }
    fp_rng_t rng;
    fp_rng_seed(&rng, sim->seed * 0x9E3779B97F4A7C15ull + 29);
    for (int c = 0; c < NCLASSES; c++) /* the seed picks which images each site gets */
        for (uint32_t i = npool[c] ? npool[c] - 1 : 0; i > 0; i--) {
            uint32_t j = (uint32_t)fp_rng_below(&rng, (uint64_t)i + 1), t = pool[c][i];
            pool[c][i] = pool[c][j];
            pool[c][j] = t;
        }
    uint32_t *idx = malloc((size_t)2 * per * sizeof *idx);
    all = malloc((size_t)N * 2 * per * sizeof *all);
    if (!idx || !all) {
        free(idx);
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    int held = per / 5 > 0 ? per / 5 : 1;
    for (int s = 0; s < N && rc == 0; s++) {
        sim_site_t *site = &sim->sites[s];
        int cls[2] = {s % NCLASSES, (s + 1) % NCLASSES};
        if (used[cls[0]] + per > npool[cls[0]] || used[cls[1]] + per > npool[cls[1]]) {
            rc = fp_err_set(err, -EINVAL, "%d sites of %d images per class need more images "
                            "than Fashion-MNIST has (fewer --sites or --max-docs)", N, per);
            break;
        }
        /* train: per − held of each class, interleaved; held out: the rest */
        uint32_t nt = 0, nh = 0, *tr = idx, *he = idx + 2 * (per - held);
        for (int k = 0; k < per; k++)
            for (int j = 0; j < 2; j++) {
                uint32_t id = pool[cls[j]][used[cls[j]] + (uint32_t)k];
                if (k < per - held) {
                    tr[nt++] = id;
                    all[nall++] = id;
                } else {
                    he[nh++] = id;
                }
            }
        used[cls[0]] += (uint32_t)per;
        used[cls[1]] += (uint32_t)per;
        char dir[SIM_PATH_MAX];
        sim_path(dir, "%s/data/%s", sim->out, site->name);
        fp_fs_remove_tree(dir, NULL);
        if ((rc = fp_fs_mkdirs(dir, 0755, err)) != 0 ||
            (rc = write_pair(dir, "train", &im, &lb, tr, nt, &site->train, err)) != 0 ||
            (rc = write_pair(dir, "heldout", &im, &lb, he, nh, &site->held, err)) != 0)
            break;
        site->ntrain = nt;
        site->nheld = nh;
        snprintf(site->cats, sizeof site->cats, "%s, %s", fm_labels[FIRST_CLASS + cls[0]],
                 fm_labels[FIRST_CLASS + cls[1]]);
    }
    free(idx);
    char dir[SIM_PATH_MAX];
    sim_path(dir, "%s/data/pooled", sim->out);
    if (rc == 0 && (rc = fp_fs_mkdirs(dir, 0755, err)) == 0)
        rc = write_pair(dir, "train", &im, &lb, all, nall, &sim->pooled_train, err);
out:
    for (int c = 0; c < NCLASSES; c++)
        free(pool[c]);
    free(all);
    fp_idx_free(&im);
    fp_idx_free(&lb);
    return rc;
}

/* `fedpeft vision train` of a baseline: the site's images (job < N) or all of them pooled. */
int sim_image_baseline_argv(const sim_t *sim, int job, const char *out, const char **argv,
                            char (*num)[32])
{
    int N = sim->nsites, central = job == N, rmax = 0, n = 0;
    for (int i = 0; i < N; i++)
        rmax = sim->ranks[i] > rmax ? sim->ranks[i] : rmax;
    const char *spec = central ? sim->pooled_train : sim->sites[job].train;
    static char images[SIM_PATH_MAX], labels[SIM_PATH_MAX]; /* the caller spawns, then frees */
    const char *comma = strchr(spec, ',');
    snprintf(images, sizeof images, "%.*s", (int)(comma - spec), spec);
    snprintf(labels, sizeof labels, "%s", comma + 1);
    snprintf(num[0], 32, "%d", central ? rmax : sim->ranks[job]);
    snprintf(num[1], 32, "%lld", (long long)sim->rounds * sim->steps * (central ? N : 1));
    snprintf(num[2], 32, "%d", sim->batch);
    snprintf(num[3], 32, "%g", sim->lr);
    snprintf(num[4], 32, "%g", sim->alpha);
    snprintf(num[5], 32, "%llu", (unsigned long long)sim->seed);
    const char *a[] = {sim->self_bin, "vision", "train", "--model", sim->model, "--images",
                       images, "--labels", labels, "--rank", num[0], "--alpha", num[4],
                       "--targets", sim->targets, "--steps", num[1], "--batch", num[2], "--lr",
                       num[3], "--seed", num[5], "--warmup", "0", "--base-dtype",
                       sim->base_dtype, "--out", out, NULL};
    for (size_t i = 0; i < sizeof a / sizeof *a; i++)
        argv[n++] = a[i];
    return n - 1;
}

const char *sim_units(const sim_t *sim)
{
    return sim->task == SIM_TASK_IMAGE ? "images" : "documents";
}
