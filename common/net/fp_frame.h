/* fp_frame.h — framing on a byte stream: [u32 big-endian length][payload].
 *
 * The decoder is incremental: feed it whatever arrived; it calls back once per complete
 * frame. A length above the configured maximum is refused as soon as its four bytes are in,
 * before anything is allocated, and the decoder then stays failed (the connection must close:
 * framing cannot be recovered). */
#ifndef FP_FRAME_H
#define FP_FRAME_H

#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"

#define FP_FRAME_HEADER 4
#define FP_FRAME_DEFAULT_MAX (4u << 20) /* 4 MiB: a 1 MiB tensor chunk and its envelope */

typedef struct fp_frame_dec {
    size_t max;                        /* largest payload accepted */
    unsigned char hdr[FP_FRAME_HEADER];
    size_t hdr_have;                   /* header bytes gathered */
    unsigned char *buf;                /* payload being gathered (grows up to max) */
    size_t need, have, cap;
    int failed;
    uint64_t frames, bytes;            /* delivered so far */
} fp_frame_dec_t;

/* Called per complete frame; payload is valid during the call only. Non-zero stops feeding
 * and is returned by fp_frame_feed. */
typedef int (*fp_frame_cb)(void *ctx, const unsigned char *payload, size_t len);

void fp_frame_dec_init(fp_frame_dec_t *d, size_t max);
void fp_frame_dec_free(fp_frame_dec_t *d);

/* Feeds len bytes. Returns 0; -EFBIG for a length over max; -ENOMEM; or the callback's
 * non-zero value. After any failure the decoder refuses further input with -EPROTO. */
int fp_frame_feed(fp_frame_dec_t *d, const void *data, size_t len, fp_frame_cb cb, void *ctx,
                  fp_err_t *err);

/* Bytes of a frame still expected (0 between frames): a truncated stream ends with non-zero. */
size_t fp_frame_pending(const fp_frame_dec_t *d);

/* Writes the 4-byte header for a payload of len bytes (len ≤ UINT32_MAX). */
void fp_frame_header(unsigned char hdr[FP_FRAME_HEADER], size_t len);

#endif
