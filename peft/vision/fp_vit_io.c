/* A ViT checkpoint in Hugging Face's layout (fp_vit.h): config.json and model.safetensors with
 * ViTForImageClassification's tensor names. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_json.h"
#include "fp_safetensors.h"
#include "fp_vit.h"

#define MAX_TENSORS(L) (10 + 20 * (size_t)(L))

typedef struct vt_tensor {
    char name[128];
    float *data;
    int ndim;
    uint64_t shape[4];
} vt_tensor_t;

/* Every tensor of m, with its HF name and shape; returns how many (NULL biases skipped). */
static size_t tensors(const fp_vit_t *m, vt_tensor_t *t)
{
    const fp_vit_config_t *c = &m->c;
    uint64_t D = (uint64_t)c->D, T = (uint64_t)(c->S / c->P) * (c->S / c->P) + 1;
    size_t n = 0;
#define ADD(nm, ptr, nd, ...)                                                                  \
    do {                                                                                       \
        if (ptr) {                                                                             \
            snprintf(t[n].name, sizeof t[n].name, "%s", nm);                                   \
            t[n].data = (ptr);                                                                 \
            t[n].ndim = (nd);                                                                  \
            uint64_t s_[] = {__VA_ARGS__};                                                     \
            memcpy(t[n].shape, s_, sizeof s_);                                                 \
            n++;                                                                               \
        }                                                                                      \
    } while (0)
    ADD("vit.embeddings.cls_token", m->cls, 3, 1, 1, D);
    ADD("vit.embeddings.position_embeddings", m->pos, 3, 1, T, D);
    ADD("vit.embeddings.patch_embeddings.projection.weight", m->patch_w, 4, D,
        (uint64_t)c->C, (uint64_t)c->P, (uint64_t)c->P);
    ADD("vit.embeddings.patch_embeddings.projection.bias", m->patch_b, 1, D);
    for (int l = 0; l < c->L; l++) {
        const fp_vit_layer_t *y = &m->layers[l];
        char nm[128], base[64];
        snprintf(base, sizeof base, "vit.encoder.layer.%d", l);
        snprintf(nm, sizeof nm, "%s.layernorm_before.weight", base);
        ADD(nm, y->ln1_w, 1, D);
        snprintf(nm, sizeof nm, "%s.layernorm_before.bias", base);
        ADD(nm, y->ln1_b, 1, D);
        snprintf(nm, sizeof nm, "%s.layernorm_after.weight", base);
        ADD(nm, y->ln2_w, 1, D);
        snprintf(nm, sizeof nm, "%s.layernorm_after.bias", base);
        ADD(nm, y->ln2_b, 1, D);
        for (int k = 0; k < FP_VT_COUNT; k++) {
            int o, in;
            fp_vit_target_shape(c, k, &o, &in);
            snprintf(nm, sizeof nm, "%s.%s.weight", base, fp_vit_target_name(k));
            ADD(nm, y->w[k], 2, (uint64_t)o, (uint64_t)in);
            snprintf(nm, sizeof nm, "%s.%s.bias", base, fp_vit_target_name(k));
            ADD(nm, y->b[k], 1, (uint64_t)o);
        }
    }
    ADD("vit.layernorm.weight", m->lnf_w, 1, D);
    ADD("vit.layernorm.bias", m->lnf_b, 1, D);
    if (!m->head_fresh) { /* a backbone is saved without a classifier */
        ADD("classifier.weight", m->head_w, 2, (uint64_t)c->K, D);
        ADD("classifier.bias", m->head_b, 1, (uint64_t)c->K);
    }
#undef ADD
    return n;
}

