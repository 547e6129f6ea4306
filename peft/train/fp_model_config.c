/* fp_model_config.c — config.json of the decoder families fedpeft computes: every key read
 * or known not to change the computation, anything else refused by name; and written back in
 * each family's own form. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"
#include "fp_json.h"
#include "fp_model.h"

const char *const fp_model_family_names[FP_FAMILY_COUNT] = {"llama", "mistral", "qwen2"};
static const char *const architectures[FP_FAMILY_COUNT] = {
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"};
static const char *const rope_names[] = {"default", "linear", "llama3"};

int fp_model_config_check(const fp_model_config_t *c, fp_err_t *err)
{
    if (c->dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 || c->n_kv_heads <= 0 ||
        c->head_dim <= 0 || c->ff <= 0 || c->vocab <= 0 || c->max_seq <= 0)
        return fp_err_set(err, -EINVAL, "model sizes must be positive (dim %d, layers %d, heads "
                          "%d, kv heads %d, head_dim %d, ff %d, vocab %d, max positions %d)",
                          c->dim, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim, c->ff,
                          c->vocab, c->max_seq);
    if (c->n_heads % c->n_kv_heads != 0)
        return fp_err_set(err, -EINVAL, "%d attention heads are not a multiple of %d key/value "
                          "heads", c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2 != 0)
        return fp_err_set(err, -EINVAL, "head_dim %d must be even for rotary embeddings",
                          c->head_dim);
    if (!(c->rms_eps > 0) || !(c->rope_theta > 0))
        return fp_err_set(err, -EINVAL, "rms_norm_eps and rope_theta must be positive");
    if ((unsigned)c->family >= FP_FAMILY_COUNT)
        return fp_err_set(err, -EINVAL, "unknown model family %d", (int)c->family);
    if (c->bos_id >= c->vocab || c->eos_id >= c->vocab)
        return fp_err_set(err, -EINVAL, "bos/eos token id beyond the vocabulary of %d",
                          c->vocab);
    if (c->n_eos_more < 0 || c->n_eos_more > FP_MODEL_EOS_MAX - 1)
        return fp_err_set(err, -EINVAL, "at most %d eos token ids", FP_MODEL_EOS_MAX);
    for (int i = 0; i < c->n_eos_more; i++)
        if (c->eos_more[i] < 0 || c->eos_more[i] >= c->vocab)
            return fp_err_set(err, -EINVAL, "eos token id %d beyond the vocabulary of %d",
                              c->eos_more[i], c->vocab);
    if (c->window < 0)
        return fp_err_set(err, -EINVAL, "sliding_window %d must be positive", c->window);
    /* each family's own structure: what its config can say and its modeling code computes */
    unsigned want_bias = c->family == FP_FAMILY_QWEN2 ? FP_BIAS_QKV : 0;
    if (c->bias != want_bias && !(c->family == FP_FAMILY_LLAMA && c->bias == FP_BIAS_QKVO))
        return fp_err_set(err, -EINVAL, "a %s model cannot have these biases",
                          fp_model_family_names[c->family]);
    if (c->window && c->family != FP_FAMILY_MISTRAL)
        return fp_err_set(err, -EINVAL, "only mistral models have a sliding window here");
    const fp_rope_scaling_t *r = &c->rope;
    if (r->type == FP_ROPE_LINEAR && !(r->factor > 0))
        return fp_err_set(err, -EINVAL, "linear rope scaling needs a positive factor");
    if (r->type == FP_ROPE_LLAMA3 &&
        (!(r->factor > 0) || !(r->low_freq_factor > 0) ||
         !(r->high_freq_factor > r->low_freq_factor) || r->original_max <= 0))
        return fp_err_set(err, -EINVAL, "llama3 rope scaling needs factor > 0, "
                          "high_freq_factor > low_freq_factor > 0 and "
                          "original_max_position_embeddings > 0");
    long long params = (long long)c->vocab * c->dim * 2 +
                       (long long)c->n_layers * ((long long)c->dim * c->ff * 3 +
                                                 4LL * c->dim * c->n_heads * c->head_dim);
    if (params > (1LL << 36))
        return fp_err_set(err, -EFBIG, "model of ~%lld parameters is too large", params);
    return 0;
}

