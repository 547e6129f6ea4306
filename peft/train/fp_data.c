#include "fp_data.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"

#define MAX_FILE (4ull << 30)

typedef struct builder {
    fp_dataset_t *d;
    size_t cap, dcap;
    int *ids;
    size_t nids, idcap;
} builder_t;

static int grow(builder_t *b, size_t more)
{
    fp_dataset_t *d = b->d;
    if (d->n + more > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 1 << 16;
        while (cap < d->n + more)
            cap *= 2;
        int *t = realloc(d->tok, cap * sizeof *t);
        if (t)
            d->tok = t;
        unsigned char *g = t ? realloc(d->tgt, cap) : NULL;
        if (!t || !g)
            return -ENOMEM;
        d->tgt = g;
        b->cap = cap;
    }
    if (d->ndocs == b->dcap) {
        size_t cap = b->dcap ? b->dcap * 2 : 1024;
        fp_doc_t *x = realloc(d->docs, cap * sizeof *x);
        if (!x)
            return -ENOMEM;
        d->docs = x;
        b->dcap = cap;
    }
    return 0;
}

static void push(builder_t *b, int id, int target)
{
    b->d->tok[b->d->n] = id;
    b->d->tgt[b->d->n] = (unsigned char)(target ? 1 : 0);
    b->d->n++;
}

/* Adds a document: [bos] prompt-ids (not targets) completion-ids [eos] (targets). */
static int add_doc(builder_t *b, const int *prompt, size_t np, const int *comp, size_t nc,
                   int bos, int eos)
{
    if (np + nc == 0)
        return 0;
    if (grow(b, np + nc + 2))
        return -ENOMEM;
    size_t start = b->d->n;
    if (bos >= 0)
        push(b, bos, 0);
    for (size_t i = 0; i < np; i++)
        push(b, prompt[i], 0);
    for (size_t i = 0; i < nc; i++)
        push(b, comp[i], 1);
    if (eos >= 0)
        push(b, eos, 1);
    b->d->docs[b->d->ndocs++] = (fp_doc_t){start, b->d->n - start};
    if (np > 0)
        b->d->prompted = 1;
    return 0;
}

static int tokenize(builder_t *b, const fp_tokenizer_t *tok, const char *s, size_t len,
                    fp_err_t *err)
{
    b->nids = 0;
    return fp_tokenizer_encode(tok, s, len, &b->ids, &b->nids, &b->idcap, err);
}

static int load_text(builder_t *b, const char *path, const char *buf, size_t len,
                     const fp_tokenizer_t *tok, int bos, int eos, fp_err_t *err)
{
    /* fortune format when some line is exactly "%" */
    int fortune = (len >= 2 && !memcmp(buf, "%\n", 2)) || memmem(buf, len, "\n%\n", 3) ||
                  (len >= 2 && !memcmp(buf + len - 2, "\n%", 2));
    size_t doc = 0, i = 0;
    while (i <= len) {
        size_t eol = i;
        while (eol < len && buf[eol] != '\n')
            eol++;
        size_t ll = eol - i;
        int sep = fortune ? (ll == 1 && buf[i] == '%') || (ll == 2 && !memcmp(buf + i, "%\r", 2))
                          : ll == 0 || (ll == 1 && buf[i] == '\r');
        int end = eol >= len;
        if (sep || end) {
            size_t stop = sep ? i : len;
            /* trim the trailing newline of the document */
            while (stop > doc && (buf[stop - 1] == '\n' || buf[stop - 1] == '\r'))
                stop--;
            if (stop > doc) {
                int rc = tokenize(b, tok, buf + doc, stop - doc, err);
                if (rc)
                    return fp_err_prefix(err, rc, "%s: ", path);
                if (add_doc(b, NULL, 0, b->ids, b->nids, bos, eos))
                    return fp_err_set(err, -ENOMEM, "out of memory");
            }
            doc = eol + 1;
        }
        if (end)
            break;
        i = eol + 1;
    }
    return 0;
}

