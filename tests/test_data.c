/* Training data: document splitting, prompt masking, errors named by file and line, the
 * held-out split, and windows that cover every target exactly once. */
#include "fp_test.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_data.h"
#include "fp_fs.h"
#include "fp_tokenizer.h"

#define dir fpt_dir

static fp_tokenizer_t *bytes_tok(void)
{
    fp_tokenizer_t *t;
    fp_err_t err = {0};
    assert_int_equal(fp_tokenizer_bytes(&t, &err), 0);
    return t;
}

static fp_dataset_t *load(const char *name, const char *text, int bos, int eos)
{
    char *p = fpt_write(dir, name, text, strlen(text));
    fp_tokenizer_t *t = bytes_tok();
    fp_dataset_t *d = NULL;
    fp_err_t err = {0};
    const char *files[1] = {p};
    int rc = fp_dataset_load(files, 1, t, bos, eos, 257, &d, &err);
    if (rc)
        print_error("%s\n", err.msg);
    assert_int_equal(rc, 0);
    fp_tokenizer_free(t);
    free(p);
    return d;
}

static void test_text_documents(void **state)
{
    (void)state;
    /* fortune format: "%" lines separate entries, which may hold blank lines */
    fp_dataset_t *d = load("f.txt", "one\n\ntwo lines\n%\nsecond\n%\nthird\n%\n", 256, 256);
    assert_int_equal(d->ndocs, 3);
    assert_int_equal(d->docs[0].len, 1 + strlen("one\n\ntwo lines") + 1);
    assert_int_equal(d->tok[0], 256);   /* BOS */
    assert_int_equal(d->tok[1], 'o');
    assert_int_equal(d->tgt[0], 0);     /* BOS is never a target */
    assert_int_equal(d->tgt[1], 1);
    assert_int_equal(d->tok[d->docs[0].len - 1], 256); /* EOS, a target */
    assert_int_equal(d->tgt[d->docs[0].len - 1], 1);
    fp_dataset_free(d);
    /* otherwise blank lines separate documents */
    d = load("p.txt", "para one\nstill one\n\n\npara two\n\npara three", -1, -1);
    assert_int_equal(d->ndocs, 3);
    assert_int_equal(d->docs[1].len, strlen("para two"));
    assert_int_equal(d->n, strlen("para one\nstill one") + strlen("para two") +
                               strlen("para three"));
    fp_dataset_free(d);
}

static void test_jsonl_kinds_and_masking(void **state)
{
    (void)state;
    fp_dataset_t *d = load("k.jsonl",
                           "{\"text\": \"ab\"}\n"
                           "\n"
                           "{\"prompt\": \"Q:\", \"completion\": \"yes\"}\n"
                           "{\"input_ids\": [5, 6, 7]}\n",
                           256, 256);
    assert_int_equal(d->ndocs, 3);
    /* prompt/completion: BOS Q : (not targets) y e s EOS (targets) */
    const fp_doc_t *pc = &d->docs[1];
    assert_int_equal(pc->len, 1 + 2 + 3 + 1);
    static const int want_tok[] = {256, 'Q', ':', 'y', 'e', 's', 256};
    static const unsigned char want_tgt[] = {0, 0, 0, 1, 1, 1, 1};
    for (size_t i = 0; i < pc->len; i++) {
        assert_int_equal(d->tok[pc->off + i], want_tok[i]);
        assert_int_equal(d->tgt[pc->off + i], want_tgt[i]);
    }
    /* input_ids are taken as given: no BOS/EOS added */
    const fp_doc_t *ids = &d->docs[2];
    assert_int_equal(ids->len, 3);
    assert_int_equal(d->tok[ids->off], 5);
    fp_dataset_free(d);
}

static void expect_load_error(const char *name, const char *text, const char *needle)
{
    char *p = fpt_write(dir, name, text, strlen(text));
    fp_tokenizer_t *t = bytes_tok();
    fp_dataset_t *d = NULL;
    fp_err_t err = {0};
    const char *files[1] = {p};
    int rc = fp_dataset_load(files, 1, t, 256, 256, 257, &d, &err);
    if (rc == 0 || !strstr(err.msg, needle))
        print_error("%s: rc %d: %s\n", name, rc, err.msg);
    assert_true(rc < 0);
    assert_null(d);
    assert_err_contains(&err, name);
    assert_err_contains(&err, needle);
    fp_tokenizer_free(t);
    free(p);
}

static void test_bad_lines_are_named(void **state)
{
    (void)state;
    expect_load_error("bad.jsonl", "{\"text\": \"ok\"}\n\n{\"text\": \"broken\n", ":3: bad JSON");
    expect_load_error("kind.jsonl", "{\"text\": \"ok\"}\n{\"label\": 1}\n",
                      ":2: expected {\"text\": ...}");
    expect_load_error("ids.jsonl", "{\"input_ids\": [1, 2, 999]}\n",
                      ":1: input_ids[2] is not a token id below the vocabulary size 257");
    expect_load_error("empty.txt", "\n\n\n", "no tokens");
    fp_tokenizer_t *t = bytes_tok();
    fp_dataset_t *d;
    fp_err_t err = {0};
    const char *missing[1] = {"/nonexistent/data.txt"};
    assert_int_equal(fp_dataset_load(missing, 1, t, -1, -1, 257, &d, &err), -ENOENT);
    assert_err_contains(&err, "/nonexistent/data.txt");
    fp_tokenizer_free(t);
}

/* Every target of d is predicted exactly once, with its label; for prompted data every window
 * starts at a document's start or continues a document longer than T, so a document that fits
 * in T is seen whole. */
