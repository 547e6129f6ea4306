/* fp_stream.h — the receiving end of a tensor stream, spooled to disk.
 *
 * An adapter travels as ordered chunks with offsets and ends with a Commit holding its
 * SHA-256. The receiver writes chunks to DIR/<id>.part as they come (never holding the stream
 * in memory), hashes them incrementally, and on fp_stream_rx_sync makes the prefix received
 * so far durable and records its length in DIR/<id>.acked — the offset an Ack promises. After
 * a broken connection, or a crash, fp_stream_rx_open on the same id resumes from that offset:
 * the file is cut back to it and its prefix re-hashed. fp_stream_rx_finish checks the length
 * and hash and renames the file into place atomically.
 *
 * Where the file system allows, the spool is written with O_DIRECT from an aligned staging
 * buffer: a coordinator receiving many adapters neither copies them through the page cache nor
 * evicts what else is cached, and making a prefix durable costs one device flush. Between a
 * sync and the next, the file may hold a zero-padded last block beyond `received`; the
 * .acked record, not the file size, says what is valid. Where O_DIRECT is refused, or with
 * FEDPEFT_SPOOL_DIRECT=0 in the environment, plain buffered writes are used. None of these functions touches shared state: a stream may be driven from
 * any one thread at a time. */
#ifndef FP_STREAM_H
#define FP_STREAM_H

#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"
#include "fp_sha256.h"

typedef struct fp_stream_rx {
    uint64_t id;
    uint64_t total;     /* bytes announced */
    uint64_t base;      /* where the stream starts in the file (after the prefix) */
    uint64_t received;  /* bytes written, in order */
    uint64_t durable;   /* bytes fsynced and recorded: what may be acknowledged */
    int fd;
    int direct;         /* 1: O_DIRECT through stage */
    char *part, *acked; /* DIR/<id>.part, DIR/<id>.acked */
    void *sha;          /* fp_sha256_ctx_t over bytes [0, received) */
    unsigned char *stage; /* direct mode: bytes [flushed, received), FP_STREAM_STAGE aligned */
    uint64_t flushed;   /* direct mode: a multiple of FP_STREAM_ALIGN written in place */
} fp_stream_rx_t;

#define FP_STREAM_ALIGN 4096u
#define FP_STREAM_STAGE (4u << 20)

/* Opens (or resumes) stream id of total bytes in dir, after prefix[0..prefix_len) (a multiple
 * of FP_STREAM_ALIGN; not hashed, not counted in offsets: a file header the stream's bytes
 * complete). rx->received tells where the sender must continue. */
int fp_stream_rx_open(fp_stream_rx_t *rx, const char *dir, uint64_t id, uint64_t total,
                      const void *prefix, size_t prefix_len, fp_err_t *err);

/* Appends a chunk: offset must equal rx->received and the chunk must fit in total. */
int fp_stream_rx_write(fp_stream_rx_t *rx, uint64_t offset, const void *data, size_t n,
                       fp_err_t *err);

/* Makes [0, received) durable; afterwards rx->durable == rx->received. */
int fp_stream_rx_sync(fp_stream_rx_t *rx, fp_err_t *err);

/* Checks that all total bytes arrived with this SHA-256, syncs and renames the spool file to
 * final_path (replacing it). The stream is closed either way on success; on a hash or length
 * mismatch the spool is discarded (the sender must start again). */
int fp_stream_rx_finish(fp_stream_rx_t *rx, const uint8_t sha256[32], const char *final_path,
                        fp_err_t *err);

/* Closes, keeping the spool for a later resume. Accepts a closed rx. */
void fp_stream_rx_close(fp_stream_rx_t *rx);

/* Closes and removes the spool. */
void fp_stream_rx_discard(fp_stream_rx_t *rx);


#endif