double fp_rope_scale(const fp_model_config_t *c, double inv)
{
    const fp_rope_scaling_t *r = &c->rope;
    switch (r->type) {
    case FP_ROPE_LINEAR:
        return inv / r->factor;
    case FP_ROPE_LLAMA3: {
        /* wavelengths shorter than original/high kept, longer than original/low divided by
         * factor, and between them a blend linear in original/wavelength */
        double wavelen = 2 * M_PI / inv, old = r->original_max;
        if (wavelen < old / r->high_freq_factor)
            return inv;
        if (wavelen > old / r->low_freq_factor)
            return inv / r->factor;
        double s = (old / wavelen - r->low_freq_factor) /
                   (r->high_freq_factor - r->low_freq_factor);
        return (1 - s) * inv / r->factor + s * inv;
    }
    default:
        return inv;
    }
}

/* ---- reading ---- */

/* Keys that name, describe or configure generation, never the forward pass or the loss
 * (PretrainedConfig's own and the hub's bookkeeping). */
static const char *const inert_keys[] = {
    "_name_or_path", "architectures", "model_type", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "initializer_range", "pad_token_id", "pretraining_tp",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_decoder",
    "is_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "id2label", "label2id", "problem_type", "finetuning_task",
    "tokenizer_class", "prefix", "task_specific_params", "sep_token_id",
    "decoder_start_token_id", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "max_window_layers", "use_sliding_window",
    "is_llama_config", /* nanotron's export marker (SmolLM) */
    "_attn_implementation", "_attn_implementation_autoset", /* eager, sdpa, flash: one maths */
    "unsloth_version", "unsloth_fixed",                     /* Unsloth's export markers */
};

/* Keys read below, by family (a family's modeling code knows nothing of the others'). */
static const char *const common_keys[] = {
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "head_dim", "hidden_act",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "attention_dropout", "layer_types",
    "rope_interleaved",
};
static const char *const llama_keys[] = {"attention_bias", "mlp_bias"};
static const char *const window_keys[] = {"sliding_window"};

static int in_list(const char *k, const char *const *list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(k, list[i]))
            return 1;
    return 0;
}
#define IN(k, list) in_list(k, list, sizeof list / sizeof *list)

int fp_config_key_inert(const char *key)
{
    return IN(key, inert_keys);
}

static int known_key(fp_model_family_t fam, const char *k)
{
    return IN(k, inert_keys) || IN(k, common_keys) ||
           (fam == FP_FAMILY_LLAMA && IN(k, llama_keys)) ||
           (fam != FP_FAMILY_LLAMA && IN(k, window_keys));
}

static int get_int(json_t *j, const char *key, int *out, int required, const char *path,
                   fp_err_t *err)
{
    long long v;
    int rc = fp_json_opt_int(j, key, &v, path, err);
    if (rc < 0)
        return rc;
    if (rc == 0) {
        if (required)
            return fp_err_set(err, -EBADMSG, "%s: missing \"%s\"", path, key);
        return 0;
    }
    if (v < -1 || v > INT32_MAX)
        return fp_err_set(err, -EBADMSG, "%s: \"%s\" out of range", path, key);
    *out = (int)v;
    return 0;
}

/* A number that must be present and positive in a rope object. */
static int rope_number(json_t *o, const char *key, double *out, const char *file,
                       const char *what, fp_err_t *err)
{
    json_t *v = json_object_get(o, key);
    if (!json_is_number(v) || !(json_number_value(v) > 0))
        return fp_err_set(err, -EBADMSG, "%s: %s needs \"%s\", a positive number", file, what,
                          key);
    *out = json_number_value(v);
    return 0;
}

