/* safetensors reader and writer, and the float conversions behind them. */
#include "fp_test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fp_dtype.h"
#include "fp_fs.h"
#include "fp_safetensors.h"
#include "fp_sha256.h"



/* ---- conversions ---- */

static void test_f16_every_value_round_trips(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 0x10000u; h++) {
        float f = fp_f16_to_f32((uint16_t)h);
        uint16_t back = fp_f32_to_f16(f);
        if (isnan(f))
            assert_true((back & 0x7c00u) == 0x7c00u && (back & 0x3ffu) != 0);
        else
            assert_int_equal(back, h);
    }
    assert_true(fp_f16_to_f32(0x3c00) == 1.0f);
    assert_true(fp_f16_to_f32(0x0001) == 0x1.0p-24f);      /* smallest subnormal */
    assert_true(fp_f16_to_f32(0x7bff) == 65504.0f);        /* largest normal */
    assert_int_equal(fp_f32_to_f16(65520.0f), 0x7c00);     /* ties to even: overflows */
    assert_int_equal(fp_f32_to_f16(65519.0f), 0x7bff);
    assert_int_equal(fp_f32_to_f16(0x1.0p-25f), 0x0000);   /* tie to even: zero */
    assert_int_equal(fp_f32_to_f16(0x1.8p-25f), 0x0001);
    assert_int_equal(fp_f32_to_f16(1.0f + 0x1.0p-11f), 0x3c00); /* tie to even */
    assert_int_equal(fp_f32_to_f16(1.0f + 0x1.8p-10f), 0x3c02); /* 1.5 ulp: tie, to even */
    assert_int_equal(fp_f32_to_f16(1.0f + 0x1.8p-11f), 0x3c01); /* 0.75 ulp: up */
}

static void test_bf16_rounds_to_nearest_even(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 0x10000u; h++) {
        float f = fp_bf16_to_f32((uint16_t)h);
        uint16_t back = fp_f32_to_bf16(f);
        if (isnan(f))
            assert_true(isnan(fp_bf16_to_f32(back)));
        else
            assert_int_equal(back, h);
    }
    /* 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0). */
    assert_int_equal(fp_f32_to_bf16(1.0f + 0x1.0p-8f), 0x3f80);
    assert_int_equal(fp_f32_to_bf16(1.0f + 0x1.8p-8f), 0x3f81);
}

/* ---- round trips ---- */

static void test_write_read_every_float_dtype(void **state)
{
    (void)state;
    float v[12];
    for (int i = 0; i < 12; i++)
        v[i] = (float)(i - 5) * 0.375f; /* exact in every float dtype */
    fp_st_entry_t e[4] = {
        {.name = "f32", .dtype = FP_DT_F32, .ndim = 2, .shape = {3, 4}, .f32 = v},
        {.name = "f16", .dtype = FP_DT_F16, .ndim = 1, .shape = {12}, .f32 = v},
        {.name = "bf16", .dtype = FP_DT_BF16, .ndim = 3, .shape = {2, 3, 2}, .f32 = v},
        {.name = "f64", .dtype = FP_DT_F64, .ndim = 2, .shape = {4, 3}, .f32 = v},
    };
    const char *meta[] = {"fedpeft.round", "7", NULL};
    char *p = fp_path_join(fpt_dir, "all.safetensors");
    fp_err_t err = {0};
    assert_int_equal(fp_st_write(p, e, 4, meta, &err), 0);

    /* header length is a multiple of 8 and the format metadata is there */
    FILE *f = fopen(p, "rb");
    uint64_t hl;
    assert_int_equal(fread(&hl, 8, 1, f), 1);
    fclose(f);
    assert_int_equal(hl % 8, 0);

    fp_st_file_t *st;
    assert_int_equal(fp_st_open(&st, p, &err), 0);
    assert_int_equal(fp_st_count(st), 4);
    assert_string_equal(fp_st_meta(st, "format"), "pt");
    assert_string_equal(fp_st_meta(st, "fedpeft.round"), "7");
    const char *names[4] = {"f32", "f16", "bf16", "f64"};
    for (int i = 0; i < 4; i++) {
        const fp_st_tensor_t *t = fp_st_find(st, names[i]);
        assert_non_null(t);
        assert_int_equal(t->dtype, e[i].dtype);
        assert_int_equal(t->ndim, e[i].ndim);
        assert_int_equal(t->nelem, 12);
        float got[12];
        assert_int_equal(fp_st_read_f32(st, t, got, &err), 0);
        assert_memory_equal(got, v, sizeof v);
    }
    /* F32 is zero-copy: the view points into the mapping */
    const fp_st_tensor_t *t = fp_st_find(st, "f32");
    const float *view = fp_st_f32_view(t);
    assert_non_null(view);
    assert_memory_equal(view, v, sizeof v);
    assert_null(fp_st_f32_view(fp_st_find(st, "f16")));
    assert_null(fp_st_find(st, "missing"));
    /* releasing pages keeps the data readable (it faults back in) */
    fp_st_release(st, t);
    assert_memory_equal(view, v, sizeof v);
    fp_st_close(st);
    free(p);
}

