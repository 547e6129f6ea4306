/* fp_model.h — Llama-family decoder weights and their Hugging Face directory format.
 *
 * Shapes (HF orientation, row-major; D = dim, H = heads, KV = kv heads, hd = head_dim,
 * F = ff, V = vocab):
 *   embed       V × D                 model.embed_tokens.weight
 *   attn_norm   D                     model.layers.N.input_layernorm.weight
 *   wq          H·hd × D   (bq H·hd)  model.layers.N.self_attn.q_proj.weight (.bias)
 *   wk, wv      KV·hd × D  (bk, bv)   ...k_proj, v_proj
 *   wo          D × H·hd   (bo D)     ...o_proj
 *   mlp_norm    D                     model.layers.N.post_attention_layernorm.weight
 *   w_gate,w_up F × D                 model.layers.N.mlp.gate_proj / up_proj
 *   w_down      D × F                 model.layers.N.mlp.down_proj
 *   norm        D                     model.norm.weight
 *   lm_head     V × D                 lm_head.weight (absent, = embed, when tied)
 * A linear layer computes y = x·Wᵀ (+ b) for x: N × in.
 */
#ifndef FP_MODEL_H
#define FP_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "fp_adapter.h"
#include "fp_dtype.h"
#include "fp_error.h"
#include "fp_lowp.h"

/* The decoder families fedpeft reads (config.json's model_type). */
typedef enum fp_model_family {
    FP_FAMILY_LLAMA,   /* "llama": Llama 1–3.x, and what fedpeft itself writes */
    FP_FAMILY_MISTRAL, /* "mistral": Llama's layers with an optional sliding window */
    FP_FAMILY_QWEN2,   /* "qwen2": Qwen2 and Qwen2.5: q, k and v biases, no o bias */
    FP_FAMILY_COUNT
} fp_model_family_t;

extern const char *const fp_model_family_names[FP_FAMILY_COUNT]; /* "llama", ... */

/* How RoPE's frequencies are scaled (rope_scaling / rope_parameters), as transformers'
 * modeling_rope_utils computes them; every type's attention factor is 1. */
typedef enum fp_rope_type {
    FP_ROPE_DEFAULT, /* inv_freq_i = 1 / θ^(2i/hd) */
    FP_ROPE_LINEAR,  /* inv_freq_i / factor */
    FP_ROPE_LLAMA3,  /* low frequencies / factor, high kept, a smooth blend between */
} fp_rope_type_t;

typedef struct fp_rope_scaling {
    double factor;           /* linear, llama3 */
    double low_freq_factor;  /* llama3 */
    double high_freq_factor; /* llama3 */
    fp_rope_type_t type;
    int original_max;        /* llama3: original_max_position_embeddings */
} fp_rope_scaling_t;

/* Bit masks of the targets carrying a bias (1 << fp_target_t). */
#define FP_BIAS_QKV 0x7u  /* Qwen2 */
#define FP_BIAS_QKVO 0xfu /* Llama's attention_bias */

enum { FP_MODEL_EOS_MAX = 8 };

/* Laid out without padding (ints in pairs before the doubles), so that configurations compare
 * byte for byte. */
typedef struct fp_model_config {
    fp_model_family_t family; /* model_type */
    int window;       /* sliding_window: a query attends to itself and the window − 1 positions
                         before it (HF: kv > q − window); 0: the whole causal prefix */
    int dim;          /* hidden_size D */
    int n_layers;     /* num_hidden_layers L */
    int n_heads;      /* num_attention_heads H */
    int n_kv_heads;   /* num_key_value_heads KV (H % KV == 0) */
    int head_dim;     /* hd, default D / H */
    int ff;           /* intermediate_size F */
    int vocab;        /* vocab_size V */
    int max_seq;      /* max_position_embeddings */
    double rms_eps;   /* rms_norm_eps */
    double rope_theta;
    fp_rope_scaling_t rope; /* zero: plain RoPE */
    int tied;         /* tie_word_embeddings */
    unsigned bias;    /* the targets with a bias (FP_BIAS_QKVO: attention_bias; FP_BIAS_QKV:
                         Qwen2); 0: none */
    int bos_id, eos_id; /* -1 when absent; eos_id is the first of eos_token_id's list, the
                           token that ends documents */
    int eos_more[FP_MODEL_EOS_MAX - 1]; /* the rest of eos_token_id's list (Llama 3.x Instruct) */
    int n_eos_more;
} fp_model_config_t;

