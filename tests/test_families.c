/* Models users bring. Tiny mirrors of real Hugging Face checkpoints — each config.json with
 * every key the hub's file has, in its own spelling, only the sizes shrunk; random weights
 * under HF tensor names — of Llama-3.2-1B (llama3 RoPE scaling, with an original context short
 * enough that scaling matters at the test's length, and every one of its three bands used),
 * Llama-3.2-1B-Instruct (an eos list),
 * the same in transformers 5's rope_parameters form, Qwen2.5-0.5B (q/k/v biases, tied,
 * θ 1e6) and Mistral-7B-v0.1 with a window shorter than the sequence.
 *
 * Each loads with what its config means, and its loss in float32 equals the float64
 * reference, and both equal an independent float64 PyTorch model with transformers'
 * semantics (tests/parity/hf_loss.py) to 1e-5 relative; the scaling and the window each move
 * the loss by far more than that, so a model that ignored them would fail. A key or tensor
 * fedpeft does not understand is refused by name; `fedpeft model check` says the same. */
#include "fp_test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"
#include "fp_json.h"
#include "fp_model.h"
#include "fp_rng.h"
#include "fp_safetensors.h"
#include "fp_transformer.h"
#include "fp_transformer64.h"

enum { B = 2, T = 24, N = B * T, VOCAB = 61 };

/* The sizes every mirror shares: D 32, 2 layers, 4 heads of 8 over 2 key/value heads. */
#define SIZES                                                                                  \
    "\"hidden_size\": 32, \"intermediate_size\": 48, \"num_hidden_layers\": 2, "                \
    "\"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"vocab_size\": 61, "

static const char llama32[] =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": false, "
    "\"attention_dropout\": 0.0, \"bos_token_id\": 57, \"eos_token_id\": 58, \"head_dim\": 8, "
    "\"hidden_act\": \"silu\", \"initializer_range\": 0.02, \"max_position_embeddings\": 512, "
    "\"mlp_bias\": false, \"model_type\": \"llama\", \"pretraining_tp\": 1, "
    "\"rms_norm_eps\": 1e-05, \"rope_scaling\": {\"factor\": 32.0, \"high_freq_factor\": 4.0, "
    "\"low_freq_factor\": 1.0, \"original_max_position_embeddings\": 400, "
    "\"rope_type\": \"llama3\"}, \"rope_theta\": 500000.0, \"tie_word_embeddings\": true, "
    "\"torch_dtype\": \"bfloat16\", \"transformers_version\": \"4.45.0.dev0\", "
    "\"use_cache\": true, " SIZES "\"_pad\": 0}";

static const char llama32_instruct[] =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": false, "
    "\"attention_dropout\": 0.0, \"bos_token_id\": 57, \"eos_token_id\": [58, 59, 60], "
    "\"head_dim\": 8, \"hidden_act\": \"silu\", \"initializer_range\": 0.02, "
    "\"max_position_embeddings\": 512, \"mlp_bias\": false, \"model_type\": \"llama\", "
    "\"pretraining_tp\": 1, \"rms_norm_eps\": 1e-05, \"rope_scaling\": {\"factor\": 32.0, "
    "\"high_freq_factor\": 4.0, \"low_freq_factor\": 1.0, "
    "\"original_max_position_embeddings\": 400, \"rope_type\": \"llama3\"}, "
    "\"rope_theta\": 500000.0, \"tie_word_embeddings\": true, \"torch_dtype\": \"bfloat16\", "
    "\"transformers_version\": \"4.45.0.dev0\", \"use_cache\": true, " SIZES "\"_pad\": 0}";

/* transformers 5 writes rope_parameters (θ inside it) and dtype */
static const char llama32_v5[] =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": false, "
    "\"attention_dropout\": 0.0, \"bos_token_id\": 57, \"eos_token_id\": 58, \"head_dim\": 8, "
    "\"hidden_act\": \"silu\", \"initializer_range\": 0.02, \"max_position_embeddings\": 512, "
    "\"mlp_bias\": false, \"model_type\": \"llama\", \"pretraining_tp\": 1, "
    "\"rms_norm_eps\": 1e-05, \"rope_parameters\": {\"factor\": 32.0, "
    "\"high_freq_factor\": 4.0, \"low_freq_factor\": 1.0, "
    "\"original_max_position_embeddings\": 400, \"rope_theta\": 500000.0, "
    "\"rope_type\": \"llama3\"}, \"tie_word_embeddings\": true, \"dtype\": \"bfloat16\", "
    "\"transformers_version\": \"5.0.0\", \"use_cache\": true, " SIZES "\"_pad\": 0}";

