/* fp_data.h — tokenized training data.
 *
 * Files:
 *   *.jsonl  one JSON object per line: {"text": s}, {"prompt": p, "completion": c} (the loss
 *            covers the completion only) or {"input_ids": [...]} (used as given). Blank lines
 *            are skipped; any other line that is not one of these is an error naming the file
 *            and line.
 *   other    plain UTF-8 text. Documents are separated by lines holding only "%" (the
 *            fortune/strfile format) when the file has such lines, else by blank lines.
 * Each text document becomes [BOS] tokens [EOS] (where the model has those ids); documents are
 * concatenated into one stream with a per-token "is a training target" mask.
 */
#ifndef FP_DATA_H
#define FP_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"
#include "fp_rng.h"
#include "fp_tokenizer.h"

typedef struct fp_doc {
    size_t off, len; /* token range in the stream */
} fp_doc_t;

typedef struct fp_dataset {
    int *tok;            /* n tokens */
    unsigned char *tgt;  /* n flags: 1 when the token is a prediction target */
    size_t n;
    fp_doc_t *docs;
    size_t ndocs;
} fp_dataset_t;

/* Loads and tokenizes files. bos/eos: ids to wrap text documents with (−1: none). Ids of
 * input_ids documents must be below vocab. */
int fp_dataset_load(const char *const *files, int nfiles, const fp_tokenizer_t *tok, int bos,
                    int eos, int vocab, fp_dataset_t **out, fp_err_t *err);

void fp_dataset_free(fp_dataset_t *d);

/* Splits d by documents: a fraction frac (0 ≤ frac < 1) of them, chosen by seed, goes to
 * *held (at least one document when frac > 0 and d has two or more), the rest to *train.
 * Either output may be NULL. */
int fp_dataset_split(const fp_dataset_t *d, double frac, uint64_t seed, fp_dataset_t **train,
                     fp_dataset_t **held, fp_err_t *err);

/* Number of target tokens (tokens with a predecessor that are targets). */
size_t fp_dataset_targets(const fp_dataset_t *d);

/* B random windows of T+1 tokens from the stream: tokens[b·T + t] and labels[b·T + t] (the
 * next token where it is a target, else −1). Short data is padded (label −1). */
void fp_dataset_sample(const fp_dataset_t *d, fp_rng_t *rng, int B, int T, int *tokens,
                       int *labels);

/* The i-th of fp_dataset_eval_windows(d, T) consecutive windows that together predict every
 * target token of d exactly once. */
size_t fp_dataset_eval_windows(const fp_dataset_t *d, int T);
void fp_dataset_eval_window(const fp_dataset_t *d, size_t i, int T, int *tokens, int *labels);

#endif
