/* fp_coord_priv.h — the coordinator's loop glue, shared by its parts: fp_coord.c (the
 * round's actions: records, jobs, timers; start and stop), fp_coord_sites.c (the sites'
 * sessions: Hello, task streams out, uploads in) and fp_coord_sa.c (secure rounds). Decisions are the round machine's
 * (fp_round.h); the heavy work is fp_fed.h's, on the thread pool. */
#ifndef FP_COORD_PRIV_H
#define FP_COORD_PRIV_H

#include <stdatomic.h>
#include <stdint.h>
#include <uv.h>

#include "fp_coord.h"
#include "fp_db.h"
#include "fp_fed.h"
#include "fp_msg.h"
#include "fp_round.h"
#include "fp_srv_link.h"
#include "fp_tls.h"

typedef struct site site_t;
typedef struct fp_sa_round fp_sa_round_t; /* fp_coord_sa.c */

/* One session of a site (a site reconnecting may briefly have two). */
struct site {
    fp_coord_t *co;
    fp_srv_peer_t *peer;
    int closed;
    int welcomed;
    char name[FP_MAX_NAME + 1];
    char fpr[65];
    uint32_t budget;
    uint64_t samples;
    /* the task being sent */
    fp_blob_t *tx;
    int64_t tx_task;
    uint64_t tx_off;
    int tx_commit;
    int64_t tx_next;          /* a task to send once the stream in flight is out (0: none) */
    /* the upload being received (read by verify on a worker while a job runs) */
    int64_t up_task;
    int up_rank;
    fp_stream_tensor_t *up_t;
    int up_n;
    fp_blob_t *up_start;
    double up_bound;
    int up_clip;
    double up_dp_clip, up_dp_share; /* the round's clip bound, a site's noise share */
    int up_secure;            /* a masked vector of up_dim floats' words (secure round) */
    size_t up_dim;
    int up_pass;              /* which of the round's sums it is in (exact merges: 1 or 2) */
    Fedpeft__Privacy welcome_privacy;
    site_t *next, *prev;
};

/* The coordinator's one round-level job at a time, on the thread pool. */
typedef enum job_kind { JOB_NONE, JOB_PREPARE, JOB_AGGREGATE } job_kind_t;

struct fp_coord {
    uv_loop_t *loop;
    fp_srv_config_t *cfg;
    fp_fed_t fed;
    fp_db_t *db;
    fp_round_t *round;
    fp_tls_ctx_t *tls;
    fp_listener_t *lis;
    fp_srv_link_t link;
    uint8_t model_sha[32];
    unsigned targets;
    site_t *sites;            /* live sessions */
    /* the round's resources (the machine decides, these are what its actions made) */
    char global_sha[65];      /* the global adapter the round starts from */
    int global_rank;
    fp_blob_t **blobs;        /* one stream per distinct rank of the round */
    int nblobs;
    int64_t sent_bytes;       /* adapter bytes sent to sites this round (bytes_out at close;
                                 a restarted coordinator counts from its restart) */
    uv_timer_t timer;         /* the machine's timer (the round's deadline) */
    int64_t timer_early_ms;   /* tests: arm the timer this much early, as a timer armed from
                                 a stale loop time fires (FEDPEFT_TEST_TIMER_EARLY_MS) */
    uv_timer_t tick;          /* watchdog, status */
    /* the job */
    uv_work_t work;
    job_kind_t job;
    int64_t job_round;
    int *job_ranks;
    int job_nranks;
    fp_blob_t **job_blobs;
    fp_agg_in_t agg;
    fp_agg_out_t agg_out;
    int job_rc;
    fp_err_t job_err;
    int lock_fd;              /* STATE/lock, held while the coordinator lives */
    /* differential privacy */
    double dp_clip;           /* C: the bound of the round open (or the next) */
    double dp_z_update;       /* z_Δ: the update's own noise multiplier (z without adaptive
                                 clipping's share) */
    fp_noise_t *draw_rng;     /* the loop's: Poisson draws */
    fp_noise_t *job_rng;      /* the jobs': the aggregate's noise */
    /* secure aggregation: the open round's, and what its aggregation job unmasks with */
    fp_sa_round_t *sa;
    fp_sa_job_t sa_job;
    uv_timer_t sa_timer;      /* its phases' time */
    /* stopping */
    int stopping, done_called, handles_open;
    int started;              /* the first tick has poked the round machine */
    void (*on_done)(void *ctx, int rc);
    void *done_ctx;
    int exit_rc;
    /* counters */
    _Atomic uint64_t c_closed, c_expired, c_connected, c_accepted, c_bytes_in, c_bytes_out;
    _Atomic uint64_t c_refused[16];
    _Atomic uint64_t c_hs_refused, c_revoked, c_reloads, c_limited, c_conns, c_startups;
    _Atomic int64_t c_round;
    _Atomic uint64_t c_epsilon_bits; /* ε spent, a double's bits */
    double agg_total, agg_last;
    int64_t st_round, st_ms;  /* the last STATUS sent */
    int st_phase;
    int64_t refused_window;   /* refused handshakes: the minute being counted, */
    int refused_logged;       /* lines logged in it, */
    uint64_t refused_quiet;   /* and refusals not logged since the last line */
};

