#include "fp_json.h"

#include <stdlib.h>
#include <string.h>

#include "fp_fs.h"

json_t *fp_json_load_file(const char *path, size_t max_bytes, fp_err_t *err)
{
    char *buf = NULL;
    size_t len = 0;
    if (fp_fs_read_file(path, max_bytes, &buf, &len, err) != 0)
        return NULL;
    json_error_t jerr;
    json_t *j = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    free(buf);
    if (!j)
        fp_err_set(err, -EBADMSG, "%s: bad JSON at line %d column %d: %s", path, jerr.line,
                   jerr.column, jerr.text);
    return j;
}

int fp_json_write_file(const char *path, const json_t *json, fp_err_t *err)
{
    char *text = json_dumps(json, JSON_INDENT(2) | JSON_SORT_KEYS);
    if (!text)
        return fp_err_set(err, -ENOMEM, "%s: cannot serialise JSON", path);
    size_t n = strlen(text);
    char *withnl = realloc(text, n + 2);
    if (!withnl) {
        free(text);
        return fp_err_set(err, -ENOMEM, "%s: out of memory", path);
    }
    withnl[n] = '\n';
    withnl[n + 1] = '\0';
    int rc = fp_fs_write_file(path, withnl, n + 1, 0644, err);
    free(withnl);
    return rc;
}

static int type_error(const char *what, const char *key, const char *want, fp_err_t *err)
{
    return fp_err_set(err, -EBADMSG, "%s: field \"%s\" must be %s", what, key, want);
}

int fp_json_opt_int(const json_t *obj, const char *key, long long *out, const char *what,
                    fp_err_t *err)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return 0;
    if (json_is_integer(v)) {
        *out = json_integer_value(v);
        return 1;
    }
    /* Python writes 16.0 for some integer settings; accept integral reals. */
    if (json_is_real(v)) {
        double d = json_real_value(v);
        if (d == (double)(long long)d) {
            *out = (long long)d;
            return 1;
        }
    }
    return type_error(what, key, "an integer", err);
}

int fp_json_opt_number(const json_t *obj, const char *key, double *out, const char *what,
                       fp_err_t *err)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_number(v))
        return type_error(what, key, "a number", err);
    *out = json_number_value(v);
    return 1;
}

int fp_json_opt_bool(const json_t *obj, const char *key, int *out, const char *what,
                     fp_err_t *err)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_boolean(v))
        return type_error(what, key, "true or false", err);
    *out = json_is_true(v);
    return 1;
}

int fp_json_opt_string(const json_t *obj, const char *key, const char **out, const char *what,
                       fp_err_t *err)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_string(v))
        return type_error(what, key, "a string", err);
    *out = json_string_value(v);
    return 1;
}