int fp_vit_save(const fp_vit_t *m, const char *dir, fp_err_t *err)
{
    const fp_vit_config_t *c = &m->c;
    if (m->base != FP_BASE_F32)
        return fp_err_set(err, -EINVAL, "a ViT on a %s base cannot be saved in float32",
                          fp_base_dtype_name(m->base));
    int rc = fp_fs_mkdirs(dir, 0755, err);
    if (rc)
        return rc;
    vt_tensor_t *t = calloc(MAX_TENSORS(c->L), sizeof *t);
    fp_st_entry_t *e = calloc(MAX_TENSORS(c->L), sizeof *e);
    json_t *j = json_pack("{s:[s],s:s,s:i,s:i,s:i,s:i,s:s,s:f,s:f,s:f,s:i,s:i,s:i,s:b,s:o}",
                          "architectures", "ViTForImageClassification", "model_type", "vit",
                          "hidden_size", c->D, "num_hidden_layers", c->L,
                          "num_attention_heads", c->H, "intermediate_size", c->F,
                          "hidden_act", "gelu", "hidden_dropout_prob", 0.0,
                          "attention_probs_dropout_prob", 0.0, "layer_norm_eps", c->eps,
                          "image_size", c->S, "patch_size", c->P, "num_channels", c->C,
                          "qkv_bias", c->qkv_bias, "id2label", json_object());
    char *sp = fp_path_join(dir, "model.safetensors"), *cp = fp_path_join(dir, "config.json");
    if (!t || !e || !j || !sp || !cp) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    json_t *ids = json_object_get(j, "id2label"), *lab = json_object();
    json_object_set_new(j, "label2id", lab);
    for (int k = 0; k < c->K; k++) {
        char key[16], def[32];
        snprintf(key, sizeof key, "%d", k);
        snprintf(def, sizeof def, "LABEL_%d", k);
        const char *name = c->labels ? c->labels[k] : def;
        json_object_set_new(ids, key, json_string(name));
        json_object_set_new(lab, name, json_integer(k));
    }
    size_t n = tensors(m, t);
    for (size_t i = 0; i < n; i++) {
        e[i] = (fp_st_entry_t){.name = t[i].name, .dtype = FP_DT_F32, .ndim = t[i].ndim,
                               .f32 = t[i].data};
        memcpy(e[i].shape, t[i].shape, sizeof t[i].shape);
    }
    const char *meta[] = {"format", "pt", NULL};
    if ((rc = fp_st_write(sp, e, n, meta, err)) == 0)
        rc = fp_json_write_file(cp, j, err);
out:
    free(t);
    free(e);
    json_decref(j);
    free(sp);
    free(cp);
    return rc;
}

int fp_vit_load(const char *dir, fp_vit_t **out, fp_err_t *err)
{
    *out = NULL;
    fp_vit_config_t c;
    char *cp = fp_path_join(dir, "config.json"), *sp = fp_path_join(dir, "model.safetensors");
    fp_st_file_t *st = NULL;
    fp_vit_t *m = NULL;
    vt_tensor_t *t = NULL;
    int rc = !cp || !sp ? fp_err_set(err, -ENOMEM, "out of memory")
                        : fp_vit_config_load(cp, &c, err);
    if (rc)
        goto out;
    rc = fp_vit_alloc(&c, &m, err);
    if (rc == 0) {
        m->c.labels = c.labels; /* the model owns the names from here */
        c.labels = NULL;
    }
    fp_vit_config_free(&c);
    if (rc || (rc = fp_st_open(&st, sp, err)) != 0)
        goto out;
    if (!(t = calloc(MAX_TENSORS(m->c.L), sizeof *t))) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    size_t n = tensors(m, t);
    for (size_t i = 0; i < n; i++) {
        const fp_st_tensor_t *x = fp_st_find(st, t[i].name);
        uint64_t want = 1;
        for (int d = 0; d < t[i].ndim; d++)
            want *= t[i].shape[d];
        if (!x && !strncmp(t[i].name, "classifier.", 11)) {
            m->head_fresh = 1; /* a base without this task's head: a new one is trained */
            continue;
        }
        if (!x) {
            rc = fp_err_set(err, -EINVAL, "%s: no tensor %s", sp, t[i].name);
            goto out;
        }
        int same = x->ndim == t[i].ndim && x->nelem == want;
        for (int d = 0; same && d < t[i].ndim; d++)
            same = x->shape[d] == t[i].shape[d];
        if (!same) {
            rc = fp_err_set(err, -EINVAL, "%s: %s is not of the shape the config gives it "
                            "(%llu values expected)", sp, t[i].name, (unsigned long long)want);
            goto out;
        }
        if ((rc = fp_st_read_f32(st, x, t[i].data, err)) != 0)
            goto out;
    }
    for (size_t i = 0; i < fp_st_count(st); i++) { /* nothing the model would not compute */
        const char *name = fp_st_get(st, i)->name;
        int known = !strncmp(name, "vit.pooler.", 11); /* ViTModel's pooler: not a classifier's */
        for (size_t k = 0; k < n && !known; k++)
            known = !strcmp(name, t[k].name);
        if (!known) {
            rc = fp_err_set(err, -ENOTSUP, "%s: tensor %s is not part of a "
                            "ViTForImageClassification; refusing rather than ignoring it", sp,
                            name);
            goto out;
        }
    }
    *out = m;
    m = NULL;
out:
    fp_vit_free(m);
    fp_st_close(st);
    free(t);
    free(cp);
    free(sp);
    return rc;
}

