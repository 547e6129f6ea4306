/* The fedpeft tool as a user runs it: `fedpeft adapter random`, `fedpeft merge` with every
 * strategy, and every way a merge must refuse — exit non-zero, say why, write nothing. */
#include "fp_test.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fp_fs.h"
#include "fp_hfpeft.h"

static char *out_text, *err_text;

static int teardown(void **state)
{
    free(out_text);
    free(err_text);
    return fpt_teardown_dir(state);
}

static int runv(const char *const *args)
{
    return fpt_runv(FEDPEFT_BIN, args, &out_text, &err_text);
}

/* Collects a NULL-terminated variadic list into args[] (at most 63). */
#define COLLECT(args, first, ap)                                                               \
    do {                                                                                       \
        int n_ = 0;                                                                            \
        for (const char *a_ = (first); a_ && n_ < 63; a_ = va_arg(ap, const char *))           \
            (args)[n_++] = a_;                                                                 \
        (args)[n_] = NULL;                                                                     \
    } while (0)

static int run(const char *first, ...) __attribute__((sentinel));
static int run(const char *first, ...)
{
    const char *args[64];
    va_list ap;
    va_start(ap, first);
    COLLECT(args, first, ap);
    va_end(ap);
    return runv(args);
}

static char *path(const char *name)
{
    return fp_path_join(fpt_dir, name);
}

static void make_site(const char *name, const char *rank, const char *seed, const char *aseed)
{
    char *p = path(name);
    int rc = aseed ? run("adapter", "random", "--out", p, "--layers", "2", "--dim", "48",
                         "--targets", "q_proj,v_proj,down_proj", "--rank", rank, "--seed", seed,
                         "--shared-a-seed", aseed, NULL)
                   : run("adapter", "random", "--out", p, "--layers", "2", "--dim", "48",
                         "--targets", "q_proj,v_proj,down_proj", "--rank", rank, "--seed", seed,
                         NULL);
    if (rc)
        print_error("%s", err_text);
    assert_int_equal(rc, 0);
    free(p);
}

static void test_help_everywhere(void **state)
{
    (void)state;
    assert_int_equal(run("--help", NULL), 0);
    assert_contains(out_text, "Usage: fedpeft COMMAND");
    assert_int_equal(run("merge", "--help", NULL), 0);
    assert_contains(out_text, "Usage: fedpeft merge");
    assert_int_equal(run("adapter", "--help", NULL), 0);
    assert_contains(out_text, "Usage: fedpeft adapter");
    assert_int_equal(run("adapter", "random", "--help", NULL), 0);
    assert_int_equal(run("bench", "--help", NULL), 0);
    assert_contains(out_text, "Usage: fedpeft bench");
    assert_int_equal(run("--version", NULL), 0);
    assert_contains(out_text, "fedpeft ");
    assert_int_equal(run("frobnicate", NULL), 2);
    assert_contains(err_text, "unknown command");
}

static json_t *last_json(void)
{
    json_error_t je;
    json_t *j = json_loads(out_text, 0, &je);
    if (!j)
        print_error("not JSON: %s\n", out_text);
    assert_non_null(j);
    return j;
}