/* A header made alone (fp_st_header, data aligned to 4096) with the tensors' bytes written
 * after it is a file the reader takes, its data at the alignment; fp_st_write_sha's hash is
 * the file's. */
static void test_header_then_bytes_and_hashed_write(void **state)
{
    (void)state;
    float a[6] = {1, 2, 3, 4, 5, 6}, b[4] = {-1, -2, -3, -4};
    fp_st_entry_t e[2] = {
        {.name = "x.lora_A.weight", .dtype = FP_DT_F32, .ndim = 2, .shape = {2, 3}},
        {.name = "x.lora_B.weight", .dtype = FP_DT_F32, .ndim = 2, .shape = {2, 2}},
    };
    char *hdr = NULL;
    size_t hl = 0;
    fp_err_t err = {0};
    assert_int_equal(fp_st_header(e, 2, NULL, 4096, &hdr, &hl, &err), 0);
    assert_int_equal(hl, 4096);
    char *p = fp_path_join(fpt_dir, "spooled.safetensors");
    FILE *f = fopen(p, "wb");
    assert_int_equal(fwrite(hdr, 1, hl, f), hl);
    assert_int_equal(fwrite(a, sizeof a, 1, f), 1);
    assert_int_equal(fwrite(b, sizeof b, 1, f), 1);
    fclose(f);
    fp_st_file_t *st;
    assert_int_equal(fp_st_open(&st, p, &err), 0);
    float got[6];
    assert_int_equal(fp_st_read_f32(st, fp_st_find(st, "x.lora_A.weight"), got, &err), 0);
    assert_memory_equal(got, a, sizeof a);
    assert_int_equal(fp_st_read_f32(st, fp_st_find(st, "x.lora_B.weight"), got, &err), 0);
    assert_memory_equal(got, b, sizeof b);
    fp_st_close(st);

    e[0].f32 = a;
    e[1].f32 = b;
    uint8_t sha[32], want[32];
    assert_int_equal(fp_st_write_sha(p, e, 2, NULL, sha, &err), 0);
    char *data;
    size_t len;
    assert_int_equal(fp_fs_read_file(p, 1 << 20, &data, &len, &err), 0);
    fp_sha256(data, len, want);
    assert_memory_equal(sha, want, 32);
    free(data);
    free(hdr);
    free(p);
}

static void test_empty_scalar_and_zero_size_tensors(void **state)
{
    (void)state;
    float one = 1.5f;
    fp_st_entry_t e[2] = {
        {.name = "scalar", .dtype = FP_DT_F32, .ndim = 0, .f32 = &one},
        {.name = "empty", .dtype = FP_DT_F32, .ndim = 2, .shape = {0, 7}, .f32 = &one},
    };
    char *p = fp_path_join(fpt_dir, "small.safetensors");
    fp_err_t err = {0};
    assert_int_equal(fp_st_write(p, e, 2, NULL, &err), 0);
    fp_st_file_t *st;
    assert_int_equal(fp_st_open(&st, p, &err), 0);
    assert_int_equal(fp_st_find(st, "scalar")->nelem, 1);
    assert_int_equal(fp_st_find(st, "empty")->nelem, 0);
    fp_st_close(st);
    assert_int_equal(fp_st_write(p, NULL, 0, NULL, &err), 0);
    assert_int_equal(fp_st_open(&st, p, &err), 0);
    assert_int_equal(fp_st_count(st), 0);
    fp_st_close(st);
    free(p);
}

