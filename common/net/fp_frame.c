#include "fp_frame.h"

#include <stdlib.h>
#include <string.h>

void fp_frame_dec_init(fp_frame_dec_t *d, size_t max)
{
    memset(d, 0, sizeof *d);
    d->max = max ? max : FP_FRAME_DEFAULT_MAX;
}

void fp_frame_dec_free(fp_frame_dec_t *d)
{
    free(d->buf);
    d->buf = NULL;
    d->cap = 0;
}

void fp_frame_header(unsigned char hdr[FP_FRAME_HEADER], size_t len)
{
    hdr[0] = (unsigned char)(len >> 24);
    hdr[1] = (unsigned char)(len >> 16);
    hdr[2] = (unsigned char)(len >> 8);
    hdr[3] = (unsigned char)len;
}

size_t fp_frame_pending(const fp_frame_dec_t *d)
{
    if (d->hdr_have < FP_FRAME_HEADER)
        return d->hdr_have ? FP_FRAME_HEADER - d->hdr_have : 0;
    return d->need - d->have;
}

static int deliver(fp_frame_dec_t *d, const unsigned char *p, size_t n, fp_frame_cb cb,
                   void *ctx)
{
    d->frames++;
    d->bytes += n;
    d->hdr_have = 0;
    d->need = d->have = 0;
    return cb ? cb(ctx, p, n) : 0;
}

int fp_frame_feed(fp_frame_dec_t *d, const void *data, size_t len, fp_frame_cb cb, void *ctx,
                  fp_err_t *err)
{
    const unsigned char *p = data;
    if (d->failed)
        return fp_err_set(err, -EPROTO, "framing already failed on this stream");
    while (len > 0) {
        if (d->hdr_have < FP_FRAME_HEADER) {
            size_t take = FP_FRAME_HEADER - d->hdr_have;
            if (take > len)
                take = len;
            memcpy(d->hdr + d->hdr_have, p, take);
            d->hdr_have += take;
            p += take;
            len -= take;
            if (d->hdr_have < FP_FRAME_HEADER)
                break;
            uint32_t n = (uint32_t)d->hdr[0] << 24 | (uint32_t)d->hdr[1] << 16 |
                         (uint32_t)d->hdr[2] << 8 | d->hdr[3];
            if (n > d->max) {
                d->failed = 1;
                return fp_err_set(err, -EFBIG, "frame of %u bytes is over the limit of %zu", n,
                                  d->max);
            }
            d->need = n;
            d->have = 0;
            if (n == 0 || len >= n) { /* the whole payload is here: no copy */
                int rc = deliver(d, p, n, cb, ctx);
                p += n;
                len -= n;
                if (rc) {
                    d->failed = 1;
                    return rc;
                }
                continue;
            }
        }
        /* gather the rest of the payload */
        if (d->cap < d->need) {
            unsigned char *b = realloc(d->buf, d->need);
            if (!b) {
                d->failed = 1;
                return fp_err_set(err, -ENOMEM, "out of memory for a %zu-byte frame", d->need);
            }
            d->buf = b;
            d->cap = d->need;
        }
        size_t take = d->need - d->have;
        if (take > len)
            take = len;
        memcpy(d->buf + d->have, p, take);
        d->have += take;
        p += take;
        len -= take;
        if (d->have == d->need) {
            int rc = deliver(d, d->buf, d->need, cb, ctx);
            if (rc) {
                d->failed = 1;
                return rc;
            }
        }
    }
    return 0;
}
