/* fp_transformer.h — forward and backward passes of a Llama-family decoder with LoRA.
 *
 * Sizes: B batch, T sequence length, N = B·T tokens, D dim, H heads, KV kv heads, hd head
 * dimension, F ff, V vocab, r LoRA rank. Tokens and labels are N int32 in row-major B × T;
 * label −1 means "no loss at this position" (padding, prompt tokens, the last position).
 *
 * The same code is compiled for float (training, evaluation) and double (fp_transformer64.h,
 * the reference of the gradient checks): every operation — RMSNorm, HF RoPE (rotate_half),
 * grouped-query attention with a causal mask, SwiGLU, tied or untied head, attention biases —
 * has an exact backward, and base weights are never given gradients unless full training
 * was asked for.
 */
#ifndef FP_TRANSFORMER_H
#define FP_TRANSFORMER_H

#include "fp_adapter.h"
#include "fp_error.h"
#include "fp_model.h"

enum {
    FP_TF_EVAL = 0,      /* forward only: activations are not kept */
    FP_TF_LORA = 1,      /* keep activations; backward gives LoRA factor gradients */
    FP_TF_FULL = 2,      /* keep activations; backward gives gradients of every weight */
    FP_TF_INPUT_GRAD = 4 /* backward also leaves d loss / d input embeddings (tests) */
};

typedef struct fp_tf fp_tf_t;

/* Checks that every module of lora adapts a weight of the model, with its shape. */
int fp_lora_check(const fp_model_t *m, const fp_adapter_t *lora, fp_err_t *err);

/* A workspace for batches of B × T tokens over model m with the optional adapter lora (both
 * borrowed: they must outlive the workspace, and may change between calls). */
int fp_tf_new(fp_tf_t **out, const fp_model_t *m, const fp_adapter_t *lora, int B, int T,
              unsigned flags, fp_err_t *err);
void fp_tf_free(fp_tf_t *tf);

/* Bytes of activations and scratch held by the workspace. */
size_t fp_tf_bytes(const fp_tf_t *tf);

/* Forward pass and causal LM loss: *loss_sum is the summed token loss (nats) over the
 * *count labelled positions. */
void fp_tf_forward(fp_tf_t *tf, const int *tokens, const int *labels, double *loss_sum,
                   long *count);

/* Logits of the last forward, N × V row-major (B × T rows). Only a forward without training
 * flags (FP_TF_EVAL) leaves raw logits; training workspaces keep probabilities there. */
const float *fp_tf_logits(const fp_tf_t *tf);

/* Backward of loss_scale × Σ token losses (loss_scale = 1/count for a mean). Gradients are
 * added (not assigned) into lora_grad (same modules and shapes as the adapter; FP_TF_LORA)
 * and full_grad (a model of the same configuration; FP_TF_FULL). */
void fp_tf_backward(fp_tf_t *tf, double loss_scale, fp_adapter_t *lora_grad,
                    fp_model_t *full_grad);

/* 0, or the first error of a product through oneDNN (a low-precision base) since the
 * workspace was made: its outputs are then NaN, and callers must report this error rather
 * than the non-finite loss it causes. */
int fp_tf_status(const fp_tf_t *tf);
/* An error message for fp_tf_status's rc into err; returns rc. */
int fp_tf_status_error(int rc, fp_err_t *err);

/* d loss / d input embeddings after fp_tf_backward (N × D; FP_TF_INPUT_GRAD). */
const float *fp_tf_input_grad(const fp_tf_t *tf);

#endif
