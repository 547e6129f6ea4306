#include "fp_model.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fp_fs.h"
#include "fp_json.h"
#include "fp_rng.h"
#include "fp_safetensors.h"
#include "fp_sha256.h"

const char *const fp_target_names[FP_T_COUNT] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};

int fp_targets_parse(const char *list, unsigned *mask, fp_err_t *err)
{
    *mask = 0;
    if (!strcmp(list, "all")) {
        *mask = (1u << FP_T_COUNT) - 1;
        return 0;
    }
    const char *p = list;
    while (*p) {
        const char *e = strchr(p, ',');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        int found = -1;
        for (int t = 0; t < FP_T_COUNT; t++)
            if (strlen(fp_target_names[t]) == n && !strncmp(p, fp_target_names[t], n))
                found = t;
        if (found < 0)
            return fp_err_set(err, -EINVAL, "unknown target module '%.*s' (choose from q_proj, "
                              "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or all)",
                              (int)n, p);
        *mask |= 1u << found;
        p += n + (e ? 1 : 0);
    }
    if (!*mask)
        return fp_err_set(err, -EINVAL, "no target modules given");
    return 0;
}

void fp_target_shape(const fp_model_config_t *c, fp_target_t t, int *d_out, int *d_in)
{
    int q = c->n_heads * c->head_dim, kv = c->n_kv_heads * c->head_dim;
    switch (t) {
    case FP_T_Q: *d_out = q; *d_in = c->dim; break;
    case FP_T_K:
    case FP_T_V: *d_out = kv; *d_in = c->dim; break;
    case FP_T_O: *d_out = c->dim; *d_in = q; break;
    case FP_T_GATE:
    case FP_T_UP: *d_out = c->ff; *d_in = c->dim; break;
    default: *d_out = c->dim; *d_in = c->ff; break;
    }
}

void fp_model_free(fp_model_t *m)
{
    if (!m)
        return;
    free(m->lowp_mem);
    free(m->mem);
    free(m->layers);
    free(m);
}

/* Every weight of a model of config c. */
size_t fp_model_config_params(const fp_model_config_t *c)
{
    size_t D = (size_t)c->dim, V = (size_t)c->vocab, per_layer = 2 * D;
    for (int t = 0; t < FP_T_COUNT; t++) {
        int o, i;
        fp_target_shape(c, (fp_target_t)t, &o, &i);
        per_layer += (size_t)o * (size_t)i;
        if (c->bias & (1u << t))
            per_layer += (size_t)o;
    }
    return V * D + per_layer * (size_t)c->n_layers + D + (c->tied ? 0 : V * D);
}

int fp_model_new(fp_model_t **out, const fp_model_config_t *c, fp_err_t *err)
{
    *out = NULL;
    int rc = fp_model_config_check(c, err);
    if (rc)
        return rc;
    fp_model_t *m = calloc(1, sizeof *m);
    if (!m)
        return fp_err_set(err, -ENOMEM, "out of memory");
    m->cfg = *c;
    size_t D = (size_t)c->dim, V = (size_t)c->vocab, total = fp_model_config_params(c);
    m->n_params = m->n_floats = total;
    m->mem = calloc(total, sizeof(float));
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    if (!m->mem || !m->layers) {
        fp_model_free(m);
        return fp_err_set(err, -ENOMEM, "out of memory for a model of %zu parameters", total);
    }
    float *p = m->mem;
    m->embed = p;
    p += V * D;
    for (int l = 0; l < c->n_layers; l++) {
        fp_layer_w_t *L = &m->layers[l];
        L->attn_norm = p;
        p += D;
        /* matrices back to back in target order, so that q|k|v and gate|up are each one
         * contiguous (Σ d_out) × D matrix the trainer multiplies in one product */
        for (int t = 0; t < FP_T_COUNT; t++) {
            int o, i;
            fp_target_shape(c, (fp_target_t)t, &o, &i);
            L->w[t] = p;
            p += (size_t)o * (size_t)i;
        }
        for (int t = 0; t < FP_T_COUNT; t++) {
            if (!(c->bias & (1u << t)))
                continue;
            int o, i;
            fp_target_shape(c, (fp_target_t)t, &o, &i);
            L->b[t] = p;
            p += (size_t)o;
        }
        L->mlp_norm = p;
        p += D;
    }
    m->norm = p;
    p += D;
    m->lm_head = c->tied ? m->embed : p;
    *out = m;
    return 0;
}

