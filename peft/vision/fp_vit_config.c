/* A ViT's config.json, its weights' names and shapes (fp_vit.h). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"
#include "fp_json.h"
#include "fp_model.h"
#include "fp_rng.h"
#include "fp_vit.h"

static const char *const vit_keys[] = {
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps",
    "image_size", "patch_size", "num_channels", "qkv_bias", "num_labels",
    "encoder_stride",                  /* ViTForMaskedImageModeling's decoder only */
    "pooler_output_size", "pooler_act" /* ViTModel's pooler: not in the classifier */
};

static const char *const target_names[FP_VT_COUNT] = {
    "attention.attention.query", "attention.attention.key", "attention.attention.value",
    "attention.output.dense",    "intermediate.dense",      "output.dense"};

const char *fp_vit_target_name(int t)
{
    return t >= 0 && t < FP_VT_COUNT ? target_names[t] : "?";
}

void fp_vit_module_name(int l, int t, char *buf, size_t n)
{
    snprintf(buf, n, "vit.encoder.layer.%d.%s", l, fp_vit_target_name(t));
}

void fp_vit_target_shape(const fp_vit_config_t *c, int t, int *out, int *in)
{
    *out = t == FP_VT_FC1 ? c->F : c->D;
    *in = t == FP_VT_FC2 ? c->F : c->D;
}

void fp_vit_config_free(fp_vit_config_t *c)
{
    for (int i = 0; c->labels && i < c->K; i++)
        free(c->labels[i]);
    free(c->labels);
    c->labels = NULL;
}

int fp_vit_config_check(const fp_vit_config_t *c, fp_err_t *err)
{
    if (c->D < 1 || c->L < 1 || c->H < 1 || c->F < 1 || c->S < 1 || c->P < 1 || c->C < 1 ||
        c->K < 1 || c->D > 65536 || c->L > 1024 || c->F > 262144 || c->S > 4096 || c->K > 100000)
        return fp_err_set(err, -EINVAL, "ViT config: sizes out of range (hidden %d, layers %d, "
                          "heads %d, intermediate %d, image %d, patch %d, channels %d, labels %d)",
                          c->D, c->L, c->H, c->F, c->S, c->P, c->C, c->K);
    if (c->D % c->H)
        return fp_err_set(err, -EINVAL, "ViT config: hidden_size %d is not a multiple of "
                          "num_attention_heads %d", c->D, c->H);
    if (c->S % c->P)
        return fp_err_set(err, -EINVAL, "ViT config: image_size %d is not a multiple of "
                          "patch_size %d", c->S, c->P);
    if ((c->S / c->P) * (c->S / c->P) > 65536)
        return fp_err_set(err, -EINVAL, "ViT config: %d patches (at most 65536)",
                          (c->S / c->P) * (c->S / c->P));
    if (c->K < 2)
        return fp_err_set(err, -ENOTSUP, "ViT config: %d label: with one label HF's classifier "
                          "regresses (MSE); fedpeft trains classification of 2 labels or more",
                          c->K);
    if (c->C != 1 && c->C != 3)
        return fp_err_set(err, -ENOTSUP, "ViT config: num_channels %d (1 or 3)", c->C);
    if (!(c->eps > 0))
        return fp_err_set(err, -EINVAL, "ViT config: layer_norm_eps must be positive");
    return 0;
}

static int get_int(json_t *j, const char *key, int *out, int required, const char *path,
                   fp_err_t *err)
{
    long long v;
    int rc = fp_json_opt_int(j, key, &v, path, err);
    if (rc < 0)
        return rc;
    if (rc == 0)
        return required ? fp_err_set(err, -EINVAL, "%s: \"%s\" is missing", path, key) : 0;
    if (v < 0 || v > 1 << 30)
        return fp_err_set(err, -EINVAL, "%s: \"%s\" is %lld", path, key, v);
    *out = (int)v;
    return 0;
}

/* id2label {"0": name, ...}: K names in order. */
static int read_labels(json_t *j, fp_vit_config_t *c, const char *path, fp_err_t *err)
{
    json_t *m = json_object_get(j, "id2label");
    if (!m || json_is_null(m))
        return 0;
    if (!json_is_object(m) || json_object_size(m) < 1 || json_object_size(m) > 100000)
        return fp_err_set(err, -EINVAL, "%s: id2label is an object of 1 to 100000 labels", path);
    int k = (int)json_object_size(m);
    if (c->K && c->K != k)
        return fp_err_set(err, -EINVAL, "%s: num_labels %d, but id2label names %d", path, c->K,
                          k);
    c->K = k;
    c->labels = calloc((size_t)k, sizeof *c->labels);
    if (!c->labels)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; i < k; i++) {
        char key[16];
        snprintf(key, sizeof key, "%d", i);
        json_t *v = json_object_get(m, key);
        if (!json_is_string(v))
            return fp_err_set(err, -EINVAL, "%s: id2label has no name for label %d", path, i);
        if (!(c->labels[i] = strdup(json_string_value(v))))
            return fp_err_set(err, -ENOMEM, "out of memory");
    }
    return 0;
}

