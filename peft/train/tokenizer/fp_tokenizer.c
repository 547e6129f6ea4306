/* fp_tokenizer.c — a tokenizer.json loaded into the pipeline's stages, the byte-level
 * tokenizer, and encoding: added tokens split first, then per segment normalizer →
 * pre-tokenizer → BPE. */
#include "fp_tok_priv.h"

#include "fp_fs.h"

#define MAX_JSON_BYTES (512u << 20)

static int cmp_added(const void *a, const void *b)
{
    const added_t *x = a, *y = b;
    return x->len > y->len ? -1 : x->len < y->len ? 1 : 0;
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
        fp__tok_nz_free(t->norm);
        free(t->norm);
    }
    if (t->pre) {
        fp__tok_pt_free(t->pre);
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
static int load_json(json_t *root, const char *path, fp_tokenizer_t **out, fp_err_t *err)
{
    *out = NULL;
    fp__tok_init_byte_alphabet();
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
    const char *mtype = fp__tok_type_of(model);
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
        t->vocab[k].s = fp__tok_dupmem(key, kl);
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
    qsort(t->vocab, (size_t)t->nvocab, sizeof *t->vocab, fp__tok_cmp_vocab);
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
        x->s = fp__tok_dupmem(json_string_value(content), x->len);
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
        if (fp__tok_merge_parts(json_array_get(merges, i), &a, &al, &b, &bl)) {
            free(tmp.p);
            rc = fp_err_set(err, -EBADMSG, "%s: merge %zu is malformed", path, i);
            goto fail;
        }
        int ia = fp__tok_vocab_find(t, a, al), ib = fp__tok_vocab_find(t, b, bl);
        tmp.n = 0;
        if (fp__tok_sb_add(&tmp, a, al) || fp__tok_sb_add(&tmp, b, bl)) {
            free(tmp.p);
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        int im = fp__tok_vocab_find(t, tmp.p, tmp.n);
        if (ia < 0 || ib < 0 || im < 0) {
            rc = fp_err_set(err, -EBADMSG, "%s: merge %zu (\"%.*s\" + \"%.*s\") uses a token "
                            "missing from the vocabulary", path, i, (int)al, a, (int)bl, b);
            free(tmp.p);
            goto fail;
        }
        t->merges[t->nmerges++] = (merge_t){ia, ib, (int)i, im};
    }
    free(tmp.p);
    qsort(t->merges, (size_t)t->nmerges, sizeof *t->merges, fp__tok_cmp_merge);
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
        t->byte_ids[b] = fp__tok_vocab_find(t, name, 6);
    }
    /* pipeline */
    json_t *nz = json_object_get(root, "normalizer");
    if (nz && !json_is_null(nz)) {
        t->norm = calloc(1, sizeof *t->norm);
        if (!t->norm) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        if ((rc = fp__tok_load_nz(nz, t->norm, path, err)) != 0)
            goto fail;
    }
    json_t *pre = json_object_get(root, "pre_tokenizer");
    if (pre && !json_is_null(pre)) {
        t->pre = calloc(1, sizeof *t->pre);
        if (!t->pre) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        if ((rc = fp__tok_load_pt(pre, t->pre, path, err)) != 0)
            goto fail;
    }
    json_t *dec = json_object_get(root, "decoder");
    t->dec_ok = !dec || json_is_null(dec) || fp__tok_load_dc(t, dec, path) == 0;
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
    fp__tok_init_byte_alphabet();
    json_t *vocab = json_object();
    for (int b = 0; b < 256; b++) {
        char s[8] = {0};
        fp__tok_put_utf8(fp__tok_byte_to_cp[b], s);
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
    return fp__tok_vocab_find(t, token, n);
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

/* ---- encoding ---- */

/* Encodes one segment of ordinary text (between added tokens). */
static int encode_segment(const fp_tokenizer_t *t, const char *s, size_t len, int first,
                          bpe_ws_t *ws, int **ids, size_t *n, size_t *cap, fp_err_t *err)
{
    sb_t norm = {0};
    pieces_t in = {0}, out = {0};
    int rc = fp__tok_sb_add(&norm, s, len);
    if (rc == 0 && t->norm)
        rc = fp__tok_normalize(t->norm, &norm);
    if (rc == 0)
        rc = fp__tok_pieces_add(&in, norm.p, norm.n, first);
    if (rc == 0 && t->pre)
        rc = fp__tok_pretokenize(t->pre, &in, &out);
    pieces_t *ps = t->pre ? &out : &in;
    if (rc)
        rc = fp_err_set(err, rc, "tokenizer: %s", rc == -ENOMEM ? "out of memory" :
                        "text processing failed");
    for (size_t i = 0; rc == 0 && i < ps->n; i++)
        rc = fp__tok_bpe_piece(t, ws, ps->text.p + ps->v[i].off, ps->v[i].len, ids, n, cap, err);
    free(norm.p);
    fp__tok_pieces_free(&in);
    fp__tok_pieces_free(&out);
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
            if (fp__tok_sb_add(o, text + i, (size_t)l))
                return -ENOMEM;
            i += (size_t)l;
        } else {
            char enc[4];
            int el = fp__tok_put_utf8((unsigned char)text[i], enc);
            if (fp__tok_sb_add(o, enc, (size_t)el))
                return -ENOMEM;
            i++;
        }
    }
    return fp__tok_sb_add(o, "", 0);
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
            i += (size_t)fp__tok_utf8_len((const unsigned char *)s.p + i, s.n - i);
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
        if (fp__tok_ids_push(ids, n, cap, hit->id)) {
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