/* rope_scaling or rope_parameters (what: its name) into *r (and θ from rope_parameters). */
static int parse_rope(json_t *o, const char *what, fp_rope_scaling_t *r, double *theta,
                      const char *file, fp_err_t *err)
{
    memset(r, 0, sizeof *r);
    if (!o || json_is_null(o))
        return 0;
    if (!json_is_object(o))
        return fp_err_set(err, -EBADMSG, "%s: %s must be an object or null", file, what);
    json_t *t = json_object_get(o, "rope_type");
    if (!t)
        t = json_object_get(o, "type");
    const char *type = json_is_string(t) ? json_string_value(t) : t ? NULL : "default";
    if (!type)
        return fp_err_set(err, -EBADMSG, "%s: %s's rope_type must be a string", file, what);
    int rc = 0;
    if (!strcmp(type, "default")) {
        r->type = FP_ROPE_DEFAULT;
    } else if (!strcmp(type, "linear")) {
        r->type = FP_ROPE_LINEAR;
        rc = rope_number(o, "factor", &r->factor, file, "linear rope scaling", err);
    } else if (!strcmp(type, "llama3")) {
        r->type = FP_ROPE_LLAMA3;
        double om = 0;
        if ((rc = rope_number(o, "factor", &r->factor, file, "llama3 rope scaling", err)) ||
            (rc = rope_number(o, "low_freq_factor", &r->low_freq_factor, file,
                              "llama3 rope scaling", err)) ||
            (rc = rope_number(o, "high_freq_factor", &r->high_freq_factor, file,
                              "llama3 rope scaling", err)) ||
            (rc = rope_number(o, "original_max_position_embeddings", &om, file,
                              "llama3 rope scaling", err)))
            return rc;
        if (om != floor(om) || om > INT32_MAX)
            return fp_err_set(err, -EBADMSG, "%s: original_max_position_embeddings must be a "
                              "whole number", file);
        r->original_max = (int)om;
        if (!(r->high_freq_factor > r->low_freq_factor))
            return fp_err_set(err, -EBADMSG, "%s: llama3 rope scaling needs high_freq_factor "
                              "> low_freq_factor", file);
    } else {
        return fp_err_set(err, -ENOTSUP, "%s: %s rope_type \"%s\" is not supported (fedpeft "
                          "computes default, linear and llama3 RoPE; yarn, dynamic, longrope and "
                          "the others would give different numbers)", file, what, type);
    }
    if (rc)
        return rc;
    const char *k;
    json_t *v;
    json_object_foreach(o, k, v) {
        int ok = !strcmp(k, "rope_type") || !strcmp(k, "type") ||
                 (r->type != FP_ROPE_DEFAULT && !strcmp(k, "factor")) ||
                 (r->type == FP_ROPE_LLAMA3 &&
                  (!strcmp(k, "low_freq_factor") || !strcmp(k, "high_freq_factor") ||
                   !strcmp(k, "original_max_position_embeddings")));
        if (!strcmp(k, "rope_theta") && theta) {
            if (!json_is_number(v) || !(json_number_value(v) > 0))
                return fp_err_set(err, -EBADMSG, "%s: %s.rope_theta must be a positive number",
                                  file, what);
            *theta = json_number_value(v);
            ok = 1;
        }
        /* a rotary fraction of 1 (all of head_dim) and an attention factor of 1 are what
         * fedpeft computes; any other value is not */
        if ((!strcmp(k, "partial_rotary_factor") || !strcmp(k, "attention_factor")) &&
            json_is_number(v) && json_number_value(v) == 1.0)
            ok = 1;
        if (!ok)
            return fp_err_set(err, -ENOTSUP, "%s: %s key \"%s\" is not understood by fedpeft "
                              "for rope_type \"%s\"", file, what, k, type);
    }
    return 0;
}

/* eos_token_id: a number, null, or a list (Llama 3.x Instruct: [128001, 128008, 128009]). */
static int parse_eos(json_t *j, fp_model_config_t *c, const char *file, fp_err_t *err)
{
    json_t *e = json_object_get(j, "eos_token_id");
    if (!json_is_array(e))
        return get_int(j, "eos_token_id", &c->eos_id, 0, file, err);
    size_t n = json_array_size(e);
    if (n == 0 || n > FP_MODEL_EOS_MAX)
        return fp_err_set(err, -EBADMSG, "%s: eos_token_id lists 1 to %d ids, not %zu", file,
                          FP_MODEL_EOS_MAX, n);
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(e, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) > INT32_MAX)
            return fp_err_set(err, -EBADMSG, "%s: eos_token_id[%zu] is not a token id", file, i);
        int id = (int)json_integer_value(v);
        if (i == 0)
            c->eos_id = id;
        else
            c->eos_more[c->n_eos_more++] = id;
    }
    return 0;
}

