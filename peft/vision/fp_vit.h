/* fp_vit.h — a vision transformer (Hugging Face's ViTForImageClassification) with LoRA on
 * its linears and a classifier head trained in full.
 *
 * Sizes: B images, C channels, S × S pixels, P × P patches, Np = (S/P)² patches, T = Np + 1
 * tokens (a CLS token first), N = B·T, D hidden, H heads of hd = D/H, F intermediate, K
 * labels, r LoRA rank. Pixels are B × C × S × S float32 (channels first, as the
 * preprocessing leaves them: fp_imgproc.h).
 *
 * The model, as HF's: patch embedding (a convolution of stride P, here a product over the
 * patches), CLS token, position embeddings; L pre-LayerNorm blocks (LayerNorm with bias,
 * bidirectional multi-head attention with biases, output projection, LayerNorm, intermediate
 * dense, exact (erf) GELU, output dense, both residual); a final LayerNorm; the classifier on
 * the CLS token. The loss is the cross-entropy of the labels.
 *
 * LoRA may adapt any of a layer's six linears, named as PEFT names them under the model:
 * vit.encoder.layer.<i>.attention.attention.{query,key,value}, .attention.output.dense,
 * .intermediate.dense and .output.dense. The head (classifier.weight K × D, classifier.bias K)
 * is a separate trained parameter, as PEFT's modules_to_save.
 *
 * The same code is compiled for float (fp_vit.c: training, evaluation) and double
 * (fp_vit64.c: the reference of the gradient checks).
 */
#ifndef FP_VIT_H
#define FP_VIT_H

#include <stddef.h>
#include <stdint.h>

#include "fp_adapter.h"
#include "fp_error.h"
#include "fp_lowp.h"

enum { FP_VT_QUERY, FP_VT_KEY, FP_VT_VALUE, FP_VT_ATTN_OUT, FP_VT_FC1, FP_VT_FC2, FP_VT_COUNT };

typedef struct fp_vit_config {
    int D, L, H, F;  /* hidden_size, num_hidden_layers, num_attention_heads, intermediate_size */
    int S, P, C;     /* image_size, patch_size, num_channels */
    int K;           /* labels (id2label, or num_labels) */
    double eps;      /* layer_norm_eps */
    int qkv_bias;    /* query/key/value have biases */
    char **labels;   /* K names (id2label), or NULL; owned */
} fp_vit_config_t;

/* Reads a ViT config.json (path, or a directory holding it). Every key is understood or refused by name (dropout above 0, an
 * activation other than exact gelu, a model_type other than vit, ...). */
int fp_vit_config_load(const char *path, fp_vit_config_t *c, fp_err_t *err);
/* Checks the sizes of c (positive, D divisible by H, S by P, bounded). */
int fp_vit_config_check(const fp_vit_config_t *c, fp_err_t *err);
void fp_vit_config_free(fp_vit_config_t *c);

/* The frozen model, float32, one allocation. Layer l's linear t: w[t] out × in, b[t] out (NULL
 * where the config has no bias: query/key/value without qkv_bias). On a low-precision base
 * (fp_vit_lowp) the linears' weights are lp[t] instead (w[t] NULL), in a second allocation;
 * biases, LayerNorms, embeddings and the head stay float32. */
typedef struct fp_vit_layer {
    float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    float *w[FP_VT_COUNT], *b[FP_VT_COUNT];
    fp_lowp_mat_t lp[FP_VT_COUNT];
} fp_vit_layer_t;

typedef struct fp_vit {
    fp_vit_config_t c;
    float *patch_w, *patch_b; /* D × (C·P·P), D */
    float *cls, *pos;         /* D, T × D */
    float *lnf_w, *lnf_b;     /* D, D */
    float *head_w, *head_b;   /* K × D, K: the checkpoint's classifier (may be untrained) */
    fp_vit_layer_t *layers;
    int head_fresh;           /* the checkpoint had no classifier: head_* are zeros */
    float *mem;
    size_t nparams;           /* floats in mem */
    fp_base_dtype_t base;     /* the linears' precision: FP_BASE_F32, _BF16 or _NF4 */
    void *lowp_mem;           /* the linears' weights on a low-precision base */
    size_t lowp_bytes;
} fp_vit_t;

