#include "fp_hfpeft.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "fp_adapter_priv.h"
#include "fp_adapter_stream.h"
#include "fp_fs.h"
#include "fp_json.h"
#include "fp_safetensors.h"

#define CONFIG_MAX_BYTES (16u << 20)
#define SUFFIX_A ".lora_A.weight"
#define SUFFIX_B ".lora_B.weight"

int fp_hfpeft_key(char *buf, size_t n, const char *module, char which)
{
    int w = snprintf(buf, n, FP_PEFT_PREFIX "%s.lora_%c.weight", module, which);
    return (w < 0 || (size_t)w >= n) ? -ENAMETOOLONG : 0;
}

/* ---- configuration ---- */

typedef struct peft_config {
    json_t *root;
    const char *path;
    long long r;
    double alpha;
    int rslora;
    json_t *rank_pattern;  /* object or NULL */
    json_t *alpha_pattern; /* object or NULL */
    json_t *targets;       /* array, string (regex) or NULL */
    int any_whole;         /* a factors file: any other tensor under the prefix is whole */
    json_t *mts;           /* modules_to_save: array of strings, or NULL */
} peft_config_t;

/* Whether tensor name lies under one of c's modules_to_save ("<prefix><module>."). */
static int under_saved(const peft_config_t *c, const char *name)
{
    size_t pl = strlen(FP_PEFT_PREFIX), i;
    json_t *m;
    if (!c->mts || strncmp(name, FP_PEFT_PREFIX, pl) != 0)
        return 0;
    json_array_foreach(c->mts, i, m) {
        const char *s = json_string_value(m);
        size_t l = strlen(s);
        if (!strncmp(name + pl, s, l) && name[pl + l] == '.')
            return 1;
    }
    return 0;
}

static int config_parse(peft_config_t *c, fp_err_t *err)
{
    json_t *j = c->root;
    const char *p = c->path;
    if (!json_is_object(j))
        return fp_err_set(err, -EBADMSG, "%s: not a JSON object", p);
    const char *s;
    int rc, flag;
    if ((rc = fp_json_opt_string(j, "peft_type", &s, p, err)) < 0)
        return rc;
    if (rc == 1 && strcmp(s, "LORA") != 0)
        return fp_err_set(err, -ENOTSUP, "%s: peft_type is \"%s\"; only LORA adapters are "
                          "supported", p, s);
    if ((rc = fp_json_opt_int(j, "r", &c->r, p, err)) < 0)
        return rc;
    if (rc == 0)
        c->r = 8; /* PEFT's default */
    if (c->r <= 0 || c->r > 1 << 20)
        return fp_err_set(err, -EBADMSG, "%s: r must be a positive integer, not %lld", p, c->r);
    if ((rc = fp_json_opt_number(j, "lora_alpha", &c->alpha, p, err)) < 0)
        return rc;
    if (rc == 0)
        c->alpha = 8; /* PEFT's default */
    if (!isfinite(c->alpha) || c->alpha == 0)
        return fp_err_set(err, -EBADMSG, "%s: lora_alpha must be a non-zero number", p);
    c->rslora = 0;
    if ((rc = fp_json_opt_bool(j, "use_rslora", &c->rslora, p, err)) < 0)
        return rc;
    if ((rc = fp_json_opt_bool(j, "use_dora", &flag, p, err)) < 0)
        return rc;
    if (rc == 1 && flag)
        return fp_err_set(err, -ENOTSUP, "%s: DoRA adapters (use_dora) are not supported", p);
    if ((rc = fp_json_opt_bool(j, "fan_in_fan_out", &flag, p, err)) < 0)
        return rc;
    if (rc == 1 && flag)
        return fp_err_set(err, -ENOTSUP, "%s: fan_in_fan_out adapters (Conv1D layers) are not "
                          "supported", p);
    if ((rc = fp_json_opt_string(j, "bias", &s, p, err)) < 0)
        return rc;
    if (rc == 1 && strcmp(s, "none") != 0)
        return fp_err_set(err, -ENOTSUP, "%s: bias \"%s\" is not supported (only \"none\")", p,
                          s);
    json_t *mts = json_object_get(j, "modules_to_save");
    if (mts && !json_is_null(mts) && !(json_is_array(mts) && json_array_size(mts) == 0)) {
        size_t i;
        json_t *m;
        if (!json_is_array(mts))
            return fp_err_set(err, -EBADMSG, "%s: modules_to_save must be a list", p);
        json_array_foreach(mts, i, m)
            if (!json_is_string(m) || !json_string_length(m))
                return fp_err_set(err, -EBADMSG, "%s: modules_to_save must name modules", p);
        c->mts = mts;
    }
    c->rank_pattern = json_object_get(j, "rank_pattern");
    c->alpha_pattern = json_object_get(j, "alpha_pattern");
    if (c->rank_pattern && json_is_null(c->rank_pattern))
        c->rank_pattern = NULL;
    if (c->alpha_pattern && json_is_null(c->alpha_pattern))
        c->alpha_pattern = NULL;
    if (c->rank_pattern && !json_is_object(c->rank_pattern))
        return fp_err_set(err, -EBADMSG, "%s: rank_pattern must be an object", p);
    if (c->alpha_pattern && !json_is_object(c->alpha_pattern))
        return fp_err_set(err, -EBADMSG, "%s: alpha_pattern must be an object", p);
    c->targets = json_object_get(j, "target_modules");
    if (c->targets && json_is_null(c->targets))
        c->targets = NULL;
    if (c->targets && !json_is_array(c->targets) && !json_is_string(c->targets))
        return fp_err_set(err, -EBADMSG, "%s: target_modules must be a list of names or a "
                          "regular expression", p);
    return 0;
}

