#include "fp_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <jansson.h>
#include <pcre2.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "fp_fs.h"
#include "fp_json.h"

#define MAX_JSON_BYTES (512u << 20)

/* GPT-2's pre-tokenization pattern, as HF's ByteLevel pre-tokenizer uses it. */
static const char gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/* ---- small growable buffers ---- */

typedef struct sb {
    char *p;
    size_t n, cap;
} sb_t;

static int sb_reserve(sb_t *b, size_t more)
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

static int sb_add(sb_t *b, const void *s, size_t n)
{
    if (sb_reserve(b, n + 1))
        return -ENOMEM;
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
    return 0;
}

static int ids_push(int **ids, size_t *n, size_t *cap, int id)
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
typedef struct piece {
    size_t off, len;
    int first; /* begins at offset 0 of the original input */
} piece_t;

typedef struct pieces {
    sb_t text;
    piece_t *v;
    size_t n, cap;
} pieces_t;

static int pieces_add(pieces_t *ps, const char *s, size_t len, int first)
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
    return sb_add(&ps->text, s, len);
}

static void pieces_reset(pieces_t *ps)
{
    ps->n = 0;
    ps->text.n = 0;
}

static void pieces_free(pieces_t *ps)
{
    free(ps->v);
    free(ps->text.p);
}

/* ---- GPT-2 byte ↔ unicode alphabet ---- */

static int byte_to_cp[256];
static int cp_to_byte[512];

static void init_byte_alphabet(void)
{
    if (byte_to_cp['!'])
        return;
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
        byte_to_cp[b] = printable ? b : 256 + n++;
    }
    for (int i = 0; i < 512; i++)
        cp_to_byte[i] = -1;
    for (int b = 0; b < 256; b++)
        cp_to_byte[byte_to_cp[b]] = b;
}

/* UTF-8 encoding of a code point into out (≤ 4 bytes); returns its length. */
static int put_utf8(int cp, char *out)
{
    return (int)utf8proc_encode_char(cp, (utf8proc_uint8_t *)out);
}

/* Length of the UTF-8 character at s (valid input assumed), 1 for a stray byte. */
static int utf8_len(const unsigned char *s, size_t left)
{
    utf8proc_int32_t cp;
    utf8proc_ssize_t l = utf8proc_iterate(s, (utf8proc_ssize_t)left, &cp);
    return l > 0 ? (int)l : 1;
}

/* ---- components ---- */

typedef enum { NZ_SEQ, NZ_PREPEND, NZ_REPLACE, NZ_NORMAL, NZ_LOWER, NZ_STRIP } nz_type_t;

typedef struct nz {
    nz_type_t type;
    struct nz *kids;
    int nkids;
    char *a, *b;       /* Prepend: a; Replace: a → b (literal) */
    size_t alen, blen;
    pcre2_code *re;    /* Replace with a Regex pattern */
    int form;          /* NZ_NORMAL: utf8proc options */
    int left, right;   /* Strip */
} nz_t;

typedef enum { PT_SEQ, PT_BYTELEVEL, PT_METASPACE, PT_SPLIT, PT_DIGITS, PT_WHITESPACE,
               PT_WSSPLIT } pt_type_t;

enum { B_REMOVED, B_ISOLATED, B_MERGED_PREV, B_MERGED_NEXT, B_CONTIGUOUS };

typedef struct pt {
    pt_type_t type;
    struct pt *kids;
    int nkids;
    int add_prefix_space, use_regex; /* ByteLevel */
    char repl[8];                    /* Metaspace replacement (UTF-8) */
    size_t repl_len;
    int prepend;                     /* Metaspace: 0 never, 1 first, 2 always */
    int split;                       /* Metaspace */
    pcre2_code *re;                  /* Split, ByteLevel (GPT-2), Whitespace, Digits */
    int behavior, invert;            /* Split */
} pt_t;

typedef struct vocab_entry {
    const char *s;
    uint32_t len;
    int id;
} vocab_entry_t;

typedef struct merge {
    int a, b, rank, id;
} merge_t;

typedef struct added {
    const char *s;
    size_t len;
    int id, special, lstrip, rstrip, single_word;
} added_t;

typedef enum { DC_BYTELEVEL, DC_REPLACE, DC_BYTEFALLBACK, DC_FUSE, DC_STRIP, DC_METASPACE }
    dc_type_t;

typedef struct dc {
    dc_type_t type;
    char *a, *b;
    size_t alen, blen;
    int start, stop;
    int prepend;
} dc_t;

struct fp_tokenizer {
    vocab_entry_t *vocab;   /* sorted by bytes */
    int nvocab;
    const char **id_str;    /* id → token text (vocab or added), or NULL */
    uint32_t *id_len;
    int size;               /* id space */
    merge_t *merges;        /* sorted by (a, b) */
    int nmerges;
    added_t *added;         /* sorted by length, longest first */
    int nadded;
    unsigned char added_first[256]; /* 1 for bytes that start an added token */
    nz_t *norm;
    pt_t *pre;
    dc_t *dec;
    int ndec, dec_ok;
    int byte_fallback, fuse_unk, ignore_merges, unk_id;
    int byte_ids[256];      /* <0xNN> token ids, or -1 */
};

/* ---- regex helpers ---- */