static const char qwen25[] =
    "{\"architectures\": [\"Qwen2ForCausalLM\"], \"attention_dropout\": 0.0, "
    "\"bos_token_id\": 57, \"eos_token_id\": 57, \"hidden_act\": \"silu\", "
    "\"initializer_range\": 0.02, \"max_position_embeddings\": 512, "
    "\"max_window_layers\": 2, \"model_type\": \"qwen2\", \"rms_norm_eps\": 1e-06, "
    "\"rope_theta\": 1000000.0, \"sliding_window\": 512, \"tie_word_embeddings\": true, "
    "\"torch_dtype\": \"bfloat16\", \"transformers_version\": \"4.40.1\", "
    "\"use_cache\": true, \"use_sliding_window\": false, " SIZES "\"_pad\": 0}";

static const char mistral[] =
    "{\"architectures\": [\"MistralForCausalLM\"], \"bos_token_id\": 1, \"eos_token_id\": 2, "
    "\"hidden_act\": \"silu\", \"initializer_range\": 0.02, "
    "\"max_position_embeddings\": 512, \"model_type\": \"mistral\", \"rms_norm_eps\": 1e-05, "
    "\"rope_theta\": 10000.0, \"sliding_window\": 2, \"tie_word_embeddings\": false, "
    "\"torch_dtype\": \"bfloat16\", \"transformers_version\": \"4.34.0.dev0\", "
    "\"use_cache\": true, " SIZES "\"_pad\": 0}";

/* The mirror's config text without the placeholder key that ends every literal above. */
static char *config_text(const char *mirror)
{
    char *s = strdup(mirror);
    char *pad = strstr(s, ", \"_pad\": 0}");
    strcpy(pad, "}");
    return s;
}

/* Edits a config text: sets key to value (JSON text) or removes it (value NULL). */
static char *edited(const char *text, const char *key, const char *value)
{
    json_error_t je;
    json_t *j = json_loads(text, 0, &je);
    assert_non_null(j);
    if (value)
        json_object_set_new(j, key, json_loads(value, JSON_DECODE_ANY, &je));
    else
        json_object_del(j, key);
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    return s;
}

/* A directory holding config text alone, as config.json. */
static char *make_cfg(const char *name, const char *text)
{
    char *d = fp_path_join(fpt_dir, name);
    assert_int_equal(fp_fs_mkdirs(d, 0755, NULL), 0);
    free(fpt_write(d, "config.json", text, strlen(text)));
    return d;
}

/* A model directory for config text: random weights (biases too) under HF names, saved by
 * fedpeft, then config.json replaced by the text itself. extra: a tensor name to add. */
