/* fp_srv_sess.h — the coordinator's side of one site's session, above the transport.
 *
 * Frames come in (fp_srv_sess_frame); replies go out through ops.send. Every envelope is
 * bounded (fp_msg_check) and must come in order (fp_msg_order): Hello first; then Heartbeats,
 * Updates and Resumes; during an upload only TensorChunks, Heartbeats and the Commit. Any
 * violation is answered with an Error naming it and ends the session (the transport closes
 * that connection only). Uploads are spooled to disk (fp_stream_rx): an Ack is sent each time
 * ack_every more bytes are durable, and after the Commit once the stream is verified and in
 * place — nothing is acknowledged before it is durable. A Resume after a broken connection
 * continues from the last durable offset.
 *
 * The disk work (opening or resuming a spool, writing and hashing chunks, syncing, verifying
 * and renaming) never runs inside fp_srv_sess_frame: it collects into a job that the driver
 * runs off the event loop —
 *
 *     on the loop:   if (fp_srv_sess_job_ready(s)) { fp_srv_sess_job_begin(s); queue it; }
 *     on a worker:   fp_srv_sess_job_run(s);
 *     on the loop:   rc = fp_srv_sess_job_end(s);   (Acks, the committed callback, Errors)
 *
 * — or inline with fp_srv_sess_drive. Chunks keep arriving while a job runs; frames that need
 * the job's outcome first (after an Update, a Resume or a Commit) wait in the session, and
 * fp_srv_sess_wants_pause tells the driver to stop reading until it catches up. Only one job
 * runs at a time per session; a job touches nothing but its session's stream. */
#ifndef FP_SRV_SESS_H
#define FP_SRV_SESS_H

#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"
#include "fp_msg.h"
#include "fp_stream.h"

#define FP_REASON_MAX 256

typedef struct fp_srv_sess_ops {
    /* A Hello: fill w and return 0 to welcome the site, or return an Error code and a reason
     * to refuse it. */
    int (*hello)(void *ctx, const Fedpeft__Hello *h, Fedpeft__Welcome *w, char *reason,
                 size_t n);
    /* An Update announcing an upload: return 0 with the path the stream goes to once
     * verified, or an Error code (LATE, DUPLICATE, INVALID_UPDATE, ...) with a reason. */
    int (*update)(void *ctx, const Fedpeft__Update *u, char *final_path, size_t path_n,
                  char *reason, size_t n);
    /* A Resume of stream id: return 0 with its total size and final path, or an Error code. */
    int (*resume)(void *ctx, uint64_t id, uint64_t *total, char *final_path, size_t path_n,
                  char *reason, size_t n);
    /* Optional, on the job's thread (off the event loop) as the spool of an announced or
     * resumed upload opens, before the first Ack: record what must be durable first, and give
     * the bytes the spool file starts with (*out malloc'd, *len a multiple of FP_STREAM_ALIGN;
     * none: *len 0) so that the stream completes a file (fp_stream_rx_open). 0, or an Error
     * code and a reason, which refuses the upload. */
    int (*opening)(void *ctx, uint64_t id, char **out, size_t *len, char *reason, size_t n);
    /* The stream is verified and at its path: record it (durably) and return 0 to
     * acknowledge it, or an Error code. */
    int (*committed)(void *ctx, uint64_t id, const char *path, char *reason, size_t n);
    /* Optional: a Heartbeat arrived. */
    void (*heartbeat)(void *ctx, const Fedpeft__Heartbeat *h);
    /* Queues bytes for the peer; 0 or a negative errno. */
    int (*send)(void *ctx, const unsigned char *frame, size_t len);
    /* Optional, called on the job's thread (off the event loop) once the stream is verified
     * and at its path, before committed: check and record what arrived (the application's
     * heavy work). 0, or an Error code and a reason, which refuses the upload. */
    int (*verify)(void *ctx, uint64_t id, const char *path, const uint8_t sha256[32],
                  char *reason, size_t n);
    /* Optional, on the loop: verify refused stream id with code (the session ends next). */
    void (*rejected)(void *ctx, uint64_t id, int code);
    /* Optional: the Welcome has been queued (what the application sends now follows it). */
    void (*welcomed)(void *ctx);
    /* Optional: the site reports that it could not train a task. */
    void (*task_failed)(void *ctx, const Fedpeft__TaskFailed *f);
    /* Optional: a secure round's message (SecAggKeys, SecAggShares, SecAggReveal): 0, or an
     * Error code and a reason, which ends the session. */
    int (*secagg)(void *ctx, const Fedpeft__Envelope *e, char *reason, size_t n);
} fp_srv_sess_ops_t;