static int vit_config_file(const char *path, fp_vit_config_t *c, fp_err_t *err);

int fp_vit_config_load(const char *where, fp_vit_config_t *c, fp_err_t *err)
{
    *c = (fp_vit_config_t){.eps = 1e-12, .qkv_bias = 1, .C = 3};
    char *file = fp_fs_is_dir(where) ? fp_path_join(where, "config.json") : strdup(where);
    if (!file)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int rc = vit_config_file(file, c, err);
    free(file);
    return rc;
}

static int vit_config_file(const char *path, fp_vit_config_t *c, fp_err_t *err)
{
    json_t *j = fp_json_load_file(path, 1 << 22, err);
    if (!j)
        return err && err->code ? err->code : -EINVAL;
    int rc = 0;
    const char *key;
    json_t *v;
    if (!json_is_object(j)) {
        rc = fp_err_set(err, -EINVAL, "%s: not a JSON object", path);
        goto out;
    }
    const char *mt = json_string_value(json_object_get(j, "model_type"));
    if (!mt || strcmp(mt, "vit") != 0) {
        rc = fp_err_set(err, -ENOTSUP, "%s: model_type \"%s\": fedpeft's vision models are "
                        "\"vit\" (ViTForImageClassification)", path, mt ? mt : "(none)");
        goto out;
    }
    json_object_foreach(j, key, v) {
        int known = fp_config_key_inert(key);
        for (size_t i = 0; !known && i < sizeof vit_keys / sizeof *vit_keys; i++)
            known = !strcmp(key, vit_keys[i]);
        if (!known) {
            rc = fp_err_set(err, -ENOTSUP, "%s: key \"%s\" is not understood by fedpeft for a "
                            "ViT; refusing rather than computing without it", path, key);
            goto out;
        }
    }
    const char *act = json_string_value(json_object_get(j, "hidden_act"));
    if (act && strcmp(act, "gelu") != 0) {
        rc = fp_err_set(err, -ENOTSUP, "%s: hidden_act \"%s\": fedpeft's ViT computes gelu "
                        "(exact, erf)", path, act);
        goto out;
    }
    const char *drops[] = {"hidden_dropout_prob", "attention_probs_dropout_prob"};
    for (int i = 0; i < 2; i++) {
        double p = 0;
        if (fp_json_opt_number(j, drops[i], &p, path, err) < 0) {
            rc = -EINVAL;
            goto out;
        }
        if (p != 0) {
            rc = fp_err_set(err, -ENOTSUP, "%s: %s %g: fedpeft trains without dropout (set it "
                            "to 0.0)", path, drops[i], p);
            goto out;
        }
    }
    const char *pt = json_string_value(json_object_get(j, "problem_type"));
    if (pt && strcmp(pt, "single_label_classification") != 0) {
        rc = fp_err_set(err, -ENOTSUP, "%s: problem_type \"%s\": fedpeft trains single-label "
                        "classification (cross-entropy)", path, pt);
        goto out;
    }
    if ((rc = get_int(j, "hidden_size", &c->D, 1, path, err)) ||
        (rc = get_int(j, "num_hidden_layers", &c->L, 1, path, err)) ||
        (rc = get_int(j, "num_attention_heads", &c->H, 1, path, err)) ||
        (rc = get_int(j, "intermediate_size", &c->F, 1, path, err)) ||
        (rc = get_int(j, "image_size", &c->S, 1, path, err)) ||
        (rc = get_int(j, "patch_size", &c->P, 1, path, err)) ||
        (rc = get_int(j, "num_channels", &c->C, 0, path, err)) ||
        (rc = get_int(j, "num_labels", &c->K, 0, path, err)) ||
        (rc = read_labels(j, c, path, err)))
        goto out;
    if (fp_json_opt_number(j, "layer_norm_eps", &c->eps, path, err) < 0 ||
        fp_json_opt_bool(j, "qkv_bias", &c->qkv_bias, path, err) < 0) {
        rc = -EINVAL;
        goto out;
    }
    if (c->K == 0)
        c->K = 2; /* PretrainedConfig's default */
    if ((rc = fp_vit_config_check(c, err)) != 0)
        fp_err_prefix(err, rc, "%s: ", path);
out:
    json_decref(j);
    if (rc)
        fp_vit_config_free(c);
    return rc;
}