static pcre2_code *compile_re(const char *pat, size_t len, int literal, fp_err_t *err,
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
typedef int (*match_fn)(void *ctx, size_t s, size_t e);

static int for_each_match(const pcre2_code *re, const char *text, size_t len, match_fn fn,
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
            pos = s + (size_t)utf8_len((const unsigned char *)text + s, len - s);
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
static const char *dupmem(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (!p)
        return NULL;
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

/* ---- loading ---- */

static void nz_free(nz_t *z)
{
    if (!z)
        return;
    for (int i = 0; i < z->nkids; i++) {
        nz_t *k = &z->kids[i];
        for (int j = 0; j < k->nkids; j++)
            nz_free(&k->kids[j]);
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

static void pt_free(pt_t *p)
{
    if (!p)
        return;
    for (int i = 0; i < p->nkids; i++)
        pt_free(&p->kids[i]);
    free(p->kids);
    if (p->re)
        pcre2_code_free(p->re);
}

static const char *type_of(json_t *j)
{
    json_t *t = json_object_get(j, "type");
    return json_is_string(t) ? json_string_value(t) : "";
}

/* A {"String": s} or {"Regex": r} pattern object. */
static int read_pattern(json_t *pat, const char **s, int *is_regex)
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

static int load_nz(json_t *j, nz_t *z, const char *path, fp_err_t *err)
{
    memset(z, 0, sizeof *z);
    const char *type = type_of(j);
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
            int rc = load_nz(json_array_get(arr, (size_t)i), &z->kids[i], path, err);
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
        if (read_pattern(json_object_get(j, "pattern"), &pat, &is_re) || !json_is_string(content))
            return fp_err_set(err, -EBADMSG, "%s: malformed Replace normalizer", path);
        z->type = NZ_REPLACE;
        z->a = strdup(pat);
        z->alen = strlen(pat);
        z->b = strdup(json_string_value(content));
        if (!z->a || !z->b)
            return fp_err_set(err, -ENOMEM, "out of memory");
        z->blen = strlen(z->b);
        if (is_re && !(z->re = compile_re(pat, strlen(pat), 0, err, path)))
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

static int load_pt(json_t *j, pt_t *p, const char *path, fp_err_t *err)
{
    memset(p, 0, sizeof *p);
    const char *type = type_of(j);
    if (!strcmp(type, "Sequence")) {
        json_t *arr = json_object_get(j, "pretokenizers");
        if (!json_is_array(arr))
            return fp_err_set(err, -EBADMSG, "%s: Sequence pre-tokenizer without a list", path);
        p->type = PT_SEQ;
        p->nkids = (int)json_array_size(arr);
        p->kids = calloc((size_t)p->nkids + 1, sizeof *p->kids);
        if (!p->kids)
            return fp_err_set(err, -ENOMEM, "out of memory");
        for (int i = 0; i < p->nkids; i++) {
            int rc = load_pt(json_array_get(arr, (size_t)i), &p->kids[i], path, err);
            if (rc)
                return rc;
        }
        return 0;
    }
    if (!strcmp(type, "ByteLevel")) {
        p->type = PT_BYTELEVEL;
        p->use_regex = 1;
        fp_json_opt_bool(j, "add_prefix_space", &p->add_prefix_space, path, NULL);
        fp_json_opt_bool(j, "use_regex", &p->use_regex, path, NULL);
        if (p->use_regex && !(p->re = compile_re(gpt2_pattern, strlen(gpt2_pattern), 0, err, path)))
            return -EBADMSG;
        return 0;
    }
    if (!strcmp(type, "Metaspace")) {
        p->type = PT_METASPACE;
        const char *r = "\xe2\x96\x81"; /* ▁ */
        fp_json_opt_string(j, "replacement", &r, path, NULL);
        p->repl_len = strlen(r);
        if (p->repl_len == 0 || p->repl_len >= sizeof p->repl)
            return fp_err_set(err, -EBADMSG, "%s: bad Metaspace replacement", path);
        memcpy(p->repl, r, p->repl_len);
        const char *scheme = NULL;
        int aps = 1;
        p->prepend = 2;
        if (fp_json_opt_string(j, "prepend_scheme", &scheme, path, NULL) == 1) {
            p->prepend = !strcmp(scheme, "never") ? 0 : !strcmp(scheme, "first") ? 1 : 2;
        } else if (fp_json_opt_bool(j, "add_prefix_space", &aps, path, NULL) == 1) {
            p->prepend = aps ? 2 : 0;
        }
        p->split = 1;
        fp_json_opt_bool(j, "split", &p->split, path, NULL);
        return 0;
    }
    if (!strcmp(type, "Split")) {
        const char *pat, *beh = "Isolated";
        int is_re;
        if (read_pattern(json_object_get(j, "pattern"), &pat, &is_re))
            return fp_err_set(err, -EBADMSG, "%s: malformed Split pre-tokenizer", path);
        p->type = PT_SPLIT;
        fp_json_opt_string(j, "behavior", &beh, path, NULL);
        p->behavior = !strcmp(beh, "Removed") ? B_REMOVED : !strcmp(beh, "Isolated") ? B_ISOLATED :
                      !strcmp(beh, "MergedWithPrevious") ? B_MERGED_PREV :
                      !strcmp(beh, "MergedWithNext") ? B_MERGED_NEXT :
                      !strcmp(beh, "Contiguous") ? B_CONTIGUOUS : -1;
        if (p->behavior < 0)
            return fp_err_set(err, -ENOTSUP, "%s: Split behavior \"%s\" is not supported", path,
                              beh);
        fp_json_opt_bool(j, "invert", &p->invert, path, NULL);
        if (!(p->re = compile_re(pat, strlen(pat), !is_re, err, path)))
            return -EBADMSG;
        return 0;
    }
    if (!strcmp(type, "Digits")) {
        int individual = 0;
        fp_json_opt_bool(j, "individual_digits", &individual, path, NULL);
        p->type = PT_SPLIT;
        p->behavior = individual ? B_ISOLATED : B_CONTIGUOUS;
        static const char digit[] = "\\p{N}";
        if (!(p->re = compile_re(digit, strlen(digit), 0, err, path)))
            return -EBADMSG;
        return 0;
    }
    if (!strcmp(type, "Whitespace")) {
        p->type = PT_SPLIT;
        p->behavior = B_REMOVED;
        p->invert = 1;
        static const char ws[] = "\\w+|[^\\w\\s]+";
        if (!(p->re = compile_re(ws, strlen(ws), 0, err, path)))
            return -EBADMSG;
        return 0;
    }
    if (!strcmp(type, "WhitespaceSplit")) {
        p->type = PT_SPLIT;
        p->behavior = B_REMOVED;
        static const char ws[] = "\\s+";
        if (!(p->re = compile_re(ws, strlen(ws), 0, err, path)))
            return -EBADMSG;
        return 0;
    }
    return fp_err_set(err, -ENOTSUP, "%s: pre-tokenizer \"%s\" is not supported", path, type);
}

static int load_dc(fp_tokenizer_t *t, json_t *j, const char *path)
{
    const char *type = type_of(j);
    if (!strcmp(type, "Sequence")) {
        json_t *arr = json_object_get(j, "decoders");
        size_t i;
        json_t *k;
        json_array_foreach(arr, i, k) {
            if (load_dc(t, k, path))
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
        if (read_pattern(json_object_get(j, "pattern"), &pat, &is_re) || is_re ||
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

static int cmp_vocab(const void *a, const void *b)
{
    const vocab_entry_t *x = a, *y = b;
    uint32_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->s, y->s, n);
    return c ? c : (x->len < y->len ? -1 : x->len > y->len ? 1 : 0);
}

static int cmp_merge(const void *a, const void *b)
{
    const merge_t *x = a, *y = b;
    if (x->a != y->a)
        return x->a < y->a ? -1 : 1;
    return x->b < y->b ? -1 : x->b > y->b ? 1 : 0;
}

static int cmp_added(const void *a, const void *b)
{
    const added_t *x = a, *y = b;
    return x->len > y->len ? -1 : x->len < y->len ? 1 : 0;
}

static int vocab_find(const fp_tokenizer_t *t, const char *s, size_t len)
{
    vocab_entry_t key = {s, (uint32_t)len, 0};
    const vocab_entry_t *e = bsearch(&key, t->vocab, (size_t)t->nvocab, sizeof key, cmp_vocab);
    return e ? e->id : -1;
}

static const merge_t *merge_find(const fp_tokenizer_t *t, int a, int b)
{
    merge_t key = {a, b, 0, 0};
    return bsearch(&key, t->merges, (size_t)t->nmerges, sizeof key, cmp_merge);
}

void fp_tokenizer_free(fp_tokenizer_t *t)
{
    if (!t)
        return;
    for (int i = 0; i < t->nvocab; i++)
        free((char *)t->vocab[i].s);
    for (int i = 0; i < t->nadded; i++)
        free((char *)t->added[i].s);
    free(t->vocab);
    free(t->id_str);
    free(t->id_len);
    free(t->merges);
    free(t->added);
    if (t->norm) {
        nz_free(t->norm);
        free(t->norm);
    }
    if (t->pre) {
        pt_free(t->pre);
        free(t->pre);
    }
    for (int i = 0; i < t->ndec; i++) {
        free(t->dec[i].a);
        free(t->dec[i].b);
    }
    free(t->dec);
    free(t);
}

/* Splits a merge "a b" (or ["a", "b"]) into its two parts. */
static int merge_parts(json_t *m, const char **a, size_t *al, const char **b, size_t *bl)
{
    if (json_is_string(m)) {
        const char *s = json_string_value(m);
        size_t n = json_string_length(m);
        /* the separator is the first space that is not the first character */
        const char *sp = n > 1 ? memchr(s + 1, ' ', n - 1) : NULL;
        if (!sp)
            return -1;
        *a = s;
        *al = (size_t)(sp - s);
        *b = sp + 1;
        *bl = n - *al - 1;
        return 0;
    }
    if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
        json_is_string(json_array_get(m, 1))) {
        *a = json_string_value(json_array_get(m, 0));
        *al = json_string_length(json_array_get(m, 0));
        *b = json_string_value(json_array_get(m, 1));
        *bl = json_string_length(json_array_get(m, 1));
        return 0;
    }
    return -1;
}

static int load_json(json_t *root, const char *path, fp_tokenizer_t **out, fp_err_t *err)
{
    *out = NULL;
    init_byte_alphabet();
    fp_tokenizer_t *t = calloc(1, sizeof *t);
    if (!t)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int rc = 0;
    char *buf = NULL;
    json_t *model = json_object_get(root, "model");
    if (!json_is_object(model)) {
        rc = fp_err_set(err, -EBADMSG, "%s: no \"model\" object", path);
        goto fail;
    }
    const char *mtype = type_of(model);
    if (*mtype && strcmp(mtype, "BPE") != 0) {
        rc = fp_err_set(err, -ENOTSUP, "%s: model type \"%s\" is not supported (only BPE)", path,
                        mtype);
        goto fail;
    }
    json_t *cs = json_object_get(model, "continuing_subword_prefix");
    json_t *ew = json_object_get(model, "end_of_word_suffix");
    if ((cs && !json_is_null(cs) && json_string_length(cs)) ||
        (ew && !json_is_null(ew) && json_string_length(ew))) {
        rc = fp_err_set(err, -ENOTSUP, "%s: BPE with continuing_subword_prefix or "
                        "end_of_word_suffix is not supported", path);
        goto fail;
    }
    json_t *drop = json_object_get(model, "dropout");
    if (drop && json_is_number(drop) && json_number_value(drop) > 0) {
        rc = fp_err_set(err, -ENOTSUP, "%s: BPE dropout is not supported", path);
        goto fail;
    }
    fp_json_opt_bool(model, "byte_fallback", &t->byte_fallback, path, NULL);
    fp_json_opt_bool(model, "fuse_unk", &t->fuse_unk, path, NULL);
    fp_json_opt_bool(model, "ignore_merges", &t->ignore_merges, path, NULL);
    json_t *vocab = json_object_get(model, "vocab");
    if (!json_is_object(vocab)) {
        rc = fp_err_set(err, -EBADMSG, "%s: model has no \"vocab\" object", path);
        goto fail;
    }
    t->nvocab = (int)json_object_size(vocab);
    t->vocab = calloc((size_t)t->nvocab + 1, sizeof *t->vocab);
    if (!t->vocab) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    int k = 0, maxid = -1;
    const char *key;
    json_t *v;
    json_object_foreach(vocab, key, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) > (1 << 24)) {
            rc = fp_err_set(err, -EBADMSG, "%s: vocab id of \"%s\" is not a valid id", path, key);
            t->nvocab = k;
            goto fail;
        }
        size_t kl = strlen(key);
        t->vocab[k].s = dupmem(key, kl);
        t->vocab[k].len = (uint32_t)kl;
        t->vocab[k].id = (int)json_integer_value(v);
        if (!t->vocab[k].s) {
            t->nvocab = k;
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        maxid = t->vocab[k].id > maxid ? t->vocab[k].id : maxid;
        k++;
    }
    qsort(t->vocab, (size_t)t->nvocab, sizeof *t->vocab, cmp_vocab);
    /* added tokens */
    json_t *at = json_object_get(root, "added_tokens");
    size_t na = json_is_array(at) ? json_array_size(at) : 0;
    t->added = calloc(na + 1, sizeof *t->added);
    if (!t->added) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < na; i++) {
        json_t *a = json_array_get(at, i);
        json_t *content = json_object_get(a, "content"), *id = json_object_get(a, "id");
        if (!json_is_string(content) || !json_is_integer(id) || json_integer_value(id) < 0 ||
            json_integer_value(id) > (1 << 24)) {
            rc = fp_err_set(err, -EBADMSG, "%s: malformed added_tokens entry %zu", path, i);
            goto fail;
        }
        added_t *x = &t->added[t->nadded];
        x->len = json_string_length(content);
        if (x->len == 0)
            continue;
        x->s = dupmem(json_string_value(content), x->len);
        x->id = (int)json_integer_value(id);
        fp_json_opt_bool(a, "special", &x->special, path, NULL);
        fp_json_opt_bool(a, "lstrip", &x->lstrip, path, NULL);
        fp_json_opt_bool(a, "rstrip", &x->rstrip, path, NULL);
        fp_json_opt_bool(a, "single_word", &x->single_word, path, NULL);
        if (!x->s) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        maxid = x->id > maxid ? x->id : maxid;
        t->nadded++;
    }
    qsort(t->added, (size_t)t->nadded, sizeof *t->added, cmp_added);
    for (int i = 0; i < t->nadded; i++)
        t->added_first[(unsigned char)t->added[i].s[0]] = 1;
    t->size = maxid + 1;
    t->id_str = calloc((size_t)t->size + 1, sizeof *t->id_str);
    t->id_len = calloc((size_t)t->size + 1, sizeof *t->id_len);
    if (!t->id_str || !t->id_len) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    for (int i = 0; i < t->nvocab; i++) {
        t->id_str[t->vocab[i].id] = t->vocab[i].s;
        t->id_len[t->vocab[i].id] = t->vocab[i].len;
    }
    for (int i = 0; i < t->nadded; i++) {
        t->id_str[t->added[i].id] = t->added[i].s;
        t->id_len[t->added[i].id] = (uint32_t)t->added[i].len;
    }
    /* merges, ranked by position */
    json_t *merges = json_object_get(model, "merges");
    size_t nm = json_is_array(merges) ? json_array_size(merges) : 0;
    t->merges = calloc(nm + 1, sizeof *t->merges);
    if (!t->merges) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    sb_t tmp = {0};
    for (size_t i = 0; i < nm; i++) {
        const char *a, *b;
        size_t al, bl;
        if (merge_parts(json_array_get(merges, i), &a, &al, &b, &bl)) {
            free(tmp.p);
            rc = fp_err_set(err, -EBADMSG, "%s: merge %zu is malformed", path, i);
            goto fail;
        }
        int ia = vocab_find(t, a, al), ib = vocab_find(t, b, bl);
        tmp.n = 0;
        if (sb_add(&tmp, a, al) || sb_add(&tmp, b, bl)) {
            free(tmp.p);
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        int im = vocab_find(t, tmp.p, tmp.n);
        if (ia < 0 || ib < 0 || im < 0) {
            rc = fp_err_set(err, -EBADMSG, "%s: merge %zu (\"%.*s\" + \"%.*s\") uses a token "
                            "missing from the vocabulary", path, i, (int)al, a, (int)bl, b);
            free(tmp.p);
            goto fail;
        }
        t->merges[t->nmerges++] = (merge_t){ia, ib, (int)i, im};
    }
    free(tmp.p);
    qsort(t->merges, (size_t)t->nmerges, sizeof *t->merges, cmp_merge);
    /* duplicate pairs keep their first (lowest) rank, as HF does */
    int w = 0;
    for (int i = 0; i < t->nmerges; i++) {
        if (w > 0 && t->merges[w - 1].a == t->merges[i].a && t->merges[w - 1].b == t->merges[i].b) {
            if (t->merges[i].rank < t->merges[w - 1].rank)
                t->merges[w - 1] = t->merges[i];
            continue;
        }
        t->merges[w++] = t->merges[i];
    }
    t->nmerges = w;
    /* unknown and byte-fallback tokens */
    t->unk_id = -1;
    const char *unk;
    if (fp_json_opt_string(model, "unk_token", &unk, path, NULL) == 1)
        t->unk_id = fp_tokenizer_token_id(t, unk);
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_ids[b] = vocab_find(t, name, 6);
    }
    /* pipeline */
    json_t *nz = json_object_get(root, "normalizer");
    if (nz && !json_is_null(nz)) {
        t->norm = calloc(1, sizeof *t->norm);
        if (!t->norm) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        if ((rc = load_nz(nz, t->norm, path, err)) != 0)
            goto fail;
    }
    json_t *pre = json_object_get(root, "pre_tokenizer");
    if (pre && !json_is_null(pre)) {
        t->pre = calloc(1, sizeof *t->pre);
        if (!t->pre) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        if ((rc = load_pt(pre, t->pre, path, err)) != 0)
            goto fail;
    }
    json_t *dec = json_object_get(root, "decoder");
    t->dec_ok = !dec || json_is_null(dec) || load_dc(t, dec, path) == 0;
    free(buf);
    *out = t;
    return 0;
fail:
    free(buf);
    fp_tokenizer_free(t);
    return rc;
}

int fp_tokenizer_load(const char *path, fp_tokenizer_t **out, fp_err_t *err)
{
    *out = NULL;
    char *file = fp_fs_is_dir(path) ? fp_path_join(path, "tokenizer.json") : strdup(path);
    if (!file)
        return fp_err_set(err, -ENOMEM, "out of memory");
    json_t *root = fp_json_load_file(file, MAX_JSON_BYTES, err);
    int rc;
    if (!root)
        rc = err && err->code ? err->code : -EBADMSG;
    else if (!json_is_object(root))
        rc = fp_err_set(err, -EBADMSG, "%s: not a JSON object", file);
    else
        rc = load_json(root, file, out, err);
    json_decref(root);
    free(file);
    return rc;
}

/* The byte-level tokenizer as tokenizer.json. */
static json_t *bytes_json(void)
{
    init_byte_alphabet();
    json_t *vocab = json_object();
    for (int b = 0; b < 256; b++) {
        char s[8] = {0};
        put_utf8(byte_to_cp[b], s);
        json_object_set_new(vocab, s, json_integer(b));
    }
    json_t *model = json_pack("{s:s, s:n, s:n, s:n, s:n, s:b, s:b, s:b, s:o, s:[]}", "type",
                              "BPE", "dropout", "unk_token", "continuing_subword_prefix",
                              "end_of_word_suffix", "fuse_unk", 0, "byte_fallback", 0,
                              "ignore_merges", 0, "vocab", vocab, "merges");
    json_t *eot = json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", 256, "content",
                            "<|endoftext|>", "single_word", 0, "lstrip", 0, "rstrip", 0,
                            "normalized", 0, "special", 1);
    json_t *bl = json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0,
                           "trim_offsets", 0, "use_regex", 0);
    json_t *dec = json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0,
                            "trim_offsets", 0, "use_regex", 0);
    return json_pack("{s:s, s:n, s:n, s:[o], s:n, s:o, s:n, s:o, s:o}", "version", "1.0",
                     "truncation", "padding", "added_tokens", eot, "normalizer", "pre_tokenizer",
                     bl, "post_processor", "decoder", dec, "model", model);
}

int fp_tokenizer_bytes(fp_tokenizer_t **out, fp_err_t *err)
{
    json_t *j = bytes_json();
    if (!j)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int rc = load_json(j, "<bytes>", out, err);
    json_decref(j);
    return rc;
}

int fp_tokenizer_write_bytes(const char *path, fp_err_t *err)
{
    json_t *j = bytes_json();
    if (!j)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int rc = fp_json_write_file(path, j, err);
    json_decref(j);
    return rc;
}

int fp_tokenizer_vocab_size(const fp_tokenizer_t *t)
{
    return t->size;
}

int fp_tokenizer_token_id(const fp_tokenizer_t *t, const char *token)
{
    size_t n = strlen(token);
    for (int i = 0; i < t->nadded; i++)
        if (t->added[i].len == n && !memcmp(t->added[i].s, token, n))
            return t->added[i].id;
    return vocab_find(t, token, n);
}

static int first_id(const fp_tokenizer_t *t, const char *const *names)
{
    for (; *names; names++) {
        int id = fp_tokenizer_token_id(t, *names);
        if (id >= 0)
            return id;
    }
    return -1;
}

int fp_tokenizer_eos_id(const fp_tokenizer_t *t)
{
    static const char *const names[] = {"</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>",
                                        NULL};
    return first_id(t, names);
}

int fp_tokenizer_bos_id(const fp_tokenizer_t *t)
{
    static const char *const names[] = {"<s>", "<|begin_of_text|>", "<bos>", NULL};
    return first_id(t, names);
}

/* ---- normalization ---- */

static int is_space_cp(utf8proc_int32_t cp)
{
    return cp == ' ' || (cp >= 9 && cp <= 13) || utf8proc_category(cp) == UTF8PROC_CATEGORY_ZS ||
           cp == 0x85 || cp == 0x2028 || cp == 0x2029;
}

static int normalize(const nz_t *z, sb_t *s)
{
    switch (z->type) {
    case NZ_SEQ:
        for (int i = 0; i < z->nkids; i++)
            if (normalize(&z->kids[i], s))
                return -ENOMEM;
        return 0;
    case NZ_PREPEND: {
        if (s->n == 0)
            return 0;
        if (sb_reserve(s, z->alen + 1))
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
                if (sb_reserve(&o, outlen + 1))
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
                    if (sb_add(&o, z->b, z->blen))
                        return -ENOMEM;
                    i += z->alen;
                } else {
                    if (sb_add(&o, s->p + i, 1))
                        return -ENOMEM;
                    i++;
                }
            }
        }
        free(s->p);
        *s = o;
        if (!s->p && sb_add(s, "", 0))
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
                int el = put_utf8(utf8proc_tolower(cp), enc);
                if (sb_add(&o, enc, (size_t)el))
                    return -ENOMEM;
                i += (size_t)l;
            }
            free(s->p);
            *s = o;
            return 0;
        }
        s->n = 0;
        int rc = sb_add(s, outp, (size_t)r);
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

/* ---- pre-tokenization ---- */

typedef struct split_ctx {
    const char *text;
    size_t len;
    int first;           /* the piece being split began at original offset 0 */
    size_t *marks;       /* match boundaries: pairs (s, e) */
    size_t nmarks, cap;
} split_ctx_t;

static int collect(void *vctx, size_t s, size_t e)
{
    split_ctx_t *c = vctx;
    if (c->nmarks + 2 > c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 64;
        size_t *m = realloc(c->marks, cap * sizeof *m);
        if (!m)
            return -ENOMEM;
        c->marks = m;
        c->cap = cap;
    }
    c->marks[c->nmarks++] = s;
    c->marks[c->nmarks++] = e;
    return 0;
}

/* Applies a Split behavior to one piece, adding the results to out. */
static int split_piece(const pt_t *p, const char *text, size_t len, int first, pieces_t *out)
{
    split_ctx_t c = {text, len, first, NULL, 0, 0};
    int rc = for_each_match(p->re, text, len, collect, &c);
    if (rc) {
        free(c.marks);
        return rc;
    }
    /* segments: (start, end, is_match) covering the piece */
    size_t nseg = 0, cap = c.nmarks + 2;
    struct seg {
        size_t s, e;
        int m;
    } *seg = malloc(cap * sizeof *seg);
    if (!seg) {
        free(c.marks);
        return -ENOMEM;
    }
    size_t pos = 0;
    for (size_t i = 0; i < c.nmarks; i += 2) {
        if (c.marks[i] > pos)
            seg[nseg++] = (struct seg){pos, c.marks[i], 0};
        seg[nseg++] = (struct seg){c.marks[i], c.marks[i + 1], 1};
        pos = c.marks[i + 1];
    }
    if (pos < len)
        seg[nseg++] = (struct seg){pos, len, 0};
    free(c.marks);
    if (p->invert)
        for (size_t i = 0; i < nseg; i++)
            seg[i].m = !seg[i].m;
    /* pieces as [start, end) runs */
    size_t i = 0;
    while (rc == 0 && i < nseg) {
        size_t s = seg[i].s, e = seg[i].e;
        switch (p->behavior) {
        case B_REMOVED:
            if (!seg[i].m)
                rc = pieces_add(out, text + s, e - s, first && s == 0);
            i++;
            break;
        case B_ISOLATED:
            rc = pieces_add(out, text + s, e - s, first && s == 0);
            i++;
            break;
        case B_CONTIGUOUS: {
            size_t j = i + 1;
            while (seg[i].m && j < nseg && seg[j].m && seg[j].s == seg[j - 1].e)
                j++;
            e = seg[j - 1].e;
            rc = pieces_add(out, text + s, e - s, first && s == 0);
            i = j;
            break;
        }
        case B_MERGED_PREV: /* a delimiter joins the piece before it */
            if (!seg[i].m && i + 1 < nseg && seg[i + 1].m) {
                e = seg[i + 1].e;
                i += 2;
            } else {
                i++;
            }
            rc = pieces_add(out, text + s, e - s, first && s == 0);
            break;
        case B_MERGED_NEXT: /* a delimiter joins the piece after it */
            if (seg[i].m && i + 1 < nseg && !seg[i + 1].m) {
                e = seg[i + 1].e;
                i += 2;
            } else {
                i++;
            }
            rc = pieces_add(out, text + s, e - s, first && s == 0);
            break;
        }
    }
    free(seg);
    return rc;
}

static int pretokenize(const pt_t *p, pieces_t *in, pieces_t *out)
{
    int rc = 0;
    if (p->type == PT_SEQ) {
        pieces_t a = {0}, b = {0}, *src = in;
        for (int k = 0; k < p->nkids && rc == 0; k++) {
            pieces_t *dst = k % 2 == 0 ? &a : &b;
            pieces_reset(dst);
            rc = pretokenize(&p->kids[k], src, dst);
            src = dst;
        }
        for (size_t i = 0; rc == 0 && i < src->n; i++)
            rc = pieces_add(out, src->text.p + src->v[i].off, src->v[i].len, src->v[i].first);
        pieces_free(&a);
        pieces_free(&b);
        return rc;
    }
    sb_t tmp = {0};
    pieces_t mid = {0};
    for (size_t i = 0; rc == 0 && i < in->n; i++) {
        const char *s = in->text.p + in->v[i].off;
        size_t len = in->v[i].len;
        int first = in->v[i].first;
        switch (p->type) {
        case PT_SPLIT:
            rc = split_piece(p, s, len, first, out);
            break;
        case PT_BYTELEVEL: {
            tmp.n = 0;
            if (p->add_prefix_space && (len == 0 || s[0] != ' '))
                rc = sb_add(&tmp, " ", 1);
            if (rc == 0)
                rc = sb_add(&tmp, s, len);
            pieces_reset(&mid);
            if (rc == 0) {
                if (p->use_regex) {
                    pt_t iso = *p;
                    iso.behavior = B_ISOLATED;
                    iso.invert = 0;
                    rc = split_piece(&iso, tmp.p, tmp.n, first, &mid);
                } else {
                    rc = pieces_add(&mid, tmp.p, tmp.n, first);
                }
            }
            /* map every byte to its GPT-2 alphabet character */
            sb_t mapped = {0};
            for (size_t k = 0; rc == 0 && k < mid.n; k++) {
                mapped.n = 0;
                const unsigned char *b = (const unsigned char *)mid.text.p + mid.v[k].off;
                for (size_t q = 0; rc == 0 && q < mid.v[k].len; q++) {
                    char enc[4];
                    int el = put_utf8(byte_to_cp[b[q]], enc);
                    rc = sb_add(&mapped, enc, (size_t)el);
                }
                if (rc == 0)
                    rc = pieces_add(out, mapped.p, mapped.n, mid.v[k].first);
            }
            free(mapped.p);
            break;
        }
        case PT_METASPACE: {
            /* as HF: replace spaces, then prepend unless the result starts with ▁ already */
            tmp.n = 0;
            int prepend = p->prepend == 2 || (p->prepend == 1 && first);
            if (prepend && !(len >= 1 && s[0] == ' ') &&
                !(len >= p->repl_len && !memcmp(s, p->repl, p->repl_len)))
                rc = sb_add(&tmp, p->repl, p->repl_len);
            for (size_t k = 0; rc == 0 && k < len; k++)
                rc = s[k] == ' ' ? sb_add(&tmp, p->repl, p->repl_len) : sb_add(&tmp, s + k, 1);
            if (rc)
                break;
            if (!p->split) {
                rc = pieces_add(out, tmp.p, tmp.n, first);
                break;
            }
            /* MergedWithNext on the replacement character */
            size_t start = 0;
            for (size_t k = 1; rc == 0 && k + p->repl_len <= tmp.n; k++) {
                if (!memcmp(tmp.p + k, p->repl, p->repl_len)) {
                    rc = pieces_add(out, tmp.p + start, k - start, first && start == 0);
                    start = k;
                }
            }
            if (rc == 0)
                rc = pieces_add(out, tmp.p + start, tmp.n - start, first && start == 0);
            break;
        }
        default:
            break;
        }
    }
    free(tmp.p);
    pieces_free(&mid);
    return rc;
}

/* ---- BPE ---- */

typedef struct sym {
    int id;
    int prev, next; /* -1 at the ends */
    int alive;
} sym_t;

typedef struct cand {
    int rank, pos, id;
} cand_t;

static int cand_less(const cand_t *a, const cand_t *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(cand_t *h, int *n, cand_t c)
{
    int i = (*n)++;
    h[i] = c;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!cand_less(&h[i], &h[p]))
            break;
        cand_t t = h[i];
        h[i] = h[p];
        h[p] = t;
        i = p;
    }
}

