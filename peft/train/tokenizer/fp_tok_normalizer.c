/* fp_tok_normalizer.c — HF tokenizers' normalizers: Sequence, Prepend, Replace (literal or
 * regex), NFC/NFD/NFKC/NFKD (utf8proc), Lowercase, Strip. */
#include "fp_tok_priv.h"

void fp__tok_nz_free(nz_t *z)
{
    if (!z)
        return;
    for (int i = 0; i < z->nkids; i++) {
        nz_t *k = &z->kids[i];
        for (int j = 0; j < k->nkids; j++)
            fp__tok_nz_free(&k->kids[j]);
        free(k->kids);
        free(k->a);
        free(k->b);
        if (k->re)
            pcre2_code_free(k->re);
    }
    free(z->kids);
    free(z->a);
    free(z->b);
    if (z->re)
        pcre2_code_free(z->re);
}

int fp__tok_load_nz(json_t *j, nz_t *z, const char *path, fp_err_t *err)
{
    memset(z, 0, sizeof *z);
    const char *type = fp__tok_type_of(j);
    if (!strcmp(type, "Sequence")) {
        json_t *arr = json_object_get(j, "normalizers");
        if (!json_is_array(arr))
            return fp_err_set(err, -EBADMSG, "%s: Sequence normalizer without a list", path);
        z->type = NZ_SEQ;
        z->nkids = (int)json_array_size(arr);
        z->kids = calloc((size_t)z->nkids + 1, sizeof *z->kids);
        if (!z->kids)
            return fp_err_set(err, -ENOMEM, "out of memory");
        for (int i = 0; i < z->nkids; i++) {
            int rc = fp__tok_load_nz(json_array_get(arr, (size_t)i), &z->kids[i], path, err);
            if (rc)
                return rc;
        }
        return 0;
    }
    if (!strcmp(type, "Prepend")) {
        json_t *p = json_object_get(j, "prepend");
        if (!json_is_string(p))
            return fp_err_set(err, -EBADMSG, "%s: Prepend normalizer without \"prepend\"", path);
        z->type = NZ_PREPEND;
        if (!(z->a = strdup(json_string_value(p))))
            return fp_err_set(err, -ENOMEM, "out of memory");
        z->alen = strlen(z->a);
        return 0;
    }
    if (!strcmp(type, "Replace")) {
        const char *pat;
        int is_re;
        json_t *content = json_object_get(j, "content");
        if (fp__tok_read_pattern(json_object_get(j, "pattern"), &pat, &is_re) || !json_is_string(content))
            return fp_err_set(err, -EBADMSG, "%s: malformed Replace normalizer", path);
        z->type = NZ_REPLACE;
        z->a = strdup(pat);
        z->alen = strlen(pat);
        z->b = strdup(json_string_value(content));
        if (!z->a || !z->b)
            return fp_err_set(err, -ENOMEM, "out of memory");
        z->blen = strlen(z->b);
        if (is_re && !(z->re = fp__tok_compile_re(pat, strlen(pat), 0, err, path)))
            return -EBADMSG;
        return 0;
    }
    static const struct {
        const char *name;
        int form;
    } forms[] = {
        {"NFC", UTF8PROC_STABLE | UTF8PROC_COMPOSE},
        {"NFD", UTF8PROC_STABLE | UTF8PROC_DECOMPOSE},
        {"NFKC", UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT},
        {"NFKD", UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT},
    };
    for (size_t i = 0; i < sizeof forms / sizeof forms[0]; i++) {
        if (!strcmp(type, forms[i].name)) {
            z->type = NZ_NORMAL;
            z->form = forms[i].form;
            return 0;
        }
    }
    if (!strcmp(type, "Lowercase")) {
        z->type = NZ_LOWER;
        return 0;
    }
    if (!strcmp(type, "Strip")) {
        z->type = NZ_STRIP;
        fp_json_opt_bool(j, "left", &z->left, path, NULL);
        fp_json_opt_bool(j, "right", &z->right, path, NULL);
        return 0;
    }
    return fp_err_set(err, -ENOTSUP, "%s: normalizer \"%s\" is not supported", path, type);
}

/* ---- normalization ---- */

static int is_space_cp(utf8proc_int32_t cp)
{
    return cp == ' ' || (cp >= 9 && cp <= 13) || utf8proc_category(cp) == UTF8PROC_CATEGORY_ZS ||
           cp == 0x85 || cp == 0x2028 || cp == 0x2029;
}

