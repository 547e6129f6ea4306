/* fp_sites.h — the coordinator's sites: the listener, each site's sessions (Hello and
 * Welcome, task streams out, uploads in) and the directory of the sites connected now.
 *
 * It knows the federation (fp_fed.h), the settings and the database, and nothing of the
 * coordinator's state: what depends on the round it asks through fp_sites_events_t (which
 * fp_coord.c implements), and the coordinator reaches sites only through the functions below
 * (the directory). An update refused after its stream was verified reaches the round through
 * the `refused` event, not through the connection's end. */
#ifndef FP_SITES_H
#define FP_SITES_H

#include <stdint.h>
#include <uv.h>

#include "fp_announce.h"
#include "fp_db.h"
#include "fp_fed.h"
#include "fp_msg.h"
#include "fp_sa_round.h"
#include "fp_srv_config.h"

typedef struct fp_sites fp_sites_t;

typedef struct fp_sites_events {
    /* A site was welcomed (with its rank budget), or its last session ended. */
    int (*up)(void *ctx, const char *site, int budget);
    void (*down)(void *ctx, const char *site);
    /* The round and privacy a Welcome states: fills current_round and, under DP, *pv. */
    void (*welcome)(void *ctx, Fedpeft__Welcome *w, Fedpeft__Privacy *pv);
    /* What an upload for task may be (see fp_upload_gate_t). */
    void (*gate)(void *ctx, const char *site, int64_t task, fp_upload_gate_t *g);
    /* The stream an update of that rank started from (continue strategies; NULL: none). */
    fp_blob_t *(*start)(void *ctx, int rank);
    /* Task's update is stored (pass 2: the second sum's masked Z); task will never be merged
     * (verified and refused, or its site's trainer failed). */
    void (*stored)(void *ctx, int64_t task, int pass);
    void (*refused)(void *ctx, int64_t task);
    /* Site says its trainer failed on task: 1 if the round waits for that task (it is then
     * recorded as refused), 0 to ignore it. */
    int (*task_failed)(void *ctx, const char *site, int64_t task);
    /* A SecAgg message: 0 or an Error code (reason). */
    int (*secagg)(void *ctx, const char *site, const Fedpeft__Envelope *e, char *reason,
                  size_t n);
    /* A stream went out; task `next` waited for it (send it now, if it is still wanted). */
    void (*stream_out)(void *ctx, const char *site, int64_t next);
    /* Something a status line shows changed. */
    void (*changed)(void *ctx);
    /* Stopping, and the last session is gone. */
    void (*empty)(void *ctx);
} fp_sites_events_t;

/* A Task to send: everything but the hyperparameters and the federation's constants. */
typedef struct fp_task_out {
    int64_t round, id;
    int rank;
    uint64_t seed;
    int64_t deadline_wall_ms;
    fp_blob_t *blob;                 /* the stream (a reference is taken) */
    const Fedpeft__Privacy *privacy; /* NULL: none */
    const fp_sa_task_info_t *secure; /* NULL: in the clear */
} fp_task_out_t;

/* Counters (read from any thread). */
typedef struct fp_sites_counts {
    uint64_t connected, accepted, bytes_in, bytes_out, refused[16];
    uint64_t handshakes_refused, revoked_dropped, reloads, limited, connections, startups;
} fp_sites_counts_t;

/* Listens on cfg->listen with mutual TLS (cfg, fed and db are borrowed for the sites' life;
 * model_sha is the base model's hash, targets the federation's target mask). *host receives
 * the address listened on. */
int fp_sites_start(fp_sites_t **out, uv_loop_t *loop, const fp_srv_config_t *cfg,
                   const fp_fed_t *fed, fp_db_t *db, const uint8_t model_sha[32],
                   unsigned targets, const fp_sites_events_t *ev, void *ctx, char *host,
                   size_t hn, fp_err_t *err);
int fp_sites_port(const fp_sites_t *s);
/* SIGHUP: certificates and CRL; the sessions of revoked sites end. */
int fp_sites_reload(fp_sites_t *s, unsigned *dropped, fp_err_t *err);
/* No new sessions; each site is told the coordinator is shutting down. `empty` fires once the
 * last session is gone (at once if none). */
void fp_sites_stop(fp_sites_t *s);
int fp_sites_empty(const fp_sites_t *s);
void fp_sites_counts(const fp_sites_t *s, fp_sites_counts_t *o);
void fp_sites_free(fp_sites_t *s);

/* ---- the directory ---- */

/* Whether site is connected and welcomed; its sample count (0: unknown). */
int fp_sites_live(const fp_sites_t *s, const char *site);
uint64_t fp_sites_samples(const fp_sites_t *s, const char *site);
/* Sends site a Task and its stream: 0 sent (*bytes: the stream's), 1 queued behind the stream
 * in flight (stream_out asks again), < 0 not sent. */
int fp_sites_send_task(fp_sites_t *s, const char *site, const fp_task_out_t *t, uint64_t *bytes);
/* Sends site one message. */
int fp_sites_send(fp_sites_t *s, const char *site, Fedpeft__Envelope *e);
/* Site's certificate (DER, malloc'd). */
int fp_sites_cert(const fp_sites_t *s, const char *site, unsigned char **der, size_t *n);

#endif