static cand_t heap_pop(cand_t *h, int *n)
{
    cand_t top = h[0];
    h[0] = h[--(*n)];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < *n && cand_less(&h[l], &h[m]))
            m = l;
        if (r < *n && cand_less(&h[r], &h[m]))
            m = r;
        if (m == i)
            break;
        cand_t t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
    return top;
}

static void push_sym(sym_t *sym, int *ns, int id)
{
    int k = (*ns)++;
    sym[k] = (sym_t){id, k - 1, k + 1, 1};
}

typedef struct bpe_ws {
    sym_t *sym;
    cand_t *heap;
    size_t cap;
} bpe_ws_t;

static int bpe_piece(const fp_tokenizer_t *t, bpe_ws_t *ws, const char *s, size_t len,
                     int **ids, size_t *n, size_t *cap, fp_err_t *err)
{
    if (t->ignore_merges) {
        int id = vocab_find(t, s, len);
        if (id >= 0)
            return ids_push(ids, n, cap, id);
    }
    /* at most one symbol per byte; the heap holds at most 2 candidates per merge */
    size_t need = len + 1;
    if (need > ws->cap) {
        sym_t *sy = realloc(ws->sym, need * sizeof *sy);
        cand_t *hp = sy ? realloc(ws->heap, 4 * need * sizeof *hp) : NULL;
        if (sy)
            ws->sym = sy;
        if (!sy || !hp)
            return fp_err_set(err, -ENOMEM, "out of memory");
        ws->heap = hp;
        ws->cap = need;
    }
    int ns = 0;
    for (size_t i = 0; i < len;) {
        int cl = utf8_len((const unsigned char *)s + i, len - i);
        int id = vocab_find(t, s + i, (size_t)cl);
        if (id >= 0) {
            push_sym(ws->sym, &ns, id);
        } else if (t->byte_fallback && t->byte_ids[(unsigned char)s[i]] >= 0) {
            for (int b = 0; b < cl; b++) {
                int bid = t->byte_ids[(unsigned char)s[i + b]];
                push_sym(ws->sym, &ns, bid >= 0 ? bid : t->unk_id);
            }
        } else {
            if (t->unk_id < 0)
                return fp_err_set(err, -EBADMSG, "tokenizer: character \"%.*s\" is not in the "
                                  "vocabulary and there is no unknown token", cl, s + i);
            if (!(t->fuse_unk && ns > 0 && ws->sym[ns - 1].id == t->unk_id))
                push_sym(ws->sym, &ns, t->unk_id);
        }
        i += (size_t)cl;
    }
    if (ns > 0)
        ws->sym[ns - 1].next = -1;
    int nh = 0;
    for (int i = 0; i + 1 < ns; i++) {
        const merge_t *m = merge_find(t, ws->sym[i].id, ws->sym[i + 1].id);
        if (m)
            heap_push(ws->heap, &nh, (cand_t){m->rank, i, m->id});
    }
    while (nh > 0) {
        cand_t c = heap_pop(ws->heap, &nh);
        sym_t *a = &ws->sym[c.pos];
        if (!a->alive || a->next < 0)
            continue;
        sym_t *b = &ws->sym[a->next];
        const merge_t *m = merge_find(t, a->id, b->id);
        if (!m || m->id != c.id || m->rank != c.rank)
            continue; /* stale: one side changed since */
        a->id = m->id;
        b->alive = 0;
        a->next = b->next;
        if (b->next >= 0)
            ws->sym[b->next].prev = c.pos;
        if (a->prev >= 0) {
            const merge_t *pm = merge_find(t, ws->sym[a->prev].id, a->id);
            if (pm)
                heap_push(ws->heap, &nh, (cand_t){pm->rank, a->prev, pm->id});
        }
        if (a->next >= 0) {
            const merge_t *nm = merge_find(t, a->id, ws->sym[a->next].id);
            if (nm)
                heap_push(ws->heap, &nh, (cand_t){nm->rank, c.pos, nm->id});
        }
    }
    for (int i = 0; i >= 0 && i < ns; i = ws->sym[i].next)
        if (ids_push(ids, n, cap, ws->sym[i].id))
            return fp_err_set(err, -ENOMEM, "out of memory");
    return 0;
}

