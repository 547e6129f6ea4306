#include "fp_safetensors.h"

#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fp_fs.h"
#include "fp_sha256.h"

struct fp_st_file {
    char *path;               /* path or label, for messages */
    const unsigned char *buf; /* whole file */
    size_t len;
    int mapped;               /* buf is our mapping */
    uint64_t data_off;        /* 8 + N */
    size_t n;                 /* tensors */
    fp_st_tensor_t *tensors;  /* n, in data-offset order */
    const fp_st_tensor_t **by_name; /* n, sorted by name */
    size_t nmeta;
    char **meta;              /* 2 * nmeta strings: key, value */
    char *names;              /* arena holding every tensor name */
};

static long page_size(void)
{
    static long ps;
    if (!ps)
        ps = sysconf(_SC_PAGESIZE);
    return ps;
}

void fp_st_close(fp_st_file_t *f)
{
    if (!f)
        return;
    if (f->mapped && f->buf)
        munmap((void *)f->buf, f->len);
    for (size_t i = 0; i < 2 * f->nmeta; i++)
        free(f->meta[i]);
    free(f->meta);
    free(f->tensors);
    free(f->by_name);
    free(f->names);
    free(f->path);
    free(f);
}

const char *fp_st_path(const fp_st_file_t *f)
{
    return f->path;
}

size_t fp_st_count(const fp_st_file_t *f)
{
    return f->n;
}

const fp_st_tensor_t *fp_st_get(const fp_st_file_t *f, size_t i)
{
    return i < f->n ? &f->tensors[i] : NULL;
}

static int cmp_name_ptr(const void *a, const void *b)
{
    const fp_st_tensor_t *x = *(const fp_st_tensor_t *const *)a;
    const fp_st_tensor_t *y = *(const fp_st_tensor_t *const *)b;
    return strcmp(x->name, y->name);
}

static int cmp_offsets(const void *a, const void *b)
{
    const fp_st_tensor_t *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return strcmp(x->name, y->name);
}

