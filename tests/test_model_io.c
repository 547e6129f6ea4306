/* Hugging Face model directories: round trips (F32, BF16, sharded), and every way a checkpoint
 * or its config.json can be wrong, each refused with the tensor or field named. */
#include "fp_test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fp_dtype.h"
#include "fp_fs.h"
#include "fp_json.h"
#include "fp_model.h"
#include "fp_safetensors.h"
#include "fp_sha256.h"

#define dir fpt_dir

static fp_model_t *small_model(int tied, int bias)
{
    fp_model_config_t c = {.dim = 16, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2,
                           .head_dim = 4, .ff = 24, .vocab = 19, .max_seq = 32, .rms_eps = 1e-6,
                           .rope_theta = 500000, .tied = tied, .bias = bias ? FP_BIAS_QKVO : 0u,
                           .bos_id = 1, .eos_id = 2};
    fp_model_t *m;
    fp_err_t err = {0};
    assert_int_equal(fp_model_new(&m, &c, &err), 0);
    fp_model_init(m, 7);
    for (size_t i = 0; i < m->n_params; i += 3) /* make norms and biases non-trivial too */
        m->mem[i] += 0.001f * (float)(i % 13);
    return m;
}

static char *sub(const char *name)
{
    char *p = fp_path_join(dir, name);
    assert_non_null(p);
    return p;
}

static void test_round_trip_f32_and_bf16(void **state)
{
    (void)state;
    for (int v = 0; v < 4; v++) {
        fp_model_t *m = small_model(v & 1, v >> 1);
        char name[32];
        snprintf(name, sizeof name, "rt%d", v);
        char *d = sub(name);
        fp_err_t err = {0};
        assert_int_equal(fp_model_save(m, d, FP_DT_F32, &err), 0);
        fp_model_t *back;
        assert_int_equal(fp_model_load(d, &back, &err), 0);
        assert_memory_equal(&back->cfg, &m->cfg, sizeof m->cfg);
        assert_int_equal(back->n_params, m->n_params);
        assert_memory_equal(back->mem, m->mem, m->n_params * sizeof(float));
        if (v & 1) { /* tied: no lm_head in the file, and the head is the embedding */
            char *wp = fp_path_join(d, "model.safetensors");
            fp_st_file_t *st;
            assert_int_equal(fp_st_open(&st, wp, &err), 0);
            assert_null(fp_st_find(st, "lm_head.weight"));
            assert_non_null(fp_st_find(st, "model.layers.1.mlp.down_proj.weight"));
            fp_st_close(st);
            free(wp);
            assert_ptr_equal(back->lm_head, back->embed);
        }
        fp_model_free(back);
        /* bfloat16: every weight comes back rounded to bfloat16 */
        snprintf(name, sizeof name, "bf%d", v);
        char *db = sub(name);
        assert_int_equal(fp_model_save(m, db, FP_DT_BF16, &err), 0);
        assert_int_equal(fp_model_load(db, &back, &err), 0);
        for (size_t i = 0; i < m->n_params; i++)
            assert_true(back->mem[i] == fp_bf16_to_f32(fp_f32_to_bf16(m->mem[i])));
        fp_model_free(back);
        free(db);
        free(d);
        fp_model_free(m);
    }
}