/* ---- encoding ---- */

/* Encodes one segment of ordinary text (between added tokens). */
static int encode_segment(const fp_tokenizer_t *t, const char *s, size_t len, int first,
                          bpe_ws_t *ws, int **ids, size_t *n, size_t *cap, fp_err_t *err)
{
    sb_t norm = {0};
    pieces_t in = {0}, out = {0};
    int rc = sb_add(&norm, s, len);
    if (rc == 0 && t->norm)
        rc = normalize(t->norm, &norm);
    if (rc == 0)
        rc = pieces_add(&in, norm.p, norm.n, first);
    if (rc == 0 && t->pre)
        rc = pretokenize(t->pre, &in, &out);
    pieces_t *ps = t->pre ? &out : &in;
    if (rc)
        rc = fp_err_set(err, rc, "tokenizer: %s", rc == -ENOMEM ? "out of memory" :
                        "text processing failed");
    for (size_t i = 0; rc == 0 && i < ps->n; i++)
        rc = bpe_piece(t, ws, ps->text.p + ps->v[i].off, ps->v[i].len, ids, n, cap, err);
    free(norm.p);
    pieces_free(&in);
    pieces_free(&out);
    return rc;
}

/* Valid UTF-8 copy: invalid bytes become the Latin-1 character of the same value. */
static int sanitize(const char *text, size_t len, sb_t *o)
{
    for (size_t i = 0; i < len;) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t l = utf8proc_iterate((const utf8proc_uint8_t *)text + i,
                                              (utf8proc_ssize_t)(len - i), &cp);
        if (l > 0) {
            if (sb_add(o, text + i, (size_t)l))
                return -ENOMEM;
            i += (size_t)l;
        } else {
            char enc[4];
            int el = put_utf8((unsigned char)text[i], enc);
            if (sb_add(o, enc, (size_t)el))
                return -ENOMEM;
            i++;
        }
    }
    return sb_add(o, "", 0);
}