/* sliding_window, use_sliding_window and layer_types into c->window (Mistral's window applies
 * to every layer; Qwen2 uses none unless use_sliding_window, which fedpeft does not do). */
static int parse_window(json_t *j, fp_model_config_t *c, const char *file, fp_err_t *err)
{
    /* MistralConfig's sliding_window is 4096 when the key is absent, none when it is null */
    json_t *sw = json_object_get(j, "sliding_window");
    int rc, use = 0, window = c->family == FP_FAMILY_MISTRAL && !sw ? 4096 : 0;
    if ((rc = get_int(j, "sliding_window", &window, 0, file, err)) < 0)
        return rc;
    if (window < 0)
        return fp_err_set(err, -EBADMSG, "%s: sliding_window must be positive or null", file);
    if (c->family == FP_FAMILY_MISTRAL) {
        c->window = window;
        use = window > 0;
    } else if (c->family == FP_FAMILY_QWEN2) {
        if ((rc = fp_json_opt_bool(j, "use_sliding_window", &use, file, err)) < 0)
            return rc;
        if (use)
            return fp_err_set(err, -ENOTSUP, "%s: use_sliding_window true is not supported (Qwen2 "
                              "then windows only the layers from max_window_layers on)", file);
    }
    json_t *lt = json_object_get(j, "layer_types");
    if (lt && !json_is_null(lt)) {
        if (!json_is_array(lt) || json_array_size(lt) != (size_t)c->n_layers)
            return fp_err_set(err, -EBADMSG, "%s: layer_types must list one type per layer",
                              file);
        size_t i;
        json_t *v;
        json_array_foreach(lt, i, v) {
            const char *s = json_string_value(v);
            int sliding = s && !strcmp(s, "sliding_attention");
            if (!s || (!sliding && strcmp(s, "full_attention")))
                return fp_err_set(err, -ENOTSUP, "%s: layer_types[%zu] \"%s\" is not supported "
                                  "(full_attention, or sliding_attention in a mistral model)",
                                  file, i, s ? s : "?");
            if (sliding != use)
                return fp_err_set(err, -ENOTSUP, "%s: layer_types[%zu] is %s but the model %s a "
                                  "sliding window (fedpeft computes one kind of attention for "
                                  "every layer)", file, i, s, use ? "has" : "has no");
        }
    }
    return 0;
}

