/* Hugging Face PEFT adapter directories: round trips, PEFT's own conventions, and one test per
 * way an adapter can be wrong. */
#include "fp_test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_json.h"
#include "fp_safetensors.h"



static const fp_module_desc_t mixed[] = {
    {"model.layers.0.self_attn.q_proj", 24, 16, 8, 16, 0},
    {"model.layers.0.self_attn.v_proj", 8, 16, 4, 16, 0},
    {"model.layers.1.self_attn.q_proj", 24, 16, 8, 32, 0},
    {"model.layers.1.mlp.down_proj", 16, 40, 8, 16, 0},
};

static char *subdir(const char *name)
{
    char *p = fp_path_join(fpt_dir, name);
    assert_non_null(p);
    return p;
}

static void assert_same_adapter(const fp_adapter_t *a, const fp_adapter_t *b)
{
    assert_int_equal(a->n, b->n);
    for (int i = 0; i < a->n; i++) {
        const fp_lora_module_t *x = &a->mods[i], *y = &b->mods[i];
        assert_string_equal(x->name, y->name);
        assert_int_equal(x->d_out, y->d_out);
        assert_int_equal(x->d_in, y->d_in);
        assert_int_equal(x->rank, y->rank);
        assert_true(x->alpha == y->alpha);
        assert_int_equal(x->rslora, y->rslora);
        assert_memory_equal(x->A, y->A, (size_t)x->rank * (size_t)x->d_in * sizeof(float));
        assert_memory_equal(x->B, y->B, (size_t)x->d_out * (size_t)x->rank * sizeof(float));
    }
}

static void test_round_trip_with_rank_and_alpha_patterns(void **state)
{
    (void)state;
    fp_adapter_t *ad = fpt_random_adapter(mixed, 4, 11, 0);
    ad->base_model = strdup("fedpeft/demo-base");
    char *out = subdir("rt");
    fp_err_t err = {0};
    assert_int_equal(fp_hfpeft_save(ad, out, &err), 0);

    /* The safetensors keys are exactly what HF PEFT writes. */
    char *stp = fp_path_join(out, FP_PEFT_WEIGHTS);
    fp_st_file_t *st;
    assert_int_equal(fp_st_open(&st, stp, &err), 0);
    assert_int_equal(fp_st_count(st), 8);
    const fp_st_tensor_t *t =
        fp_st_find(st, "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight");
    assert_non_null(t);
    assert_int_equal(t->shape[0], 4);
    assert_int_equal(t->shape[1], 16);
    t = fp_st_find(st, "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight");
    assert_non_null(t);
    assert_int_equal(t->shape[0], 16);
    assert_int_equal(t->shape[1], 8);
    assert_string_equal(fp_st_meta(st, "format"), "pt");
    fp_st_close(st);
    free(stp);

    /* The config: r and lora_alpha are the common values, the rest in the patterns. */
    char *cfgp = fp_path_join(out, FP_PEFT_CONFIG);
    json_t *cfg = fp_json_load_file(cfgp, 1 << 20, &err);
    assert_non_null(cfg);
    assert_string_equal(json_string_value(json_object_get(cfg, "peft_type")), "LORA");
    assert_int_equal(json_integer_value(json_object_get(cfg, "r")), 8);
    assert_int_equal(json_integer_value(json_object_get(cfg, "lora_alpha")), 16);
    json_t *rp = json_object_get(cfg, "rank_pattern");
    assert_int_equal(json_object_size(rp), 1);
    /* keys PEFT ≤ 0.14 (r".*\.K$") and ≥ 0.15 (r"(.*\.)?(K)$") both match to the module alone
     * (tests/parity/peft_patterns.py runs PEFT's own matching code on them) */
    assert_int_equal(json_integer_value(json_object_get(rp, "layers\\.0\\.self_attn\\.v_proj")),
                     4);
    json_t *ap = json_object_get(cfg, "alpha_pattern");
    assert_int_equal(json_object_size(ap), 1);
    assert_true(json_number_value(json_object_get(ap, "layers\\.1\\.self_attn\\.q_proj")) == 32);
    json_t *tm = json_object_get(cfg, "target_modules");
    assert_int_equal(json_array_size(tm), 3);
    assert_string_equal(json_string_value(json_array_get(tm, 0)), "down_proj");
    assert_string_equal(json_string_value(json_object_get(cfg, "base_model_name_or_path")),
                        "fedpeft/demo-base");
    json_decref(cfg);
    free(cfgp);

    for (int flags = 0; flags <= FP_LOAD_MAP; flags++) {
        fp_adapter_t *back;
        assert_int_equal(fp_hfpeft_load(out, flags, &back, &err), 0);
        assert_same_adapter(ad, back);
        assert_string_equal(back->base_model, "fedpeft/demo-base");
        assert_true(flags ? back->st != NULL : back->st == NULL);
        fp_adapter_free(back);
    }
    /* Saving over an existing adapter replaces it. */
    fp_adapter_t *other = fpt_random_adapter(mixed, 4, 12, 0);
    assert_int_equal(fp_hfpeft_save(other, out, &err), 0);
    fp_adapter_t *back;
    assert_int_equal(fp_hfpeft_load(out, FP_LOAD_COPY, &back, &err), 0);
    assert_same_adapter(other, back);
    fp_adapter_free(back);
    fp_adapter_free(other);
    assert_int_equal(fpt_count_prefix(fpt_dir, "rt.tmp"), 0);
    fp_adapter_free(ad);
    free(out);
}