const fp_st_tensor_t *fp_st_find(const fp_st_file_t *f, const char *name)
{
    size_t lo = 0, hi = f->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(f->by_name[mid]->name, name);
        if (c == 0)
            return f->by_name[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

const char *fp_st_meta(const fp_st_file_t *f, const char *key)
{
    for (size_t i = 0; i < f->nmeta; i++)
        if (!strcmp(f->meta[2 * i], key))
            return f->meta[2 * i + 1];
    return NULL;
}

const float *fp_st_f32_view(const fp_st_tensor_t *t)
{
    if (t->dtype != FP_DT_F32 || ((uintptr_t)t->data % sizeof(float)) != 0)
        return NULL;
    return (const float *)(const void *)t->data;
}

int fp_st_read_f32(const fp_st_file_t *f, const fp_st_tensor_t *t, float *dst, fp_err_t *err)
{
    if (!fp_dtype_is_float(t->dtype))
        return fp_err_set(err, -ENOTSUP, "%s: tensor '%s' has dtype %s; only F32, F16, BF16 "
                          "and F64 can be read as floats", f->path, t->name,
                          fp_dtype_name(t->dtype));
    fp_convert_to_f32(dst, t->data, t->dtype, (size_t)t->nelem);
    return 0;
}

void fp_st_release(const fp_st_file_t *f, const fp_st_tensor_t *t)
{
    if (!f->mapped)
        return;
    uintptr_t ps = (uintptr_t)page_size();
    uintptr_t lo = ((uintptr_t)t->data + ps - 1) & ~(ps - 1);
    uintptr_t hi = ((uintptr_t)t->data + (uintptr_t)(t->end - t->begin)) & ~(ps - 1);
    if (hi > lo)
        madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

void fp_st_release_range(const fp_st_file_t *f, const void *p, size_t bytes)
{
    uintptr_t lo = (uintptr_t)p, base = (uintptr_t)f->buf;
    if (!f->mapped || lo < base || lo >= base + f->len)
        return;
    uintptr_t ps = (uintptr_t)page_size();
    uintptr_t hi = lo + bytes;
    lo &= ~(ps - 1);
    hi &= ~(ps - 1);
    if (hi > lo)
        madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

/* Parses one tensor entry of the header into t. */
static int parse_entry(fp_st_file_t *f, const char *name, json_t *v, fp_st_tensor_t *t,
                       uint64_t data_len, fp_err_t *err)
{
    if (!json_is_object(v))
        return fp_err_set(err, -EBADMSG, "%s: tensor '%s': header entry is not an object",
                          f->path, name);
    json_t *jd = json_object_get(v, "dtype");
    if (!json_is_string(jd))
        return fp_err_set(err, -EBADMSG, "%s: tensor '%s': missing or non-string \"dtype\"",
                          f->path, name);
    t->dtype = fp_dtype_parse(json_string_value(jd));
    if (t->dtype == FP_DT_INVALID)
        return fp_err_set(err, -EBADMSG, "%s: tensor '%s': unknown dtype \"%s\"", f->path, name,
                          json_string_value(jd));

    json_t *js = json_object_get(v, "shape");
    if (!json_is_array(js))
        return fp_err_set(err, -EBADMSG, "%s: tensor '%s': missing or non-array \"shape\"",
                          f->path, name);
    size_t nd = json_array_size(js);
    if (nd > FP_ST_MAX_DIMS)
        return fp_err_set(err, -EBADMSG, "%s: tensor '%s': %zu dimensions, at most %d supported",
                          f->path, name, nd, FP_ST_MAX_DIMS);
    t->ndim = (int)nd;
    uint64_t nelem = 1;
    int overflow = 0;
    for (size_t d = 0; d < nd; d++) {
        json_t *x = json_array_get(js, d);
        if (!json_is_integer(x) || json_integer_value(x) < 0)
            return fp_err_set(err, -EBADMSG,
                              "%s: tensor '%s': shape entries must be non-negative integers",
                              f->path, name);
        t->shape[d] = (uint64_t)json_integer_value(x);
        if (t->shape[d] != 0 && nelem > UINT64_MAX / t->shape[d])
            overflow = 1;
        else
            nelem *= t->shape[d];
    }
    size_t esz = fp_dtype_size(t->dtype);
    if (overflow || nelem > UINT64_MAX / esz)
        return fp_err_set(err, -EBADMSG, "%s: tensor '%s': shape is too large", f->path, name);
    t->nelem = nelem;

    json_t *jo = json_object_get(v, "data_offsets");
    if (!json_is_array(jo) || json_array_size(jo) != 2 ||
        !json_is_integer(json_array_get(jo, 0)) || !json_is_integer(json_array_get(jo, 1)))
        return fp_err_set(err, -EBADMSG,
                          "%s: tensor '%s': \"data_offsets\" must be [begin, end] integers",
                          f->path, name);
    json_int_t b = json_integer_value(json_array_get(jo, 0));
    json_int_t e = json_integer_value(json_array_get(jo, 1));
    if (b < 0 || e < b)
        return fp_err_set(err, -EBADMSG, "%s: tensor '%s': bad data_offsets [%lld, %lld]",
                          f->path, name, (long long)b, (long long)e);
    t->begin = (uint64_t)b;
    t->end = (uint64_t)e;
    if (t->end - t->begin != nelem * esz) {
        char shape[160] = "";
        size_t pos = 0;
        for (int d = 0; d < t->ndim && pos < sizeof shape - 24; d++)
            pos += (size_t)snprintf(shape + pos, sizeof shape - pos, "%s%llu", d ? ", " : "",
                                    (unsigned long long)t->shape[d]);
        return fp_err_set(err, -EBADMSG,
                          "%s: tensor '%s': data_offsets [%llu, %llu] hold %llu bytes but shape "
                          "[%s] of %s needs %llu",
                          f->path, name, (unsigned long long)t->begin,
                          (unsigned long long)t->end, (unsigned long long)(t->end - t->begin),
                          shape, fp_dtype_name(t->dtype), (unsigned long long)(nelem * esz));
    }
    if (t->end > data_len)
        return fp_err_set(err, -EBADMSG,
                          "%s: tensor '%s': data_offsets end %llu beyond the %llu-byte data "
                          "buffer (truncated file?)",
                          f->path, name, (unsigned long long)t->end,
                          (unsigned long long)data_len);
    return 0;
}

static int parse_metadata(fp_st_file_t *f, json_t *v, fp_err_t *err)
{
    if (!json_is_object(v))
        return fp_err_set(err, -EBADMSG, "%s: \"__metadata__\" must be an object of strings",
                          f->path);
    size_t n = json_object_size(v);
    f->meta = calloc(2 * n + 1, sizeof *f->meta);
    if (!f->meta)
        return fp_err_set(err, -ENOMEM, "%s: out of memory", f->path);
    const char *k;
    json_t *x;
    json_object_foreach(v, k, x) {
        if (!json_is_string(x))
            return fp_err_set(err, -EBADMSG, "%s: \"__metadata__\" value for \"%s\" is not a "
                              "string", f->path, k);
        f->meta[2 * f->nmeta] = strdup(k);
        f->meta[2 * f->nmeta + 1] = strdup(json_string_value(x));
        f->nmeta++;
        if (!f->meta[2 * f->nmeta - 2] || !f->meta[2 * f->nmeta - 1])
            return fp_err_set(err, -ENOMEM, "%s: out of memory", f->path);
    }
    return 0;
}

/* Validates buf (the whole file) and fills f. */
static int parse(fp_st_file_t *f, fp_err_t *err)
{
    if (f->len < 8)
        return fp_err_set(err, -EBADMSG,
                          "%s: truncated: %zu bytes, but a safetensors file starts with an "
                          "8-byte header length", f->path, f->len);
    uint64_t hlen;
    memcpy(&hlen, f->buf, sizeof hlen);
    if (hlen > FP_ST_MAX_HEADER)
        return fp_err_set(err, -EFBIG,
                          "%s: header length %llu is over the format's 100 MB limit", f->path,
                          (unsigned long long)hlen);
    if (hlen > f->len - 8)
        return fp_err_set(err, -EBADMSG,
                          "%s: truncated: header length is %llu but only %zu bytes follow",
                          f->path, (unsigned long long)hlen, f->len - 8);
    f->data_off = 8 + hlen;
    uint64_t data_len = f->len - f->data_off;

    json_error_t jerr;
    json_t *root = json_loadb((const char *)f->buf + 8, (size_t)hlen,
                              JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        if (json_error_code(&jerr) == json_error_duplicate_key)
            return fp_err_set(err, -EBADMSG, "%s: duplicate tensor name in header (%s)",
                              f->path, jerr.text);
        return fp_err_set(err, -EBADMSG, "%s: bad JSON header at byte %d: %s", f->path,
                          jerr.position, jerr.text);
    }
    int rc = 0;
    if (!json_is_object(root)) {
        rc = fp_err_set(err, -EBADMSG, "%s: header is not a JSON object", f->path);
        goto out;
    }
    size_t nobj = json_object_size(root);
    size_t names_len = 0;
    const char *k;
    json_t *v;
    json_object_foreach(root, k, v) {
        if (strcmp(k, "__metadata__") != 0)
            names_len += strlen(k) + 1;
    }
    f->tensors = calloc(nobj ? nobj : 1, sizeof *f->tensors);
    f->by_name = calloc(nobj ? nobj : 1, sizeof *f->by_name);
    f->names = malloc(names_len ? names_len : 1);
    if (!f->tensors || !f->by_name || !f->names) {
        rc = fp_err_set(err, -ENOMEM, "%s: out of memory", f->path);
        goto out;
    }
    char *np = f->names;
    json_object_foreach(root, k, v) {
        if (!strcmp(k, "__metadata__")) {
            if ((rc = parse_metadata(f, v, err)) != 0)
                goto out;
            continue;
        }
        fp_st_tensor_t *t = &f->tensors[f->n];
        size_t kl = strlen(k) + 1;
        memcpy(np, k, kl);
        t->name = np;
        np += kl;
        if ((rc = parse_entry(f, t->name, v, t, data_len, err)) != 0)
            goto out;
        t->data = f->buf + f->data_off + t->begin;
        f->n++;
    }

    /* The data buffer must be covered exactly: no gap, no overlap, nothing after the end. */
    qsort(f->tensors, f->n, sizeof *f->tensors, cmp_offsets);
    uint64_t pos = 0;
    for (size_t i = 0; i < f->n; i++) {
        const fp_st_tensor_t *t = &f->tensors[i];
        if (t->begin > pos) {
            rc = fp_err_set(err, -EBADMSG,
                            "%s: gap in the data buffer: bytes [%llu, %llu) before tensor '%s' "
                            "belong to no tensor",
                            f->path, (unsigned long long)pos, (unsigned long long)t->begin,
                            t->name);
            goto out;
        }
        if (t->begin < pos) {
            rc = fp_err_set(err, -EBADMSG,
                            "%s: tensor '%s' [%llu, %llu) overlaps tensor '%s' ending at %llu",
                            f->path, t->name, (unsigned long long)t->begin,
                            (unsigned long long)t->end, f->tensors[i - 1].name,
                            (unsigned long long)pos);
            goto out;
        }
        pos = t->end;
    }
    if (pos != data_len) {
        rc = fp_err_set(err, -EBADMSG,
                        "%s: %llu trailing bytes after the last tensor (data buffer is %llu "
                        "bytes, tensors cover %llu)",
                        f->path, (unsigned long long)(data_len - pos),
                        (unsigned long long)data_len, (unsigned long long)pos);
        goto out;
    }
    for (size_t i = 0; i < f->n; i++)
        f->by_name[i] = &f->tensors[i];
    qsort(f->by_name, f->n, sizeof *f->by_name, cmp_name_ptr);
out:
    json_decref(root);
    return rc;
}

int fp_st_open_mem(fp_st_file_t **out, const void *buf, size_t len, const char *label,
                   fp_err_t *err)
{
    *out = NULL;
    fp_st_file_t *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(label ? label : "<memory>"))) {
        free(f);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    f->buf = buf;
    f->len = len;
    int rc = parse(f, err);
    if (rc) {
        fp_st_close(f);
        return rc;
    }
    *out = f;
    return 0;
}

int fp_st_open(fp_st_file_t **out, const char *path, fp_err_t *err)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fp_err_set(err, -errno, "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return fp_err_set(err, -e, "%s: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return fp_err_set(err, -EINVAL, "%s: not a regular file", path);
    }
    fp_st_file_t *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) {
        free(f);
        close(fd);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    f->len = (size_t)st.st_size;
    if (f->len > 0) {
        void *m = mmap(NULL, f->len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            int e = errno;
            close(fd);
            fp_st_close(f);
            return fp_err_set(err, -e, "%s: mmap: %s", path, strerror(e));
        }
        f->buf = m;
        f->mapped = 1;
    }
    close(fd);
    int rc = parse(f, err);
    if (rc) {
        fp_st_close(f);
        return rc;
    }
    /* Everything needed from the header was copied: drop its pages (and whatever fault-around
     * mapped next to them) so that an opened, unread file costs no resident memory. */
    if (f->len > 0)
        madvise((void *)f->buf, f->len, MADV_DONTNEED);
    *out = f;
    return 0;
}

/* ---- writer ---- */

static int entry_bytes(const fp_st_entry_t *e, uint64_t *nelem, uint64_t *nbytes, fp_err_t *err)
{
    if (!fp_dtype_is_float(e->dtype) && e->f32)
        return fp_err_set(err, -EINVAL, "tensor '%s': cannot convert float32 to %s", e->name,
                          fp_dtype_name(e->dtype));
    if (e->dtype == FP_DT_INVALID || e->ndim < 0 || e->ndim > FP_ST_MAX_DIMS)
        return fp_err_set(err, -EINVAL, "tensor '%s': bad dtype or rank", e->name);
    uint64_t n = 1;
    for (int d = 0; d < e->ndim; d++) {
        if (e->shape[d] != 0 && n > UINT64_MAX / e->shape[d])
            return fp_err_set(err, -EINVAL, "tensor '%s': shape too large", e->name);
        n *= e->shape[d];
    }
    *nelem = n;
    *nbytes = n * fp_dtype_size(e->dtype);
    return 0;
}

int fp_st_header(const fp_st_entry_t *entries, size_t n, const char *const *meta, size_t align,
                 char **out, size_t *len, fp_err_t *err)
{
    *out = NULL;
    int rc = 0;
    json_t *root = json_object();
    json_t *jm = json_object();
    if (!root || !jm) {
        json_decref(root);
        json_decref(jm);
        return fp_err_set(err, -ENOMEM, "out of memory");
    }
    json_object_set_new(jm, "format", json_string("pt"));
    for (size_t i = 0; meta && meta[i] && meta[i + 1]; i += 2)
        json_object_set_new(jm, meta[i], json_string(meta[i + 1]));
    json_object_set_new(root, "__metadata__", jm);

    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const fp_st_entry_t *e = &entries[i];
        uint64_t nelem, nbytes;
        if ((rc = entry_bytes(e, &nelem, &nbytes, err)) != 0)
            goto out;
        if (!strcmp(e->name, "__metadata__") || json_object_get(root, e->name)) {
            rc = fp_err_set(err, -EINVAL, "duplicate or reserved tensor name '%s'", e->name);
            goto out;
        }
        json_t *t = json_object();
        json_t *shape = json_array();
        for (int d = 0; d < e->ndim; d++)
            json_array_append_new(shape, json_integer((json_int_t)e->shape[d]));
        json_object_set_new(t, "dtype", json_string(fp_dtype_name(e->dtype)));
        json_object_set_new(t, "shape", shape);
        json_t *offs = json_array();
        json_array_append_new(offs, json_integer((json_int_t)off));
        json_array_append_new(offs, json_integer((json_int_t)(off + nbytes)));
        json_object_set_new(t, "data_offsets", offs);
        if (json_object_set_new(root, e->name, t) != 0) {
            rc = fp_err_set(err, -EINVAL, "tensor name '%s' is not valid UTF-8", e->name);
            goto out;
        }
        off += nbytes;
    }
    char *text = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!text) {
        rc = fp_err_set(err, -ENOMEM, "cannot serialise the header");
        goto out;
    }
    size_t tl = strlen(text), a = align < 8 ? 8 : align;
    size_t total = (8 + tl + a - 1) / a * a; /* the data starts aligned */
    char *hdr = malloc(total);
    if (!hdr) {
        free(text);
        rc = fp_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    uint64_t hl64 = total - 8;
    memcpy(hdr, &hl64, 8);
    memcpy(hdr + 8, text, tl);
    memset(hdr + 8 + tl, ' ', total - 8 - tl);
    free(text);
    *out = hdr;
    *len = total;
out:
    json_decref(root);
    return rc;
}

int fp_st_write(const char *path, const fp_st_entry_t *entries, size_t n,
                const char *const *meta, fp_err_t *err)
{
    return fp_st_write_sha(path, entries, n, meta, NULL, err);
}

/* Appends to af, hashing what is written when sha is set. */
static int put(fp_afile_t *af, fp_sha256_ctx_t *sha, const void *buf, size_t len, fp_err_t *err)
{
    if (sha)
        fp_sha256_update(sha, buf, len);
    return fp_afile_write(af, buf, len, err);
}

int fp_st_write_sha(const char *path, const fp_st_entry_t *entries, size_t n,
                    const char *const *meta, uint8_t sha_out[32], fp_err_t *err)
{
    char *hdr = NULL;
    float *stage = NULL;
    size_t hlen = 0;
    fp_sha256_ctx_t ctx, *sha = sha_out ? &ctx : NULL;
    if (sha)
        fp_sha256_init(sha);
    int rc = fp_st_header(entries, n, meta, 8, &hdr, &hlen, err);
    if (rc)
        return fp_err_prefix(err, rc, "%s: ", path);
    fp_afile_t af;
    if ((rc = fp_afile_open(&af, path, 0644, err)) != 0)
        goto out;
    rc = put(&af, sha, hdr, hlen, err);
    enum { STAGE = 1 << 16 }; /* elements converted per write */
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const fp_st_entry_t *e = &entries[i];
        uint64_t nelem, nbytes;
        entry_bytes(e, &nelem, &nbytes, NULL);
        if (!e->f32 || e->dtype == FP_DT_F32) {
            const void *src = e->f32 ? (const void *)e->f32 : e->raw;
            if (nbytes && !src) {
                rc = fp_err_set(err, -EINVAL, "tensor '%s': no data", e->name);
                break;
            }
            rc = put(&af, sha, src, (size_t)nbytes, err);
            continue;
        }
        if (!stage && !(stage = malloc(STAGE * sizeof(double)))) {
            rc = fp_err_set(err, -ENOMEM, "%s: out of memory", path);
            break;
        }
        size_t esz = fp_dtype_size(e->dtype);
        for (uint64_t j = 0; rc == 0 && j < nelem; j += STAGE) {
            size_t m = (size_t)(nelem - j < STAGE ? nelem - j : STAGE);
            fp_convert_from_f32(stage, e->f32 + j, e->dtype, m);
            rc = put(&af, sha, stage, m * esz, err);
        }
    }
    if (rc) {
        fp_afile_abort(&af);
        goto out;
    }
    rc = fp_afile_commit(&af, err);
    if (rc == 0 && sha)
        fp_sha256_final(sha, sha_out);
out:
    free(stage);
    free(hdr);
    return rc;
}
