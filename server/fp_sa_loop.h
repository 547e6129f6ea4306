/* fp_sa_loop.h — a secure round on the coordinator's loop: its machine (fp_sa_round.h) with
 * the actions that need no coordinator carried out here — the phase timer, the roster, relay
 * and unmask messages to the sites (fp_sa_wire.h), the second sum's stream Q, the round's
 * outcome told to the round machine (fp_round.h). The two that do — a Task sent again, the
 * aggregation job — go to the coordinator's host table. One secure round at a time.
 *
 *   fp_coord ──▶ fp_sa_loop ──▶ fp_sa_round (decisions), fp_sa_wire, fp_sites, fp_round */
#ifndef FP_SA_LOOP_H
#define FP_SA_LOOP_H

#include <uv.h>

#include "fp_db.h"
#include "fp_fed.h"
#include "fp_round.h"
#include "fp_sa_round.h"
#include "fp_sites.h"

typedef struct fp_sa_loop_host {
    /* Send the round's task again (an exact merge's second Task: its stream is Q). */
    void (*resend)(void *ctx, int64_t task);
    /* Run the aggregation job on *job; answer with fp_sa_round_job_done. */
    void (*start_job)(void *ctx, fp_sa_job_t *job);
    /* The timer handle is closed (fp_sa_loop_close). */
    void (*closed)(void *ctx);
} fp_sa_loop_host_t;

typedef struct fp_sa_loop fp_sa_loop_t;

int fp_sa_loop_new(fp_sa_loop_t **out, uv_loop_t *loop, fp_sites_t *sites, fp_round_t *round,
                   fp_db_t *db, const fp_sa_loop_host_t *host, void *ctx, fp_err_t *err);
/* Closes the timer (host->closed follows); then fp_sa_loop_free. */
void fp_sa_loop_close(fp_sa_loop_t *s);
void fp_sa_loop_free(fp_sa_loop_t *s);

/* A secure round n for the nt tasks t (before they are recorded: fp_sa_round_bind). */
int fp_sa_loop_begin(fp_sa_loop_t *s, int64_t n, const fp_sa_cfg_t *cfg, const fp_sa_merge_t *m,
                     const fp_round_task_t *t, int nt, fp_err_t *err);
/* The round is over (closed, expired, or never begun). */
void fp_sa_loop_end(fp_sa_loop_t *s);
/* The open secure round's machine, or NULL (these three, and fp_sa_loop_close, take a NULL
 * s: no secure round). */
fp_sa_round_t *fp_sa_loop_round(const fp_sa_loop_t *s);
/* The stream of the second sum's Tasks (Q), or NULL. */
fp_blob_t *fp_sa_loop_q(const fp_sa_loop_t *s);

/* A site's SecAgg message: 0, or the Error code to end its session with (reason). */
int fp_sa_loop_message(fp_sa_loop_t *s, const char *site, const Fedpeft__Envelope *e,
                       char *reason, size_t n);

#endif