static char *make_mirror(const char *name, const char *text, const char *extra)
{
    char *d = fp_path_join(fpt_dir, name);
    assert_int_equal(fp_fs_mkdirs(d, 0755, NULL), 0);
    char *cp = fpt_write(d, "config.json", text, strlen(text));
    fp_model_config_t c;
    fp_err_t err = {0};
    int rc = fp_model_config_load(d, &c, &err);
    if (rc)
        print_error("%s: %s\n", name, err.msg);
    assert_int_equal(rc, 0);
    fp_model_t *m;
    assert_int_equal(fp_model_new(&m, &c, &err), 0);
    fp_rng_t rng;
    fp_rng_seed(&rng, 7);
    /* larger than HF's 0.02 so that attention is far from uniform and every feature shows */
    fp_rng_fill_normal(&rng, m->mem, m->n_params, 0.3);
    for (int l = 0; l < c.n_layers; l++)
        for (int j = 0; j < c.dim; j++) {
            m->layers[l].attn_norm[j] = (float)(1 + 0.2 * fp_rng_normal(&rng));
            m->layers[l].mlp_norm[j] = (float)(1 + 0.2 * fp_rng_normal(&rng));
        }
    assert_int_equal(fp_model_save(m, d, FP_DT_F32, &err), 0);
    if (extra) { /* the same weights with one more tensor, written by hand */
        fp_model_tensor_t *t;
        int nt;
        assert_int_equal(fp_model_tensors(m, &t, &nt, &err), 0);
        fp_st_entry_t *e = calloc((size_t)nt + 1, sizeof *e);
        for (int i = 0; i < nt; i++)
            e[i] = (fp_st_entry_t){.name = t[i].name, .dtype = FP_DT_F32, .ndim = t[i].ndim,
                                   .shape = {(uint64_t)t[i].shape[0], (uint64_t)t[i].shape[1]},
                                   .f32 = t[i].data};
        e[nt] = (fp_st_entry_t){.name = extra, .dtype = FP_DT_F32, .ndim = 1,
                                .shape = {(uint64_t)c.dim, 0}, .f32 = m->norm};
        char *wp = fp_path_join(d, "model.safetensors");
        assert_int_equal(fp_st_write(wp, e, (size_t)nt + 1, NULL, &err), 0);
        free(wp);
        free(e);
        free(t);
    }
    fp_model_free(m);
    free(cp);
    cp = fpt_write(d, "config.json", text, strlen(text));
    free(cp);
    return d;
}

static void make_tokens(int *tokens, int *labels, int rows[B][T + 1])
{
    fp_rng_t rng;
    fp_rng_seed(&rng, 99);
    for (int b = 0; b < B; b++)
        for (int t = 0; t <= T; t++)
            rows[b][t] = (int)fp_rng_below(&rng, VOCAB);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            tokens[b * T + t] = rows[b][t];
            labels[b * T + t] = rows[b][t + 1];
        }
}

/* fedpeft's loss in float32 and float64 on the fixed windows. */
static void fedpeft_losses(const char *dir, double *l32, double *l64)
{
    int tokens[N], labels[N], rows[B][T + 1];
    make_tokens(tokens, labels, rows);
    fp_err_t err = {0};
    fp_model_t *m;
    int rc = fp_model_load(dir, &m, &err);
    if (rc)
        print_error("%s: %s\n", dir, err.msg);
    assert_int_equal(rc, 0);
    fp_tf_t *t32;
    fp_tf64_t *t64;
    assert_int_equal(fp_tf_new(&t32, m, NULL, B, T, FP_TF_EVAL, &err), 0);
    assert_int_equal(fp_tf64_new(&t64, m, NULL, B, T, FP_TF_EVAL, &err), 0);
    double sum;
    long count;
    fp_tf_forward(t32, tokens, labels, &sum, &count);
    *l32 = sum / (double)count;
    *l64 = fp_tf64_loss(t64, tokens, NULL, labels);
    fp_tf_free(t32);
    fp_tf64_free(t64);
    fp_model_free(m);
}

/* The independent PyTorch model's loss (float64) on the same windows. */
static double torch_loss(const char *dir)
{
    if (system("/usr/bin/python3 -c 'import torch' 2>/dev/null") != 0)
        fail_msg("python3-torch is needed (deploy/setup.sh deps --test installs it)");
    int tokens[N], labels[N], rows[B][T + 1];
    make_tokens(tokens, labels, rows);
    char text[4096];
    size_t n = 0;
    n += (size_t)snprintf(text + n, sizeof text - n, "[");
    for (int b = 0; b < B; b++) {
        n += (size_t)snprintf(text + n, sizeof text - n, b ? ", [" : "[");
        for (int t = 0; t <= T; t++)
            n += (size_t)snprintf(text + n, sizeof text - n, t ? ", %d" : "%d", rows[b][t]);
        n += (size_t)snprintf(text + n, sizeof text - n, "]");
    }
    snprintf(text + n, sizeof text - n, "]");
    char *tp = fpt_write(fpt_dir, "tokens.json", text, strlen(text));
    const char *args[] = {FP_SOURCE_DIR "/tests/parity/hf_loss.py", dir, tp, NULL};
    char *out = NULL, *err = NULL;
    int rc = fpt_runv("/usr/bin/python3", args, &out, &err);
    if (rc)
        print_error("hf_loss.py: %s\n", err);
    assert_int_equal(rc, 0);
    double l = strtod(out, NULL);
    free(out);
    free(err);
    free(tp);
    return l;
}