/* Refuses what the family's modeling code would compute differently from fedpeft. */
static int refuse_features(json_t *j, fp_model_family_t fam, const char *file, fp_err_t *err)
{
    const char *s;
    int rc, flag = 0;
    double drop = 0;
    if ((rc = fp_json_opt_string(j, "hidden_act", &s, file, err)) < 0)
        return rc;
    if (rc == 1 && strcmp(s, "silu") != 0)
        return fp_err_set(err, -ENOTSUP, "%s: hidden_act \"%s\" is not supported (only silu)",
                          file, s);
    if ((rc = fp_json_opt_bool(j, "mlp_bias", &flag, file, err)) < 0)
        return rc;
    if (rc == 1 && flag)
        return fp_err_set(err, -ENOTSUP, "%s: mlp_bias is not supported", file);
    /* nanotron's exports (SmolLM) say whether their RoPE pairs interleave; transformers never
     * does, so only false is what the checkpoint's authors meant */
    if ((rc = fp_json_opt_bool(j, "rope_interleaved", &flag, file, err)) < 0)
        return rc;
    if (rc == 1 && flag)
        return fp_err_set(err, -ENOTSUP, "%s: rope_interleaved true is not supported (fedpeft "
                          "and transformers rotate halves)", file);
    if ((rc = fp_json_opt_number(j, "attention_dropout", &drop, file, err)) < 0)
        return rc;
    if (rc == 1 && drop != 0)
        return fp_err_set(err, -ENOTSUP, "%s: attention_dropout %g is not supported (fedpeft "
                          "trains without dropout)", file, drop);
    json_t *a = json_object_get(j, "architectures");
    if (a && !json_is_null(a)) {
        size_t i;
        json_t *v;
        if (!json_is_array(a))
            return fp_err_set(err, -EBADMSG, "%s: architectures must be a list", file);
        json_array_foreach(a, i, v) {
            if (!json_is_string(v) || strcmp(json_string_value(v), architectures[fam]))
                return fp_err_set(err, -ENOTSUP, "%s: architecture \"%s\" is not supported (a "
                                  "%s model is read as %s: a decoder with a language-model "
                                  "head)", file, json_is_string(v) ? json_string_value(v) : "?",
                                  fp_model_family_names[fam], architectures[fam]);
        }
    }
    const char *k;
    json_t *v;
    json_object_foreach(j, k, v) {
        if (!strcmp(k, "quantization_config"))
            return fp_err_set(err, -ENOTSUP, "%s: \"quantization_config\": quantized checkpoints "
                              "(GPTQ, AWQ, bitsandbytes) are not read; give fedpeft the float "
                              "or bf16 weights (--base-dtype nf4 quantizes them itself)", file);
        if (!strcmp(k, "auto_map"))
            return fp_err_set(err, -ENOTSUP, "%s: \"auto_map\": a model with its own Python code "
                              "is not a %s model fedpeft can compute", file,
                              fp_model_family_names[fam]);
        if (!known_key(fam, k))
            return fp_err_set(err, -ENOTSUP, "%s: key \"%s\" is not understood by fedpeft for "
                              "model_type \"%s\" (it may change what the model computes, so the "
                              "model is refused rather than run wrong)", file, k,
                              fp_model_family_names[fam]);
    }
    return 0;
}

static int parse_config(json_t *j, fp_model_config_t *c, const char *file, fp_err_t *err)
{
    memset(c, 0, sizeof *c);
    c->bos_id = c->eos_id = -1;
    c->rms_eps = 1e-6;
    c->rope_theta = 10000.0;
    c->max_seq = 2048;
    const char *s;
    int rc = fp_json_opt_string(j, "model_type", &s, file, err);
    if (rc < 0)
        return rc;
    if (rc == 0)
        return fp_err_set(err, -ENOTSUP, "%s: no \"model_type\": fedpeft reads llama, mistral "
                          "and qwen2 configurations, and will not guess", file);
    int fam = -1;
    for (int f = 0; f < FP_FAMILY_COUNT; f++)
        if (!strcmp(s, fp_model_family_names[f]))
            fam = f;
    if (fam < 0)
        return fp_err_set(err, -ENOTSUP, "%s: model_type \"%s\" is not supported (llama, "
                          "mistral or qwen2)", file, s);
    c->family = (fp_model_family_t)fam;
    if ((rc = refuse_features(j, c->family, file, err)))
        return rc;
    if ((rc = get_int(j, "hidden_size", &c->dim, 1, file, err)) ||
        (rc = get_int(j, "num_hidden_layers", &c->n_layers, 1, file, err)) ||
        (rc = get_int(j, "num_attention_heads", &c->n_heads, 1, file, err)) ||
        (rc = get_int(j, "intermediate_size", &c->ff, 1, file, err)) ||
        (rc = get_int(j, "vocab_size", &c->vocab, 1, file, err)))
        return rc;
    /* each family's own defaults, as its transformers config class has them */
    static const int kv_default[FP_FAMILY_COUNT] = {0, 8, 32};
    static const int max_default[FP_FAMILY_COUNT] = {2048, 4096 * 32, 32768};
    c->n_kv_heads = kv_default[c->family] ? kv_default[c->family] : c->n_heads;
    c->max_seq = max_default[c->family];
    if ((rc = get_int(j, "num_key_value_heads", &c->n_kv_heads, 0, file, err)) ||
        (rc = get_int(j, "max_position_embeddings", &c->max_seq, 0, file, err)) ||
        (rc = get_int(j, "bos_token_id", &c->bos_id, 0, file, err)) ||
        (rc = parse_eos(j, c, file, err)))
        return rc;
    c->head_dim = c->n_heads > 0 ? c->dim / c->n_heads : 0;
    if ((rc = get_int(j, "head_dim", &c->head_dim, 0, file, err)))
        return rc;
    if ((rc = fp_json_opt_number(j, "rms_norm_eps", &c->rms_eps, file, err)) < 0 ||
        (rc = fp_json_opt_number(j, "rope_theta", &c->rope_theta, file, err)) < 0)
        return rc;
    fp_rope_scaling_t rs, rp;
    if ((rc = parse_rope(json_object_get(j, "rope_scaling"), "rope_scaling", &rs, NULL, file,
                         err)) ||
        (rc = parse_rope(json_object_get(j, "rope_parameters"), "rope_parameters", &rp,
                         &c->rope_theta, file, err)))
        return rc;
    if (rs.type && rp.type && memcmp(&rs, &rp, sizeof rs))
        return fp_err_set(err, -EBADMSG, "%s: rope_scaling and rope_parameters disagree", file);
    c->rope = rs.type ? rs : rp;
    int flag = 0;
    if ((rc = fp_json_opt_bool(j, "tie_word_embeddings", &c->tied, file, err)) < 0)
        return rc;
    if (c->family == FP_FAMILY_LLAMA &&
        (rc = fp_json_opt_bool(j, "attention_bias", &flag, file, err)) < 0)
        return rc;
    c->bias = c->family == FP_FAMILY_QWEN2 ? FP_BIAS_QKV : flag ? FP_BIAS_QKVO : 0;
    if ((rc = parse_window(j, c, file, err)))
        return rc;
    return 0;
}