int fp_vit_alloc(const fp_vit_config_t *c, fp_vit_t **out, fp_err_t *err)
{
    *out = NULL;
    int rc = fp_vit_config_check(c, err);
    if (rc)
        return rc;
    size_t D = (size_t)c->D, F = (size_t)c->F, T = (size_t)(c->S / c->P) * (c->S / c->P) + 1;
    size_t cpp = (size_t)c->C * c->P * c->P, K = (size_t)c->K;
    size_t per = 4 * D + 4 * D * D + 4 * D + 2 * D * F + F + D;
    size_t n = D * cpp + D + D + T * D + 2 * D + K * D + K + (size_t)c->L * per;
    fp_vit_t *m = calloc(1, sizeof *m);
    if (!m || !(m->mem = calloc(n, sizeof *m->mem)) ||
        !(m->layers = calloc((size_t)c->L, sizeof *m->layers))) {
        fp_vit_free(m);
        return fp_err_set(err, -ENOMEM, "out of memory for a ViT of %zu parameters", n);
    }
    m->c = *c;
    m->c.labels = NULL; /* the names stay the caller's; the model's own are set by the loader */
    m->nparams = n;
    float *p = m->mem;
#define TAKE(ptr, cnt) (ptr = p, p += (cnt))
    TAKE(m->patch_w, D * cpp);
    TAKE(m->patch_b, D);
    TAKE(m->cls, D);
    TAKE(m->pos, T * D);
    TAKE(m->lnf_w, D);
    TAKE(m->lnf_b, D);
    TAKE(m->head_w, K * D);
    TAKE(m->head_b, K);
    for (int l = 0; l < c->L; l++) {
        fp_vit_layer_t *y = &m->layers[l];
        TAKE(y->ln1_w, D);
        TAKE(y->ln1_b, D);
        TAKE(y->ln2_w, D);
        TAKE(y->ln2_b, D);
        for (int t = 0; t < FP_VT_COUNT; t++) {
            int o, i;
            fp_vit_target_shape(c, t, &o, &i);
            TAKE(y->w[t], (size_t)o * i);
            TAKE(y->b[t], (size_t)o);
        }
        if (!c->qkv_bias)
            y->b[FP_VT_QUERY] = y->b[FP_VT_KEY] = y->b[FP_VT_VALUE] = NULL;
    }
#undef TAKE
    *out = m;
    return 0;
}

void fp_vit_free(fp_vit_t *m)
{
    if (!m)
        return;
    fp_vit_config_free(&m->c);
    free(m->mem);
    free(m->lowp_mem);
    free(m->layers);
    free(m);
}

int fp_vit_lora_check(const fp_vit_config_t *c, const fp_adapter_t *lora, fp_err_t *err)
{
    for (int i = 0; lora && i < lora->n; i++) {
        const fp_lora_module_t *m = &lora->mods[i];
        int found = 0;
        for (int l = 0; l < c->L && !found; l++)
            for (int t = 0; t < FP_VT_COUNT && !found; t++) {
                char name[128];
                fp_vit_module_name(l, t, name, sizeof name);
                if (strcmp(name, m->name) != 0)
                    continue;
                int o, in;
                fp_vit_target_shape(c, t, &o, &in);
                if (m->d_out != o || m->d_in != in)
                    return fp_err_set(err, -EINVAL, "LoRA module %s is %d × %d; the model's "
                                      "weight is %d × %d", m->name, m->d_out, m->d_in, o, in);
                found = 1;
            }
        if (!found)
            return fp_err_set(err, -EINVAL, "LoRA module %s is not one of the ViT's linears "
                              "(vit.encoder.layer.<i>.{attention.attention.query|key|value, "
                              "attention.output.dense, intermediate.dense, output.dense})",
                              m->name);
    }
    return 0;
}

void fp_vit_init_random(fp_vit_t *m, uint64_t seed)
{
    const fp_vit_config_t *c = &m->c;
    fp_rng_t rng;
    fp_rng_seed(&rng, seed);
    memset(m->mem, 0, m->nparams * sizeof *m->mem);
    size_t D = (size_t)c->D, T = (size_t)(c->S / c->P) * (c->S / c->P) + 1;
    fp_rng_fill_normal(&rng, m->patch_w, D * (size_t)c->C * c->P * c->P, 0.02);
    fp_rng_fill_normal(&rng, m->cls, D, 0.02);
    fp_rng_fill_normal(&rng, m->pos, T * D, 0.02);
    fp_rng_fill_normal(&rng, m->head_w, (size_t)c->K * D, 0.02);
    for (size_t j = 0; j < D; j++)
        m->lnf_w[j] = 1;
    for (int l = 0; l < c->L; l++) {
        fp_vit_layer_t *y = &m->layers[l];
        for (size_t j = 0; j < D; j++)
            y->ln1_w[j] = y->ln2_w[j] = 1;
        for (int t = 0; t < FP_VT_COUNT; t++) {
            int o, in;
            fp_vit_target_shape(c, t, &o, &in);
            fp_rng_fill_normal(&rng, y->w[t], (size_t)o * in, 0.02);
        }
    }
}
