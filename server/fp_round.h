/* fp_round.h — the round's state machine: when a round opens, which sites it samples at what
 * rank, what each site is sent and when, when the round aggregates, expires or closes, and
 * how it resumes after a crash. No I/O, no clock, no database: events come in as calls,
 * actions go out through a table of callbacks, and time is asked of the caller. The
 * coordinator (fp_coord.c) turns actions into database writes, messages, timers and
 * thread-pool jobs; tests/test_round.c drives it alone.
 *
 *            site up (enough sites)          prepared
 *   IDLE ───────────────────────────▶ PREPARING ───────▶ OPEN ──┬── every task in, or
 *    ▲      open: record round + tasks                          │   ≥ min_updates and none
 *    │                                                          │   left to wait for, or at
 *    │   closed: record the new global                          │   the deadline
 *    ├───────────────────────────────── AGGREGATING ◀───────────┘   (aggregate)
 *    └─────────────────────────────────────────────── deadline with < min_updates (expire)
 *
 * A task is waited for until its update is stored (uploaded), it is refused or its site
 * reports failure (excluded), or its site disconnects and has not come back (gone). A site
 * not seen since a restart is waited for until the deadline.
 *
 * Under differential privacy the machine also keeps the budget: every draw of sites is a step
 * of the accountant (fp_rdp.h: sampling rate `fraction`, noise multiplier z); sites are drawn
 * independently (Poisson sampling, the accountant's assumption) with randomness the caller
 * supplies; a draw with fewer than min_updates sites opens no round but is charged all the
 * same (and the machine draws again after dp_retry_ms); and no draw happens whose step would
 * take ε past the budget — the machine says so once and opens no more rounds. */
#ifndef FP_ROUND_H
#define FP_ROUND_H

#include <stdint.h>

#include "fp_error.h"
#include "fp_strategy.h"

#define FP_ROUND_NAME_MAX 256

typedef enum fp_round_phase {
    FP_ROUND_IDLE,        /* no round: waiting for sites, or every round done */
    FP_ROUND_PREPARING,   /* opened and recorded; the task streams are being prepared */
    FP_ROUND_OPEN,        /* tasks out, uploads counted, the deadline running */
    FP_ROUND_AGGREGATING, /* uploads closed, the merge running */
} fp_round_phase_t;

const char *fp_round_phase_name(fp_round_phase_t p);

/* The settings the machine decides by (all reloadable). */
typedef struct fp_round_cfg {
    int64_t rounds;        /* rounds to run (0: forever) */
    int min_sites;         /* connected sites before a round opens */
    int min_updates;       /* stored updates before a round may aggregate */
    int max_sites;         /* sampled at most (0: no limit) */
    double fraction;       /* of the connected sites sampled: ⌈fraction·n⌉ */
    int64_t deadline_ms;   /* a round's length */
    uint64_t seed;         /* sampling and task seeds */
    fp_strategy_t strategy;
    int r_max;
    /* differential privacy (dp = 0: none) */
    int dp;
    double dp_noise;          /* z the accountant prices (the total, adaptive clipping's too) */
    double dp_delta, dp_epsilon_max;
    int64_t dp_retry_ms;      /* after a draw of too few sites */
} fp_round_cfg_t;

/* A round's opening, to record. */
typedef struct fp_round_open {
    int64_t n;
    int64_t opened_wall_ms, deadline_wall_ms;
    int64_t dp_steps;         /* under DP: the accountant's steps with this draw, */
    double dp_epsilon;        /* and ε spent with it */
} fp_round_open_t;

typedef struct fp_round_task {
    int64_t id;                     /* the database's task id */
    char site[FP_ROUND_NAME_MAX + 1];
    int rank;
    uint64_t seed;                  /* the site's training seed for this task */
    int uploaded;                   /* its update is stored */
    int excluded;                   /* refused or failed: never merged, not waited for */
    int gone;                       /* its site left during the round and has not come back */
} fp_round_task_t;

