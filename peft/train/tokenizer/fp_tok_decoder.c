/* fp_tok_decoder.c — HF tokenizers' decoders: ByteLevel, Replace, ByteFallback, Fuse, Strip,
 * Metaspace; ids back to text. */
#include "fp_tok_priv.h"

int fp__tok_load_dc(fp_tokenizer_t *t, json_t *j, const char *path)
{
    const char *type = fp__tok_type_of(j);
    if (!strcmp(type, "Sequence")) {
        json_t *arr = json_object_get(j, "decoders");
        size_t i;
        json_t *k;
        json_array_foreach(arr, i, k) {
            if (fp__tok_load_dc(t, k, path))
                return -1;
        }
        return 0;
    }
    dc_t *nd = realloc(t->dec, (size_t)(t->ndec + 1) * sizeof *nd);
    if (!nd)
        return -1;
    t->dec = nd;
    dc_t *d = &t->dec[t->ndec];
    memset(d, 0, sizeof *d);
    if (!strcmp(type, "ByteLevel"))
        d->type = DC_BYTELEVEL;
    else if (!strcmp(type, "ByteFallback"))
        d->type = DC_BYTEFALLBACK;
    else if (!strcmp(type, "Fuse"))
        d->type = DC_FUSE;
    else if (!strcmp(type, "Replace")) {
        const char *pat;
        int is_re;
        json_t *c = json_object_get(j, "content");
        if (fp__tok_read_pattern(json_object_get(j, "pattern"), &pat, &is_re) || is_re ||
            !json_is_string(c))
            return -1;
        d->type = DC_REPLACE;
        d->a = strdup(pat);
        d->alen = strlen(pat);
        d->b = strdup(json_string_value(c));
        d->blen = d->b ? strlen(d->b) : 0;
    } else if (!strcmp(type, "Strip")) {
        const char *c = " ";
        long long s = 0, e = 0;
        fp_json_opt_string(j, "content", &c, path, NULL);
        fp_json_opt_int(j, "start", &s, path, NULL);
        fp_json_opt_int(j, "stop", &e, path, NULL);
        d->type = DC_STRIP;
        d->a = strdup(c);
        d->alen = strlen(c);
        d->start = (int)s;
        d->stop = (int)e;
    } else if (!strcmp(type, "Metaspace")) {
        const char *r = "\xe2\x96\x81", *scheme = "always";
        fp_json_opt_string(j, "replacement", &r, path, NULL);
        fp_json_opt_string(j, "prepend_scheme", &scheme, path, NULL);
        d->type = DC_METASPACE;
        d->a = strdup(r);
        d->alen = strlen(r);
        d->prepend = strcmp(scheme, "never") != 0;
    } else {
        return -1;
    }
    t->ndec++; /* counted even when a copy failed: freed with the others */
    if ((d->type == DC_REPLACE || d->type == DC_STRIP || d->type == DC_METASPACE) && !d->a)
        return -1;
    if (d->type == DC_REPLACE && !d->b)
        return -1;
    return 0;
}

/* ---- decoding ---- */

typedef struct toklist {
    sb_t *v;
    size_t n;
} toklist_t;