int fp__tok_normalize(const nz_t *z, sb_t *s)
{
    switch (z->type) {
    case NZ_SEQ:
        for (int i = 0; i < z->nkids; i++)
            if (fp__tok_normalize(&z->kids[i], s))
                return -ENOMEM;
        return 0;
    case NZ_PREPEND: {
        if (s->n == 0)
            return 0;
        if (fp__tok_sb_reserve(s, z->alen + 1))
            return -ENOMEM;
        memmove(s->p + z->alen, s->p, s->n + 1);
        memcpy(s->p, z->a, z->alen);
        s->n += z->alen;
        return 0;
    }
    case NZ_REPLACE: {
        sb_t o = {0};
        if (z->re) {
            PCRE2_SIZE outlen = s->n * 2 + 64;
            for (;;) {
                if (fp__tok_sb_reserve(&o, outlen + 1))
                    return -ENOMEM;
                outlen = o.cap;
                int r = pcre2_substitute(z->re, (PCRE2_SPTR)s->p, s->n, 0,
                                         PCRE2_SUBSTITUTE_GLOBAL | PCRE2_SUBSTITUTE_OVERFLOW_LENGTH |
                                             PCRE2_NO_UTF_CHECK | PCRE2_SUBSTITUTE_LITERAL,
                                         NULL, NULL, (PCRE2_SPTR)z->b, z->blen,
                                         (PCRE2_UCHAR *)o.p, &outlen);
                if (r >= 0) {
                    o.n = outlen;
                    break;
                }
                if (r != PCRE2_ERROR_NOMEMORY) {
                    free(o.p);
                    return -EIO;
                }
            }
        } else {
            size_t i = 0;
            while (i < s->n) {
                if (z->alen && i + z->alen <= s->n && !memcmp(s->p + i, z->a, z->alen)) {
                    if (fp__tok_sb_add(&o, z->b, z->blen))
                        return -ENOMEM;
                    i += z->alen;
                } else {
                    if (fp__tok_sb_add(&o, s->p + i, 1))
                        return -ENOMEM;
                    i++;
                }
            }
        }
        free(s->p);
        *s = o;
        if (!s->p && fp__tok_sb_add(s, "", 0))
            return -ENOMEM;
        return 0;
    }
    case NZ_NORMAL:
    case NZ_LOWER: {
        if (s->n == 0)
            return 0;
        utf8proc_uint8_t *outp = NULL;
        utf8proc_ssize_t r;
        if (z->type == NZ_NORMAL) {
            r = utf8proc_map((const utf8proc_uint8_t *)s->p, (utf8proc_ssize_t)s->n, &outp,
                             (utf8proc_option_t)z->form);
            if (r < 0)
                return -EIO;
        } else {
            sb_t o = {0};
            for (size_t i = 0; i < s->n;) {
                utf8proc_int32_t cp;
                utf8proc_ssize_t l = utf8proc_iterate((const utf8proc_uint8_t *)s->p + i,
                                                      (utf8proc_ssize_t)(s->n - i), &cp);
                if (l <= 0)
                    return -EIO;
                char enc[4];
                int el = fp__tok_put_utf8(utf8proc_tolower(cp), enc);
                if (fp__tok_sb_add(&o, enc, (size_t)el))
                    return -ENOMEM;
                i += (size_t)l;
            }
            free(s->p);
            *s = o;
            return 0;
        }
        s->n = 0;
        int rc = fp__tok_sb_add(s, outp, (size_t)r);
        free(outp);
        return rc;
    }
    case NZ_STRIP: {
        size_t b = 0, e = s->n;
        while (z->left && b < e) {
            utf8proc_int32_t cp;
            utf8proc_ssize_t l = utf8proc_iterate((const utf8proc_uint8_t *)s->p + b,
                                                  (utf8proc_ssize_t)(e - b), &cp);
            if (l <= 0 || !is_space_cp(cp))
                break;
            b += (size_t)l;
        }
        while (z->right && e > b) {
            size_t st = e - 1;
            while (st > b && ((unsigned char)s->p[st] & 0xc0) == 0x80)
                st--;
            utf8proc_int32_t cp;
            if (utf8proc_iterate((const utf8proc_uint8_t *)s->p + st,
                                 (utf8proc_ssize_t)(e - st), &cp) <= 0 ||
                !is_space_cp(cp))
                break;
            e = st;
        }
        memmove(s->p, s->p + b, e - b);
        s->n = e - b;
        s->p[s->n] = '\0';
        return 0;
    }
    }
    return 0;
}

