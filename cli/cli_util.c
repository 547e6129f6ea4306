#include "cli.h"
#include "fp_par.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fp_fs.h"

int fp_cli_fail(const char *cmd, const char *fmt, ...)
{
    fprintf(stderr, "fedpeft %s: error: ", cmd);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return FP_EXIT_FAIL;
}

int fp_cli_usage_error(const char *cmd, const char *fmt, ...)
{
    fprintf(stderr, "fedpeft %s: ", cmd);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nTry 'fedpeft %s --help'.\n", cmd);
    return FP_EXIT_USAGE;
}

int fp_parse_int(const char *s, long long lo, long long hi, long long *out)
{
    if (!s || !*s)
        return -EINVAL;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        return -EINVAL;
    *out = v;
    return 0;
}

int fp_parse_double(const char *s, double *out)
{
    if (!s || !*s)
        return -EINVAL;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || !isfinite(v))
        return -EINVAL;
    *out = v;
    return 0;
}

static int count_items(const char *s)
{
    int n = 1;
    for (; *s; s++)
        n += *s == ',';
    return n;
}

int fp_parse_doubles(const char *s, double **out, int *n)
{
    *out = NULL;
    *n = 0;
    int cap = count_items(s);
    double *v = malloc((size_t)cap * sizeof *v);
    char *copy = strdup(s);
    if (!v || !copy) {
        free(v);
        free(copy);
        return -ENOMEM;
    }
    int k = 0, rc = 0;
    char *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (fp_parse_double(tok, &v[k]) != 0) {
            rc = -EINVAL;
            break;
        }
        k++;
    }
    free(copy);
    if (rc || k != cap) {
        free(v);
        return -EINVAL;
    }
    *out = v;
    *n = k;
    return 0;
}

int fp_parse_ints(const char *s, long long lo, long long hi, int **out, int *n)
{
    double *d;
    int k;
    *out = NULL;
    *n = 0;
    int rc = fp_parse_doubles(s, &d, &k);
    if (rc)
        return rc;
    int *v = malloc((size_t)k * sizeof *v);
    if (!v) {
        free(d);
        return -ENOMEM;
    }
    for (int i = 0; i < k; i++) {
        if (d[i] != floor(d[i]) || d[i] < (double)lo || d[i] > (double)hi) {
            free(v);
            free(d);
            return -EINVAL;
        }
        v[i] = (int)d[i];
    }
    free(d);
    *out = v;
    *n = k;
    return 0;
}

int fp_find_program(char *out, size_t n, const char *name, const char *subdir, const char *given)
{
    if (given) {
        snprintf(out, n, "%s", given);
        return access(out, X_OK) == 0 ? 0 : -ENOENT;
    }
    char self[2048];
    ssize_t l = readlink("/proc/self/exe", self, sizeof self - 1);
    if (l > 0) {
        self[l] = '\0';
        char *slash = strrchr(self, '/');
        if (slash) {
            *slash = '\0';
            snprintf(out, n, "%s/%s", self, name); /* installed side by side */
            if (access(out, X_OK) == 0)
                return 0;
            snprintf(out, n, "%s/../%s/%s", self, subdir, name); /* a build tree */
            if (access(out, X_OK) == 0)
                return 0;
        }
    }
    const char *path = getenv("PATH");
    while (path && *path) {
        const char *c = strchr(path, ':');
        size_t len = c ? (size_t)(c - path) : strlen(path);
        snprintf(out, n, "%.*s/%s", (int)len, path, name);
        if (len && access(out, X_OK) == 0)
            return 0;
        path += len + (c ? 1 : 0);
    }
    return -ENOENT;
}

int fp_wait_port(const char *log, int pid, int *port)
{
    static const char said[] = "listening on port ";
    *port = 0;
    for (int i = 0; i < 1200; i++) {
        char *text = NULL;
        size_t n;
        if (fp_fs_read_file(log, 1 << 22, &text, &n, NULL) == 0) {
            const char *p = strstr(text, said);
            if (p)
                *port = atoi(p + strlen(said));
            free(text);
            if (*port)
                return 0;
        }
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid)
            return -ECHILD;
        usleep(50000);
    }
    return -ETIMEDOUT;
}