/* fp_coord.c */
void fp__coord_status(fp_coord_t *co);          /* tells the service manager, rate-limited */
void fp__coord_finish_stop(fp_coord_t *co);     /* once nothing is left running */
fp_blob_t *fp__coord_blob(fp_coord_t *co, int rank);
/* Distributed DP: a site's noise share per coordinate, z_Δ·C/√min_updates (0 otherwise). */
double fp__coord_dp_share(const fp_coord_t *co);

/* Starts the aggregation job of the round in co->agg (a secure round, once unmasked). */
void fp__coord_start_aggregate(fp_coord_t *co);

/* fp_coord_sa.c: secure rounds */
/* A secure round for the nt sites of tasks t (before they are recorded), then their ids. */
int fp__coord_sa_begin(fp_coord_t *co, int64_t round, const fp_round_task_t *t, int nt,
                       fp_err_t *err);
void fp__coord_sa_bind(fp_coord_t *co, const fp_round_task_t *t, int nt);
/* Whether task's masked upload is welcome now (its round is in the input phase and it
 * shared its secrets). */
int fp__coord_sa_accepts(const fp_coord_t *co, int64_t task);
void fp__coord_sa_end(fp_coord_t *co);
void fp__coord_sa_task(fp_coord_t *co, int64_t task, Fedpeft__SecAgg *m);
int fp__coord_sa_secure(const fp_coord_t *co, int64_t task, size_t *dim);
int fp__coord_sa_message(fp_coord_t *co, site_t *s, const Fedpeft__Envelope *e, char *reason,
                         size_t n);
void fp__coord_sa_site_down(fp_coord_t *co, const char *site);
void fp__coord_sa_uploaded(fp_coord_t *co, int64_t task);
int fp__coord_sa_unmask(fp_coord_t *co, fp_err_t *err);
/* Exact merges: which sum runs (0: no secure round, 1, 2); pass 2's stream (Q), else NULL;
 * after pass 1's job (the bases made): the second sum starts. */
int fp__coord_sa_pass(const fp_coord_t *co);
fp_blob_t *fp__coord_sa_qblob(fp_coord_t *co);
int fp__coord_sa_second(fp_coord_t *co, fp_err_t *err);
void fp__coord_sa_job_free(fp_sa_job_t *j);
void fp__coord_sa_counts(const fp_coord_t *co, char *out, size_t n);

/* fp_coord_sites.c */
int fp__coord_send_env(site_t *s, Fedpeft__Envelope *e);
extern const fp_srv_sess_ops_t fp__coord_sess_ops;
void fp__coord_peer_open(fp_srv_peer_t *p);
void fp__coord_peer_close(fp_srv_peer_t *p, const char *why);
void fp__coord_peer_free(fp_srv_peer_t *p);
void fp__coord_peer_drain(fp_srv_peer_t *p);
void fp__coord_on_refused(void *ctx, const char *peer, const char *cn, const char *why);
site_t *fp__coord_live_site(fp_coord_t *co, const char *name);
void fp__coord_send_task(fp_coord_t *co, site_t *s, const fp_round_task_t *t);

#endif
