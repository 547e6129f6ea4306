/* A stream's tensor list, copied and as JSON (fp_tensor_list.h). */
#include "fp_tensor_list.h"

#include <stdlib.h>
#include <string.h>

/* Room for n entries and `names` bytes of names after them. */
static fp_stream_tensor_t *alloc_list(size_t n, size_t names)
{
    return malloc((n ? n : 1) * sizeof(fp_stream_tensor_t) + names + 1);
}

fp_stream_tensor_t *fp_tensor_list_copy(const fp_stream_tensor_t *t, int n)
{
    size_t cnt = n > 0 ? (size_t)n : 0, names = 0;
    for (size_t i = 0; i < cnt; i++)
        names += strlen(t[i].name) + 1;
    fp_stream_tensor_t *o = alloc_list(cnt, names);
    if (!o)
        return NULL;
    char *p = (char *)(o + (cnt ? cnt : 1));
    for (size_t i = 0; i < cnt; i++) {
        size_t l = strlen(t[i].name) + 1;
        memcpy(p, t[i].name, l);
        o[i] = t[i];
        o[i].name = p;
        p += l;
    }
    return o;
}

json_t *fp_tensor_list_json(const fp_stream_tensor_t *t, int n)
{
    json_t *a = json_array();
    for (int i = 0; a && i < n; i++)
        if (json_array_append_new(a, json_pack("[sIIII]", t[i].name, (json_int_t)t[i].rows,
                                               (json_int_t)t[i].cols, (json_int_t)t[i].offset,
                                               (json_int_t)t[i].nbytes)) != 0) {
            json_decref(a);
            return NULL;
        }
    return a;
}

int fp_tensor_list_from_json(const json_t *a, fp_stream_tensor_t **out, int *n, fp_err_t *err)
{
    *out = NULL;
    *n = 0;
    if (!json_is_array(a))
        return fp_err_set(err, -EBADMSG, "tensor list: not a JSON array");
    size_t cnt = json_array_size(a);
    fp_stream_tensor_t *t = calloc(cnt ? cnt : 1, sizeof *t); /* names borrowed from a */
    if (!t)
        return fp_err_set(err, -ENOMEM, "out of memory");
    for (size_t i = 0; i < cnt; i++) {
        const char *nm;
        json_int_t r, c, o, b;
        if (json_unpack(json_array_get(a, i), "[sIIII]", &nm, &r, &c, &o, &b) != 0 || r < 0 ||
            c < 0 || o < 0 || b < 0) {
            free(t);
            return fp_err_set(err, -EBADMSG, "tensor list: bad entry %zu", i);
        }
        t[i] = (fp_stream_tensor_t){nm, (uint64_t)r, (uint64_t)c, (uint64_t)o, (uint64_t)b};
    }
    *out = fp_tensor_list_copy(t, (int)cnt);
    free(t);
    if (!*out)
        return fp_err_set(err, -ENOMEM, "out of memory");
    *n = (int)cnt;
    return 0;
}

char *fp_tensor_list_dumps(const fp_stream_tensor_t *t, int n)
{
    json_t *a = fp_tensor_list_json(t, n);
    char *s = a ? json_dumps(a, JSON_COMPACT) : NULL;
    json_decref(a);
    return s;
}

int fp_tensor_list_loads(const char *text, fp_stream_tensor_t **out, int *n, fp_err_t *err)
{
    json_error_t je;
    json_t *a = text ? json_loads(text, 0, &je) : NULL;
    int rc = fp_tensor_list_from_json(a, out, n, err);
    json_decref(a);
    return rc;
}