/* Python's re.match (anchored at the start) or, with full, re.fullmatch of the expression src
 * against subject, as PEFT calls them: PCRE2 with Unicode semantics, as Python's str patterns
 * have (\d, \w and case folding Unicode-wide; (?:…), (?P<name>…), lookarounds). Returns 1 on
 * a match, 0 on none, -EBADMSG (naming what, the expression and PCRE2's reason) when src is
 * not a valid expression. */
static int py_match(const char *src, const char *subject, int full, fp_err_t *err,
                    const char *cfg, const char *what)
{
    int code;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)src, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_ANCHORED |
                                       (full ? PCRE2_ENDANCHORED : 0),
                                   &code, &off, NULL);
    if (!re) {
        char why[160];
        pcre2_get_error_message(code, (PCRE2_UCHAR *)why, sizeof why);
        return fp_err_set(err, -EBADMSG, "%s: %s \"%s\" is not a valid regular expression (%s "
                          "at offset %zu)", cfg, what, src, why, (size_t)off);
    }
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    int rc = md ? pcre2_match(re, (PCRE2_SPTR)subject, PCRE2_ZERO_TERMINATED, 0, 0, md, NULL)
                : PCRE2_ERROR_NOMEMORY;
    pcre2_match_data_free(md);
    pcre2_code_free(re);
    if (rc >= 0 || rc == PCRE2_ERROR_NOMATCH)
        return rc >= 0;
    if (rc == PCRE2_ERROR_NOMEMORY)
        return fp_err_set(err, -ENOMEM, "out of memory");
    /* a match limit (catastrophic backtracking) or bad UTF-8: neither a match nor a miss */
    char why[160];
    pcre2_get_error_message(rc, (PCRE2_UCHAR *)why, sizeof why);
    return fp_err_set(err, -EBADMSG, "%s: %s \"%s\" could not be matched against '%s' (%s)", cfg,
                      what, src, subject, why);
}

/* PEFT's rule (get_pattern_key, PEFT ≥ 0.15): pattern key K matches module path P when
 * re.match(r"(.*\.)?(K)$", P). (PEFT ≤ 0.14 matched r".*\.K$", then P itself as a key; the
 * keys fedpeft writes match under both.) Returns 1, 0, or -EBADMSG for an invalid K. */
static int pattern_matches(const char *key, const char *path, fp_err_t *err, const char *cfg)
{
    size_t n = strlen(key) + 16;
    char *src = malloc(n);
    if (!src)
        return fp_err_set(err, -ENOMEM, "out of memory");
    snprintf(src, n, "(.*\\.)?(%s)$", key);
    int rc = py_match(src, path, 0, err, cfg, "pattern key");
    free(src);
    return rc;
}

/* The value of the first key of pattern (an object) that matches path; 1 found, 0 not. */
static int pattern_lookup(json_t *pattern, const char *path, double *out, fp_err_t *err,
                          const char *cfg, const char *what)
{
    if (!pattern)
        return 0;
    const char *key;
    json_t *v;
    json_object_foreach(pattern, key, v) {
        int m = pattern_matches(key, path, err, cfg);
        if (m < 0)
            return m;
        if (m) {
            if (!json_is_number(v))
                return fp_err_set(err, -EBADMSG, "%s: %s value for \"%s\" is not a number",
                                  cfg, what, key);
            *out = json_number_value(v);
            return 1;
        }
    }
    return 0;
}