typedef struct fp_round_ops {
    /* The clock: monotonic milliseconds (deadlines) and wall milliseconds (recorded). */
    int64_t (*mono_ms)(void *ctx);
    int64_t (*wall_ms)(void *ctx);
    /* A site's rank cap (0: none). Optional. */
    int (*rank_cap)(void *ctx, const char *site);
    /* Record round o->n opening, its tasks t[0..nt) (fill in their ids). Non-zero: it does not
     * open (the machine stays idle and tries again on the next event). */
    int (*open)(void *ctx, const fp_round_open_t *o, fp_round_task_t *t, int nt);
    /* Prepare the task streams of round n at ranks[0..nr) (one stream, rank 0, for restart
     * strategies); answer with fp_round_prepared. */
    void (*prepare)(void *ctx, int64_t n, const int *ranks, int nr);
    /* Send task t to its site (connected now). */
    void (*send)(void *ctx, const fp_round_task_t *t);
    /* Call fp_round_timer in ms milliseconds (replacing an earlier request); or never. */
    void (*arm)(void *ctx, int64_t ms);
    void (*disarm)(void *ctx);
    /* Stop taking uploads of round n and merge its stored ones (resumed: a restarted
     * coordinator's round that was already aggregating); answer with fp_round_aggregated.
     * Non-zero: not done (the machine tries again in a second). */
    int (*aggregate)(void *ctx, int64_t n, int resumed);
    /* Record round n expired (why). Non-zero: not done (tried again in a second). */
    int (*expire)(void *ctx, int64_t n, const char *why);
    /* Record round n closed with what the aggregation produced. Non-zero: the machine stays
     * aggregating (the caller stops the coordinator). */
    int (*close)(void *ctx, int64_t n);
    /* Every configured round is done. Optional. */
    void (*finished)(void *ctx);
    /* Under DP: uniform randomness on [0, 1) for the draws (a cryptographic source); record a
     * draw of `drawn` sites, too few for a round, that brought the accountant to steps and
     * epsilon (non-zero: not recorded, not charged, drawn again later); the budget stops the
     * rounds: spent so far, and what the next draw would bring it to. */
    double (*uniform)(void *ctx);
    int (*draw_charged)(void *ctx, int drawn, int64_t steps, double epsilon);
    void (*exhausted)(void *ctx, int64_t steps, double spent, double next);
} fp_round_ops_t;

typedef struct fp_round fp_round_t;

int fp_round_new(fp_round_t **out, const fp_round_cfg_t *cfg, const fp_round_ops_t *ops,
                 void *ctx, fp_err_t *err);
void fp_round_free(fp_round_t *r);
void fp_round_set_cfg(fp_round_t *r, const fp_round_cfg_t *cfg); /* then fp_round_poke */

/* ---- events ---- */

/* A restarted coordinator: the last recorded round n in `phase` (OPEN or AGGREGATING; IDLE
 * when it was closed or expired), its deadline, its tasks still in play. An open round
 * prepares again (and waits the rest of its deadline); an aggregating one aggregates again. */
int fp_round_recover(fp_round_t *r, int64_t n, fp_round_phase_t phase, int64_t deadline_wall_ms,
                     const fp_round_task_t *t, int nt, fp_err_t *err);

/* Under DP: what a restarted coordinator had spent (the accountant's steps and ε). */
void fp_round_set_spent(fp_round_t *r, int64_t steps, double epsilon);

/* A site is connected and welcomed (again), with its rank budget. */
int fp_round_site_up(fp_round_t *r, const char *site, int budget);
/* A site's last session ended. */
void fp_round_site_down(fp_round_t *r, const char *site);
/* The streams are ready: tasks go out, the deadline runs. */
void fp_round_prepared(fp_round_t *r);
/* Task id's update is stored. */
void fp_round_uploaded(fp_round_t *r, int64_t id);
/* Task id will never be merged (refused, or its site could not train it). */
void fp_round_refused(fp_round_t *r, int64_t id);
/* The timer armed by ops->arm fired (perhaps early: it is armed again). */
void fp_round_timer(fp_round_t *r);
/* The merge finished: the round closes, the next may open. */
void fp_round_aggregated(fp_round_t *r);
/* The merge cannot be done (a secure round below its threshold): the round expires, why. */
void fp_round_aggregation_failed(fp_round_t *r, const char *why);
/* Something outside changed (settings reloaded): open a round if one is due. */
void fp_round_poke(fp_round_t *r);
/* The coordinator stops: no new round, no more decisions. */
void fp_round_stop(fp_round_t *r);

/* ---- state ---- */

fp_round_phase_t fp_round_phase(const fp_round_t *r);
int64_t fp_round_number(const fp_round_t *r);       /* the current round, or the last one */
int64_t fp_round_deadline_wall(const fp_round_t *r);
const fp_round_task_t *fp_round_tasks(const fp_round_t *r, int *n);
const fp_round_task_t *fp_round_task(const fp_round_t *r, int64_t id);
const fp_round_task_t *fp_round_task_of(const fp_round_t *r, const char *site);
int fp_round_uploads(const fp_round_t *r);          /* stored updates this round */
int fp_round_sites(const fp_round_t *r);            /* connected sites */
/* Uploads for round n are taken (it is open). */
int fp_round_accepts(const fp_round_t *r, int64_t n);
/* Task id is still to be sent (open, no update, not excluded). */
int fp_round_wants(const fp_round_t *r, int64_t id);
/* Under DP: the accountant's steps and the ε spent; whether the budget stopped the rounds. */
int64_t fp_round_dp_steps(const fp_round_t *r);
double fp_round_epsilon(const fp_round_t *r);
int fp_round_exhausted(const fp_round_t *r);

#endif
