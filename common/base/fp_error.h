/* fp_error.h — error reporting shared by every fedpeft library.
 *
 * Functions return 0 on success or a negative errno-style code (-EINVAL, -ENOMEM, -EIO,
 * -EBADMSG for malformed data, -EFBIG for a size over a limit, -EDOM for non-finite or
 * numerically impossible values, -ENOTSUP for unsupported features, ...). When the caller
 * passes an fp_err_t, the function also fills it with a message that names the file or
 * object and the problem. Library code never prints: the daemon or tool decides what to say.
 */
#ifndef FP_ERROR_H
#define FP_ERROR_H

#include <errno.h>
#include <stdarg.h>

#define FP_ERR_MSG_MAX 768

typedef struct fp_err {
    int code;                 /* 0, or the negative code of the last failure */
    char msg[FP_ERR_MSG_MAX]; /* NUL-terminated human-readable message */
} fp_err_t;

/* Sets err (if not NULL) to code and a printf-style message; returns code so that callers
 * can write `return fp_err_set(err, -EINVAL, "...")`. */
int fp_err_set(fp_err_t *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prepends context ("file.safetensors: ") to an existing message; returns err->code, or
 * `code` when err is NULL. Use it when passing a failure up through a layer that knows more. */
int fp_err_prefix(fp_err_t *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Clears err (code 0, empty message). Accepts NULL. */
void fp_err_clear(fp_err_t *err);

/* The message, or strerror(-code) when no message was recorded. Never NULL. */
const char *fp_err_msg(const fp_err_t *err);

/* Always-on invariant check for programmer errors (shapes, states); aborts with location. */
#define FP_ASSERT(cond)                                                                        \
    do {                                                                                       \
        if (!(cond))                                                                           \
            fp__assert_fail(#cond, __FILE__, __LINE__);                                        \
    } while (0)

_Noreturn void fp__assert_fail(const char *expr, const char *file, int line);

#endif