/* PEFT's target check (check_target_module_exists): a list entry T matches when P == T or P
 * ends with "." T; a string is a Python regular expression that must match all of P
 * (re.fullmatch). */
static int target_matches(json_t *targets, const char *path, fp_err_t *err, const char *cfg)
{
    if (!targets)
        return 1;
    if (json_is_string(targets))
        return py_match(json_string_value(targets), path, 1, err, cfg, "target_modules");
    size_t pl = strlen(path);
    size_t i;
    json_t *v;
    json_array_foreach(targets, i, v) {
        if (!json_is_string(v))
            return fp_err_set(err, -EBADMSG, "%s: target_modules entries must be strings", cfg);
        const char *t = json_string_value(v);
        size_t tl = strlen(t);
        if (!strcmp(path, t) || (pl > tl && path[pl - tl - 1] == '.' && !strcmp(path + pl - tl, t)))
            return 1;
    }
    return 0;
}

/* ---- loading ---- */

typedef struct key_ref {
    const char *path; /* module path, NUL-terminated copy */
    size_t plen;
    char which;       /* 'A' or 'B' */
    int idx;          /* tensor index */
} key_ref_t;

static int cmp_key_ref(const void *a, const void *b)
{
    const key_ref_t *x = a, *y = b;
    int c = strcmp(x->path, y->path);
    return c ? c : x->which - y->which;
}

static int ends_with(const char *s, size_t sl, const char *suf)
{
    size_t n = strlen(suf);
    return sl >= n && !memcmp(s + sl - n, suf, n);
}

