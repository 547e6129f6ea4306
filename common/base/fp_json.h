/* fp_json.h — jansson glue: bounded loading with readable errors and typed field access. */
#ifndef FP_JSON_H
#define FP_JSON_H

#include <jansson.h>
#include <stddef.h>

#include "fp_error.h"

/* Loads a JSON file of at most max_bytes; the error names the file, line and column. */
json_t *fp_json_load_file(const char *path, size_t max_bytes, fp_err_t *err);

/* Writes json (indent 2, sorted keys, trailing newline) durably to path. */
int fp_json_write_file(const char *path, const json_t *json, fp_err_t *err);

/* Typed optional fields. Each returns 1 when the field is present and of the right type,
 * 0 when absent (or JSON null), and a negative code (with err naming `what` and key) when
 * present with the wrong type. */
int fp_json_opt_int(const json_t *obj, const char *key, long long *out, const char *what,
                    fp_err_t *err);
int fp_json_opt_number(const json_t *obj, const char *key, double *out, const char *what,
                       fp_err_t *err);
int fp_json_opt_bool(const json_t *obj, const char *key, int *out, const char *what,
                     fp_err_t *err);
int fp_json_opt_string(const json_t *obj, const char *key, const char **out, const char *what,
                       fp_err_t *err);

#endif
