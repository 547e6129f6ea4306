/* fp_choice.h — a closed-set task scored by label likelihood.
 *
 * Prompted data (fp_data.h) whose completions all come from a small set of labels is a
 * classification task. The model's answer to an example is the label it would write after the
 * prompt: decoding greedily, each token chosen among the labels still possible (so labels that
 * begin alike are told apart where they differ, and a label that is a prefix of another ends
 * with the EOS token). The true label is fed in one forward pass (teacher forcing); every logit
 * the decision needs lies on its path, so an example costs one pass, not one per label.
 *
 * The same pass gives the loss of the true completion (its tokens and its EOS), the quantity
 * fp_evaluate averages; fp_evaluate packs several documents in a window, which lets each see
 * the ones before it, so the two agree closely rather than exactly.
 */
#ifndef FP_CHOICE_H
#define FP_CHOICE_H

#include "fp_adapter.h"
#include "fp_data.h"
#include "fp_error.h"
#include "fp_model.h"
#include "fp_tokenizer.h"

typedef struct fp_choices {
    int n;        /* labels */
    int eos;      /* the token that ends a completion (−1: none) */
    char **names; /* n: the labels as text (for messages and reports) */
    int **ids;    /* n: each label's tokens (len[k] of them) */
    int *len;
} fp_choices_t;

/* Labels from their token sequences (ids[i], len[i] ≥ 1) and names; eos is the token that ends
 * every completion in the data (−1: none). Duplicate labels are refused, and without an EOS a
 * label that is a prefix of another (-EINVAL, naming both). Free *out with fp_choices_free. */
int fp_choices_new(const char *const *names, const int *const *ids, const int *len, int n,
                   int eos, fp_choices_t **out, fp_err_t *err);
void fp_choices_free(fp_choices_t *c);

/* Labels given as text, tokenized as a completion is (fp_data.h). */
int fp_choices_from_text(const fp_tokenizer_t *tok, const char *const *names, int n, int eos,
                         fp_choices_t **out, fp_err_t *err);

/* Labels from data: the distinct completions of the prompted dataset d (without the EOS that
 * ends each document when eos ≥ 0), in order of first appearance; at most max_labels of them,
 * else -E2BIG (the completions are not a closed set). */
int fp_choices_from_data(const fp_tokenizer_t *tok, const fp_dataset_t *d, int eos,
                         int max_labels, fp_choices_t **out, fp_err_t *err);

typedef struct fp_choice_score {
    long examples;   /* documents scored */
    long correct;    /* of which the model's answer was the true label */
    double loss_sum; /* Σ −log p over the true completions' tokens (nats) */
    long loss_tokens;
} fp_choice_score_t;

/* Scores every document of the prompted dataset d (adds to *sc, which the caller zeroes).
 * A document's completion must be one of the labels; a prompt longer than the window loses its
 * beginning. batch and seq bound the forward passes (seq must hold each completion and one
 * prompt token). */
int fp_choice_eval(const fp_model_t *m, const fp_adapter_t *lora, const fp_dataset_t *d,
                   const fp_choices_t *c, int batch, int seq, fp_choice_score_t *sc,
                   fp_err_t *err);

#endif