size_t fp_model_weight_bytes(const fp_model_t *m)
{
    return m->n_floats * sizeof(float) + m->lowp_bytes;
}

/* The bytes a low-precision base (dt) holds, and the floats left beside it (norms and
 * biases); refuses dt where oneDNN cannot multiply or nf4 blocks do not fit. */
static int lowp_sizes(const fp_model_config_t *c, fp_base_dtype_t dt, size_t *bytes,
                      size_t *floats, fp_err_t *err)
{
    int rc = fp_lowp_probe(err);
    if (rc)
        return rc;
    size_t D = (size_t)c->dim, V = (size_t)c->vocab;
    *bytes = V * D * 2 * (c->tied ? 1 : 2);
    *floats = D + 2 * D * (size_t)c->n_layers;
    for (int t = 0; t < FP_T_COUNT; t++) {
        int o, i;
        fp_target_shape(c, (fp_target_t)t, &o, &i);
        if (dt == FP_BASE_NF4 && ((size_t)o * (size_t)i) % FP_NF4_BLOCK)
            return fp_err_set(err, -EINVAL, "an nf4 base quantises blocks of %d weights; %s's "
                              "%d × %d are not a whole number of them", FP_NF4_BLOCK,
                              fp_target_names[t], o, i);
        *bytes += fp_lowp_bytes(dt, (size_t)o, (size_t)i) * (size_t)c->n_layers;
        if (c->bias & (1u << t))
            *floats += (size_t)o * (size_t)c->n_layers;
    }
    return 0;
}

/* Gives m (cfg and layers set, no weights yet) a low-precision base: lowp_mem for the linear
 * weights, the embedding and the head, mem for the norms and biases, every pointer set into
 * them; the values are left to the caller. On failure m is unchanged. */
static int lowp_alloc(fp_model_t *m, fp_base_dtype_t dt, fp_err_t *err)
{
    const fp_model_config_t *c = &m->cfg;
    size_t bytes, floats, D = (size_t)c->dim, V = (size_t)c->vocab;
    int rc = lowp_sizes(c, dt, &bytes, &floats, err);
    if (rc)
        return rc;
    unsigned char *lp = malloc(bytes);
    float *mem = malloc(floats * sizeof *mem);
    if (!lp || !mem) {
        free(lp);
        free(mem);
        return fp_err_set(err, -ENOMEM, "out of memory for a %s base of %zu bytes",
                          fp_base_dtype_name(dt), bytes);
    }
    unsigned char *p = lp;
    m->embed_h = m->lm_head_h = (uint16_t *)p;
    p += V * D * 2;
    if (!c->tied) {
        m->lm_head_h = (uint16_t *)p;
        p += V * D * 2;
    }
    float *f = mem;
    for (int l = 0; l < c->n_layers; l++) {
        fp_layer_w_t *L = &m->layers[l];
        /* nf4: the layer's codes back to back, then its scales, so that a run of targets
         * (q|k|v, gate|up) is one matrix as in float */
        size_t codes = 0;
        for (int t = 0; t < FP_T_COUNT; t++) {
            int o, i;
            fp_target_shape(c, (fp_target_t)t, &o, &i);
            codes += (size_t)o * (size_t)i / 2;
        }
        unsigned char *q = p;
        float *am = (float *)(p + codes);
        for (int t = 0; t < FP_T_COUNT; t++) {
            int o, i;
            fp_target_shape(c, (fp_target_t)t, &o, &i);
            size_t n = (size_t)o * (size_t)i;
            fp_lowp_mat_t *w = &L->lp[t];
            *w = (fp_lowp_mat_t){dt, o, i, NULL, NULL, NULL};
            if (dt == FP_BASE_BF16) {
                w->h = (const uint16_t *)p;
                p += 2 * n;
            } else {
                w->q = q;
                w->absmax = am;
                q += n / 2;
                am += n / FP_NF4_BLOCK;
            }
            L->w[t] = NULL;
            L->b[t] = NULL;
        }
        if (dt == FP_BASE_NF4)
            p = (unsigned char *)am;
        L->attn_norm = f;
        f += D;
        L->mlp_norm = f;
        f += D;
        for (int t = 0; t < FP_T_COUNT; t++) {
            if (!(c->bias & (1u << t)))
                continue;
            int o, i;
            fp_target_shape(c, (fp_target_t)t, &o, &i);
            L->b[t] = f;
            f += o;
        }
    }
    m->norm = f;
    m->mem = mem;
    m->embed = m->lm_head = NULL;
    m->lowp_mem = lp;
    m->lowp_bytes = bytes;
    m->n_floats = floats;
    m->base = dt;
    return 0;
}