int fp_tokenizer_decode(const fp_tokenizer_t *t, const int *ids, size_t n, char **out,
                        fp_err_t *err)
{
    *out = NULL;
    if (!t->dec_ok)
        return fp_err_set(err, -ENOTSUP, "tokenizer: its decoder is not supported");
    toklist_t L = {calloc(n + 1, sizeof(sb_t)), n};
    if (!L.v)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        if (ids[i] < 0 || ids[i] >= t->size || !t->id_str[ids[i]]) {
            rc = fp_err_set(err, -EINVAL, "tokenizer: id %d is not in the vocabulary", ids[i]);
            break;
        }
        rc = fp__tok_sb_add(&L.v[i], t->id_str[ids[i]], t->id_len[ids[i]]);
    }
    for (int d = 0; d < t->ndec && rc == 0; d++) {
        const dc_t *dc = &t->dec[d];
        for (size_t i = 0; i < L.n && rc == 0; i++) {
            sb_t *s = &L.v[i], o = {0};
            switch (dc->type) {
            case DC_BYTELEVEL: /* GPT-2 alphabet → bytes */
                for (size_t k = 0; k < s->n && rc == 0;) {
                    utf8proc_int32_t cp;
                    utf8proc_ssize_t l = utf8proc_iterate((const utf8proc_uint8_t *)s->p + k,
                                                          (utf8proc_ssize_t)(s->n - k), &cp);
                    if (l <= 0)
                        l = 1;
                    if (cp >= 0 && cp < 512 && fp__tok_cp_to_byte[cp] >= 0) {
                        char b = (char)fp__tok_cp_to_byte[cp];
                        rc = fp__tok_sb_add(&o, &b, 1);
                    } else {
                        rc = fp__tok_sb_add(&o, s->p + k, (size_t)l);
                    }
                    k += (size_t)l;
                }
                break;
            case DC_REPLACE:
            case DC_METASPACE: {
                const char *from = dc->a, *to = dc->type == DC_REPLACE ? dc->b : " ";
                size_t fl = dc->alen, tl = dc->type == DC_REPLACE ? dc->blen : 1;
                for (size_t k = 0; k < s->n && rc == 0;) {
                    if (fl && k + fl <= s->n && !memcmp(s->p + k, from, fl)) {
                        rc = fp__tok_sb_add(&o, to, tl);
                        k += fl;
                    } else {
                        rc = fp__tok_sb_add(&o, s->p + k, 1);
                        k++;
                    }
                }
                if (rc == 0 && dc->type == DC_METASPACE && dc->prepend && i == 0 && o.n &&
                    o.p[0] == ' ') {
                    memmove(o.p, o.p + 1, o.n);
                    o.n--;
                }
                break;
            }
            case DC_BYTEFALLBACK: {
                unsigned v;
                if (s->n == 6 && sscanf(s->p, "<0x%2X>", &v) == 1) {
                    char b = (char)v;
                    rc = fp__tok_sb_add(&o, &b, 1);
                } else {
                    rc = fp__tok_sb_add(&o, s->p ? s->p : "", s->n);
                }
                break;
            }
            case DC_FUSE:
                if (i == 0)
                    for (size_t k = 0; k < L.n && rc == 0; k++)
                        rc = fp__tok_sb_add(&o, L.v[k].p ? L.v[k].p : "", L.v[k].n);
                break;
            case DC_STRIP: {
                size_t b = 0, e = s->n;
                for (int c = 0; c < dc->start && b + dc->alen <= e &&
                                !memcmp(s->p + b, dc->a, dc->alen); c++)
                    b += dc->alen;
                for (int c = 0; c < dc->stop && e >= b + dc->alen &&
                                !memcmp(s->p + e - dc->alen, dc->a, dc->alen); c++)
                    e -= dc->alen;
                rc = fp__tok_sb_add(&o, s->p ? s->p + b : "", e - b);
                break;
            }
            }
            if (dc->type == DC_FUSE) {
                if (i == 0) {
                    for (size_t k = 0; k < L.n; k++)
                        free(L.v[k].p);
                    L.v[0] = o;
                    L.n = L.n ? 1 : 0;
                    break;
                }
                continue;
            }
            free(s->p);
            *s = o;
        }
    }
    sb_t all = {0};
    for (size_t i = 0; i < L.n && rc == 0; i++)
        rc = fp__tok_sb_add(&all, L.v[i].p ? L.v[i].p : "", L.v[i].n);
    if (rc == 0 && fp__tok_sb_add(&all, "", 0))
        rc = -ENOMEM;
    for (size_t i = 0; i < L.n; i++)
        free(L.v[i].p);
    free(L.v);
    if (rc) {
        free(all.p);
        return err && err->code ? rc : fp_err_set(err, rc, "out of memory");
    }
    *out = all.p;
    return 0;
}

