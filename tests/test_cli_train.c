/* The trainer as a user runs it: init-model → pretrain → train → eval, the --json lines, and
 * every refusal with its exit status. */
#include "fp_test.h"

#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_blas.h"
#include "fp_fs.h"
#include "fp_hfpeft.h"
#include "fp_lowp.h"

#define dir fpt_dir

static char *out_text, *err_text;

static int run(const char *first, ...) __attribute__((sentinel));
static int run(const char *first, ...)
{
    const char *args[64];
    int n = 0;
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && n < 63; a = va_arg(ap, const char *))
        args[n++] = a;
    va_end(ap);
    args[n] = NULL;
    return fpt_runv(FEDPEFT_BIN, args, &out_text, &err_text);
}

static char *path(const char *name)
{
    return fp_path_join(dir, name);
}

/* The last line of stdout as JSON. */
static json_t *last_json(void)
{
    char *nl = strrchr(out_text, '\n');
    while (nl && nl > out_text && nl[1] == '\0') {
        *nl = '\0';
        nl = strrchr(out_text, '\n');
    }
    const char *line = nl ? nl + 1 : out_text;
    json_error_t je;
    json_t *j = json_loads(line, 0, &je);
    if (!j)
        print_error("not JSON: %s\n", line);
    assert_non_null(j);
    return j;
}

static double num(json_t *j, const char *k)
{
    json_t *v = json_object_get(j, k);
    if (!json_is_number(v))
        print_error("no number \"%s\"\n", k);
    assert_true(json_is_number(v));
    return json_number_value(v);
}

static void write_data(void)
{
    char text[20000] = "";
    for (int i = 0; i < 60; i++) {
        char e[256];
        snprintf(e, sizeof e, "Entry %d: the quick brown fox jumps over the lazy dog %d times.\n%%\n",
                 i, i * 7 % 13);
        strcat(text, e);
    }
    free(fpt_write(dir, "general.txt", text, strlen(text)));
    char jl[20000] = "";
    for (int i = 0; i < 40; i++) {
        char e[256];
        snprintf(e, sizeof e, "{\"prompt\": \"Q%d: colour of the sky?\", \"completion\": \" blue, "
                 "mostly %d\"}\n", i, i % 5);
        strcat(jl, e);
    }
    free(fpt_write(dir, "site.jsonl", jl, strlen(jl)));
    free(fpt_write(dir, "broken.jsonl", "{\"text\": \"fine\"}\n{\"txt\": 3}\n", 29));
}