static void test_every_strategy_merges(void **state)
{
    (void)state;
    make_site("s1", "4", "1", NULL);
    make_site("s2", "8", "2", NULL);
    make_site("s3", "8", "3", NULL);
    make_site("e1", "8", "4", "99");
    make_site("e2", "8", "5", "99");
    char *s1 = path("s1"), *s2 = path("s2"), *s3 = path("s3"), *e1 = path("e1"),
         *e2 = path("e2");
    /* inputs: 0 = three mixed ranks (4, 8, 8); 1 = two rank-8 sites with their own A;
     * 2 = two rank-8 sites sharing A (as FFA-LoRA sites do) */
    static const struct {
        const char *strategy;
        int inputs;
        int rank_max;
        int exact;
    } cases[] = {
        {"fedavg", 1, 8, 0},   {"ffa", 2, 8, 1},    {"zeropad", 0, 8, 0},
        {"flexlora", 0, 8, 0}, {"flora", 0, 20, 1}, {"florist", 0, -20, 0}, /* -: at most */
        {"fedavg", 2, 8, 1}, /* shared A: no cross terms, so fedavg is exact too */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char name[32];
        snprintf(name, sizeof name, "m-%s-%zu", cases[i].strategy, i);
        char *o = path(name);
        int rc = cases[i].inputs == 0
                     ? run("merge", "--strategy", cases[i].strategy, "--weights", "10,20,30",
                           "--report-error", "--json", "--out", o, s1, s2, s3, NULL)
                 : cases[i].inputs == 1
                     ? run("merge", "--strategy", cases[i].strategy, "--weights", "10,30",
                           "--report-error", "--json", "--out", o, s2, s3, NULL)
                     : run("merge", "--strategy", cases[i].strategy, "--weights", "10,30",
                           "--report-error", "--json", "--out", o, e1, e2, NULL);
        if (rc)
            print_error("%s: %s\n", cases[i].strategy, err_text);
        assert_int_equal(rc, 0);
        json_t *j = last_json();
        assert_string_equal(json_string_value(json_object_get(j, "strategy")),
                            cases[i].strategy);
        assert_int_equal(json_integer_value(json_object_get(j, "modules")), 6);
        int rank_max = (int)json_integer_value(json_object_get(j, "rank_max"));
        if (cases[i].rank_max > 0)
            assert_int_equal(rank_max, cases[i].rank_max);
        else
            assert_true(rank_max >= 1 && rank_max <= -cases[i].rank_max);
        double rel = json_real_value(json_object_get(j, "rel_error"));
        if (cases[i].exact)
            assert_true(rel < 1e-5);
        else
            assert_true(rel > 1e-3 && rel < 1.5);
        json_decref(j);
        /* the output is a PEFT directory fedpeft (and PEFT) can load */
        fp_adapter_t *ad;
        fp_err_t err = {0};
        assert_int_equal(fp_hfpeft_load(o, FP_LOAD_COPY, &ad, &err), 0);
        assert_int_equal(ad->n, 6);
        fp_adapter_free(ad);
        free(o);
    }
    /* The human summary is one line. */
    char *o = path("m-human");
    assert_int_equal(run("merge", "-s", "flexlora", "-r", "6", "-o", o, s1, s2, NULL), 0);
    assert_contains(out_text, "merged 2 adapters with flexlora: 6 modules, rank 6");
    assert_true(strchr(out_text, '\n') == out_text + strlen(out_text) - 1);
    /* --per-site: each site's cut at its own rank */
    char *ps = path("m-persite");
    assert_int_equal(run("merge", "-s", "zeropad", "--per-site", "-o", ps, s1, s2, NULL), 0);
    char *site1 = fp_path_join(ps, "site-1");
    fp_adapter_t *ad;
    fp_err_t err = {0};
    assert_int_equal(fp_hfpeft_load(site1, 0, &ad, &err), 0);
    assert_int_equal(ad->mods[0].rank, 4);
    fp_adapter_free(ad);
    assert_int_equal(run("adapter", "info", "--json", site1, NULL), 0);
    json_t *j = last_json();
    assert_int_equal(json_integer_value(json_object_get(j, "modules")), 6);
    json_decref(j);
    assert_int_equal(run("adapter", "info", site1, NULL), 0);
    assert_contains(out_text, "model.layers.1.self_attn.v_proj");
    free(site1);
    free(ps);
    free(o);
    free(s1);
    free(s2);
    free(s3);
    free(e1);
    free(e2);
}

/* A refused merge exits non-zero, names the problem and writes nothing at --out. */
static void expect_refusal(int code, const char *needle, const char *out, const char *first,
                           ...) __attribute__((sentinel));
static void expect_refusal(int code, const char *needle, const char *out, const char *first,
                           ...)
{
    const char *args[64];
    va_list ap;
    va_start(ap, first);
    COLLECT(args, first, ap);
    va_end(ap);
    int rc = runv(args);
    if (rc != code)
        print_error("exit %d, stderr: %s\n", rc, err_text);
    assert_int_equal(rc, code);
    assert_contains(err_text, needle);
    if (out) {
        assert_false(fp_fs_exists(out));
        const char *base = strrchr(out, '/') + 1;
        assert_int_equal(fpt_count_prefix(fpt_dir, base), 0);
    }
}