/* Writes an adapter directory by hand, as PEFT (Python) would: a config text and factors. */
static char *hand_adapter(const char *name, const char *config, const fp_st_entry_t *e, size_t n)
{
    char *d = subdir(name);
    fp_err_t err = {0};
    assert_int_equal(fp_fs_mkdirs(d, 0755, &err), 0);
    if (config) {
        char *p = fpt_write(d, FP_PEFT_CONFIG, config, strlen(config));
        free(p);
    }
    if (e) {
        char *p = fp_path_join(d, FP_PEFT_WEIGHTS);
        assert_int_equal(fp_st_write(p, e, n, NULL, &err), 0);
        free(p);
    }
    return d;
}

static float zeros[4096];

#define FACTOR(nm, dt, a, b) {.name = nm, .dtype = dt, .ndim = 2, .shape = {a, b}, .f32 = zeros}
#define PFX "base_model.model.model.layers."

static const char good_cfg[] =
    "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16, \"target_modules\": [\"q_proj\", "
    "\"v_proj\"], \"rank_pattern\": {\"v_proj\": 4, \"q_proj\": 2}, \"alpha_pattern\": "
    "{\"layers.1.self_attn.q_proj\": 32.0}, \"use_rslora\": true, \"bias\": \"none\", "
    "\"fan_in_fan_out\": false, \"task_type\": \"CAUSAL_LM\", \"modules_to_save\": null}";

/* Per-module ranks and alphas (what flexlora and florist write) over 12 layers, so that
 * "layers.1" and "layers.11" must be told apart: PEFT's own matching code, transcribed from
 * its 0.14 and 0.15 sources (tests/parity/peft_patterns.py), gives every module the rank of
 * its tensors and the alpha fedpeft gives it, under both versions; and fedpeft reads the
 * adapter back the same. */