int fp_model_config_load(const char *path, fp_model_config_t *c, fp_err_t *err)
{
    char *file = fp_fs_is_dir(path) ? fp_path_join(path, "config.json") : strdup(path);
    if (!file)
        return fp_err_set(err, -ENOMEM, "out of memory");
    json_t *j = fp_json_load_file(file, 1 << 20, err);
    int rc = 0;
    if (!j) {
        rc = err && err->code ? err->code : -EBADMSG;
        goto out;
    }
    if (!json_is_object(j)) {
        rc = fp_err_set(err, -EBADMSG, "%s: not a JSON object", file);
        goto out;
    }
    if ((rc = parse_config(j, c, file, err)))
        goto out;
    rc = fp_model_config_check(c, err);
    if (rc)
        fp_err_prefix(err, rc, "%s: ", file);
out:
    json_decref(j);
    free(file);
    return rc;
}

void fp_model_dir_of(const char *path, char *buf, size_t n)
{
    snprintf(buf, n, "%s", path);
    if (fp_fs_is_dir(path))
        return;
    char *slash = strrchr(buf, '/');
    if (slash == buf)
        buf[1] = '\0';
    else if (slash)
        *slash = '\0';
    else
        snprintf(buf, n, ".");
}

/* ---- writing and describing ---- */

static json_t *rope_json(const fp_rope_scaling_t *r)
{
    if (r->type == FP_ROPE_DEFAULT)
        return json_null();
    json_t *o = json_object();
    json_object_set_new(o, "rope_type", json_string(rope_names[r->type]));
    json_object_set_new(o, "factor", json_real(r->factor));
    if (r->type == FP_ROPE_LLAMA3) {
        json_object_set_new(o, "low_freq_factor", json_real(r->low_freq_factor));
        json_object_set_new(o, "high_freq_factor", json_real(r->high_freq_factor));
        json_object_set_new(o, "original_max_position_embeddings",
                            json_integer(r->original_max));
    }
    return o;
}