static int load_jsonl(builder_t *b, const char *path, const char *buf, size_t len,
                      const fp_tokenizer_t *tok, int bos, int eos, int vocab, fp_err_t *err)
{
    size_t line = 0, i = 0;
    int *prompt = NULL;
    size_t np = 0, pcap = 0;
    int rc = 0;
    while (i < len && rc == 0) {
        line++;
        size_t eol = i;
        while (eol < len && buf[eol] != '\n')
            eol++;
        size_t s = i, e = eol;
        i = eol + 1;
        while (s < e && (buf[s] == ' ' || buf[s] == '\t' || buf[s] == '\r'))
            s++;
        if (s == e)
            continue;
        json_error_t je;
        json_t *j = json_loadb(buf + s, e - s, 0, &je);
        if (!j) {
            rc = fp_err_set(err, -EBADMSG, "%s:%zu: bad JSON: %s", path, line, je.text);
            break;
        }
        json_t *text = json_object_get(j, "text"), *p = json_object_get(j, "prompt"),
               *c = json_object_get(j, "completion"), *ids = json_object_get(j, "input_ids");
        if (json_is_string(text)) {
            if ((rc = tokenize(b, tok, json_string_value(text), json_string_length(text), err)))
                fp_err_prefix(err, rc, "%s:%zu: ", path, line);
            else if (add_doc(b, NULL, 0, b->ids, b->nids, bos, eos))
                rc = fp_err_set(err, -ENOMEM, "out of memory");
        } else if (json_is_string(p) && json_is_string(c)) {
            np = 0;
            if ((rc = fp_tokenizer_encode(tok, json_string_value(p), json_string_length(p),
                                          &prompt, &np, &pcap, err)) ||
                (rc = tokenize(b, tok, json_string_value(c), json_string_length(c), err)))
                fp_err_prefix(err, rc, "%s:%zu: ", path, line);
            else if (add_doc(b, prompt, np, b->ids, b->nids, bos, eos))
                rc = fp_err_set(err, -ENOMEM, "out of memory");
        } else if (json_is_array(ids)) {
            b->nids = 0;
            size_t k;
            json_t *v;
            json_array_foreach(ids, k, v) {
                if (!json_is_integer(v) || json_integer_value(v) < 0 ||
                    json_integer_value(v) >= vocab) {
                    rc = fp_err_set(err, -EBADMSG, "%s:%zu: input_ids[%zu] is not a token id "
                                    "below the vocabulary size %d", path, line, k, vocab);
                    break;
                }
                if (b->nids == b->idcap) {
                    size_t cap = b->idcap ? b->idcap * 2 : 1024;
                    int *x = realloc(b->ids, cap * sizeof *x);
                    if (!x) {
                        rc = fp_err_set(err, -ENOMEM, "out of memory");
                        break;
                    }
                    b->ids = x;
                    b->idcap = cap;
                }
                b->ids[b->nids++] = (int)json_integer_value(v);
            }
            if (rc == 0 && add_doc(b, NULL, 0, b->ids, b->nids, -1, -1))
                rc = fp_err_set(err, -ENOMEM, "out of memory");
        } else {
            rc = fp_err_set(err, -EBADMSG, "%s:%zu: expected {\"text\": ...}, {\"prompt\": ..., "
                            "\"completion\": ...} or {\"input_ids\": [...]}", path, line);
        }
        json_decref(j);
    }
    free(prompt);
    return rc;
}

void fp_dataset_free(fp_dataset_t *d)
{
    if (!d)
        return;
    free(d->tok);
    free(d->tgt);
    free(d->docs);
    free(d);
}

static int ends_with(const char *s, const char *suf)
{
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

int fp_dataset_load(const char *const *files, int nfiles, const fp_tokenizer_t *tok, int bos,
                    int eos, int vocab, fp_dataset_t **out, fp_err_t *err)
{
    *out = NULL;
    builder_t b = {0};
    b.d = calloc(1, sizeof *b.d);
    if (!b.d)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int rc = 0;
    for (int f = 0; f < nfiles && rc == 0; f++) {
        char *buf = NULL;
        size_t len = 0;
        if ((rc = fp_fs_read_file(files[f], MAX_FILE, &buf, &len, err)) != 0)
            break;
        if (ends_with(files[f], ".jsonl"))
            rc = load_jsonl(&b, files[f], buf, len, tok, bos, eos, vocab, err);
        else
            rc = load_text(&b, files[f], buf, len, tok, bos, eos, err);
        free(buf);
    }
    for (size_t i = 0; rc == 0 && i < b.d->n; i++) {
        if (b.d->tok[i] < 0 || b.d->tok[i] >= vocab)
            rc = fp_err_set(err, -EINVAL, "token id %d from the tokenizer is beyond the model's "
                            "vocabulary of %d (tokenizer and model do not match)",
                            b.d->tok[i], vocab);
    }
    if (rc == 0 && b.d->n == 0)
        rc = fp_err_set(err, -EINVAL, "%s%s: no tokens in the data (empty, or only blank lines)",
                        nfiles > 0 ? files[0] : "", nfiles > 1 ? " and the other files" : "");
    free(b.ids);
    if (rc) {
        fp_dataset_free(b.d);
        return rc;
    }
    *out = b.d;
    return 0;
}

static int subset(const fp_dataset_t *d, const size_t *idx, size_t n, fp_dataset_t **out,
                  fp_err_t *err)
{
    fp_dataset_t *s = calloc(1, sizeof *s);
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += d->docs[idx[i]].len;
    if (s) {
        s->tok = malloc((total ? total : 1) * sizeof *s->tok);
        s->tgt = malloc(total ? total : 1);
        s->docs = malloc((n ? n : 1) * sizeof *s->docs);
    }
    if (!s || !s->tok || !s->tgt || !s->docs) {
        fp_dataset_free(s);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        const fp_doc_t *doc = &d->docs[idx[i]];
        memcpy(s->tok + s->n, d->tok + doc->off, doc->len * sizeof *s->tok);
        memcpy(s->tgt + s->n, d->tgt + doc->off, doc->len);
        s->docs[s->ndocs++] = (fp_doc_t){s->n, doc->len};
        s->n += doc->len;
    }
    s->prompted = d->prompted;
    *out = s;
    return 0;
}

static int cmp_size(const void *a, const void *b)
{
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

int fp_dataset_split(const fp_dataset_t *d, double frac, uint64_t seed, fp_dataset_t **train,
                     fp_dataset_t **held, fp_err_t *err)
{
    if (train)
        *train = NULL;
    if (held)
        *held = NULL;
    if (!(frac >= 0 && frac < 1))
        return fp_err_set(err, -EINVAL, "held-out fraction must be in [0, 1)");
    size_t n = d->ndocs;
    size_t *perm = malloc((n ? n : 1) * sizeof *perm);
    if (!perm)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++)
        perm[i] = i;
    fp_rng_t rng;
    fp_rng_seed(&rng, seed ^ 0x5eed5eedull);
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)fp_rng_below(&rng, i);
        size_t t = perm[i - 1];
        perm[i - 1] = perm[j];
        perm[j] = t;
    }
    size_t nh = (size_t)(frac * (double)n + 0.5);
    if (frac > 0 && nh == 0 && n >= 2)
        nh = 1;
    if (nh >= n && n > 0)
        nh = n - 1;
    /* keep each part in file order */
    qsort(perm, nh, sizeof *perm, cmp_size);
    qsort(perm + nh, n - nh, sizeof *perm, cmp_size);
    int rc = 0;
    if (held)
        rc = subset(d, perm, nh, held, err);
    if (rc == 0 && train) {
        rc = subset(d, perm + nh, n - nh, train, err);
        if (rc && held) {
            fp_dataset_free(*held);
            *held = NULL;
        }
    }
    free(perm);
    return rc;
}