static double rel(double a, double b) { return fabs(a - b) / fabs(b); }

typedef struct mirror {
    const char *name, *config;
} mirror_t;

static const mirror_t mirrors[] = {
    {"Llama-3.2-1B", llama32},
    {"Llama-3.2-1B-Instruct", llama32_instruct},
    {"Llama-3.2-1B (transformers 5)", llama32_v5},
    {"Qwen2.5-0.5B", qwen25},
    {"Mistral-7B-v0.1, window 2", mistral},
};

/* What each config means, as loaded. */
static void test_configs_read(void **state)
{
    (void)state;
    fp_model_config_t c;
    fp_err_t err = {0};
    char *d;
    char *t = config_text(llama32_instruct);
    d = make_mirror("read-instruct", t, NULL);
    assert_int_equal(fp_model_config_load(d, &c, &err), 0);
    assert_int_equal(c.family, FP_FAMILY_LLAMA);
    assert_int_equal(c.rope.type, FP_ROPE_LLAMA3);
    assert_true(c.rope.factor == 32 && c.rope.low_freq_factor == 1 &&
                c.rope.high_freq_factor == 4 && c.rope.original_max == 400);
    /* head_dim 8, θ 5e5: wavelengths 6.3, 167, 4443 and 118,000 against an original context
     * of 400: one kept (< 400/4), one blended, two divided by the factor (> 400/1) */
    int kept = 0, blended = 0, divided = 0;
    for (int i = 0; i < c.head_dim / 2; i++) {
        double inv = 1 / pow(c.rope_theta, 2.0 * i / c.head_dim), sc = fp_rope_scale(&c, inv);
        kept += sc == inv;
        divided += fabs(sc - inv / 32) <= 1e-15 * inv;
        blended += sc < inv && sc > inv / 32 * (1 + 1e-12);
    }
    assert_int_equal(kept, 1);
    assert_int_equal(blended, 1);
    assert_int_equal(divided, 2);
    assert_true(c.rope_theta == 500000.0);
    assert_int_equal(c.eos_id, 58);
    assert_int_equal(c.n_eos_more, 2);
    assert_int_equal(c.eos_more[0], 59);
    assert_int_equal(c.eos_more[1], 60);
    assert_int_equal(c.tied, 1);
    assert_int_equal(c.bias, 0);
    free(d);
    free(t);
    t = config_text(llama32_v5);
    d = make_mirror("read-v5", t, NULL);
    assert_int_equal(fp_model_config_load(d, &c, &err), 0);
    assert_int_equal(c.rope.type, FP_ROPE_LLAMA3);
    assert_true(c.rope_theta == 500000.0);
    free(d);
    free(t);
    t = config_text(qwen25);
    d = make_mirror("read-qwen", t, NULL);
    assert_int_equal(fp_model_config_load(d, &c, &err), 0);
    assert_int_equal(c.family, FP_FAMILY_QWEN2);
    assert_int_equal(c.bias, FP_BIAS_QKV);
    assert_int_equal(c.window, 0); /* use_sliding_window false */
    assert_true(c.rope_theta == 1e6 && c.tied);
    free(d);
    free(t);
    t = config_text(mistral);
    d = make_mirror("read-mistral", t, NULL);
    assert_int_equal(fp_model_config_load(d, &c, &err), 0);
    assert_int_equal(c.family, FP_FAMILY_MISTRAL);
    assert_int_equal(c.window, 2);
    assert_int_equal(c.tied, 0);
    /* MistralConfig's defaults: a window of 4096 without the key, none with null; 8 key/value
     * heads without num_key_value_heads */
    char *t2 = edited(t, "sliding_window", NULL), *t3 = edited(t, "sliding_window", "null");
    char *t4 = edited(t, "num_key_value_heads", NULL);
    fp_model_config_t c2;
    char *d2 = make_cfg("mistral-nowin", t2);
    assert_int_equal(fp_model_config_load(d2, &c2, &err), 0);
    assert_int_equal(c2.window, 4096);
    free(d2);
    d2 = make_cfg("mistral-null", t3);
    assert_int_equal(fp_model_config_load(d2, &c2, &err), 0);
    assert_int_equal(c2.window, 0);
    free(d2);
    d2 = make_cfg("mistral-kv", t4); /* 8 does not divide the mirror's 4 heads */
    assert_int_equal(fp_model_config_load(d2, &c2, &err), -EINVAL);
    assert_err_contains(&err, "4 attention heads are not a multiple of 8 key/value heads");
    free(d2);
    free(t2);
    free(t3);
    free(t4);
    /* fedpeft writes each family back in its own form, and reads it back the same */
    fp_model_t *m;
    assert_int_equal(fp_model_load(d, &m, &err), 0);
    d2 = fp_path_join(fpt_dir, "mistral-resaved");
    assert_int_equal(fp_model_save(m, d2, FP_DT_F32, &err), 0);
    assert_int_equal(fp_model_config_load(d2, &c2, &err), 0);
    assert_memory_equal(&c, &c2, sizeof c);
    fp_model_free(m);
    free(d2);
    free(d);
    free(t);
}

