/* fp_coord.h — the coordinator: sites, rounds, aggregation, on one libuv loop.
 *
 * Round flow (DESIGN.md): when at least min_sites are connected and welcomed, a round opens —
 * its row and one task per sampled site are committed to the database first — and each
 * site receives a Task with the global adapter at its rank (or, for restart strategies, the
 * accumulated global update) as a tensor stream. Uploads are spooled and verified off the
 * loop; an update is acknowledged only once its file and its row are durable. The round
 * closes when every sampled site still connected has reported (at least min_updates), or at
 * the deadline; it is aggregated off the loop, the new global adapter is written
 * content-addressed and then the round is closed in the database, in that order, so a crash
 * at any point restarts into a consistent state: an open round resumes, an aggregating round
 * is aggregated again from the same durable updates. */
#ifndef FP_COORD_H
#define FP_COORD_H

#include <stdint.h>
#include <uv.h>

#include "fp_error.h"
#include "fp_srv_config.h"

typedef struct fp_coord fp_coord_t;

/* Counters for metrics and status (read from any thread). */
typedef struct fp_coord_stats {
    uint64_t rounds_closed, rounds_expired;
    uint64_t sites_connected;
    uint64_t updates_accepted;
    uint64_t refused[16];      /* by Error code */
    uint64_t bytes_in, bytes_out;
    double agg_seconds_total, agg_seconds_last;
    int64_t round;             /* the open (or last) round */
    uint64_t handshakes_refused, revoked_dropped, reloads;
    uint64_t connections_limited;  /* closed at once by the connection limits */
    uint64_t connections, startups; /* now: all, and those in their handshake */
    int dp;                    /* differential privacy on: */
    double epsilon, epsilon_max, delta; /* spent, the budget */
} fp_coord_stats_t;

/* Opens the state directory and database (creating the federation on first start), resumes
 * whatever round was in progress, starts listening. cfg is borrowed for the coordinator's
 * life (its reloadable values may change between calls on the loop). on_done (optional) is
 * called once the coordinator has stopped (fp_coord_stop, or exit_when_done). */
int fp_coord_start(fp_coord_t **out, uv_loop_t *loop, fp_srv_config_t *cfg,
                   void (*on_done)(void *ctx, int rc), void *ctx, fp_err_t *err);

/* The port sites connect to (useful with port 0). */
int fp_coord_port(const fp_coord_t *co);

/* Graceful stop: no new sessions or rounds, sites are told (Error SHUTTING_DOWN), running
 * disk work and aggregation finish; on_done fires when nothing is left. */
void fp_coord_stop(fp_coord_t *co);

/* SIGHUP: certificates and CRL (sessions of revoked sites end), then reloadable settings
 * (fresh is a newly loaded configuration; its reloadable values are taken). */
void fp_coord_reload(fp_coord_t *co, fp_srv_config_t *fresh);

void fp_coord_stats(fp_coord_t *co, fp_coord_stats_t *out);

/* Frees a stopped coordinator. */
void fp_coord_free(fp_coord_t *co);

#endif