/* The factors in st_path with the configuration cfg (cfg->r < 0: any rank). */
static int load_weights(const char *st_path, peft_config_t *cfg_in, int flags,
                        fp_adapter_t **out, fp_err_t *err)
{
    int rc = 0;
    peft_config_t cfg = *cfg_in;
    const char *cfg_path = cfg.path;
    fp_st_file_t *st = NULL;
    key_ref_t *keys = NULL;
    char *paths = NULL;
    fp_module_desc_t *descs = NULL;
    unsigned char *owned = NULL;
    const fp_st_tensor_t **ta = NULL, **tb = NULL;
    fp_adapter_t *ad = NULL;
    fp_whole_desc_t *wd = NULL;
    const fp_st_tensor_t **wt = NULL;
    int nw = 0;
    if ((rc = fp_st_open(&st, st_path, err)) != 0)
        goto out;

    /* Every tensor must be a LoRA factor; pair them by module path. */
    size_t nt = fp_st_count(st);
    size_t paths_len = 0;
    for (size_t i = 0; i < nt; i++)
        paths_len += strlen(fp_st_get(st, i)->name) + 1;
    keys = calloc(nt ? nt : 1, sizeof *keys);
    paths = malloc(paths_len ? paths_len : 1);
    wd = calloc(nt ? nt : 1, sizeof *wd);
    wt = calloc(nt ? nt : 1, sizeof *wt);
    if (!keys || !paths || !wd || !wt) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    char *pp = paths;
    size_t plen_prefix = strlen(FP_PEFT_PREFIX);
    size_t nk = 0;
    for (size_t i = 0; i < nt; i++) {
        const char *name = fp_st_get(st, i)->name;
        size_t l = strlen(name);
        char which = ends_with(name, l, SUFFIX_A) ? 'A' : ends_with(name, l, SUFFIX_B) ? 'B' : 0;
        size_t sl = strlen(SUFFIX_A);
        if (under_saved(&cfg, name) || (cfg.any_whole && !which && l > plen_prefix &&
                                        !strncmp(name, FP_PEFT_PREFIX, plen_prefix))) {
            /* a tensor trained in full (modules_to_save) */
            const fp_st_tensor_t *t = fp_st_get(st, i);
            if (t->ndim < 1 || t->ndim > 2 || !fp_dtype_is_float(t->dtype) || !t->nelem ||
                t->shape[0] > INT32_MAX || (t->ndim == 2 && t->shape[1] > INT32_MAX)) {
                rc = fp_err_set(err, -ENOTSUP, "%s: '%s' (saved whole) is not a float matrix "
                                "or vector", st_path, name);
                goto out;
            }
            wd[nw] = (fp_whole_desc_t){name + plen_prefix, (int)t->shape[0],
                                       t->ndim == 2 ? (int)t->shape[1] : 1};
            wt[nw++] = t;
            continue;
        }
        if (!which || strncmp(name, FP_PEFT_PREFIX, plen_prefix) != 0 ||
            l <= plen_prefix + sl) {
            rc = fp_err_set(err, -EBADMSG, "%s: tensor '%s' is not a LoRA factor (expected "
                            FP_PEFT_PREFIX "<module>.lora_A.weight or .lora_B.weight)",
                            st_path, name);
            goto out;
        }
        size_t ml = l - plen_prefix - sl;
        memcpy(pp, name + plen_prefix, ml);
        pp[ml] = '\0';
        keys[nk++] = (key_ref_t){pp, ml, which, (int)i};
        pp += ml + 1;
    }
    nt = nk;
    qsort(keys, nt, sizeof *keys, cmp_key_ref);
    if (nt == 0) {
        rc = fp_err_set(err, -EBADMSG, "%s: holds no tensors", st_path);
        goto out;
    }
    int nm = 0;
    descs = calloc(nt, sizeof *descs);
    owned = calloc(nt, 1);
    ta = calloc(nt, sizeof *ta);
    tb = calloc(nt, sizeof *tb);
    if (!descs || !owned || !ta || !tb) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < nt;) {
        const key_ref_t *k = &keys[i];
        int has_pair = i + 1 < nt && !strcmp(keys[i + 1].path, k->path);
        if (!has_pair || k->which != 'A') {
            rc = fp_err_set(err, -EBADMSG, "%s: module '%s' has lora_%c but no lora_%c",
                            st_path, k->path, k->which, k->which == 'A' ? 'B' : 'A');
            goto out;
        }
        const fp_st_tensor_t *a = fp_st_get(st, (size_t)k->idx);
        const fp_st_tensor_t *b = fp_st_get(st, (size_t)keys[i + 1].idx);
        if (a->ndim != 2 || b->ndim != 2) {
            rc = fp_err_set(err, -EBADMSG, "%s: module '%s': LoRA factors must be 2-D",
                            st_path, k->path);
            goto out;
        }
        if (!fp_dtype_is_float(a->dtype) || !fp_dtype_is_float(b->dtype)) {
            rc = fp_err_set(err, -ENOTSUP, "%s: module '%s': factors must be F32, F16, BF16 "
                            "or F64, not %s/%s", st_path, k->path, fp_dtype_name(a->dtype),
                            fp_dtype_name(b->dtype));
            goto out;
        }
        if (a->shape[0] != b->shape[1]) {
            rc = fp_err_set(err, -EBADMSG, "%s: module '%s': lora_A is %llu×%llu but lora_B "
                            "is %llu×%llu; their ranks differ", st_path, k->path,
                            (unsigned long long)a->shape[0], (unsigned long long)a->shape[1],
                            (unsigned long long)b->shape[0], (unsigned long long)b->shape[1]);
            goto out;
        }
        if (a->shape[0] == 0 || a->shape[1] == 0 || b->shape[0] == 0 ||
            a->shape[0] > INT32_MAX || a->shape[1] > INT32_MAX || b->shape[0] > INT32_MAX) {
            rc = fp_err_set(err, -EBADMSG, "%s: module '%s': bad factor shape", st_path,
                            k->path);
            goto out;
        }
        fp_module_desc_t *d = &descs[nm];
        d->name = k->path;
        d->rank = (int)a->shape[0];
        d->d_in = (int)a->shape[1];
        d->d_out = (int)b->shape[0];
        double v = cfg.r < 0 ? d->rank : (double)cfg.r;
        if ((rc = pattern_lookup(cfg.rank_pattern, k->path, &v, err, cfg_path,
                                 "rank_pattern")) < 0)
            goto out;
        if (v != d->rank) {
            rc = fp_err_set(err, -EBADMSG, "%s: module '%s' has rank %d but " FP_PEFT_CONFIG
                            " says %g%s", st_path, k->path, d->rank, v,
                            rc == 1 ? " (rank_pattern)" : " (r)");
            goto out;
        }
        d->alpha = cfg.alpha;
        if ((rc = pattern_lookup(cfg.alpha_pattern, k->path, &d->alpha, err, cfg_path,
                                 "alpha_pattern")) < 0)
            goto out;
        if (!isfinite(d->alpha) || d->alpha == 0) {
            rc = fp_err_set(err, -EBADMSG, "%s: alpha for module '%s' must be non-zero",
                            cfg_path, k->path);
            goto out;
        }
        d->rslora = cfg.rslora;
        if ((rc = target_matches(cfg.targets, k->path, err, cfg_path)) < 0)
            goto out;
        if (rc == 0) {
            rc = fp_err_set(err, -EBADMSG, "%s: module '%s' is not among target_modules of "
                            FP_PEFT_CONFIG, st_path, k->path);
            goto out;
        }
        rc = 0;
        int map = flags & FP_LOAD_MAP;
        owned[nm] = (unsigned char)((map && fp_st_f32_view(a) ? 0 : FP__OWN_A) |
                                    (map && fp_st_f32_view(b) ? 0 : FP__OWN_B));
        ta[nm] = a;
        tb[nm] = b;
        nm++;
        i += 2;
    }
    if ((rc = fp__adapter_alloc(&ad, descs, nm, owned, err)) != 0 ||
        (nw && (rc = fp_adapter_set_whole(ad, wd, nw, err)) != 0))
        goto out;
    for (int i = 0; i < nw && rc == 0; i++)
        rc = fp_st_read_f32(st, wt[i], ad->whole[fp_adapter_whole_find(ad, wd[i].name)].v, err);
    if (rc)
        goto out;
    size_t k;
    json_t *mj;
    json_array_foreach(cfg.mts, k, mj) { /* every module saved whole is there */
        int found = 0;
        size_t ml = json_string_length(mj);
        for (int i = 0; i < nw && !found; i++)
            found = !strncmp(wd[i].name, json_string_value(mj), ml) && wd[i].name[ml] == '.';
        if (!found) {
            rc = fp_err_set(err, -EBADMSG, "%s: modules_to_save names '%s', which it does not "
                            "hold", st_path, json_string_value(mj));
            goto out;
        }
    }
    /* descs were in name order already, so module i of ad is descs[i]. */
    for (int i = 0; i < nm; i++) {
        fp_lora_module_t *m = &ad->mods[i];
        FP_ASSERT(!strcmp(m->name, descs[i].name));
        if (m->A)
            fp_st_read_f32(st, ta[i], m->A, NULL);
        else {
            m->A = (float *)fp_st_f32_view(ta[i]);
            m->src_a = (int)(ta[i] - fp_st_get(st, 0));
        }
        if (m->B)
            fp_st_read_f32(st, tb[i], m->B, NULL);
        else {
            m->B = (float *)fp_st_f32_view(tb[i]);
            m->src_b = (int)(tb[i] - fp_st_get(st, 0));
        }
    }
    const char *s;
    if (cfg.root && fp_json_opt_string(cfg.root, "base_model_name_or_path", &s, cfg_path,
                                       NULL) == 1 && !(ad->base_model = strdup(s)))
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    if (cfg.root && fp_json_opt_string(cfg.root, "task_type", &s, cfg_path, NULL) == 1 &&
        !(ad->task_type = strdup(s)))
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    if (rc)
        goto out;
    int any_mapped = 0;
    for (int i = 0; i < nm; i++)
        any_mapped |= ad->mods[i].src_a >= 0 || ad->mods[i].src_b >= 0;
    if (any_mapped) {
        ad->st = st;
        st = NULL;
    }
    *out = ad;
    ad = NULL;
