/* fp_corpus.h — a site's text, ready to train on: its tokenizer, its documents tokenized
 * for a model, and the held-out part. One loader for `fedpeft train`, the site daemon and
 * the simulation. */
#ifndef FP_CORPUS_H
#define FP_CORPUS_H

#include <stdint.h>

#include "fp_data.h"
#include "fp_model.h"
#include "fp_tokenizer.h"

/* A tokenizer by name: "bytes" (the byte-level one), a tokenizer.json or a directory holding
 * one; NULL: model_dir's tokenizer.json. A directory without one is a clear error. */
int fp_tokenizer_open(const char *spec, const char *model_dir, fp_tokenizer_t **out,
                      fp_err_t *err);

typedef struct fp_corpus_spec {
    const char *tokenizer;              /* as fp_tokenizer_open; NULL: the model's */
    const char *model_dir;
    const char *const *files;           /* documents */
    int nfiles;
    const char *const *eval_files;      /* held-out documents of their own (all of files
                                           trains), or NULL: */
    int n_eval;
    double eval_frac;                   /* a fraction of files' documents held out, */
    uint64_t split_seed;                /* chosen by this seed */
} fp_corpus_spec_t;

typedef struct fp_corpus {
    fp_tokenizer_t *tok;
    fp_dataset_t *train, *held;
    fp_dataset_t *all;        /* every document of files before the split (NULL when the
                                 held-out documents are files of their own) */
} fp_corpus_t;

/* Loads the tokenizer (checked against the model's vocabulary) and the documents, wrapped in
 * the model's BOS/EOS. On failure nothing is left to free. */
int fp_corpus_load(const fp_corpus_spec_t *spec, const fp_model_config_t *c, fp_corpus_t *out,
                   fp_err_t *err);
void fp_corpus_free(fp_corpus_t *c);

#endif
