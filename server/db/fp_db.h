/* fp_db.h — the coordinator's database: the one owner of its schema and of every statement.
 *
 * STATE/fedpeft.db in WAL mode with synchronous=FULL (a committed transaction survives a
 * crash), schema versioned by PRAGMA user_version and migrated on open (fp_db.c holds the
 * history). Tables (DESIGN.md):
 *   federation  one row: name, strategy, base model hash, ranks, the settings at creation
 *   site        one row per site ever seen (name = certificate CN, fingerprint, budget)
 *   round       one row per round: state open → aggregating → closed (or expired), the
 *               global adapter it started from and the one it produced, totals
 *   task        one row per site per round: assigned rank, state assigned → uploading →
 *               uploaded → merged (or dropped, refused, late), samples, metrics, the update
 *   event       audit trail: refusals, drops, reloads, starts and stops
 *   privacy     one row under differential privacy: the mechanism (fixed at creation), the
 *               current clip bound, the accountant's steps and the ε spent
 * Adapters live in STATE/adapters/<sha256>.safetensors, uploads in STATE/updates/<task>.*;
 * the database refers to both by name, and refers to a file only after the file is durable.
 *
 * Every function here is one statement or one transaction, named for what it records or
 * reads; nothing outside server/db/ sees SQL or SQLite. One connection serves the event loop
 * and worker threads alike (each call holds the connection's lock). Read-only opens never
 * write, so `fedpeft status`, `report`, `sim` and the benchmarks read beside a running
 * coordinator. Lookups return 1 (found), 0 (not found) or a negative code. */
#ifndef FP_DB_H
#define FP_DB_H

#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"

#define FP_DB_FILE "fedpeft.db"
#define FP_DB_NAME_MAX 256    /* site names (certificate CNs) */

struct json_t;
typedef struct fp_db fp_db_t;

typedef enum fp_db_round_state {
    FP_DB_ROUND_OPEN, FP_DB_ROUND_AGGREGATING, FP_DB_ROUND_CLOSED, FP_DB_ROUND_EXPIRED
} fp_db_round_state_t;

typedef enum fp_db_task_state {
    FP_DB_TASK_ASSIGNED, FP_DB_TASK_UPLOADING, FP_DB_TASK_UPLOADED, FP_DB_TASK_MERGED,
    FP_DB_TASK_DROPPED, FP_DB_TASK_REFUSED, FP_DB_TASK_LATE
} fp_db_task_state_t;

const char *fp_db_task_state_name(fp_db_task_state_t s);

/* Opens (creating and migrating unless read-only) STATE/fedpeft.db. A new database file is
 * created 0600: it is the daemon's alone (its WAL takes the same mode). */
int fp_db_open(fp_db_t **out, const char *state_dir, int readonly, fp_err_t *err);
void fp_db_close(fp_db_t *db);

/* ---- the federation (one row, fixed at creation) ---- */

typedef struct fp_db_federation {
    char name[256], strategy[32], base_model_sha256[65], targets[512];
    int64_t r_max, seed, created_ms;
    double alpha;
    int rslora;
    /* from the settings recorded at creation ("" when not recorded) */
    char base_model_config[4096]; /* the config.json the federation was created with */
    char base_model[4096];        /* the model's name or directory (adapters name it) */
} fp_db_federation_t;

int fp_db_federation_get(fp_db_t *db, fp_db_federation_t *out, fp_err_t *err);

/* Under differential privacy: the mechanism and what it has spent. */
typedef struct fp_db_privacy {
    char mode[16];                /* central | distributed */
    double noise_multiplier, sample_rate, delta, epsilon_max, count_stddev;
    int adaptive;
    double clip;                  /* the bound the next round uses */
    int64_t steps;                /* the accountant's steps: every draw of sites so far */
    double epsilon;               /* spent after them */
    int64_t exhausted_ms;         /* when the budget stopped the rounds (0: not yet) */
    int64_t min_updates;          /* the updates a round needs: the noise shares' size (0:
                                     not recorded, a federation created before schema 3) */
} fp_db_privacy_t;

/* Records the federation and its round 0, closed, whose global adapter is the initial one;
 * with privacy (NULL: none), its mechanism. One transaction. */
int fp_db_federation_create(fp_db_t *db, const fp_db_federation_t *f, const char *initial_sha,
                            int initial_rank, const fp_db_privacy_t *privacy, fp_err_t *err);

int fp_db_privacy_get(fp_db_t *db, fp_db_privacy_t *out, fp_err_t *err);

/* A draw of sites that sampled too few for a round: the accountant's step, charged. */
int fp_db_privacy_draw(fp_db_t *db, int64_t steps, double epsilon, fp_err_t *err);

/* The budget stops the rounds (recorded once). */
int fp_db_privacy_exhausted(fp_db_t *db, fp_err_t *err);

/* ---- rounds ---- */

typedef struct fp_db_round {
    int64_t n;
    fp_db_round_state_t state;
    int64_t opened_ms, deadline_ms, closed_ms;    /* 0 when not recorded */
    int64_t updates, samples, bytes_in, bytes_out;
    double eval_loss_before, eval_loss_after;     /* NAN when not recorded */
    double agg_seconds;                           /* NAN when not recorded */
    char global_adapter[65];                      /* "" until closed */
    int global_rank;
    double clip, epsilon;                         /* under privacy: its C, ε with its draw */
    int secure;                                   /* opened under secure aggregation */
} fp_db_round_t;

int fp_db_round_get(fp_db_t *db, int64_t n, fp_db_round_t *out, fp_err_t *err);
int fp_db_round_last(fp_db_t *db, fp_db_round_t *out, fp_err_t *err);
int fp_db_round_last_closed(fp_db_t *db, fp_db_round_t *out, fp_err_t *err);