/* The embedding or head of a low-precision base as a bf16 matrix, to store into. */
static fp_lowp_mat_t bf16_mat(const fp_model_config_t *c, const uint16_t *h)
{
    return (fp_lowp_mat_t){FP_BASE_BF16, c->vocab, c->dim, h, NULL, NULL};
}

/* Weights [off, off + n) of w from x (for nf4, off and n whole blocks). */
static void lowp_store(const fp_lowp_mat_t *w, size_t off, const float *x, size_t n)
{
    if (w->dt == FP_BASE_BF16)
        fp_bf16_pack((uint16_t *)w->h + off, x, n);
    else
        fp_nf4_quantize(x, n, (uint8_t *)w->q + off / 2, (float *)w->absmax + off / FP_NF4_BLOCK);
}

void *fp_model_snapshot(const fp_model_t *m)
{
    return fp_lowp_snapshot(m->mem, m->n_floats * sizeof(float), m->lowp_mem, m->lowp_bytes);
}

void fp_model_restore(fp_model_t *m, const void *snap)
{
    fp_lowp_restore(m->mem, m->n_floats * sizeof(float), m->lowp_mem, m->lowp_bytes, snap);
}

void fp_model_init(fp_model_t *m, uint64_t seed)
{
    const fp_model_config_t *c = &m->cfg;
    fp_rng_t rng;
    fp_rng_seed(&rng, seed);
    size_t D = (size_t)c->dim;
    fp_rng_fill_normal(&rng, m->embed, (size_t)c->vocab * D, 0.02);
    for (int l = 0; l < c->n_layers; l++) {
        fp_layer_w_t *L = &m->layers[l];
        for (size_t i = 0; i < D; i++)
            L->attn_norm[i] = L->mlp_norm[i] = 1.0f;
        for (int t = 0; t < FP_T_COUNT; t++) {
            int o, i;
            fp_target_shape(c, (fp_target_t)t, &o, &i);
            fp_rng_fill_normal(&rng, L->w[t], (size_t)o * (size_t)i, 0.02);
            if (L->b[t])
                memset(L->b[t], 0, (size_t)o * sizeof(float));
        }
    }
    for (size_t i = 0; i < D; i++)
        m->norm[i] = 1.0f;
    if (!c->tied)
        fp_rng_fill_normal(&rng, m->lm_head, (size_t)c->vocab * D, 0.02);
}

/* Appends a tensor: float data, or (data NULL) the low-precision matrix *lp. */
static void add_tensor(fp_model_tensor_t *t, int *n, const char *name, float *data,
                       const fp_lowp_mat_t *lp, int64_t d0, int64_t d1, int decay)
{
    fp_model_tensor_t *x = &t[(*n)++];
    snprintf(x->name, sizeof x->name, "%s", name);
    x->data = data;
    if (!data && lp) /* (a shell model, fp_model_check_dir: neither) */
        x->lp = *lp;
    x->ndim = d1 ? 2 : 1;
    x->shape[0] = d0;
    x->shape[1] = d1;
    x->decay = decay;
}