size_t fp_dataset_targets(const fp_dataset_t *d)
{
    size_t c = 0;
    for (size_t i = 1; i < d->n; i++)
        c += d->tgt[i];
    return c;
}

static void window(const fp_dataset_t *d, size_t start, int T, int *tokens, int *labels)
{
    for (int t = 0; t < T; t++) {
        size_t i = start + (size_t)t;
        if (i < d->n) {
            tokens[t] = d->tok[i];
            labels[t] = i + 1 < d->n && d->tgt[i + 1] ? d->tok[i + 1] : -1;
        } else {
            tokens[t] = d->n ? d->tok[d->n - 1] : 0;
            labels[t] = -1;
        }
    }
}

void fp_dataset_sample(const fp_dataset_t *d, fp_rng_t *rng, int B, int T, int *tokens,
                       int *labels)
{
    size_t span = d->n > (size_t)T + 1 ? d->n - (size_t)T : 1;
    for (int b = 0; b < B; b++) {
        size_t start = d->prompted && d->ndocs > 0
                           ? d->docs[fp_rng_below(rng, d->ndocs)].off
                           : (size_t)fp_rng_below(rng, span);
        window(d, start, T, tokens + (size_t)b * T, labels + (size_t)b * T);
    }
}

/* The inputs of the window starting at pos->at: [at, end). Input p predicts token p + 1. */
static size_t eval_end(const fp_dataset_t *d, const fp_eval_pos_t *pos, int T)
{
    size_t last = d->n - 1, lim = pos->at + (size_t)T;
    if (lim > last)
        lim = last;
    if (!d->prompted)
        return lim;
    /* the furthest document end within the limit; a document longer than T is cut */
    size_t end = 0;
    for (size_t k = pos->doc; k < d->ndocs; k++) {
        size_t e = d->docs[k].off + d->docs[k].len;
        if (e > last)
            e = last;
        if (e > lim)
            break;
        end = e;
    }
    return end > pos->at ? end : lim;
}

int fp_dataset_eval_next(const fp_dataset_t *d, fp_eval_pos_t *pos, int T, int *tokens,
                         int *labels)
{
    if (d->n < 2 || pos->at >= d->n - 1)
        return 0;
    size_t end = eval_end(d, pos, T);
    window(d, pos->at, (int)(end - pos->at), tokens, labels);
    for (int t = (int)(end - pos->at); t < T; t++) {
        tokens[t] = d->tok[end];
        labels[t] = -1;
    }
    pos->at = end;
    while (pos->doc < d->ndocs && d->docs[pos->doc].off + d->docs[pos->doc].len <= end)
        pos->doc++;
    return 1;
}

size_t fp_dataset_eval_windows(const fp_dataset_t *d, int T)
{
    fp_eval_pos_t pos = {0, 0};
    size_t n = 0;
    if (d->n < 2)
        return 0;
    while (pos.at < d->n - 1) {
        pos.at = eval_end(d, &pos, T);
        while (pos.doc < d->ndocs && d->docs[pos.doc].off + d->docs[pos.doc].len <= pos.at)
            pos.doc++;
        n++;
    }
    return n;
}
