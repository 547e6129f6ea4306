/* fp_tok_util.c — the tokenizer's helpers: growable buffers and pieces of text, GPT-2's byte
 * alphabet, UTF-8, regexes (PCRE2 with Unicode properties) and the JSON fields of patterns. */
#include "fp_tok_priv.h"

int fp__tok_sb_reserve(sb_t *b, size_t more)
{
    if (b->n + more <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap * 2 : 256;
    while (cap < b->n + more)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        return -ENOMEM;
    b->p = p;
    b->cap = cap;
    return 0;
}

int fp__tok_sb_add(sb_t *b, const void *s, size_t n)
{
    if (fp__tok_sb_reserve(b, n + 1))
        return -ENOMEM;
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
    return 0;
}

int fp__tok_ids_push(int **ids, size_t *n, size_t *cap, int id)
{
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 1024;
        int *p = realloc(*ids, c * sizeof *p);
        if (!p)
            return -ENOMEM;
        *ids = p;
        *cap = c;
    }
    (*ids)[(*n)++] = id;
    return 0;
}

/* Pieces of text produced by pre-tokenization: slices of a shared buffer. */

int fp__tok_pieces_add(pieces_t *ps, const char *s, size_t len, int first)
{
    if (len == 0)
        return 0;
    if (ps->n == ps->cap) {
        size_t c = ps->cap ? ps->cap * 2 : 64;
        piece_t *v = realloc(ps->v, c * sizeof *v);
        if (!v)
            return -ENOMEM;
        ps->v = v;
        ps->cap = c;
    }
    ps->v[ps->n] = (piece_t){ps->text.n, len, first};
    ps->n++;
    return fp__tok_sb_add(&ps->text, s, len);
}

void fp__tok_pieces_reset(pieces_t *ps)
{
    ps->n = 0;
    ps->text.n = 0;
}

void fp__tok_pieces_free(pieces_t *ps)
{
    free(ps->v);
    free(ps->text.p);
}

/* ---- GPT-2 byte ↔ unicode alphabet ---- */

int fp__tok_byte_to_cp[256];
int fp__tok_cp_to_byte[512];

void fp__tok_init_byte_alphabet(void)
{
    if (fp__tok_byte_to_cp['!'])
        return;
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
        fp__tok_byte_to_cp[b] = printable ? b : 256 + n++;
    }
    for (int i = 0; i < 512; i++)
        fp__tok_cp_to_byte[i] = -1;
    for (int b = 0; b < 256; b++)
        fp__tok_cp_to_byte[fp__tok_byte_to_cp[b]] = b;
}

/* UTF-8 encoding of a code point into out (≤ 4 bytes); returns its length. */
int fp__tok_put_utf8(int cp, char *out)
{
    return (int)utf8proc_encode_char(cp, (utf8proc_uint8_t *)out);
}

/* Length of the UTF-8 character at s (valid input assumed), 1 for a stray byte. */
int fp__tok_utf8_len(const unsigned char *s, size_t left)
{
    utf8proc_int32_t cp;
    utf8proc_ssize_t l = utf8proc_iterate(s, (utf8proc_ssize_t)left, &cp);
    return l > 0 ? (int)l : 1;
}

/* ---- regex helpers ---- */

pcre2_code *fp__tok_compile_re(const char *pat, size_t len, int literal, fp_err_t *err,
                              const char *what)
{
    int code;
    PCRE2_SIZE off;
    /* PCRE2 allows UCP with patterns only (a literal has no character classes anyway) */
    uint32_t opts = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, len, opts, &code, &off, NULL);
    if (!re) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(code, msg, sizeof msg);
        fp_err_set(err, -EBADMSG, "%s: pattern \"%.*s\" is not supported: %s at %zu", what,
                   (int)len, pat, (const char *)msg, (size_t)off);
        return NULL;
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* best effort */
    return re;
}

/* Calls fn for each match [s, e) of re in text, left to right (empty matches skipped). */

int fp__tok_for_each_match(const pcre2_code *re, const char *text, size_t len, match_fn fn,
                          void *ctx)
{
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    if (!md)
        return -ENOMEM;
    size_t pos = 0;
    int rc = 0;
    while (pos <= len) {
        int r = pcre2_match(re, (PCRE2_SPTR)text, len, pos, PCRE2_NO_UTF_CHECK, md, NULL);
        if (r == PCRE2_ERROR_NOMATCH)
            break;
        if (r < 0) {
            rc = -EIO;
            break;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t s = ov[0], e = ov[1];
        if (e == s) { /* empty match: step over one character */
            if (s >= len)
                break;
            pos = s + (size_t)fp__tok_utf8_len((const unsigned char *)text + s, len - s);
            continue;
        }
        if ((rc = fn(ctx, s, e)) != 0)
            break;
        pos = e;
    }
    pcre2_match_data_free(md);
    return rc;
}

/* ---- arena ---- */

/* A NUL-terminated copy of s[0:n] (the tokenizer frees it). */
const char *fp__tok_dupmem(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (!p)
        return NULL;
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

const char *fp__tok_type_of(json_t *j)
{
    json_t *t = json_object_get(j, "type");
    return json_is_string(t) ? json_string_value(t) : "";
}

/* A {"String": s} or {"Regex": r} pattern object. */
int fp__tok_read_pattern(json_t *pat, const char **s, int *is_regex)
{
    json_t *v;
    if ((v = json_object_get(pat, "String")) && json_is_string(v)) {
        *s = json_string_value(v);
        *is_regex = 0;
        return 0;
    }
    if ((v = json_object_get(pat, "Regex")) && json_is_string(v)) {
        *s = json_string_value(v);
        *is_regex = 1;
        return 0;
    }
    return -EBADMSG;
}