static void test_writer_leaves_nothing_on_failure(void **state)
{
    (void)state;
    float v[2] = {1, 2};
    fp_st_entry_t e[2] = {
        {.name = "a", .dtype = FP_DT_F32, .ndim = 1, .shape = {2}, .f32 = v},
        {.name = "a", .dtype = FP_DT_F32, .ndim = 1, .shape = {2}, .f32 = v},
    };
    char *p = fp_path_join(fpt_dir, "dup.safetensors");
    fp_err_t err = {0};
    assert_int_equal(fp_st_write(p, e, 2, NULL, &err), -EINVAL);
    assert_err_contains(&err, "duplicate");
    assert_false(fp_fs_exists(p));
    /* a failure after the temporary file was opened removes it too */
    fp_st_entry_t nodata = {.name = "b", .dtype = FP_DT_F32, .ndim = 1, .shape = {2}};
    assert_int_equal(fp_st_write(p, &nodata, 1, NULL, &err), -EINVAL);
    assert_false(fp_fs_exists(p));
    assert_int_equal(fpt_count_prefix(fpt_dir, "dup.safetensors"), 0);
    free(p);
}

static void test_unaligned_f32_is_copied_not_viewed(void **state)
{
    (void)state;
    /* A 1-byte U8 tensor first pushes the F32 tensor to an odd offset. */
    unsigned char raw[1 + 8];
    raw[0] = 9;
    float v[2] = {3.25f, -1.0f};
    memcpy(raw + 1, v, 8);
    fp_st_entry_t e[2] = {
        {.name = "byte", .dtype = FP_DT_U8, .ndim = 1, .shape = {1}, .raw = raw},
        {.name = "x", .dtype = FP_DT_F32, .ndim = 1, .shape = {2}, .raw = raw + 1},
    };
    char *p = fp_path_join(fpt_dir, "odd.safetensors");
    fp_err_t err = {0};
    assert_int_equal(fp_st_write(p, e, 2, NULL, &err), 0);
    fp_st_file_t *st;
    assert_int_equal(fp_st_open(&st, p, &err), 0);
    const fp_st_tensor_t *t = fp_st_find(st, "x");
    assert_null(fp_st_f32_view(t));
    float got[2];
    assert_int_equal(fp_st_read_f32(st, t, got, &err), 0);
    assert_memory_equal(got, v, sizeof v);
    assert_int_equal(fp_st_read_f32(st, fp_st_find(st, "byte"), got, &err), -ENOTSUP);
    assert_err_contains(&err, "U8");
    fp_st_close(st);
    free(p);
}

/* ---- every rule of the format, one test each ---- */

static void expect_reject(const char *name, const char *header, size_t data_len,
                          uint64_t hlen_override, int code, const char *needle)
{
    char *p = fpt_write_st(fpt_dir, name, header, data_len, hlen_override);
    fp_st_file_t *st = NULL;
    fp_err_t err = {0};
    int rc = fp_st_open(&st, p, &err);
    if (rc != code)
        print_error("%s: rc %d, message: %s\n", name, rc, err.msg);
    assert_int_equal(rc, code);
    assert_null(st);
    assert_err_contains(&err, name); /* the message names the file */
    assert_err_contains(&err, needle);
    free(p);
}

static void test_reject_truncated_file(void **state)
{
    (void)state;
    char *p = fpt_write(fpt_dir, "tiny.safetensors", "\x10\x00\x00", 3);
    fp_st_file_t *st;
    fp_err_t err = {0};
    assert_int_equal(fp_st_open(&st, p, &err), -EBADMSG);
    assert_err_contains(&err, "truncated");
    assert_err_contains(&err, "tiny.safetensors");
    free(p);
    expect_reject("short-header.safetensors", "{}", 0, 4096, -EBADMSG, "truncated");
}

static void test_reject_header_over_100mb(void **state)
{
    (void)state;
    expect_reject("huge.safetensors", "{}", 0, 100000001ull, -EFBIG, "100 MB");
}

static void test_reject_bad_json(void **state)
{
    (void)state;
    expect_reject("badjson.safetensors", "{\"a\": {\"dtype\": ", 0, 0, -EBADMSG, "bad JSON");
    expect_reject("notobj.safetensors", "[1, 2]  ", 0, 0, -EBADMSG, "not a JSON object");
    expect_reject("entry.safetensors", "{\"a\": 5}", 0, 0, -EBADMSG, "not an object");
}

static void test_reject_unknown_dtype(void **state)
{
    (void)state;
    expect_reject("dtype.safetensors",
                  "{\"w\":{\"dtype\":\"F13\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, 0,
                  -EBADMSG, "unknown dtype \"F13\"");
}

