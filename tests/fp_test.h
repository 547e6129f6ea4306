/* fp_test.h — helpers shared by the unit tests (cmocka). */
#ifndef FP_TEST_H
#define FP_TEST_H

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "fp_adapter.h"
#include "fp_error.h"

/* The group fixture of tests that need a scratch directory: fpt_dir is created by
 * fpt_setup_dir and removed with its contents by fpt_teardown_dir. */
extern char *fpt_dir;
int fpt_setup_dir(void **state);
int fpt_teardown_dir(void **state);

/* A fresh directory under $TMPDIR (or /tmp), removed by fpt_rmtree. Returns malloc'd path. */
char *fpt_mkdtemp(void);
void fpt_rmtree(const char *path);

/* Number of entries of dir whose name starts with prefix. */
int fpt_count_prefix(const char *dir, const char *prefix);

/* Writes len bytes to dir/name; returns the malloc'd path. */
char *fpt_write(const char *dir, const char *name, const void *buf, size_t len);

/* A safetensors file from a raw header text and `data_len` bytes of data (value i & 0xff).
 * hlen_override, when non-zero, replaces the u64 header length written. */
char *fpt_write_st(const char *dir, const char *name, const char *header, size_t data_len,
                   uint64_t hlen_override);

/* Runs the program bin with args (NULL-terminated; argv[0] is bin), captures its standard
 * output and error into *out and *err (malloc'd, replacing what they held), and returns its
 * exit status. */
int fpt_runv(const char *bin, const char *const *args, char **out, char **err);

/* Table tests of state machines (test_round, test_sa_round): an action appended to the step's
 * log ("a; b; c"), and the step's log checked against what the table expects (NULL: not
 * checked). */
void fpt_say(char *log, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void fpt_expect_actions(const char *name, int step, const char *got, const char *want);

/* Asserts that text contains needle, printing text if not. */
#define assert_contains(text, needle) fpt_assert_text((text), (needle), __FILE__, __LINE__)
void fpt_assert_text(const char *text, const char *needle, const char *file, int line);

/* Asserts that err's message contains needle (case-sensitive), printing it if not. */
#define assert_err_contains(err, needle) fpt_assert_contains((err), (needle), __FILE__, __LINE__)
void fpt_assert_contains(const fp_err_t *err, const char *needle, const char *file, int line);

/* Dense float64 ΔW (d_out × d_in row-major) += c · B · A for one module's factors. */
void fpt_dense_add(double *dw, const float *B, const float *A, int d_out, int d_in, int r,
                   double c);

/* ‖Σ_modules s·B·A of a − that of b‖_F / ‖that of b‖_F, dense (modules matched by name). */
double fpt_product_rel(const fp_adapter_t *a, const fp_adapter_t *b);

/* ‖x − y‖_F and ‖y‖_F over n doubles. */
double fpt_diff_norm(const double *x, const double *y, size_t n);
double fpt_norm(const double *x, size_t n);

/* Singular values (descending) of a dense d_out × d_in matrix (row-major, copied). */
void fpt_singular_values(const double *m, int d_out, int d_in, double *s);

/* Skips the calling test (saying why) where oneDNN cannot multiply bf16: it does on every
 * x86-64 CPU with AVX-512, natively or emulated; elsewhere fedpeft refuses a bf16 or nf4 base
 * (test_cli_train's test_base_default checks that refusal). */
void fpt_need_lowp(void);

/* Every vector level this CPU runs (fp_simd.h), widest first:
 *     for (int v = fpt_simd_top(); v >= 0; v--) { fpt_simd_use(v); ... }
 * with fpt_simd_restore as the test's teardown, so that a failed assertion inside the loop
 * does not leave the later tests on a lower level. */
int fpt_simd_top(void);              /* the CPU's level, restored */
void fpt_simd_use(int level);        /* lowers the level to exactly `level` */
int fpt_simd_restore(void **state);  /* a cmocka teardown: the CPU's level again */

/* The float64 reference's LoRA gradients against a float run's (got, with ref's modules):
 * the worst ‖got − ref‖_F / ‖ref‖_F over every module's A and B. */
struct fp_tf64;
double fpt_lora_grad_rel(const fp_adapter_t *got, struct fp_tf64 *ref);

/* A random adapter with one module per desc. */
fp_adapter_t *fpt_random_adapter(const fp_module_desc_t *descs, int n, uint64_t seed,
                                 uint64_t a_seed);

#endif