/* fp_model_tensors for any base: a low-precision one's matrices come as lp. */
static int list_tensors(const fp_model_t *m, fp_model_tensor_t **out, int *n, fp_err_t *err)
{
    const fp_model_config_t *c = &m->cfg;
    int cap = 3 + c->n_layers * (2 + 2 * FP_T_COUNT);
    fp_model_tensor_t *t = calloc((size_t)cap, sizeof *t);
    if (!t)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int k = 0;
    char name[96];
    fp_lowp_mat_t e = bf16_mat(c, m->embed_h), h = bf16_mat(c, m->lm_head_h);
    add_tensor(t, &k, "model.embed_tokens.weight", m->embed, &e, c->vocab, c->dim, 1);
    for (int l = 0; l < c->n_layers; l++) {
        const fp_layer_w_t *L = &m->layers[l];
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", l);
        add_tensor(t, &k, name, L->attn_norm, NULL, c->dim, 0, 0);
        for (int tg = 0; tg < FP_T_COUNT; tg++) {
            int o, i;
            fp_target_shape(c, (fp_target_t)tg, &o, &i);
            const char *block = tg <= FP_T_O ? "self_attn" : "mlp";
            snprintf(name, sizeof name, "model.layers.%d.%s.%s.weight", l, block,
                     fp_target_names[tg]);
            add_tensor(t, &k, name, L->w[tg], &L->lp[tg], o, i, 1);
            if (c->bias & (1u << tg)) {
                snprintf(name, sizeof name, "model.layers.%d.%s.%s.bias", l, block,
                         fp_target_names[tg]);
                add_tensor(t, &k, name, L->b[tg], NULL, o, 0, 0);
            }
        }
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", l);
        add_tensor(t, &k, name, L->mlp_norm, NULL, c->dim, 0, 0);
    }
    add_tensor(t, &k, "model.norm.weight", m->norm, NULL, c->dim, 0, 0);
    if (!c->tied)
        add_tensor(t, &k, "lm_head.weight", m->lm_head, &h, c->vocab, c->dim, 1);
    *out = t;
    *n = k;
    return 0;
}

int fp_model_tensors(const fp_model_t *m, fp_model_tensor_t **out, int *n, fp_err_t *err)
{
    if (m->base != FP_BASE_F32)
        return fp_err_set(err, -ENOTSUP, "the base is held in %s: its float tensors are gone",
                          fp_base_dtype_name(m->base));
    return list_tensors(m, out, n, err);
}

/* ---- loading ---- */

typedef struct shard {
    char *file;
    fp_st_file_t *st;
} shard_t;

static void shards_close(shard_t *sh, int nsh)
{
    for (int s = 0; s < nsh; s++) {
        fp_st_close(sh[s].st);
        free(sh[s].file);
    }
    free(sh);
}

