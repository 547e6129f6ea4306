/* The site's data (fp_agent_data.h). */
#include "fp_agent_data.h"

#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"
#include "fp_log.h"

/* Splits a comma-separated list in place: up to max names. */
static int split_csv(char *list, const char **out, int max, const char *what, fp_err_t *err)
{
    int n = 0;
    char *save = NULL;
    for (char *f = strtok_r(list, ",", &save); f; f = strtok_r(NULL, ",", &save)) {
        if (n == max)
            return fp_err_set(err, -EINVAL, "%s: more than %d files", what, max);
        out[n++] = f;
    }
    return n;
}

/* The site's documents (data.files, data.eval_files or a split), tokenized for the model. */
static int load_corpus(const fp_agent_config_t *cfg, const fp_model_config_t *mcfg,
                       fp_corpus_t *out, fp_err_t *err)
{
    char *files = strdup(cfg->data), *evals = cfg->eval_files ? strdup(cfg->eval_files) : NULL;
    const char *f[256], *e[256];
    int rc = !files || (cfg->eval_files && !evals) ? fp_err_set(err, -ENOMEM, "out of memory")
                                                   : 0;
    int nf = rc ? rc : split_csv(files, f, 256, "data.files", err);
    int ne = evals && nf >= 0 ? split_csv(evals, e, 256, "data.eval_files", err) : 0;
    if (nf < 0 || ne < 0) {
        rc = nf < 0 ? nf : ne;
    } else {
        fp_corpus_spec_t spec = {cfg->tokenizer, cfg->model_dir, f, nf, evals ? e : NULL, ne,
                                 cfg->eval_fraction, (uint64_t)cfg->split_seed};
        rc = fp_corpus_load(&spec, mcfg, out, err);
    }
    free(files);
    free(evals);
    return rc;
}

int fp_agent_data_is_vision(const fp_agent_config_t *cfg, fp_err_t *err)
{
    return fp_config_is_vit(cfg->model_dir, err);
}

/* The ViT, its preprocessing and its images. */
static int load_vision(const fp_agent_config_t *cfg, fp_agent_data_t *d, fp_err_t *err)
{
    fp_imgproc_t pp;
    fp_base_dtype_t bd = FP_BASE_F32; /* an external trainer's site: only preprocessing */
    int rc = strcmp(cfg->trainer, "external") ? fp_base_dtype_parse(cfg->base_dtype, &bd, err)
                                              : 0;
    if (rc)
        return fp_err_prefix(err, rc, "train.base_dtype: ");
    if ((rc = fp_vit_load_base(cfg->model_dir, bd, &d->vit, err)) != 0)
        return rc;
    if (d->vit->head_fresh)
        fp_log(FP_LOG_INFO, "%s has no classifier: the federation's head replaces it anyway",
               cfg->model_dir);
    fp_log(FP_LOG_NOTICE, "base model: a ViT, %s weights (%.1f MB, %s products)",
           fp_base_dtype_name(d->vit->base), (double)fp_vit_weight_bytes(d->vit) / 1e6,
           d->vit->base == FP_BASE_F32 ? "OpenBLAS" : "oneDNN bf16");
    if (!(d->vit_base = fp_vit_snapshot(d->vit)))
        return fp_err_set(err, -ENOMEM, "out of memory");
    rc = fp_vit_preprocessing(cfg->model_dir, &d->vit->c, &pp, err);
    if (rc == 0 && (rc = fp_image_set_named(cfg->data, &d->vit->c, &pp, &d->train, err)) != 0)
        fp_err_prefix(err, rc, "data.files: ");
    if (rc == 0 && cfg->eval_files &&
        (rc = fp_image_set_named(cfg->eval_files, &d->vit->c, &pp, &d->held, err)) != 0)
        fp_err_prefix(err, rc, "data.eval_files: ");
    if (rc == 0 && !cfg->eval_files && cfg->eval_fraction > 0) /* 0: no held-out images */
        rc = fp_image_set_split(&d->train, cfg->eval_fraction, (uint64_t)cfg->split_seed,
                                &d->held, err);
    return rc;
}

int fp_agent_data_load(const fp_agent_config_t *cfg, const fp_model_config_t *mcfg,
                       fp_agent_data_t *d, fp_err_t *err)
{
    *d = (fp_agent_data_t){0};
    int rc = fp_agent_data_is_vision(cfg, err);
    if (rc < 0)
        return rc;
    d->vision = rc;
    rc = d->vision ? load_vision(cfg, d, err) : load_corpus(cfg, mcfg, &d->text, err);
    if (rc)
        fp_agent_data_free(d);
    return rc;
}

size_t fp_agent_data_train_n(const fp_agent_data_t *d)
{
    return d->vision ? (size_t)d->train.n : d->text.train ? d->text.train->ndocs : 0;
}

size_t fp_agent_data_held_n(const fp_agent_data_t *d)
{
    return d->vision ? (size_t)d->held.n : d->text.held ? d->text.held->ndocs : 0;
}

void fp_agent_data_free(fp_agent_data_t *d)
{
    if (d->vision) {
        fp_vit_free(d->vit);
        free(d->vit_base);
        fp_image_set_free(&d->train);
        fp_image_set_free(&d->held);
    } else {
        fp_corpus_free(&d->text);
    }
    *d = (fp_agent_data_t){0};
}