out:
    fp_adapter_free(ad);
    fp_st_close(st);
    free(wd);
    free(wt);
    free(ta);
    free(tb);
    free(owned);
    free(descs);
    free(paths);
    free(keys);
    return rc;
}


int fp_hfpeft_load(const char *dir, int flags, fp_adapter_t **out, fp_err_t *err)
{
    *out = NULL;
    int rc = 0;
    char *cfg_path = fp_path_join(dir, FP_PEFT_CONFIG);
    char *st_path = fp_path_join(dir, FP_PEFT_WEIGHTS);
    peft_config_t cfg = {0};
    if (!cfg_path || !st_path) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    if (!fp_fs_is_dir(dir)) {
        rc = fp_err_set(err, fp_fs_exists(dir) ? -ENOTDIR : -ENOENT,
                        "%s: %s", dir, fp_fs_exists(dir) ? "not a directory" :
                        "no such adapter directory");
        goto out;
    }
    if (!fp_fs_exists(cfg_path)) {
        rc = fp_err_set(err, -ENOENT, "%s: no " FP_PEFT_CONFIG " (not a Hugging Face PEFT "
                        "adapter directory)", dir);
        goto out;
    }
    if (!fp_fs_exists(st_path)) {
        char *bin = fp_path_join(dir, "adapter_model.bin");
        int has_bin = bin && fp_fs_exists(bin);
        free(bin);
        rc = fp_err_set(err, -ENOENT, has_bin ?
                        "%s: only adapter_model.bin (PyTorch pickle) found; fedpeft reads "
                        FP_PEFT_WEIGHTS " (save with safe_serialization=True)" :
                        "%s: no " FP_PEFT_WEIGHTS, dir);
        goto out;
    }
    cfg.path = cfg_path;
    if (!(cfg.root = fp_json_load_file(cfg_path, CONFIG_MAX_BYTES, err))) {
        rc = err ? err->code : -EBADMSG;
        goto out;
    }
    if ((rc = config_parse(&cfg, err)) != 0)
        goto out;
    rc = load_weights(st_path, &cfg, flags, out, err);
out:
    json_decref(cfg.root);
    free(cfg_path);
    free(st_path);
    return rc;
}