typedef struct fp_sess_item fp_sess_item_t; /* a queued chunk or a waiting frame */

/* Disk work for one job, in this order: open the stream, write chunks, sync, finish. */
typedef struct fp_sess_job {
    int open;                /* open (or resume) stream id of total bytes */
    uint64_t id, total;
    fp_sess_item_t *chunks, **tail;
    size_t bytes;            /* of chunks */
    int sync;                /* make what was written durable */
    int finish;              /* verify sha256 and move into final_path */
    uint8_t sha256[32];
    int rc;                  /* outcome (job_run) */
    int vcode;               /* opening's or verify's Error code (0: accepted) */
    char vreason[FP_REASON_MAX];
    fp_err_t err;
} fp_sess_job_t;

typedef struct fp_srv_sess {
    fp_srv_sess_ops_t ops;
    void *ctx;
    const char *spool_dir;   /* where partial uploads live */
    uint64_t ack_every;      /* bytes between durable Acks during an upload */
    size_t max_backlog;      /* queued chunk bytes above which the driver should pause */
    fp_pstate_t state;
    fp_stream_rx_t rx;       /* the upload in progress (owned by the running job, if any) */
    char final_path[4096];
    uint64_t last_ack;
    /* the loop's view of the upload */
    uint64_t stream_id, total, expected; /* next offset a chunk must have */
    uint64_t since_sync;     /* bytes queued since the last sync was asked for */
    int opening;             /* an open job is queued or running: no chunks yet */
    int committing;          /* a finish job is queued or running */
    /* jobs */
    fp_sess_job_t next;      /* being collected on the loop */
    fp_sess_job_t run;       /* handed to the driver */
    int busy;                /* run is out (begin .. end) */
    fp_sess_item_t *waiting, **waiting_tail; /* frames held until a job's outcome is known */
    size_t waiting_bytes;
    int over;                /* an Error or Bye went out or came in: close after flushing */
    Fedpeft__Error__Code code; /* why it is over, when we ended it (0 otherwise) */
    char reason[FP_REASON_MAX];
    uint64_t frames, refused;
} fp_srv_sess_t;

void fp_srv_sess_init(fp_srv_sess_t *s, const fp_srv_sess_ops_t *ops, void *ctx,
                      const char *spool_dir, uint64_t ack_every);

/* Feeds one frame payload. Returns 0 while the session goes on, 1 once it is over (the
 * caller flushes what was sent and closes), or a negative errno when a reply could not be
 * queued. */
int fp_srv_sess_frame(fp_srv_sess_t *s, const unsigned char *p, size_t n);

/* 1 when no job is out and one is waiting to start. */
int fp_srv_sess_job_ready(const fp_srv_sess_t *s);
/* Hands the collected work to the job (the loop's thread). */
void fp_srv_sess_job_begin(fp_srv_sess_t *s);
/* Does the job's disk work. Any thread; one at a time per session. */
void fp_srv_sess_job_run(fp_srv_sess_t *s);
/* Back on the loop's thread: sends Acks, calls committed, replays frames that waited for
 * the job. Returns like fp_srv_sess_frame. */
int fp_srv_sess_job_end(fp_srv_sess_t *s);
/* Runs jobs inline until none is ready (tests, tools). Returns like fp_srv_sess_frame. */
int fp_srv_sess_drive(fp_srv_sess_t *s);

/* 1 when the driver should stop reading this connection until a job ends: too many chunk
 * bytes queued, or frames waiting for a job's outcome. */
int fp_srv_sess_wants_pause(const fp_srv_sess_t *s);

/* Ends the session from outside (timeout, shutdown): sends Error code/reason (if not over). */
void fp_srv_sess_end(fp_srv_sess_t *s, Fedpeft__Error__Code code, const char *reason);

/* Releases the session; a partial upload stays spooled for a resume. Never while a job is
 * out (between job_begin and job_end). */
void fp_srv_sess_free(fp_srv_sess_t *s);

#endif