/* The seven LoRA-able linear layers of a decoder layer. */
typedef enum fp_target {
    FP_T_Q, FP_T_K, FP_T_V, FP_T_O, FP_T_GATE, FP_T_UP, FP_T_DOWN, FP_T_COUNT
} fp_target_t;

extern const char *const fp_target_names[FP_T_COUNT]; /* "q_proj", ... "down_proj" */

/* Parses "q_proj,v_proj" (or "all") into a bit mask of (1 << fp_target_t). */
int fp_targets_parse(const char *list, unsigned *mask, fp_err_t *err);

typedef struct fp_layer_w {
    float *attn_norm;
    float *w[FP_T_COUNT];   /* q, k, v, o, gate, up, down: shapes as above; consecutive in
                               memory, so w[Q] starts the (H·hd + 2·KV·hd) × D matrix q|k|v
                               and w[GATE] the 2F × D matrix gate|up */
    float *b[FP_T_COUNT];   /* biases of the targets in cfg.bias; NULL otherwise */
    float *mlp_norm;
    fp_lowp_mat_t lp[FP_T_COUNT]; /* a low-precision base (fp_model_lowp): the weights,
                                     consecutive as w[] are; w[] is then NULL */
} fp_layer_w_t;

typedef struct fp_model {
    fp_model_config_t cfg;
    float *embed;
    fp_layer_w_t *layers;   /* n_layers */
    float *norm;
    float *lm_head;         /* == embed when tied */
    float *mem;             /* the one allocation holding every float weight */
    size_t n_params;        /* parameters (floats in mem while the base is f32) */
    size_t n_floats;        /* floats in mem */
    /* a low-precision base (fp_model_lowp): the linear weights (layers[].lp), the embedding
     * and the head in lowp_mem; embed, lm_head and every w[] are then NULL */
    fp_base_dtype_t base;
    uint16_t *embed_h, *lm_head_h;  /* bf16, V × D (the same when tied) */
    void *lowp_mem;
    size_t lowp_bytes;
} fp_model_t;

/* One weight tensor of a model, as named in HF checkpoints. */
typedef struct fp_model_tensor {
    char name[96];
    float *data;
    int ndim;
    int64_t shape[2];
    int decay;              /* 1 for matrices (weight decay applies), 0 for norms and biases */
    fp_lowp_mat_t lp;       /* data NULL (a low-precision base, inside fp_model.c only): where
                               the weight is held */
} fp_model_tensor_t;

/* d_out and d_in of target t. */
void fp_target_shape(const fp_model_config_t *c, fp_target_t t, int *d_out, int *d_in);

/* Names of the LoRA module of target t in layer l: "model.layers.<l>.self_attn.q_proj". */
void fp_lora_module_name(char *buf, size_t n, int layer, fp_target_t t);

/* The modules a LoRA of rank r on `targets` has for a model of config c, in layer and target
 * order, each with its shape. *out is one allocation holding the names too (free it). */
int fp_lora_descs(const fp_model_config_t *c, unsigned targets, int rank, double alpha,
                  int rslora, fp_module_desc_t **out, int *n, fp_err_t *err);

/* Whether a config.json key names, describes or configures generation only (PretrainedConfig's
 * own and the hub's bookkeeping: never the forward pass or the loss) — for every family's
 * reader, the vision models' too. */
int fp_config_key_inert(const char *key);

/* Checks a configuration (positive sizes, H % KV == 0, even head_dim, ...). */
int fp_model_config_check(const fp_model_config_t *c, fp_err_t *err);

/* Reads config.json of an HF model directory (or file): model_type llama, mistral or qwen2.
 * Every key is either understood or known not to change the computation; any other key, and
 * any feature fedpeft does not compute (yarn or dynamic RoPE, mlp_bias, an activation other
 * than silu, a quantized checkpoint, …) is -ENOTSUP with a message naming the key and why. */
int fp_model_config_load(const char *path, fp_model_config_t *c, fp_err_t *err);

/* Writes config.json for c to path (fp_afile: whole or not at all), in c's family's own form;
 * torch_dtype as given. What fp_model_config_load reads back is c. */
int fp_model_config_write(const fp_model_config_t *c, const char *path, const char *torch_dtype,
                          fp_err_t *err);

/* An unscaled RoPE inverse frequency 1 / θ^(2i/hd) as c's rope scaling turns it
 * (transformers' _compute_linear_scaling_rope_parameters, _compute_llama3_parameters). */
double fp_rope_scale(const fp_model_config_t *c, double inv_freq);

/* One line on what a model is: "qwen2, 494.0 M parameters, 24 layers, D 896, 14/2 heads of
 * 64, F 4864, V 151936, RoPE θ 1e+06, tied, q/k/v biases". */
