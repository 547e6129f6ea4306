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
 *
 * Data with prompts (any {"prompt", "completion"} document) is "prompted": training windows
 * and evaluation windows then start where a document starts, so every completion token is
 * predicted with its whole prompt in view (when the document fits in a window). Text data is
 * windowed at any offset, as language-model training wants.
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
    int prompted;        /* some document has a prompt (non-target tokens after BOS) */
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
 * next token where it is a target, else −1). A window starts at a random token, or for
 * prompted data at the start of a random document. Short data is padded (label −1). */
void fp_dataset_sample(const fp_dataset_t *d, fp_rng_t *rng, int B, int T, int *tokens,
                       int *labels);

/* Evaluation windows: together they predict every target token of d exactly once. Text data
 * is cut into consecutive windows of T; prompted data into windows of whole documents (as many
 * as fit in T, a longer document in pieces of T). Start with a zeroed position; each call
 * fills tokens[T] and labels[T] (padding: label −1) and returns 1, or 0 when done. */
typedef struct fp_eval_pos {
    size_t at;  /* stream offset of the next window's first input */
    size_t doc; /* the document holding it */
} fp_eval_pos_t;
int fp_dataset_eval_next(const fp_dataset_t *d, fp_eval_pos_t *pos, int T, int *tokens,
                         int *labels);

/* Number of evaluation windows of d (one pass of fp_dataset_eval_next). */
size_t fp_dataset_eval_windows(const fp_dataset_t *d, int T);

#endif