static void test_pattern_keys_match_in_peft(void **state)
{
    (void)state;
    enum { L = 12, M = 2 * L };
    fp_module_desc_t d[M];
    char names[M][64];
    for (int i = 0; i < M; i++) {
        int l = i / 2;
        snprintf(names[i], sizeof names[i], "model.layers.%d.%s", l,
                 i % 2 ? "mlp.down_proj" : "self_attn.q_proj");
        int rank = 2 + (l * 7 + i) % 5;
        d[i] = (fp_module_desc_t){names[i], 16, 16, rank, (double)(l % 3 ? 16 : 8 + l), 0};
    }
    fp_adapter_t *ad = fpt_random_adapter(d, M, 5, 0);
    char *out = subdir("peft-patterns");
    fp_err_t err = {0};
    assert_int_equal(fp_hfpeft_save(ad, out, &err), 0);
    json_t *alphas = json_object();
    for (int i = 0; i < M; i++)
        json_object_set_new(alphas, names[i], json_real(d[i].alpha));
    char *ap = fp_path_join(fpt_dir, "peft-alphas.json");
    assert_int_equal(fp_json_write_file(ap, alphas, &err), 0);
    if (system("/usr/bin/python3 -c 'import re' 2>/dev/null") != 0)
        fail_msg("python3 is needed");
    const char *args[] = {FP_SOURCE_DIR "/tests/parity/peft_patterns.py", out, ap, NULL};
    char *so = NULL, *se = NULL;
    int rc = fpt_runv("/usr/bin/python3", args, &so, &se);
    print_message("%s", so);
    if (rc)
        print_error("%s%s", so, se);
    assert_int_equal(rc, 0);
    fp_adapter_t *back;
    assert_int_equal(fp_hfpeft_load(out, 0, &back, &err), 0);
    assert_same_adapter(ad, back);
    fp_adapter_free(back);
    fp_adapter_free(ad);
    json_decref(alphas);
    free(so);
    free(se);
    free(ap);
    free(out);
}

static void test_reads_peft_conventions_and_bf16(void **state)
{
    (void)state;
    for (int i = 0; i < 4096; i++)
        zeros[i] = (float)(i % 7) * 0.25f;
    /* PEFT's own short pattern keys; the first matching key wins ("q_proj" would match
     * every q_proj, but "v_proj" is listed first and matches only v_proj). */
    fp_st_entry_t e[] = {
        FACTOR(PFX "0.self_attn.q_proj.lora_A.weight", FP_DT_BF16, 2, 16),
        FACTOR(PFX "0.self_attn.q_proj.lora_B.weight", FP_DT_BF16, 24, 2),
        FACTOR(PFX "0.self_attn.v_proj.lora_A.weight", FP_DT_F16, 4, 16),
        FACTOR(PFX "0.self_attn.v_proj.lora_B.weight", FP_DT_F32, 8, 4),
        FACTOR(PFX "1.self_attn.q_proj.lora_A.weight", FP_DT_F32, 2, 16),
        FACTOR(PFX "1.self_attn.q_proj.lora_B.weight", FP_DT_F64, 24, 2),
    };
    char *d = hand_adapter("peftstyle", good_cfg, e, 6);
    fp_err_t err = {0};
    for (int flags = 0; flags <= FP_LOAD_MAP; flags++) {
        fp_adapter_t *ad;
        int rc = fp_hfpeft_load(d, flags, &ad, &err);
        if (rc)
            print_error("%s\n", err.msg);
        assert_int_equal(rc, 0);
        assert_int_equal(ad->n, 3);
        int q0 = fp_adapter_find(ad, "model.layers.0.self_attn.q_proj");
        int v0 = fp_adapter_find(ad, "model.layers.0.self_attn.v_proj");
        int q1 = fp_adapter_find(ad, "model.layers.1.self_attn.q_proj");
        assert_true(q0 >= 0 && v0 >= 0 && q1 >= 0);
        assert_int_equal(ad->mods[q0].rank, 2);
        assert_int_equal(ad->mods[v0].rank, 4);
        assert_true(ad->mods[q0].alpha == 16);
        assert_true(ad->mods[q1].alpha == 32);
        assert_int_equal(ad->mods[q1].rslora, 1);
        assert_true(fabs(fp_module_scale(&ad->mods[q1]) - 32 / sqrt(2.0)) < 1e-12);
        /* values survive every dtype */
        for (int m = 0; m < 3; m++) {
            const fp_lora_module_t *mod = &ad->mods[m];
            for (int i = 0; i < mod->rank * mod->d_in; i++)
                assert_true(mod->A[i] == zeros[i]);
            for (int i = 0; i < mod->d_out * mod->rank; i++)
                assert_true(mod->B[i] == zeros[i]);
        }
        fp_adapter_free(ad);
    }
    free(d);
}