/* Rewrites dir's single model.safetensors as two shards plus an index, as HF does. */
static void shard(const char *d, const char *drop)
{
    fp_err_t err = {0};
    char *wp = fp_path_join(d, "model.safetensors");
    fp_st_file_t *st;
    assert_int_equal(fp_st_open(&st, wp, &err), 0);
    size_t n = fp_st_count(st);
    fp_st_entry_t *e = calloc(n, sizeof *e);
    json_t *map = json_object();
    size_t k[2] = {0, 0};
    fp_st_entry_t *parts[2] = {calloc(n, sizeof *e), calloc(n, sizeof *e)};
    for (size_t i = 0; i < n; i++) {
        const fp_st_tensor_t *t = fp_st_get(st, i);
        if (drop && !strcmp(t->name, drop))
            continue;
        int s = strstr(t->name, "layers.1.") != NULL; /* layer 1 in the second shard */
        fp_st_entry_t *x = &parts[s][k[s]++];
        x->name = t->name;
        x->dtype = t->dtype;
        x->ndim = t->ndim;
        memcpy(x->shape, t->shape, sizeof x->shape);
        x->raw = t->data;
        json_object_set_new(map, t->name, json_string(s ? "model-00002-of-00002.safetensors"
                                                         : "model-00001-of-00002.safetensors"));
    }
    char *s1 = fp_path_join(d, "model-00001-of-00002.safetensors");
    char *s2 = fp_path_join(d, "model-00002-of-00002.safetensors");
    assert_int_equal(fp_st_write(s1, parts[0], k[0], NULL, &err), 0);
    assert_int_equal(fp_st_write(s2, parts[1], k[1], NULL, &err), 0);
    json_t *idx = json_pack("{s:{s:i}, s:o}", "metadata", "total_size", 0, "weight_map", map);
    char *ip = fp_path_join(d, "model.safetensors.index.json");
    assert_int_equal(fp_json_write_file(ip, idx, &err), 0);
    json_decref(idx);
    fp_st_close(st);
    assert_int_equal(remove(wp), 0);
    free(parts[0]);
    free(parts[1]);
    free(e);
    free(s1);
    free(s2);
    free(ip);
    free(wp);
}

static void test_sharded_load(void **state)
{
    (void)state;
    fp_model_t *m = small_model(0, 1);
    char *d = sub("sharded");
    fp_err_t err = {0};
    assert_int_equal(fp_model_save(m, d, FP_DT_BF16, &err), 0);
    shard(d, NULL);
    fp_model_t *back;
    assert_int_equal(fp_model_load(d, &back, &err), 0);
    for (size_t i = 0; i < m->n_params; i++)
        assert_true(back->mem[i] == fp_bf16_to_f32(fp_f32_to_bf16(m->mem[i])));
    fp_model_free(back);
    /* a tensor missing from every shard is named */
    char *d2 = sub("sharded-missing");
    assert_int_equal(fp_model_save(m, d2, FP_DT_F32, &err), 0);
    shard(d2, "model.layers.1.self_attn.k_proj.weight");
    assert_int_equal(fp_model_load(d2, &back, &err), -EBADMSG);
    assert_err_contains(&err, "tensor 'model.layers.1.self_attn.k_proj.weight' is missing");
    free(d2);
    free(d);
    fp_model_free(m);
}

/* Edits config.json of a saved model: sets key to value (JSON text), or removes it. */
static void edit_config(const char *d, const char *key, const char *value)
{
    fp_err_t err = {0};
    char *cp = fp_path_join(d, "config.json");
    json_t *j = fp_json_load_file(cp, 1 << 20, &err);
    assert_non_null(j);
    if (value) {
        json_error_t je;
        json_t *v = json_loads(value, JSON_DECODE_ANY, &je);
        assert_non_null(v);
        json_object_set_new(j, key, v);
    } else {
        json_object_del(j, key);
    }
    assert_int_equal(fp_json_write_file(cp, j, &err), 0);
    json_decref(j);
    free(cp);
}

static void expect_config_error(const char *name, const char *key, const char *value, int code,
                                const char *needle)
{
    fp_model_t *m = small_model(0, 0);
    char *d = sub(name);
    fp_err_t err = {0};
    assert_int_equal(fp_model_save(m, d, FP_DT_F32, &err), 0);
    edit_config(d, key, value);
    fp_model_t *back = NULL;
    int rc = fp_model_load(d, &back, &err);
    if (rc != code || !strstr(err.msg, needle))
        print_error("%s: rc %d: %s\n", name, rc, err.msg);
    assert_int_equal(rc, code);
    assert_null(back);
    assert_err_contains(&err, needle);
    free(d);
    fp_model_free(m);
}

