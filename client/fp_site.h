/* fp_site.h — a site's session with the coordinator over one mTLS connection.
 *
 * Hello → Welcome; then, for each round the site is sampled into: a Task and its tensor
 * stream (verified against the Commit's SHA-256) are handed to ops.task; the application
 * trains (off the loop) and calls fp_site_upload (or fp_site_resume after a broken
 * connection); Acks report the durable prefix; the final Ack calls ops.stored. An Error from
 * the coordinator, or a broken connection, ends the session (ops.closed); the application
 * reconnects with a new one. */
#ifndef FP_SITE_H
#define FP_SITE_H

#include <stdint.h>
#include <uv.h>

#include "fp_adapter_stream.h"
#include "fp_conn.h"
#include "fp_msg.h"

typedef struct fp_site fp_site_t;

typedef struct fp_site_hello {
    const char *name;          /* must equal the certificate's CN */
    uint8_t model_sha256[32];
    uint32_t rank_budget;
    uint64_t samples;
    size_t chunk;              /* bytes per uploaded chunk (0: the protocol's 1 MiB) */
    int dp;                    /* this site clips and noises its updates when asked: capability
                                  "dp" (a distributed-DP federation refuses sites without it) */
    int secagg;                /* this site takes part in secure sums: capability "secagg" */
} fp_site_hello_t;

/* A federation's differential privacy as the coordinator announces it (Welcome), and in a
 * task what the site does itself (fp_dp.h): all zero when the federation has none. */
typedef struct fp_site_privacy {
    int mode;                  /* FP_DP_OFF, FP_DP_CENTRAL, FP_DP_DISTRIBUTED */
    double noise_multiplier, sample_rate, delta, epsilon_max, epsilon_spent;
    double clip;               /* task: C, this round's bound on the update vector */
    int global_rank;           /* task: the update vector's coordinates */
    double noise_stddev;       /* task, distributed: this site's share, per coordinate */
    int adaptive;              /* task: report the clip indicator */
    double count_stddev;       /* task, distributed adaptive: the indicator's noise share */
} fp_site_privacy_t;

/* A task's secure round (fp_secagg.h): present = 0 when its update goes in the clear. */
typedef struct fp_site_secagg {
    int present;
    int sites, index, degree, threshold;
    double scale, bound, weight;
    uint8_t seed[32];
    uint64_t dim;
    char strategy[16];
    int global_rank;
    int pass;                  /* exact merges: 1 the first sum (Y), 2 the second (Z) */
    int sketch_k;
    uint64_t sketch_seed;
} fp_site_secagg_t;

typedef struct fp_site_task {
    uint64_t round, task_id;
    int rank;
    double alpha;
    int rslora;
    int restart;               /* 1: fold the stream (the global update) in, train afresh */
    int freeze_a;              /* 1: train lora_B only (ffa) */
    double lr, weight_decay, prox_mu;
    int steps, batch, seq_len;
    uint64_t seed;
    int64_t deadline_unix_ms;
    const unsigned char *data; /* the stream (valid during the call) */
    uint64_t len;
    const fp_stream_tensor_t *t;
    int n;
    fp_site_privacy_t privacy;
    fp_site_secagg_t secagg;
} fp_site_task_t;

typedef struct fp_site_ops {
    void (*welcome)(void *ctx, fp_site_t *s, uint64_t round);
    void (*task)(void *ctx, fp_site_t *s, const fp_site_task_t *t);
    void (*stored)(void *ctx, fp_site_t *s, uint64_t task_id);
    /* The session ended: code is the coordinator's Error code (0: none), why says why. */
    void (*closed)(void *ctx, fp_site_t *s, int code, const char *why);
    /* Optional: a secure round's message from the coordinator (SecAggRoster, SecAggRelay,
     * SecAggUnmask), valid during the call. */
    void (*secagg)(void *ctx, fp_site_t *s, const Fedpeft__Envelope *e);
} fp_site_ops_t;

int fp_site_connect(fp_site_t **out, uv_loop_t *loop, const char *host, int port,
                    fp_tls_ctx_t *tls, const fp_conn_cfg_t *cfg, const fp_site_hello_t *hello,
                    const fp_site_ops_t *ops, void *ctx, fp_err_t *err);

typedef struct fp_site_update {
    uint64_t task_id;
    uint64_t samples;
    int rank;
    double train_loss, eval_before, eval_after, seconds;
    const unsigned char *data; /* the stream (borrowed until stored or closed) */
    uint64_t len;
    const fp_stream_tensor_t *t;
    int n;
    const uint8_t *sha256;     /* the stream's SHA-256 if known, else NULL: computed here */
    double clip_indicator;     /* distributed adaptive DP: 1[norm ≤ C] plus the noise share */
} fp_site_update_t;

/* The federation's privacy from its last Welcome (zero before one). */
const fp_site_privacy_t *fp_site_privacy(const fp_site_t *s);
/* Whether the last Welcome announced secure aggregation. */
int fp_site_secure(const fp_site_t *s);

/* Announces and sends an update (resume: continue a stream the coordinator holds part of). */
int fp_site_upload(fp_site_t *s, const fp_site_update_t *u, int resume);

/* Bytes of the current upload the coordinator has acknowledged as durable. */
uint64_t fp_site_acked(const fp_site_t *s);
/* Where the current upload began: the coordinator's durable prefix when it was announced. */
uint64_t fp_site_started_at(const fp_site_t *s);
/* Bytes handed to the connection in this session (every frame). */
uint64_t fp_site_sent(const fp_site_t *s);

/* Progress while training (keeps the session alive and tells the coordinator). */
int fp_site_heartbeat(fp_site_t *s, uint64_t task_id, int step, int total, double loss);

/* Sends a secure round's message (SecAggKeys, SecAggShares, SecAggReveal). */
int fp_site_send(fp_site_t *s, Fedpeft__Envelope *e);

/* Says Bye with a reason and closes (ops.closed follows). */
/* Tells the coordinator that this site could not train task_id (reason: at most 1000 bytes are
 * sent); the round stops waiting for it. 0 or a negative errno. */
int fp_site_task_failed(fp_site_t *s, uint64_t task_id, const char *reason);
void fp_site_bye(fp_site_t *s, const char *reason);

/* Closes the session (ops.closed follows); cut = 1 drops it as a network failure would. */
void fp_site_close(fp_site_t *s, int cut);

/* Frees a session after ops.closed. */
void fp_site_free(fp_site_t *s);

#endif