/* Whole config.json files of real checkpoints, as the hub has them (sizes unchanged): each is
 * read, and described as it is. */
static void test_real_configs(void **state)
{
    (void)state;
    static const struct {
        const char *name, *text, *want;
    } cases[] = {
        {"Qwen2.5-0.5B",
         "{\"architectures\": [\"Qwen2ForCausalLM\"], \"attention_dropout\": 0.0, "
         "\"bos_token_id\": 151643, \"eos_token_id\": 151643, \"hidden_act\": \"silu\", "
         "\"hidden_size\": 896, \"initializer_range\": 0.02, \"intermediate_size\": 4864, "
         "\"max_position_embeddings\": 32768, \"max_window_layers\": 24, \"model_type\": "
         "\"qwen2\", \"num_attention_heads\": 14, \"num_hidden_layers\": 24, "
         "\"num_key_value_heads\": 2, \"rms_norm_eps\": 1e-06, \"rope_theta\": 1000000.0, "
         "\"sliding_window\": 32768, \"tie_word_embeddings\": true, \"torch_dtype\": "
         "\"bfloat16\", \"transformers_version\": \"4.40.1\", \"use_cache\": true, "
         "\"use_sliding_window\": false, \"vocab_size\": 151936}",
         "qwen2, 494.0 M parameters, 24 layers, D 896, 14/2 heads of 64, F 4864, V 151936, "
         "RoPE θ 1e+06, tied head, q/k/v biases"},
        {"Llama-3.2-1B-Instruct",
         "{\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": false, "
         "\"attention_dropout\": 0.0, \"bos_token_id\": 128000, \"eos_token_id\": [128001, "
         "128008, 128009], \"head_dim\": 64, \"hidden_act\": \"silu\", \"hidden_size\": 2048, "
         "\"initializer_range\": 0.02, \"intermediate_size\": 8192, "
         "\"max_position_embeddings\": 131072, \"mlp_bias\": false, \"model_type\": "
         "\"llama\", \"num_attention_heads\": 32, \"num_hidden_layers\": 16, "
         "\"num_key_value_heads\": 8, \"pretraining_tp\": 1, \"rms_norm_eps\": 1e-05, "
         "\"rope_scaling\": {\"factor\": 32.0, \"high_freq_factor\": 4.0, "
         "\"low_freq_factor\": 1.0, \"original_max_position_embeddings\": 8192, "
         "\"rope_type\": \"llama3\"}, \"rope_theta\": 500000.0, \"tie_word_embeddings\": "
         "true, \"torch_dtype\": \"bfloat16\", \"transformers_version\": \"4.45.0.dev0\", "
         "\"use_cache\": true, \"vocab_size\": 128256}",
         "llama, 1235.8 M parameters, 16 layers, D 2048, 32/8 heads of 64, F 8192, V 128256, "
         "RoPE θ 500000, llama3 scaling ×32 (low 1, high 4, original 8192), tied head"},
        {"Mistral-7B-v0.1",
         "{\"architectures\": [\"MistralForCausalLM\"], \"bos_token_id\": 1, "
         "\"eos_token_id\": 2, \"hidden_act\": \"silu\", \"hidden_size\": 4096, "
         "\"initializer_range\": 0.02, \"intermediate_size\": 14336, "
         "\"max_position_embeddings\": 32768, \"model_type\": \"mistral\", "
         "\"num_attention_heads\": 32, \"num_hidden_layers\": 32, \"num_key_value_heads\": 8, "
         "\"rms_norm_eps\": 1e-05, \"rope_theta\": 10000.0, \"sliding_window\": 4096, "
         "\"tie_word_embeddings\": false, \"torch_dtype\": \"bfloat16\", "
         "\"transformers_version\": \"4.34.0.dev0\", \"use_cache\": true, "
         "\"vocab_size\": 32000}",
         "mistral, 7241.7 M parameters, 32 layers, D 4096, 32/8 heads of 128, F 14336, V 32000, "
         "RoPE θ 10000, sliding window 4096, untied head"},
        {"SmolLM2-135M",
         "{\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": false, "
         "\"attention_dropout\": 0.0, \"bos_token_id\": 0, \"eos_token_id\": 0, "
         "\"hidden_act\": \"silu\", \"hidden_size\": 576, \"initializer_range\": "
         "0.041666666666666664, \"intermediate_size\": 1536, \"is_llama_config\": true, "
         "\"max_position_embeddings\": 8192, \"mlp_bias\": false, \"model_type\": \"llama\", "
         "\"num_attention_heads\": 9, \"num_hidden_layers\": 30, \"num_key_value_heads\": 3, "
         "\"pretraining_tp\": 1, \"rms_norm_eps\": 1e-05, \"rope_interleaved\": false, "
         "\"rope_scaling\": null, \"rope_theta\": 100000, \"tie_word_embeddings\": true, "
         "\"torch_dtype\": \"bfloat16\", \"transformers_version\": \"4.42.3\", "
         "\"use_cache\": true, \"vocab_size\": 49152}",
         "llama, 134.5 M parameters, 30 layers, D 576, 9/3 heads of 64, F 1536, V 49152, "
         "RoPE θ 100000, tied head"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char name[32];
        snprintf(name, sizeof name, "real-%zu", i);
        char *d = make_cfg(name, cases[i].text);
        fp_model_config_t c;
        fp_err_t err = {0};
        int rc = fp_model_config_load(d, &c, &err);
        if (rc)
            print_error("%s: %s\n", cases[i].name, err.msg);
        assert_int_equal(rc, 0);
        char what[512];
        fp_model_config_describe(&c, what, sizeof what);
        if (strcmp(what, cases[i].want))
            print_error("%s:\n  got  %s\n  want %s\n", cases[i].name, what, cases[i].want);
        assert_string_equal(what, cases[i].want);
        free(d);
    }
}

/* float32 = float64 = PyTorch with transformers' semantics, for every mirror. */
static void test_mirrors_match_pytorch(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof mirrors / sizeof *mirrors; i++) {
        char *t = config_text(mirrors[i].config), name[64];
        snprintf(name, sizeof name, "parity-%zu", i);
        char *d = make_mirror(name, t, NULL);
        double l32, l64, lt = torch_loss(d);
        fedpeft_losses(d, &l32, &l64);
        print_message("%-32s float32 %.9f  float64 %.9f  PyTorch %.9f  (%.1e, %.1e)\n",
                      mirrors[i].name, l32, l64, lt, rel(l32, lt), rel(l64, lt));
        assert_true(rel(l32, l64) <= 1e-5);
        assert_true(rel(l64, lt) <= 1e-5);
        assert_true(rel(l32, lt) <= 1e-5);
        free(d);
        free(t);
    }
}

