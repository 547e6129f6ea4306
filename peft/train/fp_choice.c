#include "fp_choice.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fp_transformer.h"

void fp_choices_free(fp_choices_t *c)
{
    if (!c)
        return;
    for (int i = 0; i < c->n; i++) {
        free(c->names ? c->names[i] : NULL);
        free(c->ids ? c->ids[i] : NULL);
    }
    free(c->names);
    free(c->ids);
    free(c->len);
    free(c);
}

/* Token t of label k, the EOS after its last token (or −1 past that). */
static int label_token(const fp_choices_t *c, int k, int t)
{
    return t < c->len[k] ? c->ids[k][t] : t == c->len[k] ? c->eos : -1;
}

int fp_choices_new(const char *const *names, const int *const *ids, const int *len, int n,
                   int eos, fp_choices_t **out, fp_err_t *err)
{
    *out = NULL;
    if (n < 2)
        return fp_err_set(err, -EINVAL, "a choice needs at least two labels, not %d", n);
    fp_choices_t *c = calloc(1, sizeof *c);
    if (!c || !(c->names = calloc((size_t)n, sizeof *c->names)) ||
        !(c->ids = calloc((size_t)n, sizeof *c->ids)) ||
        !(c->len = calloc((size_t)n, sizeof *c->len))) {
        fp_choices_free(c);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    c->n = n;
    c->eos = eos;
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        if (len[i] < 1) {
            rc = fp_err_set(err, -EINVAL, "label '%s' has no tokens", names[i]);
            break;
        }
        c->names[i] = strdup(names[i]);
        c->ids[i] = malloc((size_t)len[i] * sizeof *c->ids[i]);
        if (!c->names[i] || !c->ids[i]) {
            rc = fp_err_set(err, -ENOMEM, "out of memory");
            break;
        }
        memcpy(c->ids[i], ids[i], (size_t)len[i] * sizeof *ids[i]);
        c->len[i] = len[i];
        for (int j = 0; j < i && rc == 0; j++) {
            int m = len[i] < len[j] ? len[i] : len[j];
            if (memcmp(ids[i], ids[j], (size_t)m * sizeof *ids[i]) != 0)
                continue;
            if (len[i] == len[j])
                rc = fp_err_set(err, -EINVAL, "labels '%s' and '%s' are the same tokens",
                                names[j], names[i]);
            else if (eos < 0)
                rc = fp_err_set(err, -EINVAL, "label '%s' begins label '%s', and without an end "
                                "token the two cannot be told apart", len[i] < len[j] ? names[i]
                                : names[j], len[i] < len[j] ? names[j] : names[i]);
        }
    }
    if (rc) {
        fp_choices_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

int fp_choices_from_text(const fp_tokenizer_t *tok, const char *const *names, int n, int eos,
                         fp_choices_t **out, fp_err_t *err)
{
    *out = NULL;
    int **ids = calloc((size_t)(n > 0 ? n : 1), sizeof *ids);
    int *len = calloc((size_t)(n > 0 ? n : 1), sizeof *len);
    int rc = ids && len ? 0 : fp_err_set(err, -ENOMEM, "out of memory");
    for (int i = 0; rc == 0 && i < n; i++) {
        size_t nids = 0, cap = 0;
        rc = fp_tokenizer_encode(tok, names[i], strlen(names[i]), &ids[i], &nids, &cap, err);
        len[i] = (int)nids;
    }
    if (rc == 0)
        rc = fp_choices_new(names, (const int *const *)ids, len, n, eos, out, err);
    for (int i = 0; ids && i < n; i++)
        free(ids[i]);
    free(ids);
    free(len);
    return rc;
}

/* Where a document's completion starts (its first target token), or -1. */
static long completion_start(const fp_dataset_t *d, const fp_doc_t *doc)
{
    for (size_t i = 1; i < doc->len; i++)
        if (d->tgt[doc->off + i])
            return (long)(doc->off + i);
    return -1;
}

/* The completion's tokens without a final EOS: [*c0, *end). */
static int completion_of(const fp_dataset_t *d, const fp_doc_t *doc, int eos, size_t *c0,
                         size_t *end)
{
    long s = completion_start(d, doc);
    if (s < 0)
        return -1;
    *c0 = (size_t)s;
    *end = doc->off + doc->len;
    if (eos >= 0 && *end > *c0 && d->tok[*end - 1] == eos)
        (*end)--;
    return 0;
}

int fp_choices_from_data(const fp_tokenizer_t *tok, const fp_dataset_t *d, int eos,
                         int max_labels, fp_choices_t **out, fp_err_t *err)
{
    *out = NULL;
    size_t *off = calloc((size_t)max_labels, sizeof *off);
    int *len = calloc((size_t)max_labels, sizeof *len);
    const int **ids = calloc((size_t)max_labels, sizeof *ids);
    char **names = calloc((size_t)max_labels, sizeof *names);
    int n = 0, rc = off && len && ids && names ? 0 : fp_err_set(err, -ENOMEM, "out of memory");
    for (size_t i = 0; rc == 0 && i < d->ndocs; i++) {
        size_t c0, end;
        if (completion_of(d, &d->docs[i], eos, &c0, &end) != 0 || end == c0)
            continue;
        int seen = 0;
        for (int k = 0; k < n && !seen; k++)
            seen = (size_t)len[k] == end - c0 &&
                   !memcmp(d->tok + off[k], d->tok + c0, (end - c0) * sizeof *d->tok);
        if (seen)
            continue;
        if (n == max_labels) {
            rc = fp_err_set(err, -E2BIG, "the completions are not a closed set of labels: more "
                            "than %d different ones", max_labels);
            break;
        }
        off[n] = c0;
        len[n] = (int)(end - c0);
        ids[n] = d->tok + c0;
        rc = fp_tokenizer_decode(tok, ids[n], end - c0, &names[n], err);
        n++;
    }
    if (rc == 0)
        rc = fp_choices_new((const char *const *)names, ids, len, n, eos, out, err);
    for (int k = 0; k < n; k++)
        free(names[k]);
    free(names);
    free(ids);
    free(off);
    free(len);
    return rc;
}

typedef struct slot {
    size_t doc;   /* document in the batch row */
    size_t start; /* stream offset of the row's first input */
} slot_t;

/* log p(y | row) from a row of logits over V. */
static double log_softmax_at(const float *row, int V, int y)
{
    float mx = row[0];
    for (int j = 1; j < V; j++)
        mx = row[j] > mx ? row[j] : mx;
    double sum = 0;
    for (int j = 0; j < V; j++)
        sum += exp((double)(row[j] - mx));
    return (double)(row[y] - mx) - log(sum);
}

/* The label whose tokens (and end token) the completion [c0, end) is, or −1. */
static int which_label(const fp_choices_t *c, const fp_dataset_t *d, size_t c0, size_t end)
{
    for (int k = 0; k < c->n; k++)
        if ((size_t)c->len[k] == end - c0 &&
            !memcmp(c->ids[k], d->tok + c0, (end - c0) * sizeof *d->tok))
            return k;
    return -1;
}

/* Greedy decoding restricted to the labels, along the true label's path: 1 when it writes the
 * true label. rows[t] are the logits that predict token t of the completion. */
static int answers_truth(const fp_choices_t *c, int truth, const float *rows, int V)
{
    for (int t = 0;; t++) {
        int want = label_token(c, truth, t);
        if (want < 0)
            return 1; /* the whole label and its end were chosen */
        const float *row = rows + (size_t)t * V;
        int rivals = 0;
        for (int k = 0; k < c->n; k++) {
            if (k == truth)
                continue;
            /* still possible: the same tokens as the truth so far */
            int same = 1;
            for (int u = 0; u < t && same; u++)
                same = label_token(c, k, u) == label_token(c, truth, u);
            int tk = same ? label_token(c, k, t) : -1;
            if (tk < 0 || tk == want) {
                rivals += tk == want;
                continue;
            }
            if (row[tk] > row[want])
                return 0;
        }
        if (rivals == 0)
            return 1; /* no other label is still possible */
    }
}

/* Scores the filled rows of one batch after its forward pass. */
static int score_rows(const fp_dataset_t *d, const fp_choices_t *c, const float *logits,
                      int V, int T, const slot_t *rows, int nrows, fp_choice_score_t *sc,
                      fp_err_t *err)
{
    for (int b = 0; b < nrows; b++) {
        const fp_doc_t *doc = &d->docs[rows[b].doc];
        size_t c0 = 0, cend = 0, end = doc->off + doc->len;
        completion_of(d, doc, c->eos, &c0, &cend);
        int truth = which_label(c, d, c0, cend);
        if (truth < 0)
            return fp_err_set(err, -EINVAL, "document %zu: its completion is not one of the %d "
                              "labels ('%s', …)", rows[b].doc + 1, c->n, c->names[0]);
        const float *base = logits + (size_t)b * T * V;
        /* input c0 − 1 (the prompt's last token) predicts the completion's first token */
        const float *first = base + (c0 - 1 - rows[b].start) * (size_t)V;
        sc->correct += answers_truth(c, truth, first, V);
        sc->examples++;
        for (size_t p = c0 - 1; p + 1 < end; p++) {
            const float *r = base + (p - rows[b].start) * (size_t)V;
            sc->loss_sum -= log_softmax_at(r, V, d->tok[p + 1]);
            sc->loss_tokens++;
        }
    }
    return 0;
}

int fp_choice_eval(const fp_model_t *m, const fp_adapter_t *lora, const fp_dataset_t *d,
                   const fp_choices_t *c, int batch, int seq, fp_choice_score_t *sc,
                   fp_err_t *err)
{
    if (batch < 1 || seq < 2)
        return fp_err_set(err, -EINVAL, "batch and window must be positive");
    if (d->ndocs == 0)
        return fp_err_set(err, -EINVAL, "no documents to score");
    /* the window: the longest document's inputs, at most seq */
    size_t longest = 0;
    for (size_t i = 0; i < d->ndocs; i++) {
        const fp_doc_t *doc = &d->docs[i];
        long c0 = completion_start(d, doc);
        if (c0 < 0)
            return fp_err_set(err, -EINVAL, "document %zu has no completion to score", i + 1);
        if (doc->off + doc->len - (size_t)c0 + 1 > (size_t)seq)
            return fp_err_set(err, -EINVAL, "document %zu: its completion does not fit in a "
                              "window of %d tokens", i + 1, seq);
        longest = doc->len - 1 > longest ? doc->len - 1 : longest;
    }
    int T = longest < (size_t)seq ? (int)longest : seq;
    int B = (size_t)batch < d->ndocs ? batch : (int)d->ndocs;
    fp_tf_t *tf = NULL;
    int rc = fp_tf_new(&tf, m, lora, B, T, FP_TF_EVAL, err);
    if (rc)
        return rc;
    int *tok = malloc((size_t)B * T * sizeof *tok);
    slot_t *rows = malloc((size_t)B * sizeof *rows);
    if (!tok || !rows) {
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    for (size_t next = 0; next < d->ndocs && rc == 0;) {
        int nrows = 0;
        for (; nrows < B && next < d->ndocs; nrows++, next++) {
            const fp_doc_t *doc = &d->docs[next];
            size_t end = doc->off + doc->len; /* inputs [start, end − 1) */
            size_t start = end - 1 - doc->off > (size_t)T ? end - 1 - (size_t)T : doc->off;
            int *tt = tok + (size_t)nrows * T;
            for (int t = 0; t < T; t++)
                tt[t] = start + (size_t)t < end - 1 ? d->tok[start + (size_t)t] : d->tok[end - 1];
            rows[nrows] = (slot_t){next, start};
        }
        for (int b = nrows; b < B; b++)
            memcpy(tok + (size_t)b * T, tok, (size_t)T * sizeof *tok);
        double s;
        long cnt;
        fp_tf_forward(tf, tok, NULL, &s, &cnt);
        if ((rc = fp_tf_status(tf)) != 0) {
            fp_tf_status_error(rc, err);
            break;
        }
        rc = score_rows(d, c, fp_tf_logits(tf), m->cfg.vocab, T, rows, nrows, sc, err);
    }
out:
    free(tok);
    free(rows);
    fp_tf_free(tf);
    return rc;
}
