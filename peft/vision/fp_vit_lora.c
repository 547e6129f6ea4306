/* fp_vit_lora.c — a ViT's LoRA layout: targets by name, module descs, the head as tensors
 * trained in full, and an adapter folded into the weights (fp_vit.h). */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"
#include "fp_json.h"
#include "fp_rng.h"
#include "fp_vit.h"

int fp_vit_targets_parse(const char *list, unsigned *mask, fp_err_t *err)
{
    *mask = 0;
    char *copy = strdup(list ? list : ""), *save = NULL;
    int rc = copy ? 0 : fp_err_set(err, -ENOMEM, "out of memory");
    for (char *tok = copy ? strtok_r(copy, ", ", &save) : NULL; tok && rc == 0;
         tok = strtok_r(NULL, ", ", &save)) {
        int t = -1;
        for (int k = 0; k < FP_VT_COUNT; k++) { /* PEFT's short names, or the full suffix */
            const char *full = fp_vit_target_name(k), *dot = strrchr(full, '.');
            if (!strcmp(tok, full) || (k < FP_VT_ATTN_OUT && !strcmp(tok, dot + 1)))
                t = k;
        }
        if (t < 0)
            rc = fp_err_set(err, -EINVAL, "'%s' is not a ViT linear: query, key, value, "
                            "attention.output.dense, intermediate.dense or output.dense", tok);
        else
            *mask |= 1u << t;
    }
    free(copy);
    if (rc == 0 && !*mask)
        rc = fp_err_set(err, -EINVAL, "no target modules named");
    return rc;
}

int fp_vit_lora_descs(const fp_vit_config_t *c, unsigned mask, int rank, double alpha,
                      int rslora, fp_module_desc_t **out, int *n, fp_err_t *err)
{
    *out = NULL;
    *n = 0;
    int nt = 0;
    for (int t = 0; t < FP_VT_COUNT; t++)
        nt += (mask >> t) & 1;
    int count = c->L * nt;
    const size_t room = 96;
    fp_module_desc_t *d = malloc((size_t)(count ? count : 1) * (sizeof *d + room));
    if (!d)
        return fp_err_set(err, -ENOMEM, "out of memory");
    char *names = (char *)(d + count);
    for (int l = 0, i = 0; l < c->L; l++)
        for (int t = 0; t < FP_VT_COUNT; t++) {
            if (!((mask >> t) & 1))
                continue;
            char *nm = names + (size_t)i * room;
            fp_vit_module_name(l, t, nm, room);
            d[i] = (fp_module_desc_t){nm, 0, 0, rank, alpha, rslora};
            fp_vit_target_shape(c, t, &d[i].d_out, &d[i].d_in);
            i++;
        }
    *out = d;
    *n = count;
    return 0;
}

void fp_vit_head_descs(const fp_vit_config_t *c, fp_whole_desc_t d[2])
{
    d[0] = (fp_whole_desc_t){"classifier.bias", c->K, 1};
    d[1] = (fp_whole_desc_t){"classifier.weight", c->K, c->D};
}

int fp_vit_fold(fp_vit_t *m, const fp_adapter_t *ad, fp_err_t *err)
{
    int rc = fp_vit_lora_check(&m->c, ad, err);
    if (rc)
        return rc;
    char name[96];
    for (int l = 0; l < m->c.L; l++)
        for (int t = 0; t < FP_VT_COUNT; t++) {
            fp_vit_module_name(l, t, name, sizeof name);
            int j = fp_adapter_find(ad, name);
            if (j < 0)
                continue;
            const fp_lora_module_t *x = &ad->mods[j];
            if (m->base != FP_BASE_F32) { /* in the base's precision */
                rc = fp_lowp_add_product(&m->layers[l].lp[t], (float)fp_module_scale(x), x->B,
                                         x->A, x->rank, err);
                if (rc)
                    return rc;
                continue;
            }
            /* W (out × in) += s · B (out × r) · A (r × in) */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, x->d_out, x->d_in, x->rank,
                        (float)fp_module_scale(x), x->B, x->rank, x->A, x->d_in, 1.0f,
                        m->layers[l].w[t], x->d_in);
        }
    return 0;
}

int fp_config_is_vit(const char *where, fp_err_t *err)
{
    char *path = fp_fs_is_dir(where) ? fp_path_join(where, "config.json") : strdup(where);
    json_t *j = path ? fp_json_load_file(path, 16u << 20, err) : NULL;
    const char *type = NULL;
    int rc = !path ? fp_err_set(err, -ENOMEM, "out of memory")
             : !j  ? (err && err->code ? err->code : -EBADMSG)
                   : fp_json_opt_string(j, "model_type", &type, path, err);
    int vit = rc == 1 && !strcmp(type, "vit");
    json_decref(j);
    free(path);
    return rc < 0 ? rc : vit;
}

int fp_vit_head_init(const fp_vit_config_t *c, fp_adapter_t *ad, uint64_t seed, fp_err_t *err)
{
    float *w, *b;
    int rc = fp_vit_head_set(c, ad, NULL, NULL, err);
    if (rc == 0 && (rc = fp_vit_head_of(c, ad, &w, &b, err)) == 0) {
        fp_rng_t rng;
        fp_rng_seed(&rng, seed ^ 0x68656164ull); /* "head" */
        fp_rng_fill_normal(&rng, w, (size_t)c->K * (size_t)c->D, 0.02);
    }
    return rc;
}