static void check_eval_windows(const fp_dataset_t *d, int T)
{
    size_t nw = fp_dataset_eval_windows(d, T), seen = 0, windows = 0;
    int *tok = malloc((size_t)T * sizeof *tok), *lab = malloc((size_t)T * sizeof *lab);
    unsigned char *hit = calloc(d->n, 1);
    fp_eval_pos_t pos = {0, 0};
    size_t at = pos.at;
    while (fp_dataset_eval_next(d, &pos, T, tok, lab)) {
        windows++;
        if (d->prompted) {
            int starts_doc = 0;
            for (size_t k = 0; k < d->ndocs; k++)
                starts_doc |= d->docs[k].off == at ||
                              (d->docs[k].off < at && at < d->docs[k].off + d->docs[k].len &&
                               d->docs[k].len > (size_t)T);
            assert_true(starts_doc);
        }
        for (int t = 0; t < T; t++) {
            size_t i = at + (size_t)t;
            if (lab[t] >= 0) {
                assert_true(i + 1 < d->n);
                assert_int_equal(lab[t], d->tok[i + 1]);
                assert_int_equal(d->tgt[i + 1], 1);
                assert_int_equal(hit[i + 1], 0);
                hit[i + 1] = 1;
                seen++;
            }
        }
        at = pos.at;
    }
    assert_int_equal(windows, nw);
    assert_int_equal(seen, fp_dataset_targets(d));
    free(hit);
    free(tok);
    free(lab);
}

static void test_prompted_windows(void **state)
{
    (void)state;
    char text[16384] = "";
    for (int i = 0; i < 60; i++) {
        char line[160];
        snprintf(line, sizeof line, "{\"prompt\": \"item %d%s: \", \"completion\": \"%s\"}\n", i,
                 i % 7 == 0 ? " with a much longer prompt than the others have" : "",
                 i % 2 ? "odd" : "even");
        strcat(text, line);
    }
    fp_dataset_t *d = load("pc.jsonl", text, 256, 256);
    assert_true(d->prompted);
    for (int T = 4; T <= 256; T *= 2)
        check_eval_windows(d, T);
    /* training windows start where documents start */
    fp_rng_t rng;
    fp_rng_seed(&rng, 5);
    int tok[8 * 32], lab[8 * 32];
    fp_dataset_sample(d, &rng, 8, 32, tok, lab);
    for (int b = 0; b < 8; b++)
        assert_int_equal(tok[b * 32], 256); /* BOS */
    /* a subset keeps the flag; text data has none */
    fp_dataset_t *tr, *ho;
    fp_err_t err = {0};
    assert_int_equal(fp_dataset_split(d, 0.2, 1, &tr, &ho, &err), 0);
    assert_true(tr->prompted && ho->prompted);
    fp_dataset_free(tr);
    fp_dataset_free(ho);
    fp_dataset_free(d);
    d = load("plain.txt", "a\n%\nb\n", 256, 256);
    assert_false(d->prompted);
    fp_dataset_free(d);
}

static void test_split_and_windows(void **state)
{
    (void)state;
    char text[8192] = "";
    for (int i = 0; i < 40; i++) {
        char line[64];
        snprintf(line, sizeof line, "document number %d says hello\n%%\n", i);
        strcat(text, line);
    }
    fp_dataset_t *d = load("many.txt", text, 256, 256);
    assert_int_equal(d->ndocs, 40);
    fp_dataset_t *tr, *ho, *tr2, *ho2;
    fp_err_t err = {0};
    assert_int_equal(fp_dataset_split(d, 0.25, 9, &tr, &ho, &err), 0);
    assert_int_equal(ho->ndocs, 10);
    assert_int_equal(tr->ndocs, 30);
    assert_int_equal(tr->n + ho->n, d->n);
    /* the same seed gives the same split; another seed another one */
    assert_int_equal(fp_dataset_split(d, 0.25, 9, &tr2, &ho2, &err), 0);
    assert_int_equal(ho2->n, ho->n);
    assert_memory_equal(ho2->tok, ho->tok, ho->n * sizeof(int));
    fp_dataset_free(tr2);
    fp_dataset_free(ho2);
    assert_int_equal(fp_dataset_split(d, 0.25, 10, &tr2, &ho2, &err), 0);
    int differs = ho2->n != ho->n || memcmp(ho2->tok, ho->tok, ho->n * sizeof(int)) != 0;
    assert_true(differs);
    fp_dataset_free(tr2);
    fp_dataset_free(ho2);
    /* evaluation windows predict every target exactly once, with the right labels */
    for (int T = 3; T <= 64; T *= 4)
        check_eval_windows(ho, T);
    /* training windows: labels are the next tokens where those are targets */
    fp_rng_t rng;
    fp_rng_seed(&rng, 4);
    int tok[4 * 16], lab[4 * 16];
    fp_dataset_sample(tr, &rng, 4, 16, tok, lab);
    for (int b = 0; b < 4; b++)
        for (int t = 0; t + 1 < 16; t++)
            if (lab[b * 16 + t] >= 0)
                assert_int_equal(lab[b * 16 + t], tok[b * 16 + t + 1]);
    fp_dataset_free(tr);
    fp_dataset_free(ho);
    fp_dataset_free(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_documents),
        cmocka_unit_test(test_jsonl_kinds_and_masking),
        cmocka_unit_test(test_bad_lines_are_named),
        cmocka_unit_test(test_split_and_windows),
        cmocka_unit_test(test_prompted_windows),
    };
    return cmocka_run_group_tests(tests, fpt_setup_dir, fpt_teardown_dir);
}
