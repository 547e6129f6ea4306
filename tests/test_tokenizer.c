/* The tokenizer's components on small hand-written tokenizer.json files (the equality with the
 * reference implementations on real vocabularies is tests/oracle/tokenizer_oracle.mjs). */
#include "fp_test.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_tokenizer.h"

#define dir fpt_dir

static fp_tokenizer_t *from_json(const char *name, const char *json)
{
    char *p = fpt_write(dir, name, json, strlen(json));
    fp_tokenizer_t *t = NULL;
    fp_err_t err = {0};
    int rc = fp_tokenizer_load(p, &t, &err);
    if (rc)
        print_error("%s: %s\n", name, err.msg);
    assert_int_equal(rc, 0);
    free(p);
    return t;
}

/* ids of text, as a string "1 2 3" */
static char *enc(const fp_tokenizer_t *t, const char *text)
{
    int *ids = NULL;
    size_t n = 0, cap = 0;
    fp_err_t err = {0};
    assert_int_equal(fp_tokenizer_encode(t, text, strlen(text), &ids, &n, &cap, &err), 0);
    char *s = calloc(n * 12 + 1, 1);
    for (size_t i = 0; i < n; i++)
        sprintf(s + strlen(s), i ? " %d" : "%d", ids[i]);
    free(ids);
    return s;
}

#define assert_ids(t, text, want)                                                              \
    do {                                                                                       \
        char *got_ = enc((t), (text));                                                         \
        if (strcmp(got_, (want)))                                                              \
            print_error("\"%s\": ids \"%s\", expected \"%s\"\n", (text), got_, (want));        \
        assert_string_equal(got_, (want));                                                     \
        free(got_);                                                                            \
    } while (0)

static void test_byte_level_round_trip(void **state)
{
    (void)state;
    fp_tokenizer_t *t;
    fp_err_t err = {0};
    assert_int_equal(fp_tokenizer_bytes(&t, &err), 0);
    assert_int_equal(fp_tokenizer_vocab_size(t), FP_BYTES_VOCAB);
    assert_int_equal(fp_tokenizer_eos_id(t), 256);
    static const char *texts[] = {"", "plain ASCII", "tabs\tand\nnewlines  ",
                                  "Ünïcödé 日本語 😀👨‍👩‍👧", "\x7f\x01 control"};
    for (size_t k = 0; k < sizeof texts / sizeof texts[0]; k++) {
        const char *s = texts[k];
        int *ids = NULL;
        size_t n = 0, cap = 0;
        assert_int_equal(fp_tokenizer_encode(t, s, strlen(s), &ids, &n, &cap, &err), 0);
        assert_int_equal(n, strlen(s)); /* one id per byte, the byte's value */
        for (size_t i = 0; i < n; i++)
            assert_int_equal(ids[i], (unsigned char)s[i]);
        char *back;
        assert_int_equal(fp_tokenizer_decode(t, ids, n, &back, &err), 0);
        assert_string_equal(back, s);
        free(back);
        free(ids);
    }
    assert_ids(t, "a<|endoftext|>b", "97 256 98");
    fp_tokenizer_free(t);
}

#define HEAD "{\"version\":\"1.0\","
#define MODEL(vocab, merges, extra)                                                            \
    "\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"vocab\":" vocab ",\"merges\":" merges \
    extra "}}"

static void test_bpe_merges_leftmost_by_rank(void **state)
{
    (void)state;
    fp_tokenizer_t *t = from_json(
        "bpe.json", HEAD "\"added_tokens\":[],\"normalizer\":null,\"pre_tokenizer\":null,"
        MODEL("{\"<unk>\":0,\"a\":1,\"b\":2,\"c\":3,\"ab\":4,\"abc\":5,\"aa\":6,\"bc\":7}",
              "[\"a b\",\"ab c\",\"a a\",\"b c\"]", ""));
    assert_ids(t, "abcab", "5 4");
    assert_ids(t, "aaa", "6 1");   /* leftmost pair first */
    assert_ids(t, "bcab", "7 4");
    assert_ids(t, "abxc", "4 0 3"); /* x is unknown */
    fp_tokenizer_free(t);
    /* fuse_unk joins consecutive unknowns; ["a","b"] pairs are accepted as merges */
    t = from_json("fuse.json",
                  HEAD "\"added_tokens\":[],\"normalizer\":null,\"pre_tokenizer\":null,"
                  MODEL("{\"<unk>\":0,\"a\":1,\"b\":2,\"ab\":3}", "[[\"a\",\"b\"]]",
                        ",\"fuse_unk\":true"));
    assert_ids(t, "xyzab€a", "0 3 0 1");
    fp_tokenizer_free(t);
}

static void test_byte_fallback_and_ignore_merges(void **state)
{
    (void)state;
    char vocab[4096] = "{\"<unk>\":0,\"h\":1,\"i\":2,\"hi\":3,\"hello\":4";
    for (int b = 0; b < 256; b++)
        sprintf(vocab + strlen(vocab), ",\"<0x%02X>\":%d", b, 10 + b);
    strcat(vocab, "}");
    char json[8192];
    snprintf(json, sizeof json,
             HEAD "\"added_tokens\":[],\"normalizer\":null,\"pre_tokenizer\":null,"
                  "\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"byte_fallback\":true,"
                  "\"ignore_merges\":true,\"vocab\":%s,\"merges\":[\"h i\"]}}",
             vocab);
    fp_tokenizer_t *t = from_json("bf.json", json);
    /* é is U+00E9 = C3 A9: two byte tokens; "hello" is in the vocabulary as a whole */
    assert_ids(t, "hié", "3 205 179");
    assert_ids(t, "hello", "4");
    fp_tokenizer_free(t);
}