static int is_ws_byte(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

static int is_word_byte(unsigned char c)
{
    return c >= 0x80 || c == '_' || (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z');
}

int fp_tokenizer_encode(const fp_tokenizer_t *t, const char *text, size_t len, int **ids,
                        size_t *n, size_t *cap, fp_err_t *err)
{
    sb_t s = {0};
    bpe_ws_t ws = {0};
    int rc = sanitize(text, len, &s);
    if (rc) {
        free(s.p);
        return fp_err_set(err, rc, "out of memory");
    }
    size_t seg = 0, i = 0;
    while (rc == 0 && i <= s.n) {
        const added_t *hit = NULL;
        if (i < s.n && t->added_first[(unsigned char)s.p[i]]) {
            for (int k = 0; k < t->nadded; k++) {
                const added_t *a = &t->added[k];
                if (a->len <= s.n - i && !memcmp(s.p + i, a->s, a->len)) {
                    if (a->single_word && ((i > 0 && is_word_byte((unsigned char)s.p[i - 1])) ||
                                           (i + a->len < s.n &&
                                            is_word_byte((unsigned char)s.p[i + a->len]))))
                        continue;
                    hit = a;
                    break;
                }
            }
        }
        if (!hit && i < s.n) {
            i += (size_t)utf8_len((const unsigned char *)s.p + i, s.n - i);
            continue;
        }
        /* the text before the hit (or the end) */
        size_t end = i;
        if (hit && hit->lstrip)
            while (end > seg && is_ws_byte(s.p[end - 1]))
                end--;
        if (end > seg)
            rc = encode_segment(t, s.p + seg, end - seg, seg == 0, &ws, ids, n, cap, err);
        if (!hit || rc)
            break;
        if (ids_push(ids, n, cap, hit->id)) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            break;
        }
        i += hit->len;
        if (hit->rstrip)
            while (i < s.n && is_ws_byte(s.p[i]))
                i++;
        seg = i;
    }
    free(s.p);
    free(ws.sym);
    free(ws.heap);
    return rc;
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
        rc = sb_add(&L.v[i], t->id_str[ids[i]], t->id_len[ids[i]]);
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
                    if (cp >= 0 && cp < 512 && cp_to_byte[cp] >= 0) {
                        char b = (char)cp_to_byte[cp];
                        rc = sb_add(&o, &b, 1);
                    } else {
                        rc = sb_add(&o, s->p + k, (size_t)l);
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
                        rc = sb_add(&o, to, tl);
                        k += fl;
                    } else {
                        rc = sb_add(&o, s->p + k, 1);
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
                    rc = sb_add(&o, &b, 1);
                } else {
                    rc = sb_add(&o, s->p ? s->p : "", s->n);
                }
                break;
            }
            case DC_FUSE:
                if (i == 0)
                    for (size_t k = 0; k < L.n && rc == 0; k++)
                        rc = sb_add(&o, L.v[k].p ? L.v[k].p : "", L.v[k].n);
                break;
            case DC_STRIP: {
                size_t b = 0, e = s->n;
                for (int c = 0; c < dc->start && b + dc->alen <= e &&
                                !memcmp(s->p + b, dc->a, dc->alen); c++)
                    b += dc->alen;
                for (int c = 0; c < dc->stop && e >= b + dc->alen &&
                                !memcmp(s->p + e - dc->alen, dc->a, dc->alen); c++)
                    e -= dc->alen;
                rc = sb_add(&o, s->p ? s->p + b : "", e - b);
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
        rc = sb_add(&all, L.v[i].p ? L.v[i].p : "", L.v[i].n);
    if (rc == 0 && sb_add(&all, "", 0))
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
