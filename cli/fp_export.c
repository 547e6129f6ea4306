#include "fp_export.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_db.h"
#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_model.h"
#include "fp_trainer.h"
#include "fp_vit.h"

/* The federation and the closed round to export (its global adapter's name). */
static int find_round(const fp_export_t *x, fp_db_federation_t *f, fp_db_round_t *r,
                      fp_err_t *err)
{
    fp_db_t *db;
    int rc = fp_db_open(&db, x->state_dir, 1, err);
    if (rc)
        return rc;
    fp_db_round_t last = {0};
    int found = rc = fp_db_federation_get(db, f, err);
    if (rc > 0)
        rc = fp_db_round_last_closed(db, &last, err);
    memset(r, 0, sizeof *r);
    if (rc >= 0 && x->round >= 0)
        rc = fp_db_round_get(db, x->round, r, err);
    else
        *r = last;
    fp_db_close(db);
    if (rc < 0)
        return rc;
    if (!found)
        return fp_err_set(err, -ENOENT, "%s: no federation yet", x->state_dir);
    if (r->state != FP_DB_ROUND_CLOSED || !r->global_adapter[0])
        return fp_err_set(err, -ENOENT, "round %lld is not a closed round (the last closed "
                          "round is %lld)", x->round, (long long)last.n);
    return 0;
}

static int write_merged(const fp_export_t *x, const fp_db_federation_t *f,
                        const fp_adapter_t *ad, fp_err_t *err)
{
    char mdir[4096];
    if (x->model)
        snprintf(mdir, sizeof mdir, "%s", x->model);
    else
        fp_model_dir_of(f->base_model_config, mdir, sizeof mdir);
    fp_model_t *m = NULL;
    char *mout = fp_path_join(x->out, "merged-model");
    int rc = mout ? 0 : fp_err_set(err, -ENOMEM, "out of memory");
    if (rc == 0 && ad->nwhole) { /* a ViT: W + s·B·A, and the federation's head */
        fp_vit_t *v = NULL;
        float *hw, *hb;
        if ((rc = fp_vit_load(mdir, &v, err)) == 0 &&
            (rc = fp_vit_fold(v, ad, err)) == 0 &&
            (rc = fp_vit_head_of(&v->c, ad, &hw, &hb, err)) == 0) {
            memcpy(v->head_w, hw, (size_t)v->c.K * (size_t)v->c.D * sizeof *hw);
            memcpy(v->head_b, hb, (size_t)v->c.K * sizeof *hb);
            v->head_fresh = 0;
            rc = fp_vit_save(v, mout, err);
        }
        char *pp = fp_path_join(mdir, "preprocessor_config.json"), *text = NULL, *dst = NULL;
        size_t len = 0; /* the model's preprocessing goes with it */
        if (rc == 0 && !pp)
            rc = fp_err_set(err, -ENOMEM, "out of memory");
        if (rc == 0 && fp_fs_exists(pp) &&
            (rc = fp_fs_read_file(pp, 1 << 20, &text, &len, err)) == 0)
            rc = (dst = fp_path_join(mout, "preprocessor_config.json"))
                     ? fp_fs_write_file(dst, text, len, 0644, err)
                     : fp_err_set(err, -ENOMEM, "out of memory");
        free(pp);
        free(text);
        free(dst);
        fp_vit_free(v);
        free(mout);
        return rc;
    }
    if (rc == 0 && (rc = fp_model_load(mdir, &m, err)) == 0 &&
        (rc = fp_lora_merge_into(m, ad, err)) == 0)
        rc = fp_model_save(m, mout, FP_DT_F32, err);
    fp_model_free(m);
    free(mout);
    return rc;
}

int fp_export_global(const fp_export_t *x, int64_t *round, fp_err_t *err)
{
    fp_db_federation_t f;
    fp_db_round_t r;
    int rc = find_round(x, &f, &r, err);
    if (rc)
        return rc;
    /* federations from before base_model: the directory of the configuration */
    char base[4096], rel[128];
    if (f.base_model[0])
        snprintf(base, sizeof base, "%s", f.base_model);
    else
        fp_model_dir_of(f.base_model_config, base, sizeof base);
    snprintf(rel, sizeof rel, "adapters/%s.safetensors", r.global_adapter);
    char *path = fp_path_join(x->state_dir, rel);
    fp_adapter_t *ad = NULL;
    rc = path ? fp_hfpeft_load_factors(path, f.alpha, f.rslora, FP_LOAD_COPY, &ad, err)
              : fp_err_set(err, -ENOMEM, "out of memory");
    free(path);
    if (rc)
        return rc;
    ad->base_model = strdup(base[0] ? base : f.name);
    if (!ad->nwhole) /* a decoder's; a ViT's adapter with its head has none */
        ad->task_type = strdup("CAUSAL_LM");
    rc = fp_hfpeft_save(ad, x->out, err);
    if (rc == 0 && x->merged_model)
        rc = write_merged(x, &f, ad, err);
    fp_adapter_free(ad);
    *round = r.n;
    return rc;
}