static void test_config_errors(void **state)
{
    (void)state;
    expect_config_error("c-rope", "rope_scaling", "{\"rope_type\": \"yarn\", \"factor\": 2}",
                        -ENOTSUP, "rope_scaling rope_type \"yarn\" is not supported");
    expect_config_error("c-act", "hidden_act", "\"gelu\"", -ENOTSUP, "hidden_act \"gelu\"");
    expect_config_error("c-type", "model_type", "\"gpt2\"", -ENOTSUP,
                        "model_type \"gpt2\" is not supported");
    expect_config_error("c-miss", "hidden_size", NULL, -EBADMSG, "missing \"hidden_size\"");
    expect_config_error("c-kv", "num_key_value_heads", "3", -EINVAL, "multiple of 3");
    expect_config_error("c-type2", "vocab_size", "\"many\"", -EBADMSG, "must be an integer");
    expect_config_error("c-mlpb", "mlp_bias", "true", -ENOTSUP, "mlp_bias");
    /* a shape that contradicts the config names the tensor and both shapes */
    expect_config_error("c-shape", "intermediate_size", "25", -EBADMSG,
                        "'model.layers.0.mlp.gate_proj.weight' has shape [24, 16], but config.json "
                        "implies [25, 16]");
    fp_model_t *m;
    fp_err_t err = {0};
    char *none = sub("no-such-model");
    assert_int_equal(fp_model_load(none, &m, &err), -ENOENT);
    assert_err_contains(&err, "no such model directory");
    free(none);
}

static void test_rope_parameters_spelling(void **state)
{
    (void)state;
    fp_model_t *m = small_model(0, 0);
    char *d = sub("ropeparams");
    fp_err_t err = {0};
    assert_int_equal(fp_model_save(m, d, FP_DT_F32, &err), 0);
    edit_config(d, "rope_theta", NULL);
    edit_config(d, "rope_parameters", "{\"rope_type\": \"default\", \"rope_theta\": 123456.0}");
    fp_model_config_t c;
    assert_int_equal(fp_model_config_load(d, &c, &err), 0);
    assert_true(c.rope_theta == 123456.0);
    free(d);
    fp_model_free(m);
}

/* The weights' identity: SHA-256 of model.safetensors, or of the shards in name order (the
 * index lists them in another order), streamed; size and newest mtime reported; a missing
 * shard named. */
static void test_weights_id(void **state)
{
    (void)state;
    char *d1 = fp_path_join(fpt_dir, "id-single"), *d2 = fp_path_join(fpt_dir, "id-sharded");
    assert_int_equal(fp_fs_mkdirs(d1, 0755, NULL), 0);
    assert_int_equal(fp_fs_mkdirs(d2, 0755, NULL), 0);
    size_t n1 = (3u << 20) + 17, n2 = 1000; /* more than one read of the first */
    unsigned char *buf = malloc(n1 + n2);
    for (size_t i = 0; i < n1 + n2; i++)
        buf[i] = (unsigned char)(i * 2654435761u >> 13);
    free(fpt_write(d1, "model.safetensors", buf, n1));
    free(fpt_write(d2, "model-00001-of-00002.safetensors", buf, n1));
    free(fpt_write(d2, "model-00002-of-00002.safetensors", buf + n1, n2));
    const char *idx = "{\"metadata\": {}, \"weight_map\": {"
                      "\"lm_head.weight\": \"model-00002-of-00002.safetensors\", "
                      "\"model.embed_tokens.weight\": \"model-00001-of-00002.safetensors\", "
                      "\"model.norm.weight\": \"model-00002-of-00002.safetensors\"}}";
    free(fpt_write(d2, "model.safetensors.index.json", idx, strlen(idx)));
    uint8_t want[32], got[32];
    uint64_t size = 0;
    int64_t mt = 0;
    fp_err_t err = {0};
    fp_sha256(buf, n1, want);
    assert_int_equal(fp_model_weights_id(d1, got, &size, &mt, &err), 0);
    assert_memory_equal(got, want, 32);
    assert_int_equal(size, n1);
    assert_true(mt > 0);
    fp_sha256(buf, n1 + n2, want);
    assert_int_equal(fp_model_weights_id(d2, got, &size, NULL, &err), 0);
    assert_memory_equal(got, want, 32);
    assert_int_equal(size, n1 + n2);
    char *shard = fp_path_join(d2, "model-00002-of-00002.safetensors");
    unlink(shard);
    assert_int_not_equal(fp_model_weights_id(d2, got, NULL, NULL, &err), 0);
    assert_err_contains(&err, "model-00002-of-00002.safetensors");
    free(shard);
    free(buf);
    free(d1);
    free(d2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_f32_and_bf16),
        cmocka_unit_test(test_sharded_load),
        cmocka_unit_test(test_weights_id),
        cmocka_unit_test(test_config_errors),
        cmocka_unit_test(test_rope_parameters_spelling),
    };
    return cmocka_run_group_tests(tests, fpt_setup_dir, fpt_teardown_dir);
}