/* Opens the weight files of dir: one model.safetensors, or the shards of the index. */
static int open_shards(const char *dir, shard_t **out, int *n, json_t **index, fp_err_t *err)
{
    *out = NULL;
    *n = 0;
    *index = NULL;
    char *single = fp_path_join(dir, "model.safetensors");
    char *idx = fp_path_join(dir, "model.safetensors.index.json");
    int rc = 0;
    if (!single || !idx) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    if (fp_fs_exists(single)) {
        shard_t *s = calloc(1, sizeof *s);
        if (!s || !(s->file = strdup(single))) {
            free(s);
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        if ((rc = fp_st_open(&s->st, single, err)) != 0) {
            free(s->file);
            free(s);
            goto out;
        }
        *out = s;
        *n = 1;
        goto out;
    }
    if (!fp_fs_exists(idx)) {
        rc = fp_err_set(err, -ENOENT, "%s: no model.safetensors or model.safetensors.index.json",
                        dir);
        goto out;
    }
    json_t *j = fp_json_load_file(idx, 64u << 20, err);
    if (!j) {
        rc = err && err->code ? err->code : -EBADMSG;
        goto out;
    }
    json_t *wm = json_object_get(j, "weight_map");
    if (!json_is_object(wm)) {
        json_decref(j);
        rc = fp_err_set(err, -EBADMSG, "%s: no \"weight_map\" object", idx);
        goto out;
    }
    /* distinct shard files, in first-seen order */
    size_t cap = json_object_size(wm);
    shard_t *s = calloc(cap ? cap : 1, sizeof *s);
    if (!s) {
        json_decref(j);
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    int k = 0;
    const char *key;
    json_t *v;
    json_object_foreach(wm, key, v) {
        if (!json_is_string(v) || strchr(json_string_value(v), '/')) {
            rc = fp_err_set(err, -EBADMSG, "%s: shard name for '%s' must be a file name in the "
                            "model directory", idx, key);
            break;
        }
        int seen = 0;
        for (int i = 0; i < k && !seen; i++)
            seen = !strcmp(strrchr(s[i].file, '/') + 1, json_string_value(v));
        if (seen)
            continue;
        s[k].file = fp_path_join(dir, json_string_value(v));
        if (!s[k].file) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            break;
        }
        k++;
        if ((rc = fp_st_open(&s[k - 1].st, s[k - 1].file, err)) != 0)
            break;
    }
    if (rc) {
        shards_close(s, k);
        json_decref(j);
        goto out;
    }
    *out = s;
    *n = k;
    *index = j;
out:
    free(single);
    free(idx);
    return rc;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int fp_model_weights_id(const char *dir, uint8_t sha[32], uint64_t *size, int64_t *mtime_ns,
                        fp_err_t *err)
{
    char *single = fp_path_join(dir, "model.safetensors");
    char *idx = fp_path_join(dir, "model.safetensors.index.json");
    char **files = NULL;
    size_t n = 0;
    json_t *j = NULL;
    int rc = 0;
    if (!single || !idx) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    if (fp_fs_exists(single)) {
        files = malloc(sizeof *files);
        if (!files || !(files[0] = strdup(single))) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        n = 1;
    } else if (fp_fs_exists(idx)) {
        if (!(j = fp_json_load_file(idx, 64u << 20, err))) {
            rc = err && err->code ? err->code : -EBADMSG;
            goto out;
        }
        json_t *wm = json_object_get(j, "weight_map"), *v;
        const char *key;
        files = calloc(json_object_size(wm) + 1, sizeof *files);
        if (!json_is_object(wm) || !files) {
            rc = files ? fp_err_set(err, -EBADMSG, "%s: no \"weight_map\" object", idx)
                       : fp_err_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        json_object_foreach(wm, key, v) {
            const char *f = json_string_value(v);
            if (!f || strchr(f, '/')) {
                rc = fp_err_set(err, -EBADMSG, "%s: shard name for '%s' must be a file name "
                                "in the model directory", idx, key);
                goto out;
            }
            int seen = 0;
            for (size_t i = 0; i < n && !seen; i++)
                seen = !strcmp(files[i], f);
            if (!seen && !(files[n++] = strdup(f))) {
                rc = fp_err_set(err, -ENOMEM, "out of memory");
                goto out;
            }
        }
        qsort(files, n, sizeof *files, cmp_names);
        for (size_t i = 0; i < n; i++) { /* full paths, in name order */
            char *p = fp_path_join(dir, files[i]);
            if (!p) {
                rc = fp_err_set(err, -ENOMEM, "out of memory");
                goto out;
            }
            free(files[i]);
            files[i] = p;
        }
    } else {
        rc = fp_err_set(err, -ENOENT, "%s: no model.safetensors or model.safetensors.index.json",
                        dir);
        goto out;
    }
    uint64_t total = 0;
    int64_t newest = 0;
    for (size_t i = 0; i < n; i++) {
        struct stat st;
        if (stat(files[i], &st) != 0) {
            rc = fp_err_set(err, -errno, "%s: %s", files[i], strerror(errno));
            goto out;
        }
        total += (uint64_t)st.st_size;
        int64_t mt = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
        newest = mt > newest ? mt : newest;
    }
    if (size)
        *size = total;
    if (mtime_ns)
        *mtime_ns = newest;
    if (sha)
        rc = fp_sha256_files((const char *const *)files, (int)n, sha, err);
out:
    for (size_t i = 0; files && i < n; i++)
        free(files[i]);
    free(files);
    json_decref(j);
    free(single);
    free(idx);
    return rc;
}

/* A model of config c whose base is held in dt from the start (weights uninitialised). */
static int model_alloc(fp_model_t **out, const fp_model_config_t *c, fp_base_dtype_t dt,
                       fp_err_t *err)
{
    if (dt == FP_BASE_F32)
        return fp_model_new(out, c, err);
    *out = NULL;
    int rc = fp_model_config_check(c, err);
    if (rc)
        return rc;
    fp_model_t *m = calloc(1, sizeof *m);
    if (!m || !(m->layers = calloc((size_t)c->n_layers, sizeof *m->layers))) {
        free(m);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    m->cfg = *c;
    if ((rc = lowp_alloc(m, dt, err)) != 0) {
        fp_model_free(m);
        return rc;
    }
    m->n_params = fp_model_config_params(c);
    *out = m;
    return 0;
}

int fp_model_lowp(fp_model_t *m, fp_base_dtype_t dt, fp_err_t *err)
{
    if (dt == FP_BASE_F32 || m->base == dt)
        return 0;
    if (m->base != FP_BASE_F32)
        return fp_err_set(err, -EINVAL, "the base is %s already", fp_base_dtype_name(m->base));
    fp_model_t *n = NULL;
    fp_model_tensor_t *from = NULL, *to = NULL;
    int nf = 0, nt = 0;
    int rc = model_alloc(&n, &m->cfg, dt, err);
    if (rc == 0)
        rc = list_tensors(m, &from, &nf, err);
    if (rc == 0)
        rc = list_tensors(n, &to, &nt, err);
    for (int i = 0; rc == 0 && i < nt; i++) { /* the same tensors, in the same order */
        size_t cnt = (size_t)to[i].shape[0] * (size_t)(to[i].ndim == 2 ? to[i].shape[1] : 1);
        if (to[i].data)
            memcpy(to[i].data, from[i].data, cnt * sizeof(float));
        else
            lowp_store(&to[i].lp, 0, from[i].data, cnt);
    }
    free(from);
    free(to);
    if (rc == 0) { /* n takes m's float weights away with it */
        fp_model_t old = *m;
        *m = *n;
        *n = old;
    }
    fp_model_free(n);
    return rc;
}

/* Reads checkpoint tensor st into the low-precision matrix w a chunk at a time through
 * scratch (FP_LOAD_CHUNK floats), dropping each chunk's pages of the mapping once read, so
 * that neither the tensor as floats nor its file bytes are ever resident whole. A bf16 tensor
 * into a bf16 base is copied as it is. */
enum { FP_LOAD_CHUNK = 256 * FP_NF4_BLOCK };
static int read_lowp(const fp_st_file_t *f, const fp_st_tensor_t *st, const fp_lowp_mat_t *w,
                     float *scratch, fp_err_t *err)
{
    if (!fp_dtype_is_float(st->dtype))
        return fp_err_set(err, -ENOTSUP, "%s: tensor '%s' has dtype %s; only F32, F16, BF16 "
                          "and F64 can be read as weights", fp_st_path(f), st->name,
                          fp_dtype_name(st->dtype));
    size_t n = (size_t)st->nelem, es = fp_dtype_size(st->dtype);
    for (size_t off = 0; off < n; off += FP_LOAD_CHUNK) {
        size_t k = n - off < FP_LOAD_CHUNK ? n - off : FP_LOAD_CHUNK;
        const unsigned char *src = st->data + off * es;
        if (st->dtype == FP_DT_BF16 && w->dt == FP_BASE_BF16) {
            memcpy((uint16_t *)w->h + off, src, 2 * k);
        } else {
            fp_convert_to_f32(scratch, src, st->dtype, k);
            lowp_store(w, off, scratch, k);
        }
        fp_st_release_range(f, src, k * es);
    }
    return 0;
}

/* The checkpoint's tensor for t, in whichever shard holds it, with t's shape; a missing or
 * mis-shaped one is an error naming it. */
static int find_tensor(const char *dir, shard_t *sh, int nsh, const fp_model_tensor_t *t,
                       const fp_st_tensor_t **out, const fp_st_file_t **file, fp_err_t *err)
{
    const fp_st_tensor_t *st = NULL;
    const fp_st_file_t *f = NULL;
    for (int s = 0; s < nsh && !st; s++)
        if ((st = fp_st_find(sh[s].st, t->name)) != NULL)
            f = sh[s].st;
    if (!st)
        return fp_err_set(err, -EBADMSG, "%s: tensor '%s' is missing from the checkpoint", dir,
                          t->name);
    int ok = st->ndim == t->ndim && (int64_t)st->shape[0] == t->shape[0] &&
             (t->ndim == 1 || (int64_t)st->shape[1] == t->shape[1]);
    if (!ok) {
        char got[64], want[64];
        if (st->ndim == 2)
            snprintf(got, sizeof got, "[%llu, %llu]", (unsigned long long)st->shape[0],
                     (unsigned long long)st->shape[1]);
        else if (st->ndim == 1)
            snprintf(got, sizeof got, "[%llu]", (unsigned long long)st->shape[0]);
        else
            snprintf(got, sizeof got, "%d dimensions", st->ndim);
        if (t->ndim == 2)
            snprintf(want, sizeof want, "[%lld, %lld]", (long long)t->shape[0],
                     (long long)t->shape[1]);
        else
            snprintf(want, sizeof want, "[%lld]", (long long)t->shape[0]);
        return fp_err_set(err, -EBADMSG, "%s: tensor '%s' has shape %s, but config.json "
                          "implies %s", fp_st_path(f), t->name, got, want);
    }
    if (st->dtype != FP_DT_F32 && st->dtype != FP_DT_BF16 && st->dtype != FP_DT_F16 &&
        st->dtype != FP_DT_F64)
        return fp_err_set(err, -ENOTSUP, "%s: tensor '%s' is %s (fedpeft reads F32, BF16, F16 "
                          "and F64 weights)", fp_st_path(f), t->name, fp_dtype_name(st->dtype));
    *out = st;
    *file = f;
    return 0;
}

/* A checkpoint tensor the model does not use means the checkpoint is not what config.json
 * says (a bias where none is configured, another architecture's weights): refused by name.
 * Two are known and harmless: rotary_emb.inv_freq buffers (recomputed from the config) and
 * the head of a tied model (transformers ties it to the embedding, as fedpeft does). */
static int refuse_unused(const char *dir, const fp_model_config_t *c, shard_t *sh, int nsh,
                         const fp_model_tensor_t *t, int nt, fp_err_t *err)
{
    for (int s = 0; s < nsh; s++)
        for (size_t k = 0; k < fp_st_count(sh[s].st); k++) {
            const char *name = fp_st_get(sh[s].st, k)->name;
            static const char inv_freq[] = ".rotary_emb.inv_freq";
            size_t len = strlen(name), il = sizeof inv_freq - 1;
            int used = (len >= il && !strcmp(name + len - il, inv_freq)) ||
                       (c->tied && !strcmp(name, "lm_head.weight"));
            for (int i = 0; i < nt && !used; i++)
                used = !strcmp(name, t[i].name);
            if (!used)
                return fp_err_set(err, -EBADMSG, "%s: tensor '%s' is not part of a %s model as "
                                  "config.json describes it (%s)", dir, name,
                                  fp_model_family_names[c->family],
                                  strstr(name, ".bias") ? "a bias it does not configure"
                                                        : "refused rather than ignored");
        }
    return 0;
}

int fp_model_check_dir(const char *dir, fp_model_config_t *c, fp_model_files_t *info,
                       fp_err_t *err)
{
    memset(info, 0, sizeof *info);
    if (!fp_fs_is_dir(dir))
        return fp_err_set(err, -ENOENT, "%s: no such model directory", dir);
    int rc = fp_model_config_load(dir, c, err);
    if (rc)
        return rc;
    /* the names and shapes alone: a model without weights */
    fp_model_t shell = {.cfg = *c};
    shard_t *sh = NULL;
    int nsh = 0, nt = 0;
    json_t *index = NULL;
    fp_model_tensor_t *t = NULL;
    if (!(shell.layers = calloc((size_t)c->n_layers, sizeof *shell.layers)))
        return fp_err_set(err, -ENOMEM, "out of memory");
    if ((rc = open_shards(dir, &sh, &nsh, &index, err)) != 0 ||
        (rc = list_tensors(&shell, &t, &nt, err)) != 0)
        goto out;
    for (int i = 0; i < nt; i++) {
        const fp_st_tensor_t *st;
        const fp_st_file_t *f;
        if ((rc = find_tensor(dir, sh, nsh, &t[i], &st, &f, err)) != 0)
            goto out;
        info->dtypes |= 1u << st->dtype;
        info->bytes += st->end - st->begin;
    }
    info->tensors = nt;
    info->shards = nsh;
    rc = refuse_unused(dir, c, sh, nsh, t, nt, err);
out:
    free(t);
    shards_close(sh, nsh);
    json_decref(index);
    free(shell.layers);
    return rc;
}

int fp_model_load(const char *dir, fp_model_t **out, fp_err_t *err)
{
    return fp_model_load_base(dir, FP_BASE_F32, out, err);
}

int fp_model_load_base(const char *dir, fp_base_dtype_t dt, fp_model_t **out, fp_err_t *err)
{
    *out = NULL;
    fp_model_config_t c;
    if (!fp_fs_is_dir(dir))
        return fp_err_set(err, -ENOENT, "%s: no such model directory", dir);
    int rc = fp_model_config_load(dir, &c, err);
    if (rc)
        return rc;
    fp_model_t *m = NULL;
    shard_t *sh = NULL;
    int nsh = 0;
    json_t *index = NULL;
    fp_model_tensor_t *t = NULL;
    int nt = 0;
    float *scratch = dt == FP_BASE_F32 ? NULL : malloc(FP_LOAD_CHUNK * sizeof *scratch);
    if (dt != FP_BASE_F32 && !scratch)
        return fp_err_set(err, -ENOMEM, "out of memory");
    if ((rc = model_alloc(&m, &c, dt, err)) != 0)
        goto out;
    if ((rc = open_shards(dir, &sh, &nsh, &index, err)) != 0)
        goto out;
    if ((rc = list_tensors(m, &t, &nt, err)) != 0 ||
        (rc = refuse_unused(dir, &c, sh, nsh, t, nt, err)) != 0)
        goto out;
    for (int i = 0; i < nt; i++) {
        const fp_st_tensor_t *st;
        const fp_st_file_t *f;
        if ((rc = find_tensor(dir, sh, nsh, &t[i], &st, &f, err)) != 0)
            goto out;
        rc = t[i].data ? fp_st_read_f32(f, st, t[i].data, err)
                       : read_lowp(f, st, &t[i].lp, scratch, err);
        if (rc)
            goto out;
        fp_st_release(f, st);
    }
out:
    free(scratch);
    free(t);
    shards_close(sh, nsh);
    json_decref(index);
    if (rc) {
        fp_model_free(m);
        return rc;
    }
    *out = m;
    return 0;
}

int fp_model_save(const fp_model_t *m, const char *dir, fp_dtype_t dtype, fp_err_t *err)
{
    if (dtype != FP_DT_F32 && dtype != FP_DT_BF16 && dtype != FP_DT_F16)
        return fp_err_set(err, -EINVAL, "models are saved as F32, BF16 or F16");
    if (m->base != FP_BASE_F32)
        return fp_err_set(err, -ENOTSUP, "a %s base is not saved", fp_base_dtype_name(m->base));
    const fp_model_config_t *c = &m->cfg;
    int rc = fp_fs_mkdirs(dir, 0755, err);
    if (rc)
        return rc;
    fp_model_tensor_t *t = NULL;
    fp_st_entry_t *e = NULL;
    char *cfg = fp_path_join(dir, "config.json"), *wts = fp_path_join(dir, "model.safetensors");
    int nt = 0;
    if (!cfg || !wts) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    if ((rc = fp_model_tensors(m, &t, &nt, err)) != 0)
        goto out;
    e = calloc((size_t)nt, sizeof *e);
    if (!e) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < nt; i++) {
        e[i].name = t[i].name;
        e[i].dtype = dtype;
        e[i].ndim = t[i].ndim;
        e[i].shape[0] = (uint64_t)t[i].shape[0];
        e[i].shape[1] = (uint64_t)t[i].shape[1];
        e[i].f32 = t[i].data;
    }
    if ((rc = fp_st_write(wts, e, (size_t)nt, NULL, err)) != 0)
        goto out;
    rc = fp_model_config_write(c, cfg, dtype == FP_DT_F32 ? "float32" :
                               dtype == FP_DT_BF16 ? "bfloat16" : "float16", err);
out:
    free(e);
    free(t);
    free(cfg);
    free(wts);
    return rc;
}

void fp_lora_module_name(char *buf, size_t n, int layer, fp_target_t t)
{
    snprintf(buf, n, "model.layers.%d.%s.%s", layer, t <= FP_T_O ? "self_attn" : "mlp",
             fp_target_names[t]);
}

int fp_lora_descs(const fp_model_config_t *c, unsigned targets, int rank, double alpha,
                  int rslora, fp_module_desc_t **out, int *n_out, fp_err_t *err)
{
    *out = NULL;
    *n_out = 0;
    if (rank <= 0 || !(alpha != 0) || !targets)
        return fp_err_set(err, -EINVAL, "LoRA needs a positive rank, a non-zero alpha and at "
                          "least one target");
    enum { NAME = 96 };
    int L = c->n_layers, n = 0;
    size_t cap = (size_t)L * FP_T_COUNT;
    /* one allocation: the descriptors, then their names */
    fp_module_desc_t *d = calloc(1, cap * (sizeof *d + NAME) + 1);
    if (!d)
        return fp_err_set(err, -ENOMEM, "out of memory");
    char *names = (char *)(d + cap);
    for (int l = 0; l < L; l++)
        for (int t = 0; t < FP_T_COUNT; t++) {
            if (!(targets & (1u << t)))
                continue;
            char *nm = names + (size_t)n * NAME;
            fp_lora_module_name(nm, NAME, l, (fp_target_t)t);
            int o, i;
            fp_target_shape(c, (fp_target_t)t, &o, &i);
            d[n] = (fp_module_desc_t){nm, o, i, rank, alpha, rslora};
            n++;
        }
    *out = d;
    *n_out = n;
    return 0;
}
