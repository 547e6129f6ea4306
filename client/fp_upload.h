/* fp_upload.h — a site sending one tensor stream to the coordinator over mTLS.
 *
 * Hello → Welcome; then Update (a new stream) or Resume (one the coordinator already holds a
 * durable prefix of); the coordinator's first Ack says where to start; chunks of up to 1 MiB
 * follow, paced by the connection's send queue; Acks report the durable prefix as it grows;
 * the Commit carries the stream's SHA-256 and the final Ack says it is stored. If the
 * connection breaks, start again with resume set: only what was not durable is sent again. */
#ifndef FP_UPLOAD_H
#define FP_UPLOAD_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "fp_conn.h"
#include "fp_msg.h"

typedef struct fp_upload fp_upload_t;

typedef struct fp_upload_spec {
    const char *site_name;
    uint8_t model_sha256[32];
    uint32_t rank_budget;
    uint64_t samples;
    uint64_t id;                  /* stream (task) id */
    int resume;                   /* 1: resume stream id instead of announcing it */
    const unsigned char *data;    /* the stream's bytes (borrowed) */
    size_t total;
    const uint8_t *sha256;        /* the stream's SHA-256 if known, else NULL: computed here */
    const Fedpeft__Update *update; /* announcement: tensors, rank, metrics (borrowed) */
    size_t chunk;                 /* bytes per chunk (0: 1 MiB) */
} fp_upload_spec_t;

/* ok: the stream is stored (final Ack); otherwise reason says why it stopped. acked: the
 * durable prefix the coordinator confirmed last. */
typedef void (*fp_upload_done_cb)(void *ctx, int ok, uint64_t acked, const char *reason);

int fp_upload_start(fp_upload_t **out, uv_loop_t *loop, const char *host, int port,
                    fp_tls_ctx_t *tls, const fp_conn_cfg_t *cfg, const fp_upload_spec_t *spec,
                    fp_upload_done_cb done, void *ctx, fp_err_t *err);

/* Bytes handed to the connection so far (all sessions of this upload object). */
uint64_t fp_upload_sent(const fp_upload_t *u);

/* The offset the coordinator's first Ack named: its durable prefix when this session began. */
uint64_t fp_upload_started_at(const fp_upload_t *u);

/* The durable prefix the coordinator has acknowledged so far. */
uint64_t fp_upload_acked(const fp_upload_t *u);

/* Cuts the connection now, as a network failure would (done fires with ok = 0). */
void fp_upload_cut(fp_upload_t *u);

/* Frees the upload; only after done has fired. Accepts NULL. */
void fp_upload_free(fp_upload_t *u);

#endif