static void test_the_whole_flow(void **state)
{
    (void)state;
    write_data();
    char *m = path("model"), *p = path("pretrained"), *a = path("adapter"), *a2 = path("a2");
    char *gen = path("general.txt"), *site = path("site.jsonl");
    int rc = run("init-model", "--dim", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                 "--ff", "64", "--seq", "64", "--seed", "3", "--out", m, NULL);
    if (rc)
        print_error("%s", err_text);
    assert_int_equal(rc, 0);
    assert_contains(out_text, "vocab 257");
    rc = run("pretrain", "--model", m, "--data", gen, "--steps", "30", "--batch", "4", "--seq",
             "32", "--lr", "1e-2", "--threads", "2", "--json", "--out", p, NULL);
    if (rc)
        print_error("%s", err_text);
    assert_int_equal(rc, 0);
    json_t *j = last_json();
    assert_int_equal((int)num(j, "steps"), 30);
    assert_true(num(j, "eval_loss_after") < num(j, "eval_loss_before") - 0.5);
    json_decref(j);
    char *tok = fp_path_join(p, "tokenizer.json");
    assert_true(fp_fs_exists(tok));
    free(tok);
    /* LoRA on the frozen pretrained model */
    rc = run("train", "--model", p, "--data", site, "--rank", "4", "--alpha", "8", "--targets",
             "all", "--steps", "25", "--batch", "4", "--seq", "32", "--lr", "3e-3", "--threads",
             "1", "--json", "--out", a, NULL);
    if (rc)
        print_error("%s", err_text);
    assert_int_equal(rc, 0);
    assert_contains(err_text, "step 25/25");
    j = last_json();
    assert_true(num(j, "tokens_per_s") > 0);
    assert_true(isfinite(num(j, "final_loss")));
    assert_int_equal((int)num(j, "steps"), 25);
    assert_true(num(j, "eval_loss_after") < num(j, "eval_loss_before"));
    double held_after = num(j, "eval_loss_after");
    json_decref(j);
    fp_adapter_t *ad;
    fp_err_t err = {0};
    assert_int_equal(fp_hfpeft_load(a, 0, &ad, &err), 0);
    assert_int_equal(ad->n, 2 * 7);
    assert_int_equal(ad->mods[0].rank, 4);
    fp_adapter_free(ad);
    /* eval on the same held-out documents gives the same loss */
    rc = run("eval", "--model", p, "--adapter", a, "--data", site, "--split", "heldout",
             "--seq", "32", "--batch", "4", "--json", NULL);
    assert_int_equal(rc, 0);
    j = last_json();
    assert_true(fabs(num(j, "loss") - held_after) < 1e-5);
    assert_true(fabs(num(j, "perplexity") - exp(num(j, "loss"))) < 1e-6 * num(j, "perplexity"));
    assert_true(num(j, "tokens") > 0);
    json_decref(j);
    rc = run("eval", "--model", p, "--data", gen, NULL);
    assert_int_equal(rc, 0);
    assert_contains(out_text, "perplexity");
    /* continue training the adapter */
    rc = run("train", "--model", p, "--adapter", a, "--data", site, "--steps", "3", "--batch",
             "2", "--seq", "32", "--out", a2, NULL);
    if (rc)
        print_error("%s", err_text);
    assert_int_equal(rc, 0);
    free(m);
    free(p);
    free(a);
    free(a2);
    free(gen);
    free(site);
}

static void test_refusals(void **state)
{
    (void)state;
    char *m = path("model"), *p = path("pretrained"), *a = path("adapter"), *o = path("never");
    char *site = path("site.jsonl"), *broken = path("broken.jsonl"), *none = path("none");
    /* bad data is named by file and line */
    int rc = run("train", "--model", p, "--data", broken, "--steps", "2", "--out", o, NULL);
    assert_int_equal(rc, 1);
    assert_contains(err_text, "broken.jsonl:2:");
    assert_false(fp_fs_exists(o));
    rc = run("train", "--model", none, "--data", site, "--steps", "2", "--out", o, NULL);
    assert_int_equal(rc, 1);
    assert_contains(err_text, "no such model directory");
    rc = run("train", "--model", p, "--data", site, "--steps", "2", "--seq", "65", "--out", o,
             NULL);
    assert_int_equal(rc, 1);
    assert_contains(err_text, "beyond the model's 64 positions");
    /* an adapter made for another model */
    char *other = path("other"), *oa = path("other-adapter");
    assert_int_equal(run("init-model", "--dim", "48", "--layers", "2", "--heads", "4", "--ff",
                         "64", "--seq", "64", "--out", other, NULL), 0);
    assert_int_equal(run("train", "--model", other, "--data", site, "--steps", "1", "--batch",
                         "2", "--seq", "16", "--out", oa, NULL), 0);
    rc = run("eval", "--model", p, "--adapter", oa, "--data", site, NULL);
    assert_int_equal(rc, 1);
    assert_contains(err_text, "adapts a 48×48 weight but the model's is 32×32");
    /* usage errors */
    assert_int_equal(run("train", "--model", p, "--data", site, "--out", o, NULL), 2);
    assert_contains(err_text, "--steps is required");
    assert_int_equal(run("train", "--model", p, "--adapter", a, "--rank", "8", "--data", site,
                         "--steps", "1", "--out", o, NULL), 2);
    assert_int_equal(run("train", "--model", p, "--data", site, "--steps", "1", "--targets",
                         "q_proj,lm_head", "--out", o, NULL), 2);
    assert_contains(err_text, "unknown target module 'lm_head'");
    assert_int_equal(run("pretrain", "--model", p, "--data", site, "--steps", "1", "--rank", "4",
                         "--out", o, NULL), 2);
    assert_int_equal(run("init-model", "--dim", "32", "--out", o, NULL), 2);
    assert_false(fp_fs_exists(o));
    /* --help everywhere */
    static const char *cmds[] = {"init-model", "pretrain", "train", "eval", "tokenize"};
    for (size_t i = 0; i < 5; i++) {
        assert_int_equal(run(cmds[i], "--help", NULL), 0);
        assert_contains(out_text, "Usage: fedpeft");
    }
    free(m);
    free(p);
    free(a);
    free(o);
    free(site);
    free(broken);
    free(none);
    free(other);
    free(oa);
}