int fp_hfpeft_load_factors(const char *path, double alpha, int rslora, int flags,
                           fp_adapter_t **out, fp_err_t *err)
{
    *out = NULL;
    if (!isfinite(alpha) || alpha == 0)
        return fp_err_set(err, -EINVAL, "%s: alpha must be finite and non-zero", path);
    peft_config_t cfg = {0};
    cfg.path = path;
    cfg.r = -1; /* each module's rank is its tensors' */
    cfg.alpha = alpha;
    cfg.rslora = rslora;
    cfg.any_whole = 1;
    return load_weights(path, &cfg, flags, out, err);
}

/* ---- saving ---- */

/* The most common value of vals[0..n) (ties: the smallest). */
static double mode_of(const double *vals, int n)
{
    if (n <= 0)
        return 0;
    double best = vals[0];
    int best_count = 0;
    for (int i = 0; i < n; i++) {
        int c = 0;
        for (int j = 0; j < n; j++)
            c += vals[j] == vals[i];
        if (c > best_count || (c == best_count && vals[i] < best)) {
            best = vals[i];
            best_count = c;
        }
    }
    return best;
}

/* The rank_pattern / alpha_pattern key of module i: its path after the first dot, escaped to
 * match literally ("model.layers.0.mlp.down_proj" → "layers\\.0\\.mlp\\.down_proj").
 * PEFT ≤ 0.14 matches a key only after a dot (r".*\.K$", else the module's own path as a
 * key) and ≥ 0.15 after a dot or at the start (r"(.*\.)?(K)$"): such a suffix matches its
 * module under both, and nothing else unless another module ends the same way (refused).
 * *out malloc'd. */
static int pattern_key(const fp_adapter_t *ad, int i, char **out, fp_err_t *err)
{
    const char *name = ad->mods[i].name, *dot = strchr(name, '.');
    const char *sfx = dot ? dot + 1 : name;
    size_t sl = strlen(sfx);
    for (int j = 0; j < ad->n; j++) {
        const char *o = ad->mods[j].name;
        size_t ol = strlen(o);
        if (j != i && (!strcmp(o, sfx) || (ol > sl && o[ol - sl - 1] == '.' &&
                                           !strcmp(o + ol - sl, sfx))))
            return fp_err_set(err, -EINVAL, "modules '%s' and '%s' end alike: no PEFT pattern "
                              "key can give '%s' its own rank", name, o, name);
    }
    char *k = malloc(2 * sl + 1), *p = k;
    if (!k)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (const char *c = sfx; *c; c++) {
        unsigned char u = (unsigned char)*c;
        if (u < 0x80 && !(u == '_' || (u >= '0' && u <= '9') || ((u | 0x20) >= 'a' &&
                                                                  (u | 0x20) <= 'z')))
            *p++ = '\\';
        *p++ = *c;
    }
    *p = '\0';
    *out = k;
    return 0;
}

