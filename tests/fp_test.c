#include "fp_test.h"

#include <dirent.h>
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"
#include "fp_lowp.h"
#include "fp_simd.h"
#include "fp_transformer64.h"

extern char **environ;

char *fpt_mkdtemp(void)
{
    const char *base = getenv("TMPDIR");
    char *p = fp_path_join(base && *base ? base : "/tmp", "fedpeft-test-XXXXXX");
    assert_non_null(p);
    assert_non_null(mkdtemp(p));
    return p;
}

char *fpt_dir;

int fpt_setup_dir(void **state)
{
    (void)state;
    fpt_dir = fpt_mkdtemp();
    return 0;
}

int fpt_teardown_dir(void **state)
{
    (void)state;
    fpt_rmtree(fpt_dir);
    free(fpt_dir);
    fpt_dir = NULL;
    return 0;
}

void fpt_rmtree(const char *path)
{
    fp_fs_remove_tree(path, NULL);
}

int fpt_count_prefix(const char *dir, const char *prefix)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL)
        n += strncmp(de->d_name, prefix, strlen(prefix)) == 0;
    closedir(d);
    return n;
}

char *fpt_write(const char *dir, const char *name, const void *buf, size_t len)
{
    char *p = fp_path_join(dir, name);
    assert_non_null(p);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    if (len)
        assert_int_equal(fwrite(buf, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
    return p;
}

char *fpt_write_st(const char *dir, const char *name, const char *header, size_t data_len,
                   uint64_t hlen_override)
{
    size_t hl = strlen(header);
    size_t total = 8 + hl + data_len;
    unsigned char *buf = malloc(total);
    assert_non_null(buf);
    uint64_t n = hlen_override ? hlen_override : hl;
    memcpy(buf, &n, 8);
    memcpy(buf + 8, header, hl);
    for (size_t i = 0; i < data_len; i++)
        buf[8 + hl + i] = (unsigned char)(i & 0xff);
    char *p = fpt_write(dir, name, buf, total);
    free(buf);
    return p;
}

int fpt_runv(const char *bin, const char *const *args, char **out, char **err)
{
    const char *argv[128];
    int n = 0;
    argv[n++] = bin;
    for (; *args && n < 127; args++)
        argv[n++] = *args;
    argv[n] = NULL;
    char *dir = fpt_mkdtemp();
    char *op = fp_path_join(dir, "stdout"), *ep = fp_path_join(dir, "stderr");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, op, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 2, ep, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    pid_t pid;
    assert_int_equal(posix_spawn(&pid, bin, &fa, NULL, (char **)argv, environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    free(*out);
    free(*err);
    *out = *err = NULL;
    assert_int_equal(fp_fs_read_file(op, 1 << 24, out, NULL, NULL), 0);
    assert_int_equal(fp_fs_read_file(ep, 1 << 24, err, NULL, NULL), 0);
    free(op);
    free(ep);
    fpt_rmtree(dir);
    free(dir);
    return WEXITSTATUS(status);
}

void fpt_assert_text(const char *text, const char *needle, const char *file, int line)
{
    if (!strstr(text, needle)) {
        print_error("%s:%d: expected \"%s\" in:\n%s\n", file, line, needle, text);
        _fail(file, line);
    }
}

void fpt_assert_contains(const fp_err_t *err, const char *needle, const char *file, int line)
{
    if (!strstr(err->msg, needle)) {
        print_error("%s:%d: error message \"%s\" does not contain \"%s\"\n", file, line,
                    err->msg, needle);
        _fail(file, line);
    }
}

void fpt_dense_add(double *dw, const float *B, const float *A, int d_out, int d_in, int r,
                   double c)
{
    for (int i = 0; i < d_out; i++)
        for (int k = 0; k < r; k++) {
            double b = c * B[(size_t)i * (size_t)r + (size_t)k];
            const float *a = A + (size_t)k * (size_t)d_in;
            double *row = dw + (size_t)i * (size_t)d_in;
            for (int j = 0; j < d_in; j++)
                row[j] += b * a[j];
        }
}

double fpt_diff_norm(const double *x, const double *y, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (x[i] - y[i]) * (x[i] - y[i]);
    return sqrt(s);
}

double fpt_norm(const double *x, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += x[i] * x[i];
    return sqrt(s);
}

void fpt_singular_values(const double *m, int d_out, int d_in, double *s)
{
    size_t n = (size_t)d_out * (size_t)d_in;
    int k = d_out < d_in ? d_out : d_in;
    double *copy = malloc(n * sizeof *copy);
    double *superb = malloc((size_t)k * sizeof *superb);
    assert_non_null(copy);
    assert_non_null(superb);
    memcpy(copy, m, n * sizeof *copy);
    lapack_int info = LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'N', 'N', d_out, d_in, copy, d_in, s,
                                     NULL, 1, NULL, 1, superb);
    assert_int_equal(info, 0);
    free(copy);
    free(superb);
}

fp_adapter_t *fpt_random_adapter(const fp_module_desc_t *descs, int n, uint64_t seed,
                                 uint64_t a_seed)
{
    fp_adapter_t *ad = NULL;
    fp_err_t err = {0};
    int rc = fp_adapter_new(&ad, descs, n, &err);
    if (rc)
        print_error("fp_adapter_new: %s\n", err.msg);
    assert_int_equal(rc, 0);
    fp_adapter_randomize(ad, seed, a_seed, 0.5);
    return ad;
}

double fpt_product_rel(const fp_adapter_t *a, const fp_adapter_t *b)
{
    double num = 0, den = 0;
    for (int i = 0; i < b->n; i++) {
        const fp_lora_module_t *mb = &b->mods[i], *ma = &a->mods[fp_adapter_find(a, mb->name)];
        size_t sz = (size_t)mb->d_out * mb->d_in;
        double *da = calloc(sz, sizeof *da), *db = calloc(sz, sizeof *db);
        fpt_dense_add(da, ma->B, ma->A, ma->d_out, ma->d_in, ma->rank, fp_module_scale(ma));
        fpt_dense_add(db, mb->B, mb->A, mb->d_out, mb->d_in, mb->rank, fp_module_scale(mb));
        for (size_t e = 0; e < sz; e++) {
            num += (da[e] - db[e]) * (da[e] - db[e]);
            den += db[e] * db[e];
        }
        free(da);
        free(db);
    }
    return sqrt(num / den);
}

double fpt_lora_grad_rel(const fp_adapter_t *got, struct fp_tf64 *ref)
{
    double worst = 0;
    for (int j = 0; j < got->n; j++)
        for (int f = 0; f < 2; f++) {
            size_t n;
            const double *r = fp_tf64_lora_grad(ref, j, f ? 'B' : 'A', &n);
            const float *g = f ? got->mods[j].B : got->mods[j].A;
            double num = 0, den = 0;
            for (size_t e = 0; e < n; e++) {
                num += (g[e] - r[e]) * (g[e] - r[e]);
                den += r[e] * r[e];
            }
            worst = fmax(worst, sqrt(num / den));
        }
    return worst;
}

int fpt_simd_top(void)
{
    return (int)fp_simd_cap(FP_SIMD_AVX512);
}

void fpt_simd_use(int level)
{
    assert_int_equal(fp_simd_cap((fp_simd_t)level), level);
}

int fpt_simd_restore(void **state)
{
    (void)state;
    fpt_simd_top();
    return 0;
}

void fpt_need_lowp(void)
{
    fp_err_t err = {0};
    if (fp_lowp_probe(&err) != 0) {
        print_message("skipped: %s\n", fp_err_msg(&err));
        skip();
    }
}

void fpt_say(char *log, size_t cap, const char *fmt, ...)
{
    size_t n = strlen(log);
    if (n && n < cap)
        n += (size_t)snprintf(log + n, cap - n, "; ");
    if (n >= cap)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(log + n, cap - n, fmt, ap);
    va_end(ap);
}

void fpt_expect_actions(const char *name, int step, const char *got, const char *want)
{
    if (want && strcmp(got, want) != 0)
        fail_msg("%s, step %d:\n  actions   \"%s\"\n  expected  \"%s\"", name, step, got, want);
}