int fp_vit_head_of(const fp_vit_config_t *c, const fp_adapter_t *ad, float **w, float **b,
                   fp_err_t *err)
{
    *w = *b = NULL;
    if (ad->nwhole == 0)
        return 0;
    int iw = fp_adapter_whole_find(ad, "classifier.weight");
    int ib = fp_adapter_whole_find(ad, "classifier.bias");
    if (ad->nwhole != 2 || iw < 0 || ib < 0 || ad->whole[iw].rows != c->K ||
        ad->whole[iw].cols != c->D || ad->whole[ib].rows != c->K || ad->whole[ib].cols != 1)
        return fp_err_set(err, -EBADMSG, "the tensors trained in full are not this ViT's "
                          "classifier (classifier.weight %d × %d and classifier.bias %d)", c->K,
                          c->D, c->K);
    *w = ad->whole[iw].v;
    *b = ad->whole[ib].v;
    return 0;
}

int fp_vit_head_set(const fp_vit_config_t *c, fp_adapter_t *ad, const float *w, const float *b,
                    fp_err_t *err)
{
    fp_whole_desc_t d[2] = {{"classifier.weight", c->K, c->D}, {"classifier.bias", c->K, 1}};
    int rc = fp_adapter_set_whole(ad, d, 2, err);
    float *hw, *hb;
    if (rc == 0 && (rc = fp_vit_head_of(c, ad, &hw, &hb, err)) == 0) {
        if (w)
            memcpy(hw, w, (size_t)c->K * (size_t)c->D * sizeof *hw);
        if (b)
            memcpy(hb, b, (size_t)c->K * sizeof *hb);
    }
    return rc;
}

int fp_vit_adapter_save(const fp_adapter_t *lora, const fp_vit_config_t *c, const float *head_w,
                        const float *head_b, const char *dir, fp_err_t *err)
{
    fp_adapter_t *ad = NULL;
    int rc = fp_vit_lora_check(c, lora, err);
    if (rc == 0)
        rc = fp_adapter_clone(lora, &ad, err);
    if (rc == 0)
        rc = fp_vit_head_set(c, ad, head_w, head_b, err);
    if (rc == 0)
        rc = fp_hfpeft_save(ad, dir, err);
    fp_adapter_free(ad);
    return rc;
}

int fp_vit_adapter_load(const char *dir, const fp_vit_config_t *c, fp_adapter_t **lora,
                        float **head, fp_err_t *err)
{
    *lora = NULL;
    *head = NULL;
    float *w, *b;
    int rc = fp_hfpeft_load(dir, 0, lora, err);
    if (rc)
        return rc;
    if ((rc = fp_vit_lora_check(c, *lora, err)) != 0 ||
        (rc = fp_vit_head_of(c, *lora, &w, &b, err)) != 0) {
        fp_err_prefix(err, rc, "%s: ", dir);
        fp_adapter_free(*lora);
        *lora = NULL;
        return rc;
    }
    if (!w)
        return 0;
    size_t K = (size_t)c->K, D = (size_t)c->D;
    if (!(*head = malloc((K * D + K) * sizeof **head))) {
        fp_adapter_free(*lora);
        *lora = NULL;
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    memcpy(*head, w, K * D * sizeof **head);
    memcpy(*head + K * D, b, K * sizeof **head);
    return 0;
}