static void expect_load_error(const char *name, const char *config, const fp_st_entry_t *e,
                              size_t n, int code, const char *needle)
{
    char *d = hand_adapter(name, config, e, n);
    fp_adapter_t *ad = NULL;
    fp_err_t err = {0};
    int rc = fp_hfpeft_load(d, FP_LOAD_MAP, &ad, &err);
    if (rc != code || !strstr(err.msg, needle))
        print_error("%s: rc %d, message: %s\n", name, rc, err.msg);
    assert_int_equal(rc, code);
    assert_null(ad);
    assert_err_contains(&err, needle);
    free(d);
}

static const fp_st_entry_t pair8[] = {
    FACTOR(PFX "0.self_attn.q_proj.lora_A.weight", FP_DT_F32, 8, 16),
    FACTOR(PFX "0.self_attn.q_proj.lora_B.weight", FP_DT_F32, 24, 8),
};
static const char cfg8[] = "{\"peft_type\":\"LORA\",\"r\":8,\"lora_alpha\":16}";

static void test_reject_missing_pieces(void **state)
{
    (void)state;
    fp_adapter_t *ad;
    fp_err_t err = {0};
    char *none = subdir("does-not-exist");
    assert_int_equal(fp_hfpeft_load(none, 0, &ad, &err), -ENOENT);
    assert_err_contains(&err, "no such adapter directory");
    free(none);
    expect_load_error("noconfig", NULL, pair8, 2, -ENOENT, "no adapter_config.json");
    expect_load_error("noweights", cfg8, NULL, 0, -ENOENT, "no adapter_model.safetensors");
    char *d = hand_adapter("binonly", cfg8, NULL, 0);
    char *bin = fpt_write(d, "adapter_model.bin", "PK", 2);
    assert_int_equal(fp_hfpeft_load(d, 0, &ad, &err), -ENOENT);
    assert_err_contains(&err, "adapter_model.bin");
    free(bin);
    free(d);
    char *f = fpt_write(fpt_dir, "plainfile", "x", 1);
    assert_int_equal(fp_hfpeft_load(f, 0, &ad, &err), -ENOTDIR);
    free(f);
}

static void test_reject_bad_config(void **state)
{
    (void)state;
    expect_load_error("badjson", "{\"r\": 8,", pair8, 2, -EBADMSG, "bad JSON at line 1");
    expect_load_error("notlora", "{\"peft_type\":\"IA3\"}", pair8, 2, -ENOTSUP, "only LORA");
    expect_load_error("dora", "{\"r\":8,\"use_dora\":true}", pair8, 2, -ENOTSUP, "DoRA");
    expect_load_error("fifo", "{\"r\":8,\"fan_in_fan_out\":true}", pair8, 2, -ENOTSUP,
                      "fan_in_fan_out");
    /* a module saved whole must be there */
    expect_load_error("mts", "{\"r\":8,\"modules_to_save\":[\"lm_head\"]}", pair8, 2, -EBADMSG,
                      "modules_to_save names 'lm_head', which it does not hold");
    expect_load_error("biasall", "{\"r\":8,\"bias\":\"all\"}", pair8, 2, -ENOTSUP, "bias");
    expect_load_error("rtype", "{\"r\":\"eight\"}", pair8, 2, -EBADMSG, "must be an integer");
    expect_load_error("rzero", "{\"r\":0}", pair8, 2, -EBADMSG, "positive integer");
    expect_load_error("badre", "{\"r\":8,\"rank_pattern\":{\"q_proj(\":4}}", pair8, 2, -EBADMSG,
                      "not a valid regular expression");
}