/* One site's task in a round being opened; id is filled in. */
typedef struct fp_db_assign {
    const char *site;
    int rank;
    uint64_t seed;
    int64_t id;
} fp_db_assign_t;

/* Under privacy, a round's draw: the accountant's steps and ε with it, the clip bound. */
typedef struct fp_db_draw {
    int64_t steps;
    double epsilon, clip;
} fp_db_draw_t;

/* Round n opens from global adapter start_sha with tasks t[0..n) (and under privacy its draw,
 * charged in the same transaction; NULL: none). One transaction. */
int fp_db_round_open(fp_db_t *db, int64_t n, int64_t opened_ms, int64_t deadline_ms,
                     const char *start_sha, fp_db_assign_t *t, int nt, const fp_db_draw_t *dp,
                     int secure, fp_err_t *err);

/* Round n expires (why is recorded); its unfinished tasks are dropped. One transaction. */
int fp_db_round_expire(fp_db_t *db, int64_t n, const char *why, fp_err_t *err);

/* Round n stops taking uploads: aggregating, tasks without an update dropped. */
int fp_db_round_aggregating(fp_db_t *db, int64_t n, fp_err_t *err);

/* Round n closes with global adapter sha (rank), its totals summed from its stored updates,
 * which become merged; clip_next (not NAN) is the clip bound from here on. One transaction. */
int fp_db_round_close(fp_db_t *db, int64_t n, const char *global_sha, int rank,
                      double agg_seconds, int64_t bytes_out, double clip_next, fp_err_t *err);

/* ---- tasks ---- */

typedef struct fp_db_task {
    int64_t id, round;
    char site[FP_DB_NAME_MAX + 1];
    int rank;
    uint64_t seed;
    fp_db_task_state_t state;
    int64_t stream_bytes, samples;
    char *tensors;            /* the upload's tensor list (JSON), malloc'd; NULL if none */
} fp_db_task_t;

int fp_db_task_get(fp_db_t *db, int64_t id, fp_db_task_t *out, fp_err_t *err);

/* The tasks of round n still in play (assigned, uploading, uploaded), by id; tensors NULL. */
int fp_db_round_tasks(fp_db_t *db, int64_t n, fp_db_task_t **out, int *count, fp_err_t *err);

/* The stored updates of round n, by site. */
typedef struct fp_db_stored {
    int64_t id, samples;
    int rank;
    double clip_bit;              /* NAN when not recorded */
} fp_db_stored_t;
int fp_db_round_uploads(fp_db_t *db, int64_t n, fp_db_stored_t **out, int *count,
                        fp_err_t *err);

/* The tasks of round n that ended without an update (refused, dropped). */
int fp_db_round_unfinished(fp_db_t *db, int64_t n, int64_t **ids, int *count, fp_err_t *err);

/* Progress of round n: tasks with a stored update, and all its tasks. */
int fp_db_round_progress(fp_db_t *db, int64_t n, int64_t *done, int64_t *all, fp_err_t *err);
/* Round n's refused tasks: *count, and the first one's site and reason in why ("" if none). */
int fp_db_round_refused(fp_db_t *db, int64_t n, int64_t *count, char *why, size_t why_n,
                        fp_err_t *err);

/* An upload is announced: the task becomes uploading with what the site reported. */
typedef struct fp_db_upload {
    int64_t stream_bytes, samples;
    double train_loss, eval_loss_before, eval_loss_after, train_seconds; /* NAN: not sent */
    const char *tensors;      /* tensor list as JSON */
    double clip_bit;          /* distributed adaptive DP: the site's noised clip indicator */
} fp_db_upload_t;
/* Task id's upload announced: 1 recorded; 0 not — the task ended (refused, dropped) or its round
 * is no longer open since it was checked; or < 0. */
int fp_db_task_uploading(fp_db_t *db, int64_t id, const fp_db_upload_t *u, fp_err_t *err);

/* The update of task id is durable: recorded as uploaded, if it is uploading and its round
 * still open (clip_bit: under central privacy 1[norm ≤ C]; NAN keeps what was announced).
 * 1 recorded, 0 too late (the round closed), negative on error. */
int fp_db_task_uploaded(fp_db_t *db, int64_t id, const char *sha_hex, double norm, int clipped,
                        double clip_bit, fp_err_t *err);

/* Task id ends unmerged (refused or late) with a reason, if it is assigned or uploading. */
int fp_db_task_end(fp_db_t *db, int64_t id, fp_db_task_state_t state, const char *error,
                   fp_err_t *err);

/* ---- sites and events ---- */

/* A site said Hello: recorded (first time) or updated, its connections counted. Bookkeeping:
 * committed without a flush of its own (durable with the next durable commit). */
int fp_db_site_seen(fp_db_t *db, const char *name, const char *fingerprint, int64_t budget,
                    int64_t samples, fp_err_t *err);

/* Appends an event to the audit trail (round < 0: the latest round). Best effort: a failure
 * is not reported (the trail must never stop the coordinator), and committed without a flush
 * of its own (durable with the next durable commit: a machine's crash may lose the last). */
void fp_db_event(fp_db_t *db, int64_t round, const char *site, const char *kind,
                 const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* ---- views for people (fedpeft status, report) ---- */

/* {federation, privacy (null without), rounds (the last max_rounds, 0: all, oldest first),
 * sites (with tasks merged, refused, dropped), refusals (the last ten), metrics (totals)};
 * null federation if none. */
int fp_db_status(fp_db_t *db, int64_t max_rounds, struct json_t **out, fp_err_t *err);

/* {federation, privacy, sites, rounds (from 1), tasks (every one)}: what the report draws. */
int fp_db_history(fp_db_t *db, struct json_t **out, fp_err_t *err);

#endif