/* Scaling and the window change the loss by far more than the tolerance at this length: a
 * model that ignored them would fail the parity above. */
static void test_features_matter(void **state)
{
    (void)state;
    static const struct {
        const char *config, *key, *from, *to, *what;
    } cases[] = {
        {llama32, "rope_scaling", NULL, "null", "llama3 RoPE scaling"},
        {llama32, "rope_scaling", "null", "{\"rope_type\": \"linear\", \"factor\": 4}",
         "linear"},
        {mistral, "sliding_window", NULL, "null", "the sliding window"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char *t0 = config_text(cases[i].config);
        char *t = cases[i].from ? edited(t0, cases[i].key, cases[i].from) : strdup(t0);
        char *t2 = edited(t0, cases[i].key, cases[i].to);
        free(t0);
        char n1[32], n2[32];
        snprintf(n1, sizeof n1, "feat-a%zu", i);
        snprintf(n2, sizeof n2, "feat-b%zu", i);
        char *d1 = make_mirror(n1, t, NULL), *d2 = make_mirror(n2, t2, NULL);
        double a32, a64, b32, b64;
        fedpeft_losses(d1, &a32, &a64);
        fedpeft_losses(d2, &b32, &b64);
        print_message("%-20s %.9f vs %.9f (%.1e)\n", cases[i].what, a64, b64, rel(a64, b64));
        assert_true(rel(a64, b64) > 1e-3);
        if (i == 1) /* linear scaling is computed too, and PyTorch agrees */
            assert_true(rel(b64, torch_loss(d2)) <= 1e-5);
        free(d1);
        free(d2);
        free(t);
        free(t2);
    }
}

static void expect_refused(const char *name, const char *text, const char *extra_tensor,
                           int code, const char *needle)
{
    char *d = make_mirror(name, text, extra_tensor);
    fp_err_t err = {0};
    fp_model_t *m = NULL;
    int rc = fp_model_load(d, &m, &err);
    if (rc != code || !strstr(err.msg, needle))
        print_error("%s: rc %d: %s\n", name, rc, err.msg);
    assert_int_equal(rc, code);
    assert_null(m);
    assert_err_contains(&err, needle);
    free(d);
}

/* A config.json alone (make_mirror needs a readable one first). */
static void expect_config_refused(const char *name, const char *text, int code,
                                  const char *needle)
{
    char *d = make_cfg(name, text);
    fp_err_t err = {0};
    fp_model_config_t c;
    int rc = fp_model_config_load(d, &c, &err);
    if (rc != code || !strstr(err.msg, needle))
        print_error("%s: rc %d: %s\n", name, rc, err.msg);
    assert_int_equal(rc, code);
    assert_err_contains(&err, needle);
    free(d);
}

/* Every key fedpeft does not compute is refused by name, never skipped. */
static void test_refusals(void **state)
{
    (void)state;
    char *l = config_text(llama32), *q = config_text(qwen25), *mi = config_text(mistral);
    static const struct {
        int base; /* 0 llama, 1 qwen, 2 mistral */
        const char *key, *value;
        int code;
        const char *needle;
    } cases[] = {
        {0, "model_type", NULL, -ENOTSUP, "no \"model_type\""},
        {0, "model_type", "\"gemma\"", -ENOTSUP, "model_type \"gemma\" is not supported"},
        {0, "rope_scaling", "{\"rope_type\": \"yarn\", \"factor\": 4.0}", -ENOTSUP,
         "rope_type \"yarn\" is not supported"},
        {0, "rope_scaling", "{\"type\": \"dynamic\", \"factor\": 2.0}", -ENOTSUP,
         "rope_type \"dynamic\" is not supported"},
        {0, "rope_scaling", "{\"rope_type\": \"llama3\", \"factor\": 8.0}", -EBADMSG,
         "needs \"low_freq_factor\""},
        {0, "rope_scaling", "{\"rope_type\": \"linear\", \"factor\": 2, \"beta_fast\": 32}",
         -ENOTSUP, "rope_scaling key \"beta_fast\" is not understood"},
        {0, "partial_rotary_factor", "0.5", -ENOTSUP, "key \"partial_rotary_factor\""},
        {0, "sliding_window", "4096", -ENOTSUP, "key \"sliding_window\" is not understood by "
                                                "fedpeft for model_type \"llama\""},
        {0, "quantization_config", "{\"quant_method\": \"gptq\"}", -ENOTSUP,
         "quantized checkpoints"},
        {0, "attention_dropout", "0.1", -ENOTSUP, "attention_dropout 0.1"},
        {0, "rope_interleaved", "true", -ENOTSUP, "rope_interleaved true"},
        {0, "hidden_act", "[\"silu\"]", -EBADMSG, "hidden_act"},
        {0, "rope_parameters", "{\"rope_type\": \"linear\", \"factor\": 2.0}", -EBADMSG,
         "rope_scaling and rope_parameters disagree"},
        {0, "architectures", "[\"LlamaForSequenceClassification\"]", -ENOTSUP,
         "architecture \"LlamaForSequenceClassification\""},
        {0, "eos_token_id", "[58, \"x\"]", -EBADMSG, "eos_token_id[1]"},
        {0, "eos_token_id", "[58, 99]", -EINVAL, "eos token id 99 beyond the vocabulary"},
        {1, "use_sliding_window", "true", -ENOTSUP, "use_sliding_window true"},
        {1, "attention_bias", "true", -ENOTSUP, "key \"attention_bias\""},
        {2, "layer_types", "[\"full_attention\", \"sliding_attention\"]", -ENOTSUP,
         "layer_types[0] is full_attention"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const char *base = cases[i].base == 0 ? l : cases[i].base == 1 ? q : mi;
        char *t = edited(base, cases[i].key, cases[i].value), name[32];
        snprintf(name, sizeof name, "refuse-%zu", i);
        expect_config_refused(name, t, cases[i].code, cases[i].needle);
        free(t);
    }
    /* a tensor the config does not account for: an o_proj bias in a Qwen2 checkpoint */
    expect_refused("extra-bias", q, "model.layers.0.self_attn.o_proj.bias", -EBADMSG,
                   "tensor 'model.layers.0.self_attn.o_proj.bias' is not part of a qwen2 model");
    /* the two that transformers itself ignores load */
    char *d = make_mirror("inv-freq", l, "model.layers.0.self_attn.rotary_emb.inv_freq");
    fp_model_t *m;
    fp_err_t err = {0};
    assert_int_equal(fp_model_load(d, &m, &err), 0);
    fp_model_free(m);
    free(d);
    free(l);
    free(q);
    free(mi);
}

/* `fedpeft model check`: what a checkpoint is, or exactly why it is refused. */
static void test_model_check(void **state)
{
    (void)state;
    char *q = config_text(qwen25), *l = config_text(llama32_instruct);
    char *dq = make_mirror("check-qwen", q, NULL), *dl = make_mirror("check-llama", l, NULL);
    char *out = NULL, *err = NULL;
    const char *a1[] = {"model", "check", dq, NULL};
    int rc = fpt_runv(FEDPEFT_BIN, a1, &out, &err);
    if (rc)
        print_error("%s%s", out, err);
    assert_int_equal(rc, 0);
    assert_contains(out, "supported");
    assert_contains(out, "qwen2");
    assert_contains(out, "q/k/v biases");
    assert_contains(out, "tied");
    assert_contains(out, "F32");
    const char *a2[] = {"model", "check", dl, NULL};
    assert_int_equal(fpt_runv(FEDPEFT_BIN, a2, &out, &err), 0);
    assert_contains(out, "llama3 scaling ×32");
    assert_contains(out, "eos 58, 59, 60");
    /* refused: the key and why, exit status 1 */
    char *y = edited(l, "rope_scaling", "{\"rope_type\": \"yarn\", \"factor\": 4.0}");
    free(fpt_write(dl, "config.json", y, strlen(y)));
    assert_int_equal(fpt_runv(FEDPEFT_BIN, a2, &out, &err), 1);
    assert_contains(out, "not supported");
    assert_contains(out, "rope_type \"yarn\"");
    /* a tensor */
    char *dx = make_mirror("check-extra", q, "model.layers.1.self_attn.o_proj.bias");
    const char *a3[] = {"model", "check", dx, NULL};
    assert_int_equal(fpt_runv(FEDPEFT_BIN, a3, &out, &err), 1);
    assert_contains(out, "model.layers.1.self_attn.o_proj.bias");
    const char *a4[] = {"model", "check", "--help", NULL};
    assert_int_equal(fpt_runv(FEDPEFT_BIN, a4, &out, &err), 0);
    assert_contains(out, "Usage: fedpeft model check");
    free(out);
    free(err);
    free(y);
    free(dx);
    free(dq);
    free(dl);
    free(q);
    free(l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_configs_read),
        cmocka_unit_test(test_real_configs),
        cmocka_unit_test(test_mirrors_match_pytorch),
        cmocka_unit_test(test_features_matter),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_model_check),
    };
    return cmocka_run_group_tests(tests, fpt_setup_dir, fpt_teardown_dir);
}