static json_t *config_json(const fp_model_config_t *c, const char *torch_dtype)
{
    json_t *j = json_object(), *arch = json_array();
    if (!j || !arch) {
        json_decref(j);
        json_decref(arch);
        return NULL;
    }
    json_array_append_new(arch, json_string(architectures[c->family]));
    json_object_set_new(j, "architectures", arch);
    json_object_set_new(j, "model_type", json_string(fp_model_family_names[c->family]));
    json_object_set_new(j, "hidden_size", json_integer(c->dim));
    json_object_set_new(j, "intermediate_size", json_integer(c->ff));
    json_object_set_new(j, "num_hidden_layers", json_integer(c->n_layers));
    json_object_set_new(j, "num_attention_heads", json_integer(c->n_heads));
    json_object_set_new(j, "num_key_value_heads", json_integer(c->n_kv_heads));
    json_object_set_new(j, "head_dim", json_integer(c->head_dim));
    json_object_set_new(j, "vocab_size", json_integer(c->vocab));
    json_object_set_new(j, "max_position_embeddings", json_integer(c->max_seq));
    json_object_set_new(j, "rms_norm_eps", json_real(c->rms_eps));
    json_object_set_new(j, "rope_theta", json_real(c->rope_theta));
    json_object_set_new(j, "rope_scaling", rope_json(&c->rope));
    json_object_set_new(j, "tie_word_embeddings", json_boolean(c->tied));
    if (c->family == FP_FAMILY_LLAMA) {
        json_object_set_new(j, "attention_bias", json_boolean(c->bias == FP_BIAS_QKVO));
        json_object_set_new(j, "mlp_bias", json_false());
    } else if (c->family == FP_FAMILY_MISTRAL) {
        json_object_set_new(j, "sliding_window", c->window ? json_integer(c->window)
                                                           : json_null());
    } else {
        json_object_set_new(j, "use_sliding_window", json_false());
        json_object_set_new(j, "sliding_window", json_null());
        json_object_set_new(j, "max_window_layers", json_integer(c->n_layers));
    }
    json_object_set_new(j, "attention_dropout", json_real(0.0));
    json_object_set_new(j, "hidden_act", json_string("silu"));
    json_object_set_new(j, "initializer_range", json_real(0.02));
    json_object_set_new(j, "bos_token_id", c->bos_id >= 0 ? json_integer(c->bos_id) : json_null());
    json_t *eos = c->eos_id < 0 ? json_null() : json_integer(c->eos_id);
    if (c->eos_id >= 0 && c->n_eos_more > 0) {
        json_decref(eos);
        eos = json_array();
        json_array_append_new(eos, json_integer(c->eos_id));
        for (int i = 0; i < c->n_eos_more; i++)
            json_array_append_new(eos, json_integer(c->eos_more[i]));
    }
    json_object_set_new(j, "eos_token_id", eos);
    json_object_set_new(j, "torch_dtype", json_string(torch_dtype));
    json_object_set_new(j, "use_cache", json_true());
    return j;
}

int fp_model_config_write(const fp_model_config_t *c, const char *path, const char *torch_dtype,
                          fp_err_t *err)
{
    json_t *j = config_json(c, torch_dtype);
    if (!j)
        return fp_err_set(err, -ENOMEM, "out of memory");
    int rc = fp_json_write_file(path, j, err);
    json_decref(j);
    return rc;
}

void fp_model_config_describe(const fp_model_config_t *c, char *buf, size_t n)
{
    char rope[128] = "", win[48] = "", bias[32] = "";
    const fp_rope_scaling_t *r = &c->rope;
    if (r->type == FP_ROPE_LINEAR)
        snprintf(rope, sizeof rope, ", linear scaling ×%g", r->factor);
    else if (r->type == FP_ROPE_LLAMA3)
        snprintf(rope, sizeof rope, ", llama3 scaling ×%g (low %g, high %g, original %d)",
                 r->factor, r->low_freq_factor, r->high_freq_factor, r->original_max);
    if (c->window)
        snprintf(win, sizeof win, ", sliding window %d", c->window);
    if (c->bias)
        snprintf(bias, sizeof bias, ", %s biases", c->bias == FP_BIAS_QKV ? "q/k/v" : "q/k/v/o");
    snprintf(buf, n, "%s, %.1f M parameters, %d layers, D %d, %d/%d heads of %d, F %d, V %d, "
             "RoPE θ %g%s%s, %s head%s", fp_model_family_names[c->family],
             (double)fp_model_config_params(c) / 1e6, c->n_layers, c->dim, c->n_heads,
             c->n_kv_heads, c->head_dim, c->ff, c->vocab, c->rope_theta, rope, win,
             c->tied ? "tied" : "untied", bias);
}
