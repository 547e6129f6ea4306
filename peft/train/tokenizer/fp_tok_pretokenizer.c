/* fp_tok_pretokenizer.c — HF tokenizers' pre-tokenizers: Sequence, ByteLevel (GPT-2's
 * pattern), Metaspace, Split (with its five behaviours), Digits, Whitespace, WhitespaceSplit. */
#include "fp_tok_priv.h"

/* GPT-2's pre-tokenization pattern, as HF's ByteLevel pre-tokenizer uses it. */
static const char gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

void fp__tok_pt_free(pt_t *p)
{
    if (!p)
        return;
    for (int i = 0; i < p->nkids; i++)
        fp__tok_pt_free(&p->kids[i]);
    free(p->kids);
    if (p->re)
        pcre2_code_free(p->re);
}

int fp__tok_load_pt(json_t *j, pt_t *p, const char *path, fp_err_t *err)
{
    memset(p, 0, sizeof *p);
    const char *type = fp__tok_type_of(j);
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
            int rc = fp__tok_load_pt(json_array_get(arr, (size_t)i), &p->kids[i], path, err);
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
        if (p->use_regex && !(p->re = fp__tok_compile_re(gpt2_pattern, strlen(gpt2_pattern), 0, err, path)))
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
        if (fp__tok_read_pattern(json_object_get(j, "pattern"), &pat, &is_re))
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
        if (!(p->re = fp__tok_compile_re(pat, strlen(pat), !is_re, err, path)))
            return -EBADMSG;
        return 0;
    }
    if (!strcmp(type, "Digits")) {
        int individual = 0;
        fp_json_opt_bool(j, "individual_digits", &individual, path, NULL);
        p->type = PT_SPLIT;
        p->behavior = individual ? B_ISOLATED : B_CONTIGUOUS;
        static const char digit[] = "\\p{N}";
        if (!(p->re = fp__tok_compile_re(digit, strlen(digit), 0, err, path)))
            return -EBADMSG;
        return 0;
    }
    if (!strcmp(type, "Whitespace")) {
        p->type = PT_SPLIT;
        p->behavior = B_REMOVED;
        p->invert = 1;
        static const char ws[] = "\\w+|[^\\w\\s]+";
        if (!(p->re = fp__tok_compile_re(ws, strlen(ws), 0, err, path)))
            return -EBADMSG;
        return 0;
    }
    if (!strcmp(type, "WhitespaceSplit")) {
        p->type = PT_SPLIT;
        p->behavior = B_REMOVED;
        static const char ws[] = "\\s+";
        if (!(p->re = fp__tok_compile_re(ws, strlen(ws), 0, err, path)))
            return -EBADMSG;
        return 0;
    }
    return fp_err_set(err, -ENOTSUP, "%s: pre-tokenizer \"%s\" is not supported", path, type);
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
    int rc = fp__tok_for_each_match(p->re, text, len, collect, &c);
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
                rc = fp__tok_pieces_add(out, text + s, e - s, first && s == 0);
            i++;
            break;
        case B_ISOLATED:
            rc = fp__tok_pieces_add(out, text + s, e - s, first && s == 0);
            i++;
            break;
        case B_CONTIGUOUS: {
            size_t j = i + 1;
            while (seg[i].m && j < nseg && seg[j].m && seg[j].s == seg[j - 1].e)
                j++;
            e = seg[j - 1].e;
            rc = fp__tok_pieces_add(out, text + s, e - s, first && s == 0);
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
            rc = fp__tok_pieces_add(out, text + s, e - s, first && s == 0);
            break;
        case B_MERGED_NEXT: /* a delimiter joins the piece after it */
            if (seg[i].m && i + 1 < nseg && !seg[i + 1].m) {
                e = seg[i + 1].e;
                i += 2;
            } else {
                i++;
            }
            rc = fp__tok_pieces_add(out, text + s, e - s, first && s == 0);
            break;
        }
    }
    free(seg);
    return rc;
}

int fp__tok_pretokenize(const pt_t *p, pieces_t *in, pieces_t *out)
{
    int rc = 0;
    if (p->type == PT_SEQ) {
        pieces_t a = {0}, b = {0}, *src = in;
        for (int k = 0; k < p->nkids && rc == 0; k++) {
            pieces_t *dst = k % 2 == 0 ? &a : &b;
            fp__tok_pieces_reset(dst);
            rc = fp__tok_pretokenize(&p->kids[k], src, dst);
            src = dst;
        }
        for (size_t i = 0; rc == 0 && i < src->n; i++)
            rc = fp__tok_pieces_add(out, src->text.p + src->v[i].off, src->v[i].len, src->v[i].first);
        fp__tok_pieces_free(&a);
        fp__tok_pieces_free(&b);
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
                rc = fp__tok_sb_add(&tmp, " ", 1);
            if (rc == 0)
                rc = fp__tok_sb_add(&tmp, s, len);
            fp__tok_pieces_reset(&mid);
            if (rc == 0) {
                if (p->use_regex) {
                    pt_t iso = *p;
                    iso.behavior = B_ISOLATED;
                    iso.invert = 0;
                    rc = split_piece(&iso, tmp.p, tmp.n, first, &mid);
                } else {
                    rc = fp__tok_pieces_add(&mid, tmp.p, tmp.n, first);
                }
            }
            /* map every byte to its GPT-2 alphabet character */
            sb_t mapped = {0};
            for (size_t k = 0; rc == 0 && k < mid.n; k++) {
                mapped.n = 0;
                const unsigned char *b = (const unsigned char *)mid.text.p + mid.v[k].off;
                for (size_t q = 0; rc == 0 && q < mid.v[k].len; q++) {
                    char enc[4];
                    int el = fp__tok_put_utf8(fp__tok_byte_to_cp[b[q]], enc);
                    rc = fp__tok_sb_add(&mapped, enc, (size_t)el);
                }
                if (rc == 0)
                    rc = fp__tok_pieces_add(out, mapped.p, mapped.n, mid.v[k].first);
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
                rc = fp__tok_sb_add(&tmp, p->repl, p->repl_len);
            for (size_t k = 0; rc == 0 && k < len; k++)
                rc = s[k] == ' ' ? fp__tok_sb_add(&tmp, p->repl, p->repl_len) : fp__tok_sb_add(&tmp, s + k, 1);
            if (rc)
                break;
            if (!p->split) {
                rc = fp__tok_pieces_add(out, tmp.p, tmp.n, first);
                break;
            }
            /* MergedWithNext on the replacement character */
            size_t start = 0;
            for (size_t k = 1; rc == 0 && k + p->repl_len <= tmp.n; k++) {
                if (!memcmp(tmp.p + k, p->repl, p->repl_len)) {
                    rc = fp__tok_pieces_add(out, tmp.p + start, k - start, first && start == 0);
                    start = k;
                }
            }
            if (rc == 0)
                rc = fp__tok_pieces_add(out, tmp.p + start, tmp.n - start, first && start == 0);
            break;
        }
        default:
            break;
        }
    }
    free(tmp.p);
    fp__tok_pieces_free(&mid);
    return rc;
}