static void test_refusals_write_nothing(void **state)
{
    (void)state;
    make_site("r4", "4", "1", NULL);
    make_site("r8", "8", "2", NULL);
    char *r4 = path("r4"), *r8 = path("r8"), *o = path("never"), *missing = path("missing");
    /* missing input */
    expect_refusal(1, "missing: no such adapter directory", o, "merge", "-s", "flora", "-o", o,
                   r4, missing, NULL);
    /* a directory without its weights file */
    char *half = path("half");
    fp_err_t err = {0};
    fp_fs_mkdirs(half, 0755, &err);
    char *cfg = fp_path_join(r4, FP_PEFT_CONFIG);
    char *text;
    size_t len;
    assert_int_equal(fp_fs_read_file(cfg, 1 << 20, &text, &len, &err), 0);
    free(fpt_write(half, FP_PEFT_CONFIG, text, len));
    free(text);
    free(cfg);
    expect_refusal(1, "no adapter_model.safetensors", o, "merge", "-s", "zeropad", "-o", o, r4,
                   half, NULL);
    /* unequal ranks for fedavg */
    expect_refusal(1, "needs equal ranks", o, "merge", "-s", "fedavg", "-o", o, r4, r8, NULL);
    /* mismatched modules */
    char *other = path("other");
    assert_int_equal(run("adapter", "random", "--out", other, "--layers", "3", "--dim", "48",
                         "--targets", "q_proj,v_proj,down_proj", NULL), 0);
    expect_refusal(1, "unexpected module 'model.layers.2", o, "merge", "-s", "flora", "-o", o,
                   r4, other, NULL);
    /* mismatched shapes */
    char *wide = path("wide");
    assert_int_equal(run("adapter", "random", "--out", wide, "--layers", "2", "--dim", "64",
                         "--targets", "q_proj,v_proj,down_proj", NULL), 0);
    expect_refusal(1, "weight, but the first adapter's is", o, "merge", "-s", "flexlora", "-o",
                   o, r4, wide, NULL);
    /* non-finite values */
    char *bad = path("nan");
    fp_adapter_t *ad;
    assert_int_equal(fp_hfpeft_load(r8, FP_LOAD_COPY, &ad, &err), 0);
    ad->mods[2].B[7] = NAN;
    assert_int_equal(fp_hfpeft_save(ad, bad, &err), 0);
    fp_adapter_free(ad);
    expect_refusal(1, "non-finite", o, "merge", "-s", "zeropad", "-o", o, r4, bad, NULL);
    expect_refusal(1, "non-finite", o, "merge", "-s", "flora", "-o", o, r4, bad, NULL);
    /* usage errors: exit 2 */
    expect_refusal(2, "--strategy is required", o, "merge", "-o", o, r4, r8, NULL);
    expect_refusal(2, "unknown strategy 'fedsgd'", o, "merge", "-s", "fedsgd", "-o", o, r4,
                   NULL);
    expect_refusal(2, "2 weights given for 3 adapters", o, "merge", "-s", "flora", "-w", "1,2",
                   "-o", o, r4, r8, r8, NULL);
    expect_refusal(2, "--rank applies to flexlora only", o, "merge", "-s", "zeropad", "-r", "4",
                   "-o", o, r4, NULL);
    expect_refusal(2, "--energy needs a number in (0, 1]", o, "merge", "-s", "florist", "-e",
                   "1.5", "-o", o, r4, NULL);
    expect_refusal(2, "--weights needs comma-separated numbers", o, "merge", "-s", "flora", "-w",
                   "1,x", "-o", o, r4, r8, NULL);
    expect_refusal(2, "no adapter directories", o, "merge", "-s", "flora", "-o", o, NULL);
    /* --out pointing at an input */
    expect_refusal(1, "is one of the inputs", NULL, "merge", "-s", "flora", "-o", r4, r4, r8,
                   NULL);
    assert_int_equal(fp_hfpeft_load(r4, 0, &ad, &err), 0); /* untouched */
    fp_adapter_free(ad);
    free(bad);
    free(wide);
    free(other);
    free(half);
    free(r4);
    free(r8);
    free(o);
    free(missing);
}

static void test_bench_smoke(void **state)
{
    (void)state;
    /* Not a timing assertion: the benchmark runs and prints its table. */
    int rc = run("bench", "merge", "--quick", NULL);
    if (rc)
        print_error("%s\n%s\n", out_text, err_text);
    assert_int_equal(rc, 0);
    assert_contains(out_text, "fedavg, 16 adapters");
    assert_contains(out_text, "streaming merge peak RSS");
    assert_contains(out_text, "flexlora factored SVD");
    /* secure aggregation: the library's arithmetic, and a whole federation both ways */
    rc = run("bench", "secagg", "--sites", "6", "--dim", "5000", "--drop", "1", NULL);
    if (rc)
        print_error("%s\n%s\n", out_text, err_text);
    assert_int_equal(rc, 0);
    assert_contains(out_text, "coordinator: sum (+ unmask) of the survivors");
    rc = run("bench", "coordinator", "--secure-aggregation", "--sites", "4", "--rounds", "1",
             NULL);
    if (rc)
        print_error("%s\n%s\n", out_text, err_text);
    assert_int_equal(rc, 0);
    assert_contains(out_text, "with secure aggregation:");
    assert_contains(out_text, "bytes a site sends per round");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_help_everywhere),
        cmocka_unit_test(test_every_strategy_merges),
        cmocka_unit_test(test_refusals_write_nothing),
        cmocka_unit_test(test_bench_smoke),
    };
    return cmocka_run_group_tests(tests, fpt_setup_dir, teardown);
}