static int no_sapphire_rapids(const char *kernel) { return strcmp(kernel, "SapphireRapids"); }

/* The kernel ladder: each feature set gets the best kernel it can run, never a faster one. */
static void test_blas_kernel_choice(void **state)
{
    (void)state;
    static const struct {
        unsigned f;
        const char *want;
    } cases[] = {
        {0, NULL},
        {FP_CPU_SSE42, "Nehalem"},
        {FP_CPU_SSE42 | FP_CPU_AVX, "Sandybridge"},
        {FP_CPU_SSE42 | FP_CPU_AVX | FP_CPU_AVX2, "Haswell"},
        {FP_CPU_SSE42 | FP_CPU_AVX | FP_CPU_AVX2 | FP_CPU_AVX512, "SkylakeX"},
        {FP_CPU_SSE42 | FP_CPU_AVX | FP_CPU_AVX2 | FP_CPU_AVX512 | FP_CPU_AVX512BF16,
         "Cooperlake"},
        {FP_CPU_SSE42 | FP_CPU_AVX | FP_CPU_AVX2 | FP_CPU_AVX512 | FP_CPU_AVX512BF16 | FP_CPU_AMX,
         "SapphireRapids"},
        /* bf16 or AMX flags without the AVX-512 state do not make a kernel */
        {FP_CPU_SSE42 | FP_CPU_AVX | FP_CPU_AVX2 | FP_CPU_AVX512BF16 | FP_CPU_AMX, "Haswell"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const char *k = fp_blas_best_kernel(cases[i].f, NULL);
        if (!cases[i].want)
            assert_null(k);
        else
            assert_string_equal(k, cases[i].want);
    }
    /* an AMX CPU with a library that has no SapphireRapids kernel (Debian's 0.3.21) runs
     * Cooperlake, and the test of the switch expects what the library carries */
    unsigned amx = FP_CPU_SSE42 | FP_CPU_AVX | FP_CPU_AVX2 | FP_CPU_AVX512 | FP_CPU_AVX512BF16 |
                   FP_CPU_AMX;
    assert_string_equal(fp_blas_best_kernel(amx, no_sapphire_rapids), "Cooperlake");
    assert_true(fp_blas_kernel_level("SkylakeX") > fp_blas_kernel_level("Haswell"));
    assert_true(fp_blas_kernel_level("Zen") == fp_blas_kernel_level("Haswell"));
    assert_true(fp_blas_kernel_level("Haswell") > fp_blas_kernel_level("Prescott"));
    assert_int_equal(fp_blas_kernel_level("Prescott"), 0);
}

/* A CPU that OpenBLAS misreads, simulated: its own choice is the generic kernel (Prescott).
 * fedpeft runs itself again on the best kernel this CPU supports that the loaded library
 * carries (on an AMX CPU Debian's 0.3.21 has Cooperlake, not SapphireRapids), says so, and
 * trains to the same losses as the generic kernel does when the user asks for it. */
static void test_blas_kernel_runs(void **state)
{
    (void)state;
    char *p = path("pretrained"), *site = path("site.jsonl"), *o1 = path("k1"), *o2 = path("k2");
    const char *best = fp_blas_best_available();
    double loss[2], held[2];
    for (int sim = 0; sim < 2; sim++) {
        setenv("OPENBLAS_CORETYPE", "Prescott", 1);
        if (sim)
            setenv("FEDPEFT_BLAS_SIMULATE_MISDETECT", "1", 1);
        int rc = run("train", "--model", p, "--data", site, "--rank", "4", "--targets", "all",
                     "--steps", "6", "--batch", "4", "--seq", "32", "--lr", "3e-3", "--threads",
                     "2", "--json", "--out", sim ? o2 : o1, NULL);
        unsetenv("OPENBLAS_CORETYPE");
        unsetenv("FEDPEFT_BLAS_SIMULATE_MISDETECT");
        if (rc)
            print_error("%s", err_text);
        assert_int_equal(rc, 0);
        json_t *j = last_json();
        const char *k = json_string_value(json_object_get(j, "blas_kernel"));
        assert_non_null(k);
        if (!sim) {
            /* the user's kernel is kept, whatever the CPU supports */
            assert_string_equal(k, "Prescott");
            assert_contains(err_text, "kernel Prescott (set by OPENBLAS_CORETYPE=Prescott");
        } else if (best) {
            assert_string_equal(k, best);
            assert_contains(err_text, "chosen by fedpeft: OpenBLAS picked Prescott");
        } else { /* a library built for one CPU type (or no x86-64 kernel): nothing to switch */
            print_message("no kernel to switch to: %s\n", k);
            assert_null(strstr(err_text, "chosen by fedpeft"));
        }
        loss[sim] = num(j, "final_loss");
        held[sim] = num(j, "eval_loss_after");
        json_decref(j);
    }
    print_message("kernel %s vs Prescott: final loss %.7f vs %.7f, held-out %.7f vs %.7f\n",
                  best ? best : "(none)", loss[1], loss[0], held[1], held[0]);
    if (fp_cpu_features() & FP_CPU_AVX512BF16) {
        /* as on an AMX CPU (Sapphire Rapids, model masked): the best kernel the library
         * carries, which for Debian's 0.3.21 is Cooperlake; the program says so and trains */
        setenv("FEDPEFT_CPU_SIMULATE_AMX", "1", 1);
        const char *amx_best = fp_blas_best_available();
        assert_true(fp_cpu_features() & FP_CPU_AMX);
        setenv("OPENBLAS_CORETYPE", "Prescott", 1);
        setenv("FEDPEFT_BLAS_SIMULATE_MISDETECT", "1", 1);
        int rc = run("train", "--model", p, "--data", site, "--rank", "4", "--targets", "all",
                     "--steps", "6", "--batch", "4", "--seq", "32", "--lr", "3e-3", "--threads",
                     "2", "--json", "--out", o1, NULL);
        unsetenv("OPENBLAS_CORETYPE");
        unsetenv("FEDPEFT_BLAS_SIMULATE_MISDETECT");
        unsetenv("FEDPEFT_CPU_SIMULATE_AMX");
        if (rc)
            print_error("%s", err_text);
        assert_int_equal(rc, 0);
        json_t *j = last_json();
        const char *k = json_string_value(json_object_get(j, "blas_kernel"));
        print_message("as on an AMX CPU: kernel %s (the library's best: %s)\n", k, amx_best);
        assert_non_null(amx_best);
        assert_string_equal(k, amx_best);
        assert_contains(err_text, "chosen by fedpeft: OpenBLAS picked Prescott");
        if (!fp_blas_library_has("SapphireRapids"))
            assert_string_equal(k, "Cooperlake");
        assert_true(fabs(num(j, "final_loss") - loss[0]) <= 1e-4 * fabs(loss[0]));
        json_decref(j);
    }
    assert_true(fabs(loss[1] - loss[0]) <= 1e-4 * fabs(loss[0]));
    assert_true(fabs(held[1] - held[0]) <= 1e-4 * fabs(held[0]));
    free(p);
    free(site);
    free(o1);
    free(o2);
}

static int teardown(void **state)
{
    free(out_text);
    free(err_text);
    return fpt_teardown_dir(state);
}

/* The frozen base in bf16 and nf4 on the demo model and the demo's data: 200 steps of LoRA
 * training end within 1 % of the float base's final loss; nf4 still lowers the held-out loss;
 * eval says which base it used; what --base-dtype refuses. */
static void test_base_dtypes(void **state)
{
    (void)state;
    const char *model = FP_SOURCE_DIR "/models/demo", *data = "/usr/share/games/fortunes/pets";
    double final[2], held[2][2];
    fpt_need_lowp();
    for (int k = 0; k < 3; k++) {
        static const char *const dts[] = {"f32", "bf16", "nf4"};
        char *a = path(dts[k]);
        int rc = run("train", "--model", model, "--data", data, "--rank", "4", "--targets",
                     "all", "--steps", k < 2 ? "200" : "60", "--batch", "4", "--seq", "64",
                     "--lr", "2e-3", "--threads", "2", "--base-dtype", dts[k], "--json", "--out",
                     a, NULL);
        if (rc)
            print_error("%s", err_text);
        assert_int_equal(rc, 0);
        char want[64];
        snprintf(want, sizeof want, "base: %s (%s", dts[k], k ? "oneDNN" : "OpenBLAS");
        assert_contains(err_text, want);
        json_t *j = last_json();
        assert_string_equal(json_string_value(json_object_get(j, "base_dtype")), dts[k]);
        if (k < 2) {
            final[k] = num(j, "final_loss");
            held[k][0] = num(j, "eval_loss_before");
            held[k][1] = num(j, "eval_loss_after");
        } else {
            print_message("nf4: held-out loss %.4f -> %.4f\n", num(j, "eval_loss_before"),
                          num(j, "eval_loss_after"));
            assert_true(num(j, "eval_loss_after") < num(j, "eval_loss_before") - 0.02);
        }
        json_decref(j);
        if (k == 1) { /* eval of the bf16-trained adapter, on a bf16 base, says so */
            rc = run("eval", "--model", model, "--adapter", a, "--data", data, "--seq", "64",
                     "--batch", "4", "--base-dtype", "bf16", "--json", NULL);
            assert_int_equal(rc, 0);
            j = last_json();
            assert_string_equal(json_string_value(json_object_get(j, "base_dtype")), "bf16");
            json_decref(j);
        }
        free(a);
    }
    print_message("200 steps: final loss f32 %.5f, bf16 %.5f; held-out %.4f -> %.4f (f32), "
                  "%.4f -> %.4f (bf16)\n", final[0], final[1], held[0][0], held[0][1],
                  held[1][0], held[1][1]);
    if (!(fabs(final[1] - final[0]) < 0.01 * final[0]))
        fail_msg("bf16 training ended at loss %g, f32 at %g: more than 1 %% apart", final[1],
                 final[0]);
    assert_true(fabs(held[1][1] - held[0][1]) < 0.01 * held[0][1]);
    char *o = path("never");
    assert_int_equal(run("train", "--model", model, "--data", data, "--steps", "1", "--out", o,
                         "--base-dtype", "fp8", NULL), 2);
    assert_contains(err_text, "f32, bf16, nf4 or auto");
    free(o);
}


/* `eval` on the demo model and data with env DNNL_MAX_CPU_ISA=isa (NULL: as this process
 * has it): its exit status; *base and *loss from its --json line when it succeeded. */
static int eval_base(const char *isa, const char *dt, char *base, size_t n, double *loss)
{
    const char *had = getenv("DNNL_MAX_CPU_ISA");
    char *keep = had ? strdup(had) : NULL;
    if (isa)
        setenv("DNNL_MAX_CPU_ISA", isa, 1);
    int rc = run("eval", "--model", FP_SOURCE_DIR "/models/demo", "--data",
                 "/usr/share/games/fortunes/pets", "--seq", "64", "--batch", "2",
                 "--base-dtype", dt, "--json", NULL);
    if (keep)
        setenv("DNNL_MAX_CPU_ISA", keep, 1);
    else
        unsetenv("DNNL_MAX_CPU_ISA");
    free(keep);
    if (rc == 0) {
        json_t *j = last_json();
        snprintf(base, n, "%s", json_string_value(json_object_get(j, "base_dtype")));
        *loss = num(j, "loss");
        json_decref(j);
    }
    return rc;
}

/* The default base is the fastest exact one: bf16 where the CPU multiplies bf16 natively, the
 * OpenBLAS f32 path where it does not. A CPU without bf16 instructions is simulated by
 * holding oneDNN's ISA back: to AVX-512 without bf16 (oneDNN emulates bf16 there: asked for,
 * it runs; by default, f32 runs) and to AVX2 (oneDNN cannot multiply bf16: asking for bf16 or
 * nf4 is refused with advice). The variable only lowers oneDNN's ISA: on a CPU without
 * AVX-512, the first is refused too. */
static void test_base_default(void **state)
{
    (void)state;
    char base[16];
    double f32, loss;
    assert_int_equal(eval_base(NULL, "f32", base, sizeof base, &f32), 0);
    assert_string_equal(base, "f32");
    assert_int_equal(eval_base(NULL, "auto", base, sizeof base, &loss), 0);
    assert_string_equal(base, fp_lowp_cpu_bf16() ? "bf16" : "f32");
    static const char *const isas[] = {"AVX512_CORE", "AVX2"};
    for (int i = 0; i < 2; i++) {
        assert_int_equal(eval_base(isas[i], "auto", base, sizeof base, &loss), 0);
        assert_string_equal(base, "f32");
        assert_true(loss == f32); /* the very f32 path */
        int rc = eval_base(isas[i], "nf4", base, sizeof base, &loss);
        if (i == 0 && (fp_cpu_features() & FP_CPU_AVX512)) {
            assert_int_equal(rc, 0);
            assert_string_equal(base, "nf4");
        } else {
            assert_int_equal(rc, 1);
            assert_contains(err_text, "cannot multiply bf16 on this CPU");
            assert_contains(err_text, "use --base-dtype f32");
        }
    }
}

/* A product through oneDNN that fails (the failpoint fails the N-th; the first is the probe
 * at load) is reported as such by train and eval: never as divergence or a NaN loss. */
static void test_product_failure(void **state)
{
    (void)state;
    fpt_need_lowp();
    const char *model = FP_SOURCE_DIR "/models/demo", *data = "/usr/share/games/fortunes/pets";
    char *o = path("failed");
    /* in the held-out evaluation before training; in training's second step */
    static const char *const nth[] = {"lowp-product:2", "lowp-product:500"};
    for (int i = 0; i < 2; i++) {
        setenv("FEDPEFT_FAILPOINT", nth[i], 1);
        int rc = run("train", "--model", model, "--data", data, "--steps", "4", "--batch", "2",
                     "--seq", "32", "--base-dtype", "bf16", "--out", o, NULL);
        unsetenv("FEDPEFT_FAILPOINT");
        assert_int_equal(rc, 1);
        assert_contains(err_text, "a bf16 product through oneDNN");
        assert_contains(err_text, "Input/output error");
        assert_null(strstr(err_text, "diverged"));
        if (i == 1) /* the count above lands in training */
            assert_contains(err_text, "step 1/4");
        assert_false(fp_fs_exists(o));
    }
    setenv("FEDPEFT_FAILPOINT", "lowp-product:3", 1);
    int rc = run("eval", "--model", model, "--data", data, "--seq", "32", "--batch", "2",
                 "--base-dtype", "bf16", "--json", NULL);
    unsetenv("FEDPEFT_FAILPOINT");
    assert_int_equal(rc, 1);
    assert_contains(err_text, "a bf16 product through oneDNN");
    free(o);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_the_whole_flow),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_blas_kernel_choice),
        cmocka_unit_test(test_blas_kernel_runs),
        cmocka_unit_test(test_base_dtypes),
        cmocka_unit_test(test_base_default),
        cmocka_unit_test(test_product_failure),
    };
    return cmocka_run_group_tests(tests, fpt_setup_dir, teardown);
}
