#include "fp_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int fp_err_set(fp_err_t *err, int code, const char *fmt, ...)
{
    if (!err)
        return code;
    err->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    return code;
}

int fp_err_prefix(fp_err_t *err, int code, const char *fmt, ...)
{
    if (!err)
        return code;
    if (err->code == 0)
        err->code = code;
    char prefix[FP_ERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    char old[FP_ERR_MSG_MAX];
    memcpy(old, err->msg, sizeof old);
    snprintf(err->msg, sizeof err->msg, "%s%s", prefix, old[0] ? old : strerror(-err->code));
    return err->code;
}

void fp_err_clear(fp_err_t *err)
{
    if (!err)
        return;
    err->code = 0;
    err->msg[0] = '\0';
}

const char *fp_err_msg(const fp_err_t *err)
{
    if (!err)
        return "unknown error";
    if (err->msg[0])
        return err->msg;
    return err->code ? strerror(-err->code) : "success";
}

void fp__assert_fail(const char *expr, const char *file, int line)
{
    fprintf(stderr, "fedpeft: internal error: assertion `%s' failed at %s:%d\n", expr, file,
            line);
    abort();
}
