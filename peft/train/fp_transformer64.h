/* fp_transformer64.h — the decoder in float64, for gradient checks.
 *
 * The same code as fp_transformer.h compiled with REAL = double, over double copies of a
 * model's weights and an adapter's factors. Tests perturb those copies to take finite
 * differences, and compare with the analytic gradients of fp_tf64_backward. */
#ifndef FP_TRANSFORMER64_H
#define FP_TRANSFORMER64_H

#include "fp_adapter.h"
#include "fp_error.h"
#include "fp_model.h"
#include "fp_transformer.h"

typedef struct fp_tf64 fp_tf64_t;

/* flags as fp_tf_new; FP_TF_FULL gives gradients of every weight. */
int fp_tf64_new(fp_tf64_t **out, const fp_model_t *m, const fp_adapter_t *lora, int B, int T,
                unsigned flags, fp_err_t *err);
void fp_tf64_free(fp_tf64_t *tf);

/* Mean loss over labelled positions; from token ids, or (embeds non-NULL: N × D) from input
 * embeddings, as HF's inputs_embeds. */
double fp_tf64_loss(fp_tf64_t *tf, const int *tokens, const double *embeds, const int *labels);

/* Backward of the mean loss of the last forward; gradients are zeroed first. */
void fp_tf64_backward(fp_tf64_t *tf);

/* Parameters and their gradients: factor f ('A' or 'B') of adapter module j; weight tensor i
 * in fp_model_tensors order; input embeddings. Counts in *n. */
double *fp_tf64_lora(fp_tf64_t *tf, int j, char f, size_t *n);
double *fp_tf64_lora_grad(fp_tf64_t *tf, int j, char f, size_t *n);
double *fp_tf64_weight(fp_tf64_t *tf, int i, size_t *n);
double *fp_tf64_weight_grad(fp_tf64_t *tf, int i, size_t *n);
const double *fp_tf64_input_grad(const fp_tf64_t *tf);

#endif