static void test_reject_bad_tensors(void **state)
{
    (void)state;
    fp_st_entry_t extra[] = {
        pair8[0], pair8[1],
        FACTOR("base_model.model.lm_head.weight", FP_DT_F32, 4, 4),
    };
    expect_load_error("extra", cfg8, extra, 3, -EBADMSG, "not a LoRA factor");
    expect_load_error("unpaired", cfg8, pair8, 1, -EBADMSG, "has lora_A but no lora_B");
    expect_load_error("onlyb", cfg8, pair8 + 1, 1, -EBADMSG, "has lora_B but no lora_A");
    fp_st_entry_t ranks[] = {
        FACTOR(PFX "0.self_attn.q_proj.lora_A.weight", FP_DT_F32, 8, 16),
        FACTOR(PFX "0.self_attn.q_proj.lora_B.weight", FP_DT_F32, 24, 4),
    };
    expect_load_error("rankab", cfg8, ranks, 2, -EBADMSG, "their ranks differ");
    expect_load_error("rankcfg", "{\"r\":16}", pair8, 2, -EBADMSG,
                      "has rank 8 but adapter_config.json says 16");
    expect_load_error("rankpat", "{\"r\":8,\"rank_pattern\":{\"q_proj\":4}}", pair8, 2,
                      -EBADMSG, "(rank_pattern)");
    expect_load_error("target", "{\"r\":8,\"target_modules\":[\"v_proj\"]}", pair8, 2,
                      -EBADMSG, "not among target_modules");
    fp_st_entry_t flat[] = {
        {.name = PFX "0.self_attn.q_proj.lora_A.weight", .dtype = FP_DT_F32, .ndim = 1,
         .shape = {8}, .f32 = zeros},
        pair8[1],
    };
    expect_load_error("flat", cfg8, flat, 2, -EBADMSG, "must be 2-D");
    int32_t ints[128 * 4] = {0};
    fp_st_entry_t ityp[] = {
        {.name = PFX "0.self_attn.q_proj.lora_A.weight", .dtype = FP_DT_I32, .ndim = 2,
         .shape = {8, 16}, .raw = ints},
        pair8[1],
    };
    expect_load_error("i32", cfg8, ityp, 2, -ENOTSUP, "I32");
    /* A regex target_modules string must match the whole path. */
    expect_load_error("retarget", "{\"r\":8,\"target_modules\":\"q_proj\"}", pair8, 2,
                      -EBADMSG, "not among target_modules");
    char *d = hand_adapter("reok", "{\"r\":8,\"target_modules\":\".*\\\\.(q|v)_proj\"}", pair8,
                           2);
    fp_adapter_t *ad;
    fp_err_t err = {0};
    assert_int_equal(fp_hfpeft_load(d, 0, &ad, &err), 0);
    fp_adapter_free(ad);
    free(d);
    /* Python's syntax, as PEFT's re.fullmatch reads it: \d, (?:…), a lookahead */
    d = hand_adapter("repy", "{\"r\":8,\"target_modules\":"
                     "\"model\\\\.layers\\\\.\\\\d+\\\\.self_attn\\\\.(?:q|v)_proj\"}", pair8, 2);
    assert_int_equal(fp_hfpeft_load(d, 0, &ad, &err), 0);
    fp_adapter_free(ad);
    free(d);
    d = hand_adapter("repy2", "{\"r\":8,\"target_modules\":"
                     "\".*layers\\\\.(?!1\\\\.)\\\\d+\\\\.self_attn\\\\.q_proj\"}", pair8, 2);
    assert_int_equal(fp_hfpeft_load(d, 0, &ad, &err), 0);
    fp_adapter_free(ad);
    free(d);
    /* the whole path must match (fullmatch), not a prefix of it */
    expect_load_error("refull", "{\"r\":8,\"target_modules\":\"model\\\\.layers\\\\.\\\\d\"}",
                      pair8, 2, -EBADMSG, "not among target_modules");
    expect_load_error("rebad", "{\"r\":8,\"target_modules\":\"(?:q_proj\"}", pair8, 2,
                      -EBADMSG, "missing closing parenthesis");
}