/* A model of config c (copied) with every weight zero, to be filled. */
int fp_vit_alloc(const fp_vit_config_t *c, fp_vit_t **out, fp_err_t *err);
void fp_vit_free(fp_vit_t *m);
/* HF's initialisation (initializer_range 0.02): linears, patches, CLS, positions and the head
 * from N(0, 0.02²), biases 0, LayerNorms 1 and 0; from seed. */
void fp_vit_init_random(fp_vit_t *m, uint64_t seed);

/* Reads an HF ViTForImageClassification directory (config.json, model.safetensors in f32, f16
 * or bf16). A checkpoint without a classifier (a backbone) loads with head_fresh set. */
int fp_vit_load(const char *dir, fp_vit_t **out, fp_err_t *err);
/* Writes m as such a directory (float32), loadable by transformers as well; with head_fresh
 * set, without a classifier (a backbone, whose users train their own head). A model on a
 * low-precision base is refused (its float32 weights are gone). */
int fp_vit_save(const fp_vit_t *m, const char *dir, fp_err_t *err);

/* Moves m's linears to a low-precision base (fp_lowp.h: bf16, or NF4 blocks of 64 weights;
 * FP_BASE_F32 changes nothing): products with them run through oneDNN's bf16 matmul, an
 * activation rounded to bf16 as their left operand, accumulated in float32. Refused where
 * oneDNN cannot multiply bf16 on this CPU (the error says so), for NF4 when a linear's size is
 * not a multiple of 64, and on a model already moved. */
int fp_vit_lowp(fp_vit_t *m, fp_base_dtype_t dt, fp_err_t *err);
/* fp_vit_load, then fp_vit_lowp(dt). */
int fp_vit_load_base(const char *dir, fp_base_dtype_t dt, fp_vit_t **out, fp_err_t *err);
/* Bytes of m's weights (float32 and low-precision). */
size_t fp_vit_weight_bytes(const fp_vit_t *m);
/* A copy of every weight of m (malloc'd; free it), and m's weights set back from one. */
void *fp_vit_snapshot(const fp_vit_t *m);
void fp_vit_restore(fp_vit_t *m, const void *snap);

/* A fine-tuned ViT's result as PEFT saves it with modules_to_save=["classifier"]: the LoRA
 * factors and the head (base_model.model.classifier.weight K × D and .bias K) in one adapter
 * directory; loaded back with the head as K × D + K floats (*head malloc'd; NULL for an
 * adapter of LoRA factors only, which keeps the model's classifier; *lora keeps it too, as its
 * tensors trained in full). */
int fp_vit_adapter_save(const fp_adapter_t *lora, const fp_vit_config_t *c, const float *head_w,
                        const float *head_b, const char *dir, fp_err_t *err);
int fp_vit_adapter_load(const char *dir, const fp_vit_config_t *c, fp_adapter_t **lora,
                        float **head, fp_err_t *err);

/* The head carried by an adapter as its tensors trained in full — "classifier.weight" K × D
 * and "classifier.bias" K × 1, PEFT's modules_to_save — as pointers into ad's values (both
 * NULL when it carries none). Any other tensor trained in full, or another shape, is refused:
 * what the model would not use must not be dropped silently. */
int fp_vit_head_of(const fp_vit_config_t *c, const fp_adapter_t *ad, float **w, float **b,
                   fp_err_t *err);
/* Gives ad the head as its tensors trained in full: copies of w and b (NULL: zeros). */
int fp_vit_head_set(const fp_vit_config_t *c, fp_adapter_t *ad, const float *w, const float *b,
                    fp_err_t *err);

/* A comma list of linears (PEFT's short names query/key/value or the suffixes
 * attention.output.dense, intermediate.dense, output.dense) as a mask of 1 << FP_VT_*. */
int fp_vit_targets_parse(const char *list, unsigned *mask, fp_err_t *err);
/* The LoRA modules of every layer's linears in mask at rank, alpha, rslora: *out is one
 * allocation holding the names too (free it), *n entries, layer by layer. */
int fp_vit_lora_descs(const fp_vit_config_t *c, unsigned mask, int rank, double alpha,
                      int rslora, fp_module_desc_t **out, int *n, fp_err_t *err);
/* The head as tensors trained in full: classifier.bias K × 1, classifier.weight K × D. */
void fp_vit_head_descs(const fp_vit_config_t *c, fp_whole_desc_t d[2]);
/* Gives ad a new head as HF initialises one (weights N(0, 0.02²), biases 0) from seed: the
 * same values wherever the same seed is used (the coordinator's first global, a site alone,
 * the simulation's base row). */