static void test_split_behaviours(void **state)
{
    (void)state;
    static const char *beh[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext",
                                "Contiguous"};
    /* as HF documents for "the-final--countdown": Removed [the, final, countdown], Isolated
     * [the, -, final, -, -, countdown], MergedWithPrevious [the-, final-, -, countdown],
     * MergedWithNext [the, -final, -, -countdown], Contiguous [the, -, final, --, countdown] */
    static const char *want[] = {"1 1 2", "1 3 1 3 3 2", "4 4 3 2", "1 6 3 5", "1 3 1 8 2"};
    for (int k = 0; k < 5; k++) {
        char json[2048], name[32];
        snprintf(json, sizeof json,
                 HEAD "\"added_tokens\":[],\"normalizer\":null,"
                      "\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"String\":\"-\"},"
                      "\"behavior\":\"%s\",\"invert\":false},"
                      "\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"vocab\":{\"<unk>\":0,"
                      "\"a\":1,\"b\":2,\"-\":3,\"a-\":4,\"-b\":5,\"-a\":6,\"--b\":7,\"--\":8},"
                      "\"merges\":[\"a -\",\"- b\",\"- a\",\"- -\",\"-- b\"]}}",
                 beh[k]);
        snprintf(name, sizeof name, "split%d.json", k);
        fp_tokenizer_t *t = from_json(name, json);
        /* "a-a--b": pieces by behaviour, then BPE inside each piece */
        char *got = enc(t, "a-a--b");
        if (strcmp(got, want[k]))
            print_error("%s: got \"%s\", expected \"%s\"\n", beh[k], got, want[k]);
        assert_string_equal(got, want[k]);
        free(got);
        fp_tokenizer_free(t);
    }
}

static void test_added_tokens_and_normalizers(void **state)
{
    (void)state;
    fp_tokenizer_t *t = from_json(
        "added.json",
        HEAD "\"added_tokens\":["
             "{\"id\":10,\"content\":\"<mask>\",\"lstrip\":true,\"rstrip\":true,\"special\":true},"
             "{\"id\":11,\"content\":\"cat\",\"single_word\":true,\"special\":false}],"
             "\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"NFKC\"},"
             "{\"type\":\"Lowercase\"},{\"type\":\"Strip\",\"left\":true,\"right\":true}]},"
             "\"pre_tokenizer\":{\"type\":\"Whitespace\"},"
        MODEL("{\"<unk>\":0,\"a\":1,\"b\":2,\"c\":3,\"t\":4,\"f\":5,\"i\":6,\"s\":7}", "[]", ""));
    /* spaces around <mask> are stripped into it; the NFKC ligature ﬁ becomes f i; case folds */
    assert_ids(t, "AB <mask>  ﬁ", "1 2 10 5 6");
    /* "cat" is matched alone, but not inside "cats" */
    assert_ids(t, "a cat", "1 11");
    assert_ids(t, "cats", "3 1 4 7");
    fp_tokenizer_free(t);
}

static void expect_error(const char *name, const char *json, int code, const char *needle)
{
    char *p = fpt_write(dir, name, json, strlen(json));
    fp_tokenizer_t *t = NULL;
    fp_err_t err = {0};
    int rc = fp_tokenizer_load(p, &t, &err);
    if (rc != code || !strstr(err.msg, needle))
        print_error("%s: rc %d: %s\n", name, rc, err.msg);
    assert_int_equal(rc, code);
    assert_null(t);
    assert_err_contains(&err, needle);
    free(p);
}

static void test_load_errors(void **state)
{
    (void)state;
    expect_error("wp.json", HEAD "\"model\":{\"type\":\"WordPiece\",\"vocab\":{}}}", -ENOTSUP,
                 "model type \"WordPiece\"");
    expect_error("pt.json",
                 HEAD "\"pre_tokenizer\":{\"type\":\"BertPreTokenizer\"},"
                 MODEL("{\"a\":0}", "[]", ""),
                 -ENOTSUP, "pre-tokenizer \"BertPreTokenizer\"");
    expect_error("nz.json",
                 HEAD "\"normalizer\":{\"type\":\"BertNormalizer\"}," MODEL("{\"a\":0}", "[]", ""),
                 -ENOTSUP, "normalizer \"BertNormalizer\"");
    expect_error("merge.json", HEAD MODEL("{\"a\":0,\"b\":1}", "[\"a b\"]", ""), -EBADMSG,
                 "missing from the vocabulary");
    expect_error("json.json", "{\"model\": ", -EBADMSG, "bad JSON at line 1");
    expect_error("regex.json",
                 HEAD "\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(\"},"
                 "\"behavior\":\"Isolated\"}," MODEL("{\"a\":0}", "[]", ""),
                 -EBADMSG, "pattern \"(\" is not supported");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_byte_level_round_trip),
        cmocka_unit_test(test_bpe_merges_leftmost_by_rank),
        cmocka_unit_test(test_byte_fallback_and_ignore_merges),
        cmocka_unit_test(test_split_behaviours),
        cmocka_unit_test(test_added_tokens_and_normalizers),
        cmocka_unit_test(test_load_errors),
    };
    return cmocka_run_group_tests(tests, fpt_setup_dir, fpt_teardown_dir);
}