static void test_reject_corrupt_weights_file(void **state)
{
    (void)state;
    char *d = hand_adapter("corrupt", cfg8, pair8, 2);
    char *p = fp_path_join(d, FP_PEFT_WEIGHTS);
    FILE *f = fopen(p, "ab");
    fputs("xyz", f);
    fclose(f);
    fp_adapter_t *ad;
    fp_err_t err = {0};
    assert_int_equal(fp_hfpeft_load(d, 0, &ad, &err), -EBADMSG);
    assert_err_contains(&err, "corrupt/adapter_model.safetensors");
    assert_err_contains(&err, "trailing bytes");
    free(p);
    free(d);
}

static void test_validate_against_spec(void **state)
{
    (void)state;
    fp_adapter_t *ad = fpt_random_adapter(mixed, 4, 3, 0);
    fp_err_t err = {0};
    fp_module_desc_t spec[4];
    memcpy(spec, mixed, sizeof spec);
    assert_int_equal(fp_adapter_validate(ad, spec, 4, &err), 0);
    assert_int_equal(fp_adapter_validate(ad, spec, 3, &err), -EINVAL);
    assert_err_contains(&err, "unexpected module 'model.layers.1.mlp.down_proj'");
    fp_module_desc_t more[5];
    memcpy(more, mixed, sizeof mixed);
    more[4] = (fp_module_desc_t){"model.layers.1.self_attn.v_proj", 8, 16, 4, 16, 0};
    assert_int_equal(fp_adapter_validate(ad, more, 5, &err), -EINVAL);
    assert_err_contains(&err, "module 'model.layers.1.self_attn.v_proj' is missing");
    spec[1].d_in = 17;
    assert_int_equal(fp_adapter_validate(ad, spec, 4, &err), -EINVAL);
    assert_err_contains(&err, "expected 8×17");
    spec[1].d_in = 16;
    spec[0].rank = 4;
    assert_int_equal(fp_adapter_validate(ad, spec, 4, &err), -EINVAL);
    assert_err_contains(&err, "rank 8 is above the allowed 4");
    spec[0].rank = 8;
    int v = fp_adapter_find(ad, "model.layers.0.self_attn.v_proj");
    ad->mods[v].B[2 * 4 + 3] = NAN;
    assert_int_equal(fp_adapter_validate(ad, spec, 4, &err), -EDOM);
    assert_err_contains(&err, "module 'model.layers.0.self_attn.v_proj': lora_B");
    assert_err_contains(&err, "row 2, column 3");
    fp_adapter_free(ad);
}

static void test_save_refusals(void **state)
{
    (void)state;
    fp_module_desc_t d[2] = {mixed[0], mixed[1]};
    d[1].rslora = 1;
    fp_adapter_t *ad = fpt_random_adapter(d, 2, 1, 0);
    char *out = subdir("mixedrs");
    fp_err_t err = {0};
    assert_int_equal(fp_hfpeft_save(ad, out, &err), -EINVAL);
    assert_err_contains(&err, "rsLoRA");
    assert_false(fp_fs_exists(out));
    assert_int_equal(fpt_count_prefix(fpt_dir, "mixedrs"), 0);
    fp_adapter_free(ad);
    free(out);
    ad = fpt_random_adapter(mixed, 1, 1, 0);
    char *f = fpt_write(fpt_dir, "afile", "x", 1);
    assert_int_equal(fp_hfpeft_save(ad, f, &err), -ENOTDIR);
    free(f);
    fp_adapter_free(ad);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_with_rank_and_alpha_patterns),
        cmocka_unit_test(test_pattern_keys_match_in_peft),
        cmocka_unit_test(test_reads_peft_conventions_and_bf16),
        cmocka_unit_test(test_reject_missing_pieces),
        cmocka_unit_test(test_reject_bad_config),
        cmocka_unit_test(test_reject_bad_tensors),
        cmocka_unit_test(test_reject_corrupt_weights_file),
        cmocka_unit_test(test_validate_against_spec),
        cmocka_unit_test(test_save_refusals),
    };
    return cmocka_run_group_tests(tests, fpt_setup_dir, fpt_teardown_dir);
}
