/* IDX files (fp_idx.h), through zlib's gz reader (which reads plain files as they are). */
#include "fp_idx.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>

void fp_idx_free(fp_idx_t *x)
{
    if (!x)
        return;
    free(x->data);
    *x = (fp_idx_t){0};
}

/* Reads exactly n bytes; 0, or the error said. */
static int read_all(gzFile f, const char *path, void *buf, size_t n, const char *what,
                    fp_err_t *err)
{
    size_t got = 0;
    while (got < n) {
        unsigned chunk = n - got > (1u << 30) ? 1u << 30 : (unsigned)(n - got);
        int k = gzread(f, (char *)buf + got, chunk);
        if (k < 0) {
            int zc;
            const char *m = gzerror(f, &zc);
            return fp_err_set(err, -EBADMSG, "%s: %s (%s)", path,
                              zc == Z_ERRNO ? strerror(errno) : m, what);
        }
        if (k == 0)
            return fp_err_set(err, -EBADMSG, "%s: truncated: it ends in its %s (%zu of %zu "
                              "bytes)", path, what, got, n);
        got += (size_t)k;
    }
    return 0;
}

int fp_idx_load(const char *path, fp_idx_t *out, fp_err_t *err)
{
    *out = (fp_idx_t){0};
    gzFile f = gzopen(path, "rb");
    if (!f)
        return fp_err_set(err, errno ? -errno : -ENOMEM, "%s: %s", path,
                          errno ? strerror(errno) : "out of memory");
    uint8_t magic[4], dims[4 * FP_IDX_MAX_DIMS], extra;
    int rc = read_all(f, path, magic, 4, "header", err);
    if (rc)
        goto out;
    if (magic[0] || magic[1] || magic[2] != 0x08 || magic[3] < 1 || magic[3] > FP_IDX_MAX_DIMS) {
        rc = fp_err_set(err, -EBADMSG, "%s: not an IDX file of unsigned bytes with 1 to %d "
                        "dimensions (magic %02x %02x %02x %02x)", path, FP_IDX_MAX_DIMS,
                        magic[0], magic[1], magic[2], magic[3]);
        goto out;
    }
    out->ndim = magic[3];
    if ((rc = read_all(f, path, dims, 4 * (size_t)out->ndim, "dimensions", err)) != 0)
        goto out;
    uint64_t n = 1;
    for (int i = 0; i < out->ndim; i++) {
        const uint8_t *d = dims + 4 * i;
        out->dims[i] = (uint32_t)d[0] << 24 | (uint32_t)d[1] << 16 | (uint32_t)d[2] << 8 | d[3];
        n *= out->dims[i];
        if (n > FP_IDX_MAX_BYTES) {
            rc = fp_err_set(err, -EFBIG, "%s: more than %u bytes of data", path,
                            FP_IDX_MAX_BYTES);
            goto out;
        }
    }
    out->n = (size_t)n;
    out->data = malloc(out->n ? out->n : 1);
    if (!out->data) {
        rc = fp_err_set(err, -ENOMEM, "%s: out of memory for %zu bytes", path, out->n);
        goto out;
    }
    if ((rc = read_all(f, path, out->data, out->n, "data", err)) != 0)
        goto out;
    if (gzread(f, &extra, 1) != 0)
        rc = fp_err_set(err, -EBADMSG, "%s: bytes after the data its dimensions announce",
                        path);
out:
    gzclose(f);
    if (rc)
        fp_idx_free(out);
    return rc;
}