static int last_component_cmp(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static json_t *build_config(const fp_adapter_t *ad, fp_err_t *err)
{
    int n = ad->n;
    double *ranks = malloc((size_t)n * sizeof *ranks);
    double *alphas = malloc((size_t)n * sizeof *alphas);
    const char **tails = malloc((size_t)n * sizeof *tails);
    json_t *j = NULL;
    if (!ranks || !alphas || !tails) {
        fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        ranks[i] = ad->mods[i].rank;
        alphas[i] = ad->mods[i].alpha;
        const char *dot = strrchr(ad->mods[i].name, '.');
        tails[i] = dot ? dot + 1 : ad->mods[i].name;
        if (ad->mods[i].rslora != ad->mods[0].rslora) {
            fp_err_set(err, -EINVAL, "modules disagree on rsLoRA ('%s' vs '%s'); a PEFT "
                       "adapter has one use_rslora flag", ad->mods[0].name, ad->mods[i].name);
            goto out;
        }
    }
    double r = mode_of(ranks, n), alpha = mode_of(alphas, n);
    qsort(tails, (size_t)n, sizeof *tails, last_component_cmp);
    j = json_object();
    json_t *rp = json_object(), *ap = json_object(), *tm = json_array();
    for (int i = 0; i < n; i++) {
        if (ranks[i] != r || alphas[i] != alpha) {
            char *key = NULL;
            if (pattern_key(ad, i, &key, err) != 0) {
                json_decref(rp);
                json_decref(ap);
                json_decref(tm);
                json_decref(j);
                j = NULL;
                goto out;
            }
            if (ranks[i] != r)
                json_object_set_new(rp, key, json_integer((json_int_t)ranks[i]));
            if (alphas[i] != alpha)
                json_object_set_new(ap, key, json_real(alphas[i]));
            free(key);
        }
        if (i == 0 || strcmp(tails[i], tails[i - 1]) != 0)
            json_array_append_new(tm, json_string(tails[i]));
    }
    json_object_set_new(j, "peft_type", json_string("LORA"));
    /* a decoder's adapter is a causal LM's; one with a head trained in full (a classifier's)
     * has none, as PEFT's image-classification recipes leave it */
    json_object_set_new(j, "task_type", ad->task_type ? json_string(ad->task_type)
                                        : ad->nwhole ? json_null() : json_string("CAUSAL_LM"));
    json_object_set_new(j, "base_model_name_or_path",
                        ad->base_model ? json_string(ad->base_model) : json_null());
    json_object_set_new(j, "r", json_integer((json_int_t)r));
    if (alpha == floor(alpha) && fabs(alpha) < 1e15)
        json_object_set_new(j, "lora_alpha", json_integer((json_int_t)alpha));
    else
        json_object_set_new(j, "lora_alpha", json_real(alpha));
    json_object_set_new(j, "use_rslora", json_boolean(ad->n > 0 && ad->mods[0].rslora));
    json_object_set_new(j, "target_modules", tm);
    json_object_set_new(j, "rank_pattern", rp);
    json_object_set_new(j, "alpha_pattern", ap);
    json_object_set_new(j, "lora_dropout", json_real(0.0));
    json_object_set_new(j, "bias", json_string("none"));
    json_object_set_new(j, "fan_in_fan_out", json_false());
    json_object_set_new(j, "inference_mode", json_true());
    json_object_set_new(j, "init_lora_weights", json_true());
    json_object_set_new(j, "modules_to_save", json_null());
    json_object_set_new(j, "layers_to_transform", json_null());
    json_object_set_new(j, "layers_pattern", json_null());
    json_object_set_new(j, "use_dora", json_false());
    json_object_set_new(j, "revision", json_null());
out:
    free(ranks);
    free(alphas);
    free(tails);
    return j;
}

/* The factors (the same names, shapes and order as the adapter's tensor stream, the tensors
 * trained in full after them) into one safetensors file; its SHA-256 into sha if not NULL.
 * peft: a PEFT directory's file, where a bias is one-dimensional as PyTorch has it (the
 * stream's files keep every tensor two-dimensional). */
static int write_tensors(const fp_adapter_t *ad, int peft, const char *st_path, uint8_t sha[32],
                         fp_err_t *err)
{
    fp_stream_tensor_t *t;
    int n;
    uint64_t total;
    int rc = fp_adapter_stream_layout(ad, &t, &n, &total, err);
    if (rc)
        return rc;
    fp_st_entry_t *e = calloc((size_t)n + 1, sizeof *e);
    if (!e) {
        free(t);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    for (int i = 0; i < n; i++) {
        e[i] = (fp_st_entry_t){.name = t[i].name, .dtype = FP_DT_F32, .ndim = 2,
                               .shape = {t[i].rows, t[i].cols}};
        if (i < 2 * ad->n) {
            e[i].f32 = i % 2 ? ad->mods[i / 2].B : ad->mods[i / 2].A;
            continue;
        }
        const fp_whole_t *w = &ad->whole[i - 2 * ad->n];
        size_t l = strlen(w->name);
        e[i].f32 = w->v;
        if (peft && w->cols == 1 && l > 5 && !strcmp(w->name + l - 5, ".bias"))
            e[i].ndim = 1;
    }
    rc = fp_st_write_sha(st_path, e, (size_t)n, NULL, sha, err);
    free(e);
    free(t);
    return rc;
}

int fp_hfpeft_write_factors(const fp_adapter_t *ad, const char *st_path, uint8_t sha[32],
                            fp_err_t *err)
{
    return write_tensors(ad, 0, st_path, sha, err);
}

static int write_files(const fp_adapter_t *ad, const char *dir, json_t *cfg, fp_err_t *err)
{
    int rc;
    char *st_path = fp_path_join(dir, FP_PEFT_WEIGHTS);
    char *cfg_path = fp_path_join(dir, FP_PEFT_CONFIG);
    if (!st_path || !cfg_path)
        rc = fp_err_set(err, -ENOMEM, "out of memory");
    else if ((rc = write_tensors(ad, 1, st_path, NULL, err)) == 0)
        rc = fp_json_write_file(cfg_path, cfg, err);
    free(cfg_path);
    free(st_path);
    return rc;
}

/* modules_to_save: each whole tensor's module (its name less the last component), once. */
static int set_modules_to_save(json_t *cfg, const fp_adapter_t *ad, fp_err_t *err)
{
    json_t *a = json_array();
    for (int i = 0; a && i < ad->nwhole; i++) {
        const char *name = ad->whole[i].name, *dot = strrchr(name, '.');
        if (!dot || dot == name) {
            json_decref(a);
            return fp_err_set(err, -EINVAL, "'%s': a tensor trained in full is named "
                              "<module>.<parameter>", name);
        }
        json_t *m = json_stringn(name, (size_t)(dot - name));
        size_t k;
        json_t *x;
        int seen = 0;
        json_array_foreach(a, k, x) seen |= json_equal(x, m);
        if (seen)
            json_decref(m);
        else
            json_array_append_new(a, m);
    }
    if (!a)
        return fp_err_set(err, -ENOMEM, "out of memory");
    json_object_set_new(cfg, "modules_to_save", a);
    return 0;
}

int fp_hfpeft_save(const fp_adapter_t *ad, const char *dir, fp_err_t *err)
{
    if (ad->n == 0)
        return fp_err_set(err, -EINVAL, "%s: refusing to write an adapter with no modules", dir);
    json_t *cfg = build_config(ad, err);
    if (!cfg)
        return err && err->code ? err->code : -ENOMEM;
    if (ad->nwhole && set_modules_to_save(cfg, ad, err) != 0) {
        json_decref(cfg);
        return err && err->code ? err->code : -EINVAL;
    }
    int rc = 0;
    char *tmp = NULL;
    if (fp_fs_is_dir(dir)) {
        rc = write_files(ad, dir, cfg, err);
        goto out;
    }
    if (fp_fs_exists(dir)) {
        rc = fp_err_set(err, -ENOTDIR, "%s: exists and is not a directory", dir);
        goto out;
    }
    /* New directory: build it aside, then rename it into place whole. */
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir) {
        char *parent = strndup(dir, (size_t)(slash - dir));
        rc = parent ? fp_fs_mkdirs(parent, 0755, err) : fp_err_set(err, -ENOMEM, "oom");
        free(parent);
        if (rc)
            goto out;
    }
    size_t n = strlen(dir) + 16;
    tmp = malloc(n);
    if (!tmp) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    snprintf(tmp, n, "%s.tmp.XXXXXX", dir);
    if (!mkdtemp(tmp)) {
        rc = fp_err_set(err, -errno, "%s: cannot create a directory next to it: %s", dir,
                        strerror(errno));
        free(tmp);
        tmp = NULL;
        goto out;
    }
    chmod(tmp, 0755);
    if ((rc = write_files(ad, tmp, cfg, err)) != 0)
        goto out;
    if (rename(tmp, dir) != 0) {
        rc = fp_err_set(err, -errno, "%s: rename: %s", dir, strerror(errno));
        goto out;
    }
    free(tmp);
    tmp = NULL;
    char *parent = slash ? (slash == dir ? strdup("/") : strndup(dir, (size_t)(slash - dir)))
                         : strdup(".");
    rc = parent ? fp_fs_sync_dir(parent, err) : fp_err_set(err, -ENOMEM, "out of memory");
    free(parent);
out:
    if (tmp) {
        fp_fs_remove_tree(tmp, NULL);
        free(tmp);
    }
    json_decref(cfg);
    return rc;
}