void fp_model_config_describe(const fp_model_config_t *c, char *buf, size_t n);

/* The parameters of a model of config c. */
size_t fp_model_config_params(const fp_model_config_t *c);

/* The model directory of a config path: path itself when it is a directory, else the
 * directory of the config.json it names ("." for a bare file name). */
void fp_model_dir_of(const char *path, char *buf, size_t n);

/* Allocates a model with zeroed weights (norms zero too: call fp_model_init). */
int fp_model_new(fp_model_t **out, const fp_model_config_t *c, fp_err_t *err);
void fp_model_free(fp_model_t *m);

/* Keeps the base in low precision: the linear weights in dt (bf16 or nf4; nf4 needs every
 * matrix to be whole blocks of 64 weights), the embedding and the head in bf16 (after checking
 * that oneDNN multiplies bf16 here: fp_lowp_probe); their float copies are freed,
 * so the model serves forward passes and LoRA training (fp_transformer's products go through
 * oneDNN) but no full training or saving. dt f32: nothing changes. */
int fp_model_lowp(fp_model_t *m, fp_base_dtype_t dt, fp_err_t *err);
/* Bytes of every weight, in whatever precision each is held. */
size_t fp_model_weight_bytes(const fp_model_t *m);
/* A copy of every weight, to put back after an update was folded in (fp_lora_merge_into);
 * NULL when out of memory. Free it with free(). */
void *fp_model_snapshot(const fp_model_t *m);
void fp_model_restore(fp_model_t *m, const void *snap);

/* HF LlamaForCausalLM initialisation: linear and embedding weights ~ N(0, 0.02²), norms 1,
 * biases 0. Deterministic for a seed. */
void fp_model_init(fp_model_t *m, uint64_t seed);

/* Every tensor of the model in checkpoint order (lm_head omitted when tied). *out malloc'd. */
int fp_model_tensors(const fp_model_t *m, fp_model_tensor_t **out, int *n, fp_err_t *err);

/* Loads an HF model directory: config.json, then model.safetensors or the shards listed in
 * model.safetensors.index.json; F32, BF16, F16 or F64 weights, held as float32. A missing or
 * mis-shaped tensor is an error naming it, and so is one the configuration does not account
 * for (a tied model's lm_head and rotary_emb.inv_freq buffers excepted, as transformers
 * ignores them). */
int fp_model_load(const char *dir, fp_model_t **out, fp_err_t *err);
/* The same with the base held in dt as it is read (fp_model_lowp's layout, the same bytes):
 * no float copy of the linear weights, the embedding or the head is ever made. Each tensor is
 * converted a chunk at a time, and its mapped pages dropped as they are read, so the peak is
 * the low-precision base plus a few pages. A bf16 checkpoint fills a bf16 base byte for byte.
 * dt f32: fp_model_load. */
int fp_model_load_base(const char *dir, fp_base_dtype_t dt, fp_model_t **out, fp_err_t *err);

/* What fp_model_check_dir found in a checkpoint's files. */
typedef struct fp_model_files {
    unsigned dtypes;   /* the weights' element types, as bits 1 << fp_dtype_t */
    uint64_t bytes;    /* the weights' bytes */
    int tensors;       /* tensors the model reads */
    int shards;        /* safetensors files */
} fp_model_files_t;

/* Checks that dir holds a model fedpeft computes exactly as transformers would, without
 * reading its weights: config.json (fp_model_config_load's refusals), every tensor present
 * with its shape and a readable dtype, and none that the configuration does not account for.
 * Fills *c and *info; an error names the key or tensor at fault and why. */
int fp_model_check_dir(const char *dir, fp_model_config_t *c, fp_model_files_t *info,
                       fp_err_t *err);

/* The identity of a model's weights, the federation's base_model_sha256: the SHA-256 of
 * model.safetensors, or, for a sharded checkpoint, of its shards' bytes one after the other
 * in the byte order of their names (what `cat $(LC_ALL=C ls model-*.safetensors) | sha256sum`
 * prints). The files are streamed: memory stays small for any model size. *size and
 * *mtime_ns (either may be NULL) receive the files' total size and newest modification time,
 * so that a caller can cache the hash; with sha NULL nothing is hashed. */
int fp_model_weights_id(const char *dir, uint8_t sha[32], uint64_t *size, int64_t *mtime_ns,
                        fp_err_t *err);

/* Writes config.json and model.safetensors (dtype F32 or BF16) into dir (created). */
int fp_model_save(const fp_model_t *m, const char *dir, fp_dtype_t dtype, fp_err_t *err);

#endif