static void test_reject_shape_size_mismatch(void **state)
{
    (void)state;
    expect_reject("mismatch.safetensors",
                  "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]}}", 12, 0,
                  -EBADMSG, "hold 12 bytes but shape [2, 2] of F32 needs 16");
    expect_reject("negshape.safetensors",
                  "{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, 0,
                  -EBADMSG, "non-negative integers");
    expect_reject("badoffs.safetensors",
                  "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4]}}", 4, 0,
                  -EBADMSG, "[begin, end]");
    expect_reject("overflow.safetensors",
                  "{\"w\":{\"dtype\":\"F64\",\"shape\":[4294967296,4294967296],"
                  "\"data_offsets\":[0,8]}}", 8, 0, -EBADMSG, "too large");
}

static void test_reject_overlapping_offsets(void **state)
{
    (void)state;
    expect_reject("overlap.safetensors",
                  "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                  "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                  12, 0, -EBADMSG, "overlaps");
}

static void test_reject_gapped_offsets(void **state)
{
    (void)state;
    expect_reject("gap.safetensors",
                  "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                  "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}",
                  20, 0, -EBADMSG, "gap");
    expect_reject("gapstart.safetensors",
                  "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, 0,
                  -EBADMSG, "gap");
}

static void test_reject_duplicate_names(void **state)
{
    (void)state;
    expect_reject("dup.safetensors",
                  "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                  "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                  8, 0, -EBADMSG, "duplicate tensor name");
}

static void test_reject_trailing_bytes(void **state)
{
    (void)state;
    expect_reject("trailing.safetensors",
                  "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 11, 0,
                  -EBADMSG, "3 trailing bytes");
}

static void test_reject_data_beyond_end(void **state)
{
    (void)state;
    expect_reject("cut.safetensors",
                  "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 10, 0,
                  -EBADMSG, "beyond the 10-byte data buffer");
}

static void test_reject_bad_metadata(void **state)
{
    (void)state;
    expect_reject("meta.safetensors", "{\"__metadata__\":{\"format\":5}}", 0, 0, -EBADMSG,
                  "not a string");
    expect_reject("meta2.safetensors", "{\"__metadata__\":[1]}", 0, 0, -EBADMSG,
                  "must be an object");
}

static void test_accepts_space_padded_header_and_metadata(void **state)
{
    (void)state;
    char *p = fpt_write_st(fpt_dir, "ok.safetensors",
                           "{\"__metadata__\":{\"format\":\"pt\"},"
                           "\"a\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[0,6]}}    ",
                           6, 0);
    fp_st_file_t *st;
    fp_err_t err = {0};
    assert_int_equal(fp_st_open(&st, p, &err), 0);
    assert_string_equal(fp_st_meta(st, "format"), "pt");
    assert_int_equal(fp_st_get(st, 0)->dtype, FP_DT_BF16);
    fp_st_close(st);
    free(p);
}

static void test_open_missing_and_directory(void **state)
{
    (void)state;
    fp_st_file_t *st;
    fp_err_t err = {0};
    char *p = fp_path_join(fpt_dir, "nope.safetensors");
    assert_int_equal(fp_st_open(&st, p, &err), -ENOENT);
    assert_err_contains(&err, "nope.safetensors");
    free(p);
    assert_int_equal(fp_st_open(&st, fpt_dir, &err), -EINVAL);
    assert_err_contains(&err, "not a regular file");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_f16_every_value_round_trips),
        cmocka_unit_test(test_bf16_rounds_to_nearest_even),
        cmocka_unit_test(test_write_read_every_float_dtype),
        cmocka_unit_test(test_header_then_bytes_and_hashed_write),
        cmocka_unit_test(test_empty_scalar_and_zero_size_tensors),
        cmocka_unit_test(test_writer_leaves_nothing_on_failure),
        cmocka_unit_test(test_unaligned_f32_is_copied_not_viewed),
        cmocka_unit_test(test_reject_truncated_file),
        cmocka_unit_test(test_reject_header_over_100mb),
        cmocka_unit_test(test_reject_bad_json),
        cmocka_unit_test(test_reject_unknown_dtype),
        cmocka_unit_test(test_reject_shape_size_mismatch),
        cmocka_unit_test(test_reject_overlapping_offsets),
        cmocka_unit_test(test_reject_gapped_offsets),
        cmocka_unit_test(test_reject_duplicate_names),
        cmocka_unit_test(test_reject_trailing_bytes),
        cmocka_unit_test(test_reject_data_beyond_end),
        cmocka_unit_test(test_reject_bad_metadata),
        cmocka_unit_test(test_accepts_space_padded_header_and_metadata),
        cmocka_unit_test(test_open_missing_and_directory),
    };
    return cmocka_run_group_tests(tests, fpt_setup_dir, fpt_teardown_dir);
}