int fp_vit_head_init(const fp_vit_config_t *c, fp_adapter_t *ad, uint64_t seed, fp_err_t *err);
/* 1 when the config.json at path (or in the directory path) is a ViT's (model_type "vit"),
 * 0 for another model, or < 0 when it cannot be read. */
int fp_config_is_vit(const char *path, fp_err_t *err);
/* Folds ad's factors into m's weights: W += s·B·A for each module (a restart strategy's
 * global update, made part of the base), in the base's precision. */
int fp_vit_fold(fp_vit_t *m, const fp_adapter_t *ad, fp_err_t *err);

/* The shape of linear t: out × in. */
void fp_vit_target_shape(const fp_vit_config_t *c, int t, int *out, int *in);
/* PEFT's short name of linear t ("query", ..., "attention.output.dense"); its module path in
 * layer l into buf ("vit.encoder.layer.<l>.<...>"). */
const char *fp_vit_target_name(int t);
void fp_vit_module_name(int l, int t, char *buf, size_t n);

/* Checks that every module of lora is one of m's linears with its shape. */
int fp_vit_lora_check(const fp_vit_config_t *c, const fp_adapter_t *lora, fp_err_t *err);

typedef struct fp_vit_ws fp_vit_ws_t;

/* A workspace for batches of B images over m with the adapter lora (may be NULL) and the head
 * (K × D and K floats); all borrowed, they may change between calls. train: keep what the
 * backward needs. */
int fp_vit_new(fp_vit_ws_t **out, const fp_vit_t *m, const fp_adapter_t *lora,
               const float *head_w, const float *head_b, int B, int train, fp_err_t *err);
void fp_vit_free_ws(fp_vit_ws_t *ws);

/* Forward of b ≤ B images; labels (b, or NULL) give *loss_sum (nats, summed) and *correct
 * (argmax right). */
void fp_vit_forward(fp_vit_ws_t *ws, const float *pixels, int b, const int *labels,
                    double *loss_sum, int *correct);
/* The last forward's logits, b × K. */
const float *fp_vit_logits(const fp_vit_ws_t *ws);
/* 0, or the first error of a low-precision product since the workspace was made (oneDNN's
 * status; the results are then NaN): fp_vit_status_error words it. */
int fp_vit_status(const fp_vit_ws_t *ws);
int fp_vit_status_error(int rc, fp_err_t *err);

/* Backward of loss_scale × Σ losses of the last forward (train workspace, with labels):
 * gradients added into lora_grad (the adapter's modules and shapes) and head_wg (K × D),
 * head_bg (K); any may be NULL. full_grad (a model of the same configuration, or NULL): every
 * frozen weight's gradient added into it too (pretraining; its own classifier untouched). */
void fp_vit_backward(fp_vit_ws_t *ws, double loss_scale, fp_adapter_t *lora_grad,
                     float *head_wg, float *head_bg, fp_vit_t *full_grad);

/* ---- the float64 reference (fp_vit64.c) over one flat parameter vector θ: every LoRA
 * module's A then B (the adapter's order), then the head's weight and bias ---- */

/* Parameters in θ for lora and a K-label head. */
size_t fp_vit64_nparams(const fp_vit_config_t *c, const fp_adapter_t *lora);
/* θ from lora and the head (as float, widened). */
void fp_vit64_pack(const fp_vit_config_t *c, const fp_adapter_t *lora, const float *head_w,
                   const float *head_b, double *theta);
/* The mean loss over b images at θ (the frozen weights widened from m; lora gives the
 * modules' shapes and scales), and, when grad is not NULL, its gradient into grad. */
double fp_vit64_loss(const fp_vit_t *m, const fp_adapter_t *lora, const double *theta,
                     const double *pixels, int b, const int *labels, double *grad);
/* The same with the frozen weights as parameters too: w in m->mem's layout (m->nparams
 * values; the model's own classifier there is unused, the head being θ's), their gradient
 * into gw when it is not NULL. */
double fp_vit64_loss_full(const fp_vit_t *m, const fp_adapter_t *lora, const double *w,
                          const double *theta, const double *pixels, int b, const int *labels,
                          double *gw, double *grad);

#endif
